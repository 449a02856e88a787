"""fluxgymctl as a user runs it: exit codes, messages, --json, logs -f."""
import json
import subprocess
import sys
import textwrap
import time

import pytest

from fluxgymd.testing import PY, wait_until, write_job
from fluxgymctl.exitcodes import Exit


def ctl(*args, runtime_dir, timeout=30):
    return subprocess.run([sys.executable, "-m", "fluxgymctl", "--runtime-dir", str(runtime_dir),
                           *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args", [["ping"], ["status"], ["show", "x"], ["logs", "x"],
                                  ["cancel", "x"], ["retry", "x"], ["wait", "x"]])
def test_no_daemon_says_so_at_once_with_how_to_start_it(short_tmp, args):
    t0 = time.monotonic()
    r = ctl(*args, runtime_dir=short_tmp / "nothing-here")
    assert r.returncode == Exit.DAEMON_UNAVAILABLE
    assert "fluxgymd is not running" in r.stderr and "systemctl start fluxgymd" in r.stderr
    assert "Traceback" not in r.stderr
    assert time.monotonic() - t0 < 5


def test_stale_socket_is_reported_as_a_dead_daemon(daemon):
    daemon.stop()
    (daemon.runtime_dir / "control.sock").touch()
    r = daemon.ctl("ping", "--json")
    assert r.returncode == Exit.DAEMON_UNAVAILABLE
    assert json.loads(r.stdout)["error"]["code"] == "daemon_unavailable"


def test_exit_codes(daemon, short_tmp):
    assert daemon.ctl("show", "nope").returncode == Exit.NOT_FOUND
    assert daemon.ctl("bogus-command").returncode == Exit.USAGE
    assert daemon.ctl("submit", str(short_tmp / "missing.toml")).returncode == Exit.USAGE
    ok = write_job(short_tmp, "ok", ["true"])
    assert daemon.ctl("submit", str(ok), "--wait").returncode == Exit.OK
    assert daemon.ctl("wait", "ok").returncode == Exit.OK
    bad = write_job(short_tmp, "bad", ["false"])
    assert daemon.ctl("submit", str(bad), "--wait").returncode == Exit.JOB_NOT_SUCCEEDED
    assert daemon.ctl("wait", "bad").returncode == Exit.JOB_NOT_SUCCEEDED
    slow = write_job(short_tmp, "slow", ["sleep", "600"])
    daemon.submit(slow)
    r = daemon.ctl("wait", "slow", "--timeout", "0.5")
    assert r.returncode == Exit.TIMEOUT and "still running" in r.stderr
    daemon.ctl("cancel", "slow", check=True)


def test_every_command_speaks_json(daemon, short_tmp):
    f = write_job(short_tmp, "js", ["sh", "-c", "echo one; echo two"])
    code, job = daemon.ctl_json("submit", str(f), "--wait")
    assert code == 0 and job["state"] == "succeeded" and job["name"] == "js"
    assert daemon.ctl_json("ping")[1]["pong"] is True
    assert daemon.ctl_json("status")[1]["jobs"][0]["id"] == job["id"]
    shown = daemon.ctl_json("show", "js")[1]
    assert shown["events"][-1]["to_state"] == "succeeded"
    assert daemon.ctl_json("logs", "js")[1]["lines"][-2:] == [
        "two", "=== fluxgymd: attempt 1 exited with code 0 ==="]
    assert daemon.ctl_json("wait", "js")[1]["state"] == "succeeded"
    assert daemon.ctl_json("metrics", "js")[1]["metrics"] == []
    code, err = daemon.ctl_json("retry", "js")
    assert code == Exit.REJECTED and err["error"]["code"] == "invalid_state"
    # global --json works too
    r = daemon.ctl("--json", "show", "js")
    assert json.loads(r.stdout)["name"] == "js"


def test_status_table_shows_progress_and_eta(daemon, short_tmp):
    script = textwrap.dedent("""
        import sys, time
        for i in range(1, 4):
            sys.stdout.write(f"\\r{i}/100 [00:01<00:10, 2.00it/s, loss=0.25]"); sys.stdout.flush()
        time.sleep(600)
    """)
    daemon.submit(write_job(short_tmp, "eta", [PY, "-c", script]))
    wait_until(lambda: daemon.job("eta")["step"] == 3, what="step 3")
    r = daemon.ctl("status", check=True)
    header, row = r.stdout.splitlines()[:2]
    for col in ("ID", "NAME", "STATE", "PROGRESS", "STEP", "LOSS", "ELAPSED", "ETA", "ATTEMPTS"):
        assert col in header
    assert "eta" in row and "running" in row and "3/100" in row and "3%" in row
    assert "48s" in row  # (100 - 3) steps at 0.5 s/step
    daemon.ctl("cancel", "eta", check=True)


def test_logs_follow_streams_every_line_once_in_order(daemon, short_tmp):
    script = textwrap.dedent("""
        import sys, time
        for i in range(3000):
            print(f"line {i}")
            if i % 300 == 0:
                sys.stdout.flush(); time.sleep(0.1)
        print("the end")
    """)
    daemon.submit(write_job(short_tmp, "chatty", [PY, "-c", script]))
    r = daemon.ctl("logs", "-f", "chatty", "-n", "100000", timeout=60)
    assert r.returncode == 0, r.stderr
    lines = [l for l in r.stdout.splitlines() if not l.startswith("=== fluxgymd")]
    assert lines == [f"line {i}" for i in range(3000)] + ["the end"]
    assert daemon.job("chatty")["state"] == "succeeded"


def test_logs_follow_started_before_the_job_runs(daemon, short_tmp):
    daemon.submit(write_job(short_tmp, "first", ["sleep", "1"]))
    daemon.submit(write_job(short_tmp, "second", ["sh", "-c", "for i in 1 2 3; do echo n$i; done"]))
    proc = subprocess.Popen([sys.executable, "-m", "fluxgymctl", "--runtime-dir",
                             str(daemon.runtime_dir), "logs", "-f", "second"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert [l for l in out.splitlines() if l.startswith("n")] == ["n1", "n2", "n3"]


def test_follow_json_lines_are_numbered(daemon, short_tmp):
    daemon.ctl("submit", str(write_job(short_tmp, "num", ["sh", "-c", "echo a; echo b"])),
               "--wait", check=True)
    r = daemon.ctl("logs", "-f", "num", "--json", "-n", "0", check=True)
    assert r.stdout == ""  # finished job, zero lines asked: nothing, and it returns


def test_show_says_whether_the_gpu_rule_is_on(daemon, short_tmp):
    daemon.ctl("submit", str(write_job(short_tmp, "g", ["true"])), "--wait", check=True)
    out = daemon.ctl("show", "g", check=True).stdout
    # these machines have no NVIDIA driver: the rule is off, and show says why
    assert "GPU rule" in out and "off: NVML is not available" in out
    assert "restarts 0/5, no-progress 0/3, step limit 2m00s" in out
