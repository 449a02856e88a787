"""Goodput under chaos: the tiny LoRA job (--steps steps, a checkpoint every --every) while
its trainer is SIGKILLed at a random moment, --min to --max seconds into each attempt's
training. Prints useful steps / executed steps (from the loss curve the daemon stored: every
step any attempt ran) and the wall time as a ratio to a fault-free run of the same job in
the same run, and checks that the chaos run's LoRA equals the fault-free one.

    .venv/bin/python bench/chaos.py [--steps 600] [--every 50] [--min 2] [--max 6]
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import tempfile
import time
from pathlib import Path

from common import daemon, lora_job, tiny_flux


def run_job(d, root, name, args, chaos: bool, rng) -> tuple[float, int, int]:
    d.submit(lora_job(root, name, args.steps, args.every,
                      {"max_restarts": 1000, "no_progress_restarts": 1000, "backoff_s": 0.5,
                       "backoff_max_s": 0.5}))
    kills = 0
    while True:
        job = d.call("show", job=name)
        if job["state"] in ("succeeded", "failed", "cancelled"):
            break
        if chaos and job["state"] == "running" and job["phase"] == "training" and job["pid"]:
            pid, attempt = job["pid"], job["attempts"]
            delay = rng.uniform(args.min, args.max)
            t0 = time.monotonic()
            while time.monotonic() - t0 < delay:
                j = d.call("show", job=name)
                if j["state"] != "running" or j["attempts"] != attempt:
                    break
                time.sleep(0.05)
            else:
                try:
                    os.kill(pid, signal.SIGKILL)
                    kills += 1
                except ProcessLookupError:
                    pass
        time.sleep(0.05)
    if job["state"] != "succeeded":
        raise SystemExit(f"{name} ended {job['state']}: {job['reason']}")
    executed = len(d.call("metrics", job=name, limit=1_000_000)["metrics"])
    return job["finished_at"] - job["created_at"], executed, kills


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--min", type=float, default=2.0)
    ap.add_argument("--max", type=float, default=6.0)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    args = ap.parse_args()
    root = tiny_flux(Path(tempfile.mkdtemp(prefix="fgc", dir="/tmp")))
    d = daemon(root)
    rng = random.Random(args.seed)
    try:
        clean_wall, clean_exec, _ = run_job(d, root, "clean", args, False, rng)
        chaos_wall, chaos_exec, kills = run_job(d, root, "chaos", args, True, rng)
        from safetensors.torch import load_file
        import torch
        a = load_file(str(d.outputs_dir / "clean" / "clean.safetensors"))
        b = load_file(str(d.outputs_dir / "chaos" / "chaos.safetensors"))
        same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        print(f"{args.steps} steps, checkpoint every {args.every}, SIGKILL {args.min:g}-"
              f"{args.max:g} s into each attempt's training (seed {args.seed}): {kills} kills")
        print(f"goodput: useful {args.steps} / executed {chaos_exec} steps = "
              f"{args.steps / chaos_exec:.3f}  (fault-free run executed {clean_exec})")
        print(f"wall time: chaos {chaos_wall:.1f} s / fault-free {clean_wall:.1f} s = "
              f"{chaos_wall / clean_wall:.2f}")
        print(f"final LoRA bit-identical to the fault-free run's: {same}")
    finally:
        d.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
