"""Checks a lora job can pass before anything is loaded: the dataset's files are images, the
model folder holds a Flux pipeline, the disk has room for what the job writes.

Stdlib only: fluxgymd runs these when a job is submitted, so a job that cannot succeed is
refused at once instead of failing after minutes of model loading.
"""
from __future__ import annotations

import json
import os
import shutil
import struct

from .config import TrainConfig, model_problems
from .sources import SourceError, resolve
from .data import IMAGE_EXTS, dataset_files, max_caption_chars

MiB = 1 << 20


def sniff(path: str) -> tuple[str, int, int] | None:
    """(format, width, height) from an image file's header, or None if it is none of
    PNG, JPEG or WebP."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(32)
            if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR":
                w, h = struct.unpack(">II", head[16:24])
                return "png", w, h
            if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
                return _webp(head)
            if head[:2] == b"\xff\xd8":
                return _jpeg(fh)
    except (OSError, struct.error):
        return None
    return None


def _webp(head: bytes) -> tuple[str, int, int] | None:
    kind = head[12:16]
    if kind == b"VP8X":
        w = int.from_bytes(head[24:27], "little") + 1
        h = int.from_bytes(head[27:30], "little") + 1
        return "webp", w, h
    if kind == b"VP8 " and len(head) >= 30:
        w, h = struct.unpack("<HH", head[26:30])
        return "webp", w & 0x3FFF, h & 0x3FFF
    if kind == b"VP8L" and len(head) >= 25:
        b = head[21:25]
        w = 1 + (((b[1] & 0x3F) << 8) | b[0])
        h = 1 + (((b[3] & 0xF) << 10) | (b[2] << 2) | ((b[1] & 0xC0) >> 6))
        return "webp", w, h
    return "webp", 0, 0


def _jpeg(fh) -> tuple[str, int, int] | None:
    fh.seek(2)
    for _ in range(10_000):
        marker = fh.read(2)
        if len(marker) < 2 or marker[0] != 0xFF:
            return None
        code = marker[1]
        if code in (0xD8, 0x01) or 0xD0 <= code <= 0xD7:
            continue
        size = struct.unpack(">H", fh.read(2))[0]
        if 0xC0 <= code <= 0xCF and code not in (0xC4, 0xC8, 0xCC):
            h, w = struct.unpack(">xHH", fh.read(5))
            return "jpeg", w, h
        fh.seek(size - 2, os.SEEK_CUR)
    return None


def check_dataset(cfg: TrainConfig) -> tuple[list[str], list[str]]:
    problems: list[str] = []
    warnings: list[str] = []
    folder = cfg.dataset_dir
    if not os.path.isdir(folder):
        return problems, warnings  # config.parse already said so
    images = 0
    limit = max_caption_chars(cfg.t5xxl_max_token_length)
    for path, kind in dataset_files(folder):
        if kind == "caption":
            try:
                if os.path.getsize(path) > limit:
                    warnings.append(f"caption {path} is longer than the text encoders can use; "
                                    f"only its first {limit} characters will be read")
            except OSError:
                pass
            continue
        if kind == "other":
            problems.append(f"train.dataset_dir: {path} is not an image this trainer reads (use "
                            f"{', '.join(IMAGE_EXTS)} with optional same-name .txt captions); "
                            "move it out of the dataset folder")
            continue
        found = sniff(path)
        if found is None:
            problems.append(f"train.dataset_dir: {path} is not a PNG, JPEG or WebP image "
                            "(its first bytes say otherwise); replace or remove it")
            continue
        images += 1
        _, w, h = found
        if w and h and w * h < cfg.resolution * cfg.resolution * 0.9:
            warnings.append(f"{path} is {w}x{h}, smaller than the {cfg.resolution}px buckets "
                            "it trains in: it is upscaled, and the LoRA learns the blur")
    if images == 0 and not problems:
        problems.append(f"train.dataset_dir: {folder} holds no images ({', '.join(IMAGE_EXTS)})")
    return problems, warnings


def _json(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
        return doc if isinstance(doc, dict) else None
    except (OSError, ValueError):
        return None


def check_model(cfg: TrainConfig) -> list[str]:
    folder = cfg.pretrained_model
    index_path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index_path):
        return model_problems(cfg)  # a single file or a hub id
    index = _json(index_path)
    if index is None:
        return [f"train.pretrained_model: {index_path} is not readable JSON"]
    cls = index.get("_class_name")
    if cls != "FluxPipeline":
        return [f"train.pretrained_model: {folder} holds a {cls or 'model of unknown class'}, "
                "not a Flux pipeline (model_index.json's _class_name must be FluxPipeline); "
                "point it at a FLUX.1-dev or schnell folder"]
    tconf = _json(os.path.join(folder, "transformer", "config.json"))
    if tconf is None or tconf.get("_class_name") != "FluxTransformer2DModel":
        return [f"train.pretrained_model: {folder}/transformer/config.json is missing or is "
                "not a FluxTransformer2DModel's"]
    return model_problems(cfg)


# (in, out) of each targetable Linear, in units of the model width D (MLP ratio 4).
_DOUBLE = {"to_q": (1, 1), "to_k": (1, 1), "to_v": (1, 1), "to_out.0": (1, 1),
           "add_q_proj": (1, 1), "add_k_proj": (1, 1), "add_v_proj": (1, 1),
           "to_add_out": (1, 1), "ff.net.0.proj": (1, 4), "ff.net.2": (4, 1),
           "ff_context.net.0.proj": (1, 4), "ff_context.net.2": (4, 1),
           "norm1.linear": (1, 6), "norm1_context.linear": (1, 6)}
_SINGLE = {"to_q": (1, 1), "to_k": (1, 1), "to_v": (1, 1), "proj_mlp": (1, 4),
           "proj_out": (5, 1), "norm.linear": (1, 3)}


def lora_parameters(cfg: TrainConfig) -> int:
    """The LoRA's size from the transformer's config: r × (in + out) for each targeted
    Linear of the double and single blocks."""
    try:
        tconf = resolve(cfg.pretrained_model).transformer.config
    except (SourceError, OSError, ValueError, KeyError):
        tconf = {}  # planned as FLUX.1's size: an overestimate is the safe side
    width = int(tconf.get("num_attention_heads", 24)) * int(tconf.get("attention_head_dim", 128))
    double, single = int(tconf.get("num_layers", 19)), int(tconf.get("num_single_layers", 38))
    targets = set(cfg.network_target_modules)
    per_double = sum(a + b for name, (a, b) in _DOUBLE.items() if name in targets)
    per_single = sum(a + b for name, (a, b) in _SINGLE.items() if name in targets)
    return cfg.network_dim * width * (per_double * double + per_single * single)


def disk_needed(cfg: TrainConfig, n_images: int) -> int:
    """Bytes the job will write at most: checkpoints kept (LoRA + AdamW's two moments, fp32)
    plus one being written, the final LoRA, the latent and text caches, samples, log."""
    lora = 4 * lora_parameters(cfg)
    checkpoints = (cfg.save_last_n_checkpoints + 1) * 3 * lora
    latent = 16 * (cfg.resolution // 8) ** 2 * 4
    text = cfg.t5xxl_max_token_length * 4096 * 4
    samples = 0
    if cfg.sample_every_n_steps and cfg.max_train_steps:
        samples = (cfg.max_train_steps // cfg.sample_every_n_steps) * len(cfg.sample_prompts) \
            * cfg.resolution ** 2 * 3
    return checkpoints + lora + n_images * (latent + text) + samples + 50 * MiB


def check_disk(cfg: TrainConfig, outputs_dir: str) -> list[str]:
    if not os.path.isdir(cfg.dataset_dir):
        return []
    n = sum(1 for _, kind in dataset_files(cfg.dataset_dir) if kind == "image")
    need = disk_needed(cfg, n)
    try:
        free = shutil.disk_usage(outputs_dir).free
    except OSError:
        return []
    if free < need:
        return [f"the outputs folder {outputs_dir} has {free / MiB:.0f} MiB free; this job "
                f"writes up to about {need / MiB:.0f} MiB (checkpoints, caches, samples). "
                "Free some space or lower save_last_n_checkpoints"]
    return []


def preflight(cfg: TrainConfig, outputs_dir: str,
              model: bool = True) -> tuple[list[str], list[str]]:
    """What can be checked before the job runs. `model`: the model files are here to check
    (not while a download job still has to fetch them: the trainer checks them at start)."""
    problems, warnings = check_dataset(cfg)
    if model:
        problems += check_model(cfg)
    if not problems:
        problems += check_disk(cfg, outputs_dir)
    return problems, warnings
