"""What the watchdog benchmarks share: a daemon in a temporary folder, the tiny Flux, the
tiny LoRA job, and a clock on the daemon's event stream."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import tomli_w

from fluxgymd.testing import Daemon

PY = sys.executable
ENV = dict(os.environ, HF_HUB_OFFLINE="1")


def tiny_flux(root: Path) -> Path:
    subprocess.run([PY, "-m", "trainer.tiny", str(root / "model")], check=True, env=ENV,
                   capture_output=True)
    subprocess.run([PY, "-m", "trainer.tiny", "--dataset", str(root / "data")], check=True,
                   env=ENV, capture_output=True)
    return root


def lora_job(root: Path, name: str, steps: int, every: int, watchdog: dict) -> Path:
    path = root / f"{name}.toml"
    path.write_text(tomli_w.dumps({
        "job": {"name": name, "kind": "lora"},
        "train": {"pretrained_model": str(root / "model"), "dataset_dir": str(root / "data"),
                  "resolution": 64, "max_train_steps": steps, "train_batch_size": 2,
                  "num_repeats": 2, "save_every_n_steps": every, "save_every_n_epochs": 0,
                  "t5xxl_max_token_length": 32, "log_every_n_steps": 50},
        "watchdog": watchdog}))
    return path


def daemon(root: Path, **config) -> Daemon:
    (root / "d").mkdir(parents=True, exist_ok=True)
    return Daemon(root / "d", **config).start()


def state_times(d: Daemon, ref: str) -> list[tuple[float, str, str]]:
    """(wall time, state, reason) of every transition of a job."""
    return [(e["at"], e["to_state"], e["reason"]) for e in d.call("show", job=ref,
                                                                   events=10000)["events"]]


def wait_for(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.02)
    sys.exit(f"timed out waiting for {what}")
