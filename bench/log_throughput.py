"""Log throughput: a child printing 200,000 lines as fast as it can.

Wall time under fluxgymd (the job's started_at to finished_at, as the store records them)
as a ratio to the same child, with the same environment, writing to /dev/null, in the same
run; medians of --runs each, interleaved. Every run checks that train.log holds every line,
once, in order. Target: ratio <= 1.3.

A third figure, the "pipe floor", is the same child read by a bare loop that drains its pipe
like fluxgymd does (1 MiB pipe, 1 MiB reads, a 5 ms pause between them) and does nothing with
the bytes: what any supervisor that captures output pays before doing any work.

    .venv/bin/python bench/log_throughput.py [--runs 5] [--lines 200000]
"""
from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fluxgymd.testing import Daemon, write_job

CHILD = "import sys\nfor i in range({n}):\n    print(f'line {{i}} of the log throughput bench')\n"


def pipe_floor(child: str, env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, env=env)
    fd = p.stdout.fileno()
    fcntl.fcntl(fd, 1031, 1 << 20)  # F_SETPIPE_SZ
    while os.read(fd, 1 << 20):
        time.sleep(0.005)
    p.wait()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--lines", type=int, default=200_000)
    args = ap.parse_args()
    child = CHILD.format(n=args.lines)
    root = Path(tempfile.mkdtemp(prefix="fgb", dir="/tmp"))
    d = Daemon(root, logs__max_bytes=1 << 30)
    # what the daemon gives every child, so only the supervision differs
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    under, bare, floor = [], [], []
    try:
        d.start()
        for run in range(args.runs):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", child], stdout=subprocess.DEVNULL, env=env,
                           check=True)
            bare.append(time.perf_counter() - t0)
            floor.append(pipe_floor(child, env))
            name = f"spew{run}"
            d.submit(write_job(root, name, [sys.executable, "-c", child],
                               command={"progress": "none"}))
            # poll slowly: the bench's own polling would compete with the child for CPU
            job = d.wait_state(name, "succeeded", timeout=300, interval=1.0)
            under.append(job["finished_at"] - job["started_at"])
            lines = (d.outputs_dir / name / "train.log").read_text().splitlines()
            body = [l for l in lines if not l.startswith("=== fluxgymd")]
            expected = [f"line {i} of the log throughput bench" for i in range(args.lines)]
            if body != expected:
                sys.exit(f"run {run}: train.log has {len(body)} lines, not the "
                         f"{args.lines} expected, or not in order")
        m_under, m_bare = statistics.median(under), statistics.median(bare)
        print(f"{args.lines} lines, {args.runs} runs, every line accounted for in train.log")
        print(f"under fluxgymd   median {m_under:.3f} s  {['%.3f' % x for x in under]}")
        print(f"to /dev/null     median {m_bare:.3f} s  {['%.3f' % x for x in bare]}")
        m_floor = statistics.median(floor)
        print(f"pipe floor       median {m_floor:.3f} s  (a bare reader of the same pipe)")
        print(f"ratio: {m_under / m_bare:.2f}  (target <= 1.3); pipe floor / devnull: "
              f"{m_floor / m_bare:.2f}")
    finally:
        d.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
