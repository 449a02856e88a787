"""`fluxgymctl top` in a real pseudo-terminal: it draws the jobs, follows a job's progress
from the events stream, opens the log on enter and quits on q; off a terminal it prints one
plain snapshot."""
from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time

from conftest import FAST
from fluxgymd.testing import write_job

PY = sys.executable


def read_until(fd: int, needle: str, timeout: float, seen: list[str]) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        r, _, _ = select.select([fd], [], [], 0.1)
        if r:
            try:
                seen.append(os.read(fd, 65536).decode("utf-8", "replace"))
            except OSError:
                break
        if needle in "".join(seen):
            return "".join(seen)
    screen = "".join(seen)[-3000:]
    raise AssertionError(f"{needle!r} not shown within {timeout}s; screen:\n{screen}")


def test_top_draws_jobs_live_opens_a_log_and_quits(daemon_factory, short_tmp):
    d = daemon_factory(**FAST).start()
    script = ("import time\nfor i in range(1, 601):\n"
              "    print(f'steps: {i}/600 [00:01<00:01, 5.00it/s, loss={1 / i:.4f}]', flush=True)\n"
              "    time.sleep(0.05)\n")
    d.submit(write_job(short_tmp, "ticker", [PY, "-c", script]))
    d.wait_state("ticker", "running")
    pid, fd = pty.fork()
    if pid == 0:
        os.environ.update(COLUMNS="140", LINES="40", TERM="xterm")
        os.execv(PY, [PY, "-m", "fluxgymctl", "--runtime-dir", str(d.runtime_dir), "top"])
    seen: list[str] = []
    try:
        screen = read_until(fd, "ticker", 20, seen)
        assert "fluxgymd top" in screen and "running" in screen
        # progress arrives through events: a later step shows without a key press
        first = max(int(x) for x in __import__("re").findall(r"(\d+)/600", screen))
        seen.clear()
        read_until(fd, f"{first + 20}/600", 20, seen)
        os.write(fd, b"\r")
        read_until(fd, "log of job 1 (ticker)", 10, seen)
        os.write(fd, b"q")
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        pid = 0
    finally:
        if pid:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        os.close(fd)
    d.ctl("cancel", "ticker", check=True)


def test_top_off_a_terminal_prints_one_snapshot(daemon, short_tmp):
    daemon.submit(write_job(short_tmp, "quick", [PY, "-c", "print('1/1 [00:00<00:00]')"]))
    daemon.wait_state("quick", "succeeded")
    r = subprocess.run([PY, "-m", "fluxgymctl", "--runtime-dir", str(daemon.runtime_dir), "top"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "quick" in r.stdout and "succeeded" in r.stdout
    assert "\x1b[" not in r.stdout  # plain text
    assert "GPUs: no figures: off" in r.stdout
