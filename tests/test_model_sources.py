"""Model sources: FluxGym's single files (BFL keys, .sft, ComfyUI's prefix, fp8), a hub id in
the local cache, and the errors that say what to fix; the key layouts checked against
diffusers' own converters at FLUX.1's real width."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tinylora import assert_identical, job_file, lora

ENV = {k: v for k, v in os.environ.items() if not k.startswith("FLUXGYM_")}
ENV["HF_HUB_OFFLINE"] = "1"


@pytest.fixture
def single(tiny_single):
    return tiny_single  # the session's (conftest.py)


def test_single_files_train_to_the_same_lora_as_the_folder(tiny, straight, single):
    assert set(single) == {"pretrained_model", "clip_l", "t5xxl", "ae", "tokenizers"}
    assert single["pretrained_model"].endswith("flux1-tiny.safetensors")
    out = tiny / "out" / "from-single"
    out.mkdir(parents=True, exist_ok=True)
    run = subprocess.run([sys.executable, "-m", "trainer", str(job_file(tiny, "from-single",
                                                                         **single)),
                          "--output-dir", str(out)], env=ENV, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    said = run.stdout + run.stderr
    assert "bfl keys" in said and "(single)" in said, said[-2000:]
    assert_identical(lora(out, "from-single"), straight)


def test_single_files_and_the_folder_agree_at_batch_1_and_the_default_token_length(
        tiny, single):
    """Tensors read at another alignment (a safetensors header's length, a view into a fused
    weight) once took other CPU kernel paths: 1e-6 apart after 20 steps."""
    runs = {}
    for name, parts in (("sf-folder", {}), ("sf-single", single)):  # one at a time: two
        out = tiny / "out" / name  # torch processes on two cores slow each other down
        out.mkdir(parents=True, exist_ok=True)
        job = job_file(tiny, name, train_batch_size=1, t5xxl_max_token_length=None,
                       max_train_steps=20, **parts)
        r = subprocess.run([sys.executable, "-m", "trainer", str(job), "--output-dir",
                            str(out)], env=ENV, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = out
    a, b = (lora(out, name) for name, out in runs.items())
    assert_identical(a, b)


def _rewrite(src: str, dst: Path, prefix: str = "", dtype=None, drop: str = "") -> str:
    from safetensors.torch import load_file, save_file

    state = load_file(src)
    out = {}
    for k, v in state.items():
        if drop and k.startswith(drop):
            continue
        if dtype is not None and v.dim() == 2:
            v = v.to(dtype)
        out[prefix + k] = v
    save_file(out, str(dst))
    return str(dst)


def test_sft_comfyui_prefix_and_fp8_files_load_the_same_weights(tiny, single, tmp_path):
    import torch

    from trainer import models, sources

    folder = models.load_transformer(sources.resolve(str(tiny / "model")), torch.float32)
    want = folder.state_dict()
    parts = {k: single[k] for k in ("clip_l", "t5xxl", "ae", "tokenizers")}
    sft = _rewrite(single["pretrained_model"], tmp_path / "flux1-dev.sft",
                   prefix="model.diffusion_model.")
    src = sources.resolve(sft, **parts)
    assert (src.transformer.layout, src.transformer.prefix, src.problems) == \
        ("bfl", "model.diffusion_model.", [])
    got = models.load_transformer(src, torch.float32).state_dict()
    assert_identical(got, want)

    fp8 = _rewrite(single["pretrained_model"], tmp_path / "flux1-dev-fp8.safetensors",
                   dtype=torch.float8_e4m3fn)
    src = sources.resolve(fp8, **parts)
    assert src.transformer.dtype == "F8_E4M3"
    got = models.load_transformer(src, torch.float32).state_dict()
    for k, v in want.items():  # what fp8 storage keeps of each weight, widened again
        expect = v.to(torch.float8_e4m3fn).float() if v.dim() == 2 else v
        assert torch.equal(got[k], expect), k


def test_dev_or_schnell_is_read_from_the_keys_and_schnell_trains(tiny, single, tmp_path):
    import torch

    from trainer import models, sources

    parts = {k: single[k] for k in ("clip_l", "t5xxl", "ae", "tokenizers")}
    assert sources.resolve(single["pretrained_model"], **parts).variant == "dev"
    schnell = _rewrite(single["pretrained_model"], tmp_path / "flux1-schnell.safetensors",
                       drop="guidance_in.")
    src = sources.resolve(schnell, **parts)
    assert src.variant == "schnell" and "FLUX schnell" in src.describe()
    model = models.load_transformer(src, torch.float32)
    assert model.config.guidance_embeds is False
    from trainer import flux
    from trainer.config import TrainConfig

    g = torch.Generator().manual_seed(0)
    loss = flux.flow_matching_loss(model, torch.randn(1, 16, 8, 8), torch.randn(1, 4, 32),
                                   torch.randn(1, 32), TrainConfig(), g, "cpu", torch.float32)
    assert torch.isfinite(loss)


def test_missing_parts_and_wrong_files_are_named(single, tmp_path):
    from trainer import sources

    src = sources.resolve(single["pretrained_model"], tokenizers=single["tokenizers"])
    text = " ".join(src.problems)
    assert "train.clip_l" in text and "train.t5xxl" in text and "train.ae" in text
    src = sources.resolve(single["pretrained_model"], clip_l=single["t5xxl"],
                          t5xxl=single["t5xxl"], ae=single["ae"],
                          tokenizers=single["tokenizers"])
    assert any("train.clip_l" in p and "not a CLIP text encoder" in p for p in src.problems)
    with pytest.raises(sources.SourceError, match="not a Flux transformer"):
        sources.resolve(single["clip_l"])
    empty = tmp_path / "tok"
    (empty / "tokenizer").mkdir(parents=True)
    src = sources.resolve(single["pretrained_model"], single["clip_l"], single["t5xxl"],
                          single["ae"], str(empty))
    text = " ".join(src.problems)
    assert "vocab.json, merges.txt" in text and "spiece.model" in text
    assert "huggingface-cli download" in text and str(empty) in text


def test_a_hub_id_is_found_in_the_local_cache_and_never_downloaded(tiny, tmp_path,
                                                                      monkeypatch):
    from trainer import sources

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(sources.SourceError, match="huggingface-cli download acme/flux-tiny"):
        sources.resolve("acme/flux-tiny")
    repo = tmp_path / "models--acme--flux-tiny"
    (repo / "snapshots").mkdir(parents=True)
    (repo / "refs").mkdir()
    os.symlink(tiny / "model", repo / "snapshots" / "abc123")
    (repo / "refs" / "main").write_text("abc123")
    src = sources.resolve("acme/flux-tiny")
    assert src.kind == "folder" and src.transformer.files[0].startswith(
        str(repo / "snapshots" / "abc123"))
    from trainer.config import parse

    cfg = parse({"pretrained_model": "acme/flux-tiny", "dataset_dir": str(tiny / "data")})
    assert cfg.pretrained_model == "acme/flux-tiny"


def _column_state(config: dict) -> dict:
    """A diffusers transformer state dict at `config`'s real row counts but one column, each
    row numbered, so a mapping's every row can be followed cheaply at FLUX.1's width."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    with init_empty_weights():
        model = FluxTransformer2DModel(**{k: v for k, v in config.items()
                                          if not k.startswith("_")})
    state, base = {}, 0.0
    for k, p in model.state_dict().items():
        rows = p.shape[0]
        t = torch.arange(rows, dtype=torch.float64) + base
        state[k] = t if p.dim() == 1 and k.endswith((".bias", "norm_q.weight", "norm_k.weight",
                                                      "norm_added_q.weight",
                                                      "norm_added_k.weight")) else t[:, None]
        base += rows
    return state


def test_the_bfl_layout_matches_diffusers_converter_at_full_width():
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    from trainer.layouts import to_bfl, to_diffusers
    from trainer.sources import shipped

    config = dict(shipped("flux", "transformer"), num_layers=2, num_single_layers=2)
    state = _column_state(config)
    bfl = to_bfl(state, config)
    assert "double_blocks.1.img_attn.qkv.weight" in bfl and "single_blocks.1.linear1.weight" in bfl
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    assert theirs.keys() == state.keys()
    for k in state:
        assert theirs[k].equal(state[k]), k
    ours = dict(to_diffusers(bfl.__getitem__, config))
    assert ours.keys() == state.keys() and all(ours[k].equal(state[k]) for k in state)


def test_the_ldm_vae_layout_matches_diffusers_converter(tiny):
    import torch
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    from safetensors.torch import load_file

    from trainer.layouts import vae_to_ldm
    from trainer.sources import shipped

    config = shipped("tiny", "vae")
    state = load_file(str(tiny / "model" / "vae" / "diffusion_pytorch_model.safetensors"))
    back = convert_ldm_vae_checkpoint(vae_to_ldm(state, config), config)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)
