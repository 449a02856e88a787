"""Mixed chaos: two tiny LoRA jobs at once while the trainers and the daemon itself are hit.

Each schedule draws --faults faults at random moments of the first --window seconds (start-up
and restore included), each one of: a trainer SIGKILLed, a trainer SIGSTOPped (left for the
watchdog), the daemon SIGKILLed, the daemon SIGTERMed. A stopped or killed daemon is started
again 0.5 s later on the same dirs (as systemd's Restart= would). A thread counts each job's
trainer processes every 0.1 s. Printed per schedule and as medians: wall time as a ratio to
the same two jobs run fault-free in the same run, goodput (useful steps / steps in the
stored loss curves: every step a daemon saw), the most trainers of one job alive at once
(must be 1), and whether both LoRAs equal the fault-free run's bit for bit.

    .venv/bin/python bench/chaos_mixed.py [--schedules 3] [--faults 10] [--steps 600]
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import statistics
import tempfile
import threading
import time
from pathlib import Path

from common import lora_job, tiny_flux

from fluxgymd import procs
from fluxgymd.testing import Daemon

# A trainer stopped while it loads is judged by the loading phase's limit (30 min by
# default, for a 24 GB model): the tiny one loads in seconds, so the limits are short here.
WATCHDOG = {"max_restarts": 1000, "no_progress_restarts": 1000, "backoff_s": 0.5,
            "backoff_max_s": 0.5, "stall_floor_s": 4.0, "kill_grace_s": 10.0,
            "loading_limit_s": 30.0, "caching_limit_s": 30.0, "saving_limit_s": 30.0}
FAULTS = ("trainer SIGKILL", "trainer SIGSTOP", "daemon SIGKILL", "daemon SIGTERM")


def trainers(marker: bytes) -> list[int]:
    """Live processes running the trainer on this job's file, all alive at one moment."""
    return procs.with_cmdline(marker)


class Census(threading.Thread):
    def __init__(self, markers: dict[str, bytes]):
        super().__init__(daemon=True)
        self.markers, self.most = markers, {n: 0 for n in markers}
        self.live: dict[str, list[int]] = {n: [] for n in markers}
        self.done = threading.Event()

    def run(self):
        self.overlaps: list[str] = []
        while not self.done.is_set():
            for name, marker in self.markers.items():
                self.live[name] = trainers(marker)
                self.most[name] = max(self.most[name], len(self.live[name]))
                if len(self.live[name]) > 1:  # say who they were, for the post-mortem
                    self.overlaps.append(f"{time.strftime('%H:%M:%S')} {name}: " + "; ".join(
                        _describe(p) for p in self.live[name]))
            time.sleep(0.1)


def _describe(pid: int) -> str:
    try:
        stat = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        token = next((e.split(b"=", 1)[1].decode() for e in env
                      if e.startswith(b"FLUXGYM_ATTEMPT_TOKEN=")), "-")
        return f"pid {pid} state {stat[0]} ppid {stat[1]} token {token}"
    except OSError:
        return f"pid {pid} (gone)"


def finished(d: Daemon, names: list[str]) -> bool:
    try:
        return all(d.call("show", job=n)["state"] in ("succeeded", "failed", "cancelled")
                   for n in names)
    except Exception:
        return False  # the daemon is down or starting


def run_pair(d: Daemon, root: Path, names: list[str], args, faults: list[tuple[float, str]],
             rng: random.Random) -> dict:
    census = Census({n: f"{d.outputs_dir}/{n}/job.toml".encode() for n in names})
    census.start()
    t0 = time.monotonic()
    for n in names:
        d.submit(lora_job(root, n, args.steps, args.every, WATCHDOG))
    applied = []
    pending = list(faults)
    while not finished(d, names):
        if pending and time.monotonic() - t0 >= pending[0][0]:
            _, what = pending.pop(0)
            if what.startswith("trainer"):
                live = [p for n in names for p in census.live[n]]
                if not live:
                    continue  # none running at that moment (a restore, a backoff)
                os.kill(rng.choice(live), signal.SIGKILL if "KILL" in what else signal.SIGSTOP)
            else:
                d.stop(signal.SIGKILL if "KILL" in what else signal.SIGTERM, timeout=60)
                time.sleep(0.5)
                d.start(wait=False)
            applied.append(what)
            continue
        if d.proc is not None and d.proc.poll() is not None:  # a fault hit its start-up
            d.stop()
            d.start(wait=False)
        time.sleep(0.05)
    wall = time.monotonic() - t0
    census.done.set()
    census.join()
    jobs = {n: d.call("show", job=n) for n in names}
    bad = {n: j["reason"] for n, j in jobs.items() if j["state"] != "succeeded"}
    if bad:
        raise SystemExit(f"jobs did not succeed: {bad}")
    executed = sum(len(d.call("metrics", job=n, limit=1_000_000)["metrics"]) for n in names)
    for line in census.overlaps:
        print("  two trainers of one job:", line)
    return {"wall": wall, "executed": executed, "applied": applied,
            "most": max(census.most.values())}


def same_lora(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--schedules", type=int, default=3)
    ap.add_argument("--faults", type=int, default=10)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--keep", action="store_true", help="keep the folder (logs) at the end")
    args = ap.parse_args()
    root = tiny_flux(Path(tempfile.mkdtemp(prefix="fgm", dir="/tmp")))
    (root / "d").mkdir()
    d = Daemon(root / "d", max_concurrent_jobs=2)
    # two trainers on a 2-core machine: one thread each, or they slow each other down ~4x
    d.extra_env = {"OMP_NUM_THREADS": "1"}
    d.start()
    rng = random.Random(args.seed)
    rows = []
    try:
        clean = run_pair(d, root, ["clean-a", "clean-b"], args, [], rng)
        print(f"fault-free: 2 jobs of {args.steps} steps in {clean['wall']:.1f} s "
              f"({clean['executed']} steps executed)")
        for i in range(args.schedules):
            window = clean["wall"]
            faults = sorted((rng.uniform(0, window), rng.choice(FAULTS))
                            for _ in range(args.faults))
            names = [f"chaos{i}-a", f"chaos{i}-b"]
            r = run_pair(d, root, names, args, faults, rng)
            same = all(same_lora(d.outputs_dir / n / f"{n}.safetensors",
                                 d.outputs_dir / c / f"{c}.safetensors")
                       for n, c in zip(names, ["clean-a", "clean-b"]))
            r.update(ratio=r["wall"] / clean["wall"],
                     goodput=2 * args.steps / r["executed"], same=same)
            rows.append(r)
            kinds = {k: r["applied"].count(k) for k in FAULTS}
            print(f"schedule {i + 1} (seed {args.seed}): {len(r['applied'])} faults "
                  f"({', '.join(f'{n} {k}' for k, n in kinds.items() if n)}); wall "
                  f"{r['wall']:.1f} s = {r['ratio']:.2f} x fault-free; goodput "
                  f"{r['goodput']:.3f}; most trainers of one job at once: {r['most']}; "
                  f"LoRAs bit-identical: {same}")
        print(f"medians of {len(rows)}: wall {statistics.median(r['ratio'] for r in rows):.2f}"
              f" x fault-free, goodput {statistics.median(r['goodput'] for r in rows):.3f}; "
              f"never two trainers of one job: {all(r['most'] == 1 for r in rows)}; "
              f"all LoRAs bit-identical: {all(r['same'] for r in rows)}")
        if not all(r["most"] == 1 and r["same"] for r in rows):
            raise SystemExit(1)
    finally:
        d.stop(signal.SIGTERM, timeout=60)
        if args.keep:
            print(f"kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
