"""Memory tiers on the tiny model: each tier's levers (fp8 base, NF4 and int8 through
bitsandbytes, gradient checkpointing, AdamW8bit, Adafactor, Prodigy) train and resume
bit-exactly after SIGKILL; the planner's full-size figures; a job that cannot fit fails at
once naming the tier that would; the kohya LoRA layout loads at the trained strength."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from fluxgymd.testing import wait_until
from tinylora import assert_identical, job_file, lora

ENV = {k: v for k, v in os.environ.items() if not k.startswith("FLUXGYM_")}
ENV["HF_HUB_OFFLINE"] = "1"
STEPS = 20


def _run(root, name, kill_after_first=False, **train):
    out = root / "out" / name
    out.mkdir(parents=True, exist_ok=True)
    train = dict({"max_train_steps": STEPS, "save_every_n_steps": 10}, **train)
    job = job_file(root, name, **train)
    with open(out / "stderr.log", "ab") as log:
        p = subprocess.Popen([sys.executable, "-m", "trainer", str(job), "--output-dir",
                              str(out)], stdout=log, stderr=subprocess.STDOUT, env=ENV)
    try:
        if kill_after_first:
            wait_until(lambda: (out / "checkpoints" / "step-00000010" / "manifest.json").exists()
                       or p.poll() is not None, 180, what="the first checkpoint")
            p.send_signal(signal.SIGKILL)
        rc = p.wait(300)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return rc, out


LEVER_SETS = {
    "24G": {"vram": "24G"},  # fp8 base, checkpointing, AdamW
    "16G": {"vram": "16G"},  # fp8 base, checkpointing, Adafactor
    "12G": {"vram": "12G"},  # NF4, checkpointing, AdamW8bit
    "8G": {"vram": "8G"},  # NF4, checkpointing offloaded to the CPU, Adafactor
    "int8-prodigy": {"quantize_base": "int8", "optimizer_type": "Prodigy", "learning_rate": 1.0},
}


@pytest.mark.parametrize("name", list(LEVER_SETS))
def test_each_tier_trains_and_resumes_bit_exactly_after_sigkill(tiny, name):
    train = LEVER_SETS[name]
    rc, straight = _run(tiny, f"tier-{name}-straight", **train)
    assert rc == 0, (straight / "stderr.log").read_text()[-3000:]
    log = (straight / "stderr.log").read_text()
    assert "memory: tier" in log
    rc, out = _run(tiny, f"tier-{name}-killed", kill_after_first=True, **train)
    if rc != 0:  # killed, as meant; a run that finished first proves nothing
        assert rc == -signal.SIGKILL
        rc, out = _run(tiny, f"tier-{name}-killed", **train)
        assert rc == 0, (out / "stderr.log").read_text()[-3000:]
        assert "resuming from" in (out / "stderr.log").read_text()
    else:
        pytest.fail("the run finished before it could be killed")
    a, b = lora(straight, f"tier-{name}-straight"), lora(out, f"tier-{name}-killed")
    assert_identical(a, b)
    manifest = json.loads(next((out / "checkpoints").glob("step-*/manifest.json")).read_text())
    expect = {"24G": ("AdamW", True), "16G": ("Adafactor", True), "12G": ("AdamW8bit", False),
              "8G": ("Adafactor", False)}.get(name)
    if expect:
        assert (manifest["resume"]["optimizer_type"], manifest["resume"]["fp8_base"]) == expect
        assert manifest["levers"]["gradient_checkpointing"] is True


def test_the_planner_meets_the_full_size_targets(tiny):
    run = subprocess.run([sys.executable, "-m", "trainer.plan", str(job_file(
        tiny, "plan", network_dim=16, resolution=512, t5xxl_max_token_length=512,
        train_batch_size=1)),
        "--model", "flux-dev", "--json"], env=ENV, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    plans = doc["tiers"]
    bf16 = plans["none"]["parts"]["base_weights"]
    fp8 = plans["24G"]["parts"]["base_weights"] / bf16
    nf4 = plans["12G"]["parts"]["base_weights"] / bf16
    print(f"planner, FLUX.1-dev: fp8/bf16 {fp8:.3f}, nf4/bf16 {nf4:.3f}, peaks "
          + ", ".join(f"{t} {p['peak_bytes'] / 2**30:.2f} GiB" for t, p in plans.items()))
    assert fp8 <= 0.52 and nf4 <= 0.30
    assert bf16 > 22 * 2**30  # 11.9B parameters in bf16: the real model was planned
    for tier, budget in (("24G", 22), ("16G", 15), ("12G", 11.5), ("8G", 7.5)):
        assert plans[tier]["peak_bytes"] <= budget * 2**30, tier
    assert doc["chosen"] == "none"  # no GPU: auto plans nothing away


def _reporter(said: list):
    """A stand-in for the trainer's reporter that keeps what it is told in `said`."""
    class Rep:
        def say(self, text):
            said.append(text)

        def send(self, event, **fields):
            said.append((event, fields))
    return Rep


