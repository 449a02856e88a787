"""`fluxgymctl status` latency as a ratio to `python -c "import zmq, click"`.

Both run as fresh processes, interleaved, against a real daemon holding 10 jobs. Prints the
median of N runs each and their ratio (target <= 1.3). Output goes to a pipe, as in scripts;
the ratio on a terminal (where rich renders the table) is printed too, for information.

    .venv/bin/python bench/status_latency.py [--runs 20]
"""
from __future__ import annotations

import argparse
import os
import pty
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fluxgymd.testing import Daemon, write_job

BIN = Path(sys.executable).parent


ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def timed(argv: list[str], tty: bool = False) -> float:
    if tty:
        master, slave = pty.openpty()
        t0 = time.perf_counter()
        subprocess.run(argv, stdout=slave, stderr=subprocess.DEVNULL, check=True, env=ENV)
        dt = time.perf_counter() - t0
        os.close(slave)
        os.close(master)
        return dt
    t0 = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, env=ENV)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fgb", dir="/tmp"))
    d = Daemon(root, max_concurrent_jobs=2)
    try:
        d.start()
        for i in range(10):
            d.submit(write_job(root, f"job{i}", ["true"] if i < 8 else ["sleep", "600"]))
        status = [str(BIN / "fluxgymctl"), "--runtime-dir", str(d.runtime_dir), "status"]
        baseline = [sys.executable, "-c", "import zmq, click"]
        for argv in (status, baseline):  # warm the page cache
            timed(argv)
        ours, base, ours_tty = [], [], []
        for _ in range(args.runs):
            ours.append(timed(status))
            base.append(timed(baseline))
            ours_tty.append(timed(status, tty=True))
        m_ours, m_base, m_tty = (statistics.median(x) for x in (ours, base, ours_tty))
        print(f"fluxgymctl status (pipe)   median {m_ours * 1000:7.1f} ms  ({args.runs} runs)")
        print(f"fluxgymctl status (tty)    median {m_tty * 1000:7.1f} ms")
        print(f"python -c 'import zmq, click' median {m_base * 1000:7.1f} ms")
        print(f"ratio status/baseline (pipe): {m_ours / m_base:.2f}  (target <= 1.3)")
        print(f"ratio status/baseline (tty, rich table): {m_tty / m_base:.2f}")
    finally:
        d.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
