"""Recovery time: from `stalled` to the first new step, minus the trainer's own start-up.

The tiny LoRA job is frozen with SIGSTOP after its first checkpoint; fluxgymd notices, dumps
stacks, stops it, waits the first backoff and starts it again. Measured from the daemon's
events (state and progress, on the events socket): stalled -> running (attempt 2) is
fluxgymd's part; running -> first step of attempt 2 is the trainer's own start-up (imports,
loading, caching, resume), reported separately. Medians of --runs. Target <= 5 s.

    .venv/bin/python bench/recovery.py [--runs 3]
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import daemon, lora_job, tiny_flux, wait_for
from fluxgymd.client import Client
from fluxgymd.protocol import TOPIC_PROGRESS, TOPIC_STATE


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    root = tiny_flux(Path(tempfile.mkdtemp(prefix="fgr", dir="/tmp")))
    d = daemon(root)  # the shipped defaults: backoff 1 s, kill grace 30 s
    ours, startup = [], []
    try:
        for run in range(args.runs):
            name = f"rec{run}"
            client = Client(d.runtime_dir)
            sub = client.subscribe(TOPIC_STATE, TOPIC_PROGRESS)
            time.sleep(0.2)
            d.submit(lora_job(root, name, steps=400, every=20, watchdog={"stall_floor_s": 3}))
            job = wait_for(lambda: (j := d.call("show", job=name))["checkpoint_step"]
                           and j["phase"] == "training" and j["step"] > j["checkpoint_step"]
                           and j, 120, "a checkpoint")
            os.kill(job["pid"], signal.SIGSTOP)
            t_stalled = t_running = t_step = None
            deadline = time.monotonic() + 180
            while t_step is None and time.monotonic() < deadline:
                for topic, ev in sub.events(1.0):
                    now = time.monotonic()
                    if topic == TOPIC_STATE and ev["id"] == job["id"]:
                        if ev["state"] == "stalled":
                            t_stalled = now
                        elif ev["state"] == "running" and ev["attempts"] == 2:
                            t_running = now
                    elif topic == TOPIC_PROGRESS and ev.get("job") == job["id"] and \
                            ev.get("attempt") == 2 and ev["event"] == "step" and t_running:
                        t_step = now
                        break
            sub.close()
            client.close()
            if None in (t_stalled, t_running, t_step):
                sys.exit(f"run {run}: did not see stalled, running and a new step")
            ours.append(t_running - t_stalled)
            startup.append(t_step - t_running)
            d.call("cancel", job=name)
        m = statistics.median(ours)
        print(f"stalled -> restarted (fluxgymd's part): "
              f"{', '.join(f'{x:.2f}' for x in ours)} s; median {m:.2f} s  (target <= 5 s)")
        print(f"restarted -> first new step (the trainer's start-up, not counted): median "
              f"{statistics.median(startup):.2f} s")
        print(f"recovery time minus trainer start-up: {m:.2f} s")
    finally:
        d.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