def _full_size(tiny, vram: str):
    """The tiny job's config with the planner's model swapped for full-size Flux's."""
    from trainer import sources
    from trainer.config import parse

    cfg = parse({"pretrained_model": str(tiny / "model"), "dataset_dir": str(tiny / "data"),
                 "vram": vram, "resolution": 512})
    src = sources.resolve(cfg.pretrained_model)
    src.transformer.config = sources.shipped("flux", "transformer")  # plan the real model
    return cfg, src


def test_a_job_that_cannot_fit_its_gpu_fails_naming_the_tier_that_would(tiny, monkeypatch):
    from trainer import memory
    from trainer.train import TrainError

    said = []
    Rep = _reporter(said)
    cfg, src = _full_size(tiny, "none")
    monkeypatch.setattr(memory, "free_gpu_bytes", lambda device: 20 * 2**30)
    with pytest.raises(TrainError, match='set train.vram = "24G"'):
        memory.choose_levers(cfg, src, str(tiny / "none"), "cuda", Rep())
    cfg.vram = "auto"
    lever = memory.choose_levers(cfg, src, str(tiny / "none"), "cuda", Rep())
    assert lever["fp8_base"] and "tier 24G" in said[-2]
    event, plan = said[-1]
    assert event == "plan" and plan["tier"] == "24G" and plan["free_bytes"] == 20 * 2**30
    monkeypatch.setattr(memory, "free_gpu_bytes", lambda device: 9 * 2**30)
    assert memory.choose_levers(cfg, src, str(tiny / "none"), "cuda", Rep())[
        "quantize_base"] == "nf4"


def test_kohya_layout_has_the_trained_strength_in_diffusers_and_comfyui(tiny, straight):
    """The kohya file, read by ComfyUI's rule (up @ down × alpha / rank when .alpha is there),
    gives every module the same weight change as the diffusers file the same run wrote."""
    from safetensors import safe_open

    from trainer.layouts import kohya_modules
    from trainer.sources import shipped

    rc, out = _run(tiny, "kohya-format", save_lora_format="kohya", max_train_steps=10)
    assert rc == 0, (out / "stderr.log").read_text()[-3000:]
    rc, ref = _run(tiny, "diffusers-format", max_train_steps=10)
    assert rc == 0
    kohya, diff = lora(out, "kohya-format"), lora(ref, "diffusers-format")
    with safe_open(str(out / "kohya-format.safetensors"), "pt") as fh:
        assert fh.metadata()["ss_network_module"] == "networks.lora_flux"
    config = dict(shipped("tiny", "transformer"), num_layers=1, num_single_layers=1)
    worst = 0.0
    for name, stems in kohya_modules(config):
        down, up = kohya[f"{name}.lora_down.weight"], kohya[f"{name}.lora_up.weight"]
        delta = up @ down * (kohya[f"{name}.alpha"].item() / down.shape[0])
        rows = 0
        for stem in stems:
            b = diff[f"transformer.{stem}.lora_B.weight"]
            a = diff[f"transformer.{stem}.lora_A.weight"]
            want = b @ a  # diffusers: alpha = rank, scale 1
            got = delta[rows:rows + b.shape[0]]
            worst = max(worst, (got - want).abs().max().item())
            rows += b.shape[0]
    print(f"kohya vs diffusers layout, max abs difference of the weight change: {worst:.3g}")
    assert worst < 1e-6


