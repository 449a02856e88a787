"""Daemon idle cost: CPU (% of one core) and RSS while supervising 4 sleeping jobs.

Measured over --seconds (default 60) from the daemon's own CPU times, next to a baseline
process measured over the same window in the same run: a bare Python that imports what
the daemon imports (zmq, psutil, sqlite3, asyncio) and idles in an asyncio loop.
Targets: CPU <= 1 % of a core, RSS <= 60 MB.

With --web the same daemon setup is measured twice in the run: the dashboard off, then on
with one headless chromium page open on it (Debian's chromium). Targets: the page costs at
most +1 % of a core and +30 MB.

    .venv/bin/python bench/idle.py [--seconds 60] [--web]
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from fluxgymd.testing import Daemon, wait_until, write_job

BASELINE = ("import asyncio, sqlite3, zmq, zmq.asyncio, psutil\n"
            "asyncio.run(asyncio.sleep(10**6))")


def cpu_s(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


def daemon_with_page(seconds: float, web: bool) -> tuple[float, float]:
    """(CPU % of a core, RSS MB) of a daemon with 4 sleeping jobs, the page open if web."""
    root = Path(tempfile.mkdtemp(prefix="fgb", dir="/tmp"))
    d = Daemon(root, max_concurrent_jobs=4, **({"web__listen": "127.0.0.1:0"} if web else {}))
    driver = None
    try:
        d.start()
        for i in range(4):
            d.submit(write_job(root, f"sleeper{i}", ["sleep", "3600"]))
        wait_until(lambda: d.call("list")["counts"].get("running") == 4, what="4 running jobs")
        if web:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from web_latency import browser
            driver = browser()
            driver.get(d.ctl("web-url", check=True).stdout.strip())
            wait_until(lambda: driver.execute_script(
                "return document.getElementById('live').classList.contains('on')"), 20)
        time.sleep(2)
        dp = psutil.Process(d.proc.pid)
        c0, t0 = cpu_s(dp), time.monotonic()
        time.sleep(seconds)
        cpu = (cpu_s(dp) - c0) / (time.monotonic() - t0) * 100
        return cpu, dp.memory_info().rss / 2**20
    finally:
        if driver is not None:
            driver.quit()
        d.stop()
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--web", action="store_true")
    args = ap.parse_args()
    if args.web:
        off = daemon_with_page(args.seconds, web=False)
        on = daemon_with_page(args.seconds, web=True)
        print(f"dashboard off: CPU {off[0]:.3f} % of a core, RSS {off[1]:.1f} MB")
        print(f"dashboard on, one page open: CPU {on[0]:.3f} %, RSS {on[1]:.1f} MB")
        print(f"the page costs {on[0] - off[0]:+.3f} points of a core (target <= +1) and "
              f"{on[1] - off[1]:+.1f} MB (target <= +30); RSS ratio {on[1] / off[1]:.2f}")
        return
    root = Path(tempfile.mkdtemp(prefix="fgb", dir="/tmp"))
    d = Daemon(root, max_concurrent_jobs=4)
    base = subprocess.Popen([sys.executable, "-c", BASELINE])
    try:
        d.start()
        for i in range(4):
            d.submit(write_job(root, f"sleeper{i}", ["sleep", "3600"]))
        wait_until(lambda: d.call("list")["counts"].get("running") == 4, what="4 running jobs")
        time.sleep(2)  # let start-up work settle
        dp, bp = psutil.Process(d.proc.pid), psutil.Process(base.pid)
        c0, b0, t0 = cpu_s(dp), cpu_s(bp), time.monotonic()
        time.sleep(args.seconds)
        c1, b1, t1 = cpu_s(dp), cpu_s(bp), time.monotonic()
        wall = t1 - t0
        cpu, bcpu = (c1 - c0) / wall * 100, (b1 - b0) / wall * 100
        rss, brss = dp.memory_info().rss / 2**20, bp.memory_info().rss / 2**20
        print(f"window {wall:.0f}s, 4 sleeping jobs")
        print(f"daemon   CPU {cpu:.3f} % of a core   RSS {rss:.1f} MB")
        print(f"baseline CPU {bcpu:.3f} % of a core   RSS {brss:.1f} MB")
        print(f"CPU: {cpu:.3f} % (target <= 1 %), {cpu - bcpu:+.3f} points over the baseline")
        print(f"RSS: {rss:.1f} MB (target <= 60 MB), ratio to baseline {rss / brss:.2f}")
    finally:
        d.stop()
        base.kill()
        base.wait()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
