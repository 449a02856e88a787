"""Start-up of the trainer: time to its first training step on a resume whose caches are
complete, as a ratio to a first start (which loads the VAE, CLIP-L and T5 to fill the cache),
on the ~50M-parameter preset. Both are measured from process start to the first `step`
event, in the same run. Medians over --runs pairs. Target (issue 9): <= 0.6.

What the ratio can reach is bounded by what both pay: Python, torch and diffusers imports
(~5-8 s here) and the transformer's load. The caches it skips are the VAE, both text
encoders and their encoding; on a full-size Flux (T5-XXL, 9.5 GB) they dominate instead.

    .venv/bin/python bench/trainer_startup.py [--runs 3]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tomli_w
import zmq

PY = sys.executable
ENV = dict({k: v for k, v in os.environ.items() if not k.startswith("FLUXGYM_")},
           HF_HUB_OFFLINE="1")


def to_first_step(root: Path, out: Path, steps: int, tag: str) -> tuple[float, str]:
    """Seconds from start to the first step event, and the trainer's cache line."""
    job = root / f"{tag}.toml"
    job.write_text(tomli_w.dumps({"job": {"name": "startup"}, "train": {
        "pretrained_model": str(root / "model"), "dataset_dir": str(root / "data"),
        "resolution": 64, "max_train_steps": steps, "train_batch_size": 2, "num_repeats": 2,
        "save_every_n_steps": 0, "save_every_n_epochs": 0, "t5xxl_max_token_length": 32,
        "learning_rate": 1e-4, "log_every_n_steps": 1}}))
    pull = zmq.Context.instance().socket(zmq.PULL)
    endpoint = f"ipc://{root}/{tag}.sock"
    pull.bind(endpoint)
    env = dict(ENV, FLUXGYM_PROGRESS_ENDPOINT=endpoint, FLUXGYM_JOB_ID="1", FLUXGYM_ATTEMPT="1")
    t0 = time.perf_counter()
    p = subprocess.Popen([PY, "-m", "trainer", str(job), "--output-dir", str(out)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = None
    while p.poll() is None or pull.poll(0):
        if pull.poll(100):
            ev = json.loads(pull.recv())
            if first is None and ev.get("event") == "step":
                first = time.perf_counter() - t0
    output = p.stdout.read()
    pull.close(linger=0)
    if p.returncode != 0 or first is None:
        sys.exit(f"trainer failed ({p.returncode}):\n{output[-3000:]}")
    cache_line = next((l for l in output.splitlines() if "cache:" in l), "")
    return first, cache_line


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fgs", dir="/tmp"))
    try:
        subprocess.run([PY, "-m", "trainer.tiny", str(root / "model"), "--preset", "bench"],
                       check=True, env=ENV, capture_output=True)
        subprocess.run([PY, "-m", "trainer.tiny", "--dataset", str(root / "data")],
                       check=True, env=ENV, capture_output=True)
        firsts, resumes = [], []
        for run in range(args.runs):
            out = root / f"out{run}"
            first, line1 = to_first_step(root, out, 3, f"first{run}")
            resume, line2 = to_first_step(root, out, 6, f"resume{run}")  # resumes at step 3
            firsts.append(first)
            resumes.append(resume)
        m_first, m_resume = statistics.median(firsts), statistics.median(resumes)
        print(f"~50M Flux preset, 64px, {args.runs} runs")
        print(f"first start: {m_first:.2f} s to the first step (per run: "
              f"{', '.join(f'{x:.2f}' for x in firsts)}); {line1.strip()}")
        print(f"resume:      {m_resume:.2f} s (per run: {', '.join(f'{x:.2f}' for x in resumes)});"
              f" {line2.strip()}")
        print(f"resume start-up / first start: {m_resume / m_first:.3f}  (target <= 0.6)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