def test_diffusers_converts_our_kohya_layout_back_at_full_width():
    """diffusers' kohya converter hard-codes FLUX.1's width, so it is checked on LoRA
    tensors of the real shapes (no model needed): every module's weight change survives."""
    import torch
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    from trainer.lora import to_kohya
    from trainer.sources import shipped

    config = dict(shipped("flux", "transformer"), num_layers=1, num_single_layers=1)
    from trainer.layouts import kohya_modules

    g = torch.Generator().manual_seed(0)
    inner, r = 3072, 4
    state = {}
    for _, stems in kohya_modules(config):
        for stem in stems:
            out = 4 * inner if stem.endswith("proj_mlp") else (
                6 * inner if stem.endswith(("norm1.linear", "norm1_context.linear")) else
                3 * inner if stem.endswith("norm.linear") else inner)
            fan_in = 5 * inner if stem.endswith("single_transformer_blocks.0.proj_out") else (
                4 * inner if stem.endswith(("ff.net.2", "ff_context.net.2")) else inner)
            state[f"{stem}.lora_A.weight"] = torch.randn(r, fan_in, generator=g)
            state[f"{stem}.lora_B.weight"] = torch.randn(out, r, generator=g)
    back = _convert_kohya_flux_lora_to_diffusers(to_kohya(state, config))
    worst = 0.0
    for stem in {k.rsplit(".lora_", 1)[0] for k in state}:
        want = state[f"{stem}.lora_B.weight"] @ state[f"{stem}.lora_A.weight"]
        got = back[f"transformer.{stem}.lora_B.weight"] @ back[f"transformer.{stem}.lora_A.weight"]
        worst = max(worst, (got - want).abs().max().item())
    print(f"diffusers' kohya converter on our layout: max abs difference {worst:.3g}")
    assert worst < 1e-4


def test_a_checkpoint_from_before_tiers_still_resumes(tiny):
    """Checkpoints written before the memory keys existed were made with what is now the
    `none` tier: a run after an upgrade resumes from them instead of refusing."""
    rc, out = _run(tiny, "legacy", max_train_steps=10, vram="none")
    assert rc == 0
    manifest_path = out / "checkpoints" / "step-00000010" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for key in ("clip_l", "t5xxl", "ae", "optimizer_args", "fp8_base", "quantize_base",
                "optimizer_type"):
        del manifest["resume"][key]
    del manifest["levers"]
    manifest_path.write_text(json.dumps(manifest))
    rc, out = _run(tiny, "legacy", max_train_steps=12, vram="none")
    log = (out / "stderr.log").read_text()
    assert rc == 0, log[-3000:]
    assert "resuming from" in log and "step 10" in log


def test_a_placed_trainer_chooses_auto_for_the_room_fluxgymd_gave_it(tiny, monkeypatch):
    """The GPU reads 80 GiB free, but fluxgymd placed another job's 50 GiB plan there that
    has not allocated yet: the trainer takes the room it was given, not the reading."""
    from trainer import memory

    class Device:
        type, index = "cuda", 0

    monkeypatch.setattr(memory, "_free_gpu_bytes", lambda device: 80 * 2**30)
    assert memory.free_gpu_bytes(Device()) == 80 * 2**30
    monkeypatch.setenv("FLUXGYM_GPU_ROOM_BYTES", str(30 * 2**30))
    assert memory.free_gpu_bytes(Device()) == 30 * 2**30
    assert memory.free_gpu_bytes("cpu") is None

    said = []
    cfg, src = _full_size(tiny, "auto")
    memory.choose_levers(cfg, src, str(tiny / "room"), Device(), _reporter(said)())
    assert said[-1][1]["free_bytes"] == 30 * 2**30 and said[-1][1]["tier"] == "24G"
