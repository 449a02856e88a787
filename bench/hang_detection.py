"""Detection latency of a hang (SIGSTOP) as a ratio to the configured limit.

A child that speaks the contract reports a step every 50 ms; it is frozen with SIGSTOP and
the time until fluxgymd records it `stalled` is divided by the step limit (stall_floor_s).
Medians of --runs. Target <= 1.1. The anchor: the hardened FluxGym fork needs up to 330 s,
and only when the GPU idles.

    .venv/bin/python bench/hang_detection.py [--limit 5] [--runs 5]
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import tempfile
import textwrap
import time
from pathlib import Path

from common import PY, daemon, state_times, wait_for
from fluxgymd.testing import write_job

STEPPER = textwrap.dedent("""
    import json, os, time, zmq
    s = zmq.Context().socket(zmq.PUSH)
    s.connect(os.environ["FLUXGYM_PROGRESS_ENDPOINT"])
    s.send(json.dumps({"event": "phase", "phase": "training",
                       "job": os.environ["FLUXGYM_JOB_ID"]}).encode())
    step = 0
    while True:
        step += 1
        s.send(json.dumps({"event": "step", "step": step, "total": 10**6,
                           "job": os.environ["FLUXGYM_JOB_ID"]}).encode(), zmq.NOBLOCK)
        time.sleep(0.05)
""")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=float, default=5.0)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fgh", dir="/tmp"))
    d = daemon(root, watchdog__kill_grace_s=2.0)
    ratios = []
    try:
        for run in range(args.runs):
            name = f"hang{run}"
            d.submit(write_job(root, name, [PY, "-c", STEPPER],
                               watchdog={"stall_floor_s": args.limit, "max_restarts": 0}))
            job = wait_for(lambda: (j := d.call("show", job=name))["step"] and j["step"] > 20
                           and j, 60, "steps")
            os.kill(job["pid"], signal.SIGSTOP)
            frozen = time.time()
            wait_for(lambda: any(s == "stalled" for _, s, _ in state_times(d, name)), 60,
                     "stalled")
            at = next(t for t, s, _ in state_times(d, name) if s == "stalled")
            ratios.append((at - frozen) / args.limit)
            wait_for(lambda: d.call("show", job=name)["state"] == "failed", 60, "the end")
        print(f"step limit {args.limit:g} s, {args.runs} runs: detected after "
              f"{', '.join(f'{r * args.limit:.2f}' for r in ratios)} s")
        print(f"detection latency / limit: median {statistics.median(ratios):.3f}  "
              f"(target <= 1.1; the FluxGym fork: up to 330 s, GPU idle only)")
    finally:
        d.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
