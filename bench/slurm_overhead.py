"""What running through Slurm costs, on the single-node test Slurm (tests/slurm_cluster.py;
needs root, as CI has):

1. Latency: from `submit` to the daemon's first step event, through Slurm minus the same
   job through the local executor, in the same run. Median of --runs (5). Target <= 2 s.
2. Following: the daemon's CPU (% of one core) while 20 jobs each print a progress line every
   100 ms, through Slurm (files followed every follow_s, squeue every poll_s) next to the
   same 20 jobs run locally (pipes) in the same run. Target: Slurm <= 5 % of a core.

    sudo .venv/bin/python bench/slurm_overhead.py [--runs 5] [--seconds 20]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from slurm_cluster import Cluster, unavailable  # noqa: E402

from fluxgymd.testing import PY, Daemon, wait_until, write_job  # noqa: E402

FIRST_STEP = "print('1/10 [00:00<00:01, 10.00it/s]', flush=True)\nimport time; time.sleep(30)"
TICKS = ("import time\nfor i in range(1, 100001):\n"
         "    print(f'{i}/100000 [00:01<00:10, 10.00it/s, loss=0.5]', flush=True)\n"
         "    time.sleep(0.1)\n")


def daemon(root: Path, cluster: Cluster | None, **more) -> Daemon:
    config: dict = {"max_concurrent_jobs": 24, **more}
    if cluster is not None:
        config.update(executor="slurm", slurm__bin_dir=str(cluster.bin), slurm__cpus_per_task=1,
                      slurm__poll_s=2.0, slurm__follow_s=0.25)
    root.mkdir(parents=True, exist_ok=True)
    d = Daemon(root, **config)
    d.start()
    if cluster is not None:  # the shared-filesystem probe passes before anything is timed
        wait_until(lambda: "shared" in d.call("ping")["slurm"]["probe"], 60, 0.1, "the probe")
    return d


def to_first_step(d: Daemon, root: Path, name: str) -> float:
    path = write_job(root, name, [PY, "-c", FIRST_STEP])
    t0 = time.monotonic()
    d.submit(path)
    wait_until(lambda: d.job(name)["step"] == 1, 60, 0.01, f"{name}'s first step")
    took = time.monotonic() - t0
    d.call("cancel", job=name)
    return took


def cpu_following(d: Daemon, root: Path, seconds: float) -> float:
    for i in range(20):
        d.submit(write_job(root, f"ticks{i}", [PY, "-c", TICKS]))
    wait_until(lambda: all((d.job(f"ticks{i}")["step"] or 0) > 5 for i in range(20)), 120, 0.2,
               "20 jobs printing")
    p = psutil.Process(d.proc.pid)
    t = p.cpu_times()
    c0, t0 = t.user + t.system, time.monotonic()
    time.sleep(seconds)
    t = p.cpu_times()
    cpu = (t.user + t.system - c0) / (time.monotonic() - t0) * 100
    for i in range(20):
        d.call("cancel", job=f"ticks{i}")
    return cpu


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=20.0)
    args = ap.parse_args()
    why = unavailable()
    if why:
        print(f"skipped: {why}")
        return 0
    cluster = Cluster(Path("/var/lib/fluxgymd-tests") / f"bench-{os.getpid()}", cpus=24).start()
    root = Path(tempfile.mkdtemp(prefix="fgs", dir="/tmp"))
    daemons: list[Daemon] = []
    try:
        local = daemon(root / "local", None)
        slurm = daemon(root / "slurm", cluster)
        daemons += [local, slurm]
        lat_local, lat_slurm = [], []
        for i in range(args.runs):
            lat_local.append(to_first_step(local, root, f"first-local-{i}"))
            lat_slurm.append(to_first_step(slurm, root, f"first-slurm-{i}"))
        ml, ms = statistics.median(lat_local), statistics.median(lat_slurm)
        print(f"submit -> first step: local {ml:.2f} s, slurm {ms:.2f} s (medians of "
              f"{args.runs}); slurm - local = {ms - ml:.2f} s (target <= 2 s; runs: "
              + ", ".join(f"{s - l:.2f}" for l, s in zip(lat_local, lat_slurm)) + ")")
        cluster.cancel_all()
        cpu_local = cpu_following(local, root, args.seconds)
        cpu_slurm = cpu_following(slurm, root, args.seconds)
        print(f"daemon CPU following 20 jobs x 10 lines/s: local {cpu_local:.2f} %, slurm "
              f"{cpu_slurm:.2f} % of a core (slurm/local = {cpu_slurm / cpu_local:.2f}; "
              "target slurm <= 5 %)")
        return 0
    finally:
        for d in daemons:
            d.stop()
        cluster.cancel_all()
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
