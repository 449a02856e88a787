"""A model pulled through fluxgymd (a download job: its own child, contract progress, a
partial file that survives restarts, sha256 checked) against a bare `hf_hub_download` of the
same file from the same Hub stand-in (tests/hubstandin.py), in the same run.

Prints each round and the medians: throughput through fluxgymd / bare (target >= 0.9; both
from the job's submit, or the bare process's start, to the file in place, start-up of a
Python process included on both sides), and the daemon's CPU while it follows the download
(target <= 5 % of a core). --rate limits the stand-in (bytes/s; default 100 MB/s, a fast
datacenter link: a download is network-bound, not a memory copy).

    .venv/bin/python bench/download.py [--mb 200] [--rounds 3] [--rate 100e6]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from hubstandin import Hub  # noqa: E402

from fluxgymd.protocol import TOPIC_STATE  # noqa: E402
from fluxgymd.testing import Daemon  # noqa: E402

BARE = ("import sys; from huggingface_hub import hf_hub_download; "
        "hf_hub_download(sys.argv[1], sys.argv[2], local_dir=sys.argv[3])")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rate", type=float, default=100e6)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fgdl", dir="/tmp"))
    hub = Hub(rate=args.rate)
    size = args.mb * 1024 * 1024
    data = os.urandom(size)
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    rows = []
    try:
        hub.start()
        env["HF_ENDPOINT"] = hub.url
        for i in range(args.rounds):
            repo = f"acme/big{i}"  # a file of its own each round: nothing is taken from a cache
            hub.add(repo, "model.sft", data)
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", BARE, repo, "model.sft",
                            str(root / f"bare{i}")], env=dict(env, HF_HOME=str(root / "hf")),
                           check=True, capture_output=True)
            bare = time.perf_counter() - t0

            (root / f"d{i}").mkdir()
            d = Daemon(root / f"d{i}", models__dir=str(root / f"models{i}"),
                       **{"models__big": {"repo": repo, "file": "model.sft"}})
            d.extra_env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(root / "hf")}
            d.start()
            try:
                proc = psutil.Process(d.proc.pid)
                client = d.client()
                states = client.subscribe(TOPIC_STATE)  # told, not polling the daemon
                time.sleep(0.2)  # the subscription is in place
                cpu0 = sum(proc.cpu_times()[:2])
                t0 = time.perf_counter()
                job = client.call("pull", models=["big"])
                done = None
                while done is None and time.perf_counter() - t0 < 600:
                    for _, ev in states.events(1.0):
                        if ev["id"] == job["id"] and ev["state"] in ("succeeded", "failed"):
                            done = ev["state"]
                            break
                ours = time.perf_counter() - t0
                states.close()
                client.close()
                assert done == "succeeded", done
                cpu = (sum(proc.cpu_times()[:2]) - cpu0) / ours
            finally:
                d.stop()
            got = (root / f"models{i}" / "big" / "model.sft").read_bytes()
            assert got == data, "the file fluxgymd fetched differs"
            rows.append((bare / ours, cpu, bare, ours))
            print(f"round {i + 1}: {args.mb} MB at {args.rate / 1e6:g} MB/s: bare "
                  f"{bare:.2f} s, through fluxgymd {ours:.2f} s: throughput ratio "
                  f"{bare / ours:.3f}; daemon CPU {cpu * 100:.2f} % of a core")
        print(f"medians of {len(rows)}: throughput ratio "
              f"{statistics.median(r[0] for r in rows):.3f} (target >= 0.9), daemon CPU "
              f"{statistics.median(r[1] for r in rows) * 100:.2f} % of a core (target <= 5 %)")
    finally:
        hub.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
