"""The tiny LoRA job the trainer and watchdog tests share, and how to compare results."""
from __future__ import annotations

from pathlib import Path

import tomli_w

STEPS = 40  # 2T, with a checkpoint every T/2


def train_section(root: Path, **train) -> dict:
    section = dict(pretrained_model=str(root / "model"), dataset_dir=str(root / "data"),
                   trigger_word="fgx", resolution=64, max_train_steps=STEPS, num_repeats=2,
                   train_batch_size=2, learning_rate=1e-3, network_dim=4, network_alpha=2.0,
                   save_every_n_steps=10, save_every_n_epochs=0, t5xxl_max_token_length=32,
                   log_every_n_steps=1)
    section.update(train)
    return {k: v for k, v in section.items() if v is not None}  # None: the trainer's default


def job_file(root: Path, name: str, watchdog: dict | None = None, **train) -> Path:
    doc = {"job": {"name": name, "kind": "lora"}, "train": train_section(root, **train)}
    if watchdog:
        doc["watchdog"] = watchdog
    path = root / f"{name}.toml"
    path.write_text(tomli_w.dumps(doc))
    return path


def lora(out: Path, name: str):
    from safetensors.torch import load_file
    return load_file(str(out / f"{name}.safetensors"))


def assert_identical(a, b):
    import torch
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k


def history(d, ref):
    """A job's (state, reason) transitions."""
    return [(e["to_state"], e["reason"]) for e in d.job(ref)["events"]]


def wait_checkpoint(d, name, at_least=10, timeout=120):
    """Until the job has a checkpoint and is training again after it."""
    from fluxgymd.testing import wait_until
    return wait_until(lambda: (j := d.job(name))["checkpoint_step"] is not None
                      and j["checkpoint_step"] >= at_least and j["state"] == "running"
                      and j["phase"] == "training" and j["step"] > j["checkpoint_step"] and j,
                      timeout, 0.02, f"{name} training on after its checkpoint at {at_least}")
