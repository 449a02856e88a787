"""The [train] section of a job file: every key, its type, default and limits.

Stdlib only: fluxgymd imports this to validate a lora job when it is submitted, and the
daemon must never import torch. Key names follow kohya sd-scripts / FluxGym where one exists.
"""
from __future__ import annotations

import difflib
import math
import os
import tomllib
from dataclasses import dataclass, field, fields
from typing import Any

from . import sources, tiers

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
TIMESTEP_SAMPLING = ("shift", "sigmoid", "uniform")
MIXED_PRECISION = ("auto", "no", "bf16")
SAVE_FORMATS = ("diffusers", "kohya")
PATH_KEYS = ("pretrained_model", "clip_l", "t5xxl", "ae", "tokenizers")
# Every Linear of the double and single blocks, as kohya's networks.lora_flux (which FluxGym
# runs) trains them, in diffusers' names: double blocks' image and text attention (q, k, v and
# out), MLPs and modulation; single blocks' q, k, v, MLP in, out and modulation. Targets only
# ever match inside the blocks (see lora_targets), never the final layer or the embedders.
KOHYA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                 "to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                 "ff_context.net.2", "norm1.linear", "norm1_context.linear", "proj_mlp",
                 "proj_out", "norm.linear"]
# The smaller set of earlier versions: the image stream's attention projections only.
ATTENTION_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
DEFAULT_TARGETS = KOHYA_TARGETS


def lora_targets(names: list[str]) -> str:
    """peft's target_modules as one regex: each name, inside a double or single block."""
    import re

    alts = "|".join(re.escape(n) for n in names)
    return rf"(?:single_)?transformer_blocks\.\d+\.(?:.*\.)?(?:{alts})"


class TrainError(Exception):
    """A problem the user must fix (the trainer exits 2)."""


class TrainConfigError(Exception):
    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass
class TrainConfig:
    # what to train on
    base_model: str = ""  # a model catalog name: fluxgymd fills in the five files below
    #                       (fetching them first when they are missing); here only a name
    pretrained_model: str = ""  # a diffusers folder, a hub id in the local cache, or a file
    clip_l: str = ""  # with a single transformer file: CLIP-L, T5-XXL and the AE files
    t5xxl: str = ""
    ae: str = ""
    tokenizers: str = ""  # a folder with tokenizer/ and tokenizer_2/ (single files need it)
    dataset_dir: str = ""  # images with optional same-name .txt captions (required)
    trigger_word: str = ""  # put first in every caption
    num_repeats: int = 10  # each image this many times per epoch
    resolution: int = 512  # buckets hold about resolution^2 pixels
    # how long
    max_train_steps: int = 0  # 0: use max_train_epochs
    max_train_epochs: int = 16
    train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    # optimizer and schedule (AdamW)
    learning_rate: float = 8e-4
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0  # 0 turns clipping off
    # the LoRA
    network_dim: int = 4
    network_alpha: float = 1.0
    network_target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    # Flux flow matching
    timestep_sampling: str = "shift"
    sigmoid_scale: float = 1.0
    discrete_flow_shift: float = 3.1582
    guidance_scale: float = 1.0  # the guidance embedding's value while training
    t5xxl_max_token_length: int = 512
    # machinery
    seed: int = 42
    mixed_precision: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    # memory: a tier (trainer/tiers.py) sets the levers below; a lever set here wins
    vram: str = "auto"
    fp8_base: bool = False
    quantize_base: str = "none"
    gradient_checkpointing: bool = False
    cpu_offload_checkpointing: bool = False
    optimizer_type: str = "AdamW"
    optimizer_args: list[str] = field(default_factory=list)  # kohya's "key=value" strings
    save_lora_format: str = "diffusers"  # or "kohya": lora_unet_… names with .alpha
    levers_set: list[str] = field(default_factory=list)  # (not a key: which levers were set)
    # checkpoints
    save_every_n_steps: int = 0  # 0: off
    save_every_n_epochs: int = 1  # 0: off; 0 too when only save_every_n_steps is set
    save_last_n_checkpoints: int = 2  # at least 2
    # samples
    sample_prompts: list[str] = field(default_factory=list)
    sample_every_n_steps: int = 0  # 0: off
    sample_steps: int = 20
    sample_guidance_scale: float = 3.5
    # reporting: a progress line every this many steps when not on a terminal
    log_every_n_steps: int = 10

    def to_dict(self) -> dict[str, Any]:
        """Every key, except the levers the job left to its tier: parsing this back must
        give the same config, tier included."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name != "levers_set"
                and (f.name not in tiers.LEVERS or f.name in self.levers_set)}


_LIMITS: dict[str, tuple[float | None, float | None]] = {
    "num_repeats": (1, None), "resolution": (16, 8192), "max_train_steps": (0, None),
    "max_train_epochs": (0, None), "train_batch_size": (1, None),
    "gradient_accumulation_steps": (1, None), "learning_rate": (0, 10), "lr_warmup_steps": (0, None),
    "weight_decay": (0, None), "max_grad_norm": (0, None), "network_dim": (1, 4096),
    "network_alpha": (0, None), "sigmoid_scale": (0, None), "discrete_flow_shift": (0, None),
    "guidance_scale": (0, None), "t5xxl_max_token_length": (1, 4096), "seed": (0, 2**63 - 1),
    "save_every_n_steps": (0, None), "save_every_n_epochs": (0, None),
    "save_last_n_checkpoints": (2, None), "sample_every_n_steps": (0, None),
    "sample_steps": (1, 1000), "sample_guidance_scale": (0, None), "log_every_n_steps": (1, None),
}
_CHOICES = {"lr_scheduler": LR_SCHEDULERS, "timestep_sampling": TIMESTEP_SAMPLING,
            "mixed_precision": MIXED_PRECISION, "vram": tiers.VRAM_CHOICES,
            "quantize_base": tiers.QUANTIZE, "optimizer_type": tiers.OPTIMIZERS,
            "save_lora_format": SAVE_FORMATS}
_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
               list: "a list of strings"}


_DEFAULTS = TrainConfig()


def _type_of(name: str) -> type:
    return type(getattr(_DEFAULTS, name))


# Words people bring from other trainers, and the key that means the same here.
ALIASES = {"rank": "network_dim", "lora_rank": "network_dim", "dim": "network_dim",
           "alpha": "network_alpha", "lora_alpha": "network_alpha", "lr": "learning_rate",
           "steps": "max_train_steps", "epochs": "max_train_epochs",
           "batch_size": "train_batch_size", "model": "pretrained_model",
           "dataset": "dataset_dir", "pretrained_model_name_or_path": "pretrained_model"}


def model_problems(cfg: TrainConfig) -> list[str]:
    """What is wrong with the job's model files, read from their headers only."""
    if not cfg.pretrained_model:
        return []
    try:
        src = sources.resolve(cfg.pretrained_model, cfg.clip_l, cfg.t5xxl, cfg.ae,
                              cfg.tokenizers)
    except sources.SourceError as e:
        return [f"train.pretrained_model: {e}"]
    return src.problems


def parse(section: dict[str, Any], base_dir: str = "", pending: Any = ()) -> TrainConfig:
    """Validate a [train] table; raise TrainConfigError listing every problem. `pending`:
    paths that do not exist yet because a download job will fetch them first."""
    problems: list[str] = []
    known = [f.name for f in fields(TrainConfig) if f.name != "levers_set"]
    values: dict[str, Any] = {}
    for key, value in section.items():
        if key not in known:
            close = [ALIASES[key]] if key in ALIASES else \
                difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            problems.append(f"unknown key train.{key}"
                            + (f" (did you mean {close[0]!r}?)" if close else ""))
            continue
        want = _type_of(key)
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        ok = isinstance(value, want) and (want is bool or not isinstance(value, bool))
        if ok and want is list:
            ok = all(isinstance(v, str) for v in value)
        if ok and want is float and not math.isfinite(value):
            ok = False
        if not ok:
            problems.append(f"train.{key} must be {_TYPE_NAMES[want]}, got {value!r:.60}")
            continue
        lo, hi = _LIMITS.get(key, (None, None))
        if lo is not None and value < lo or hi is not None and value > hi:
            rng = f"at least {lo}" if hi is None else f"between {lo} and {hi}"
            problems.append(f"train.{key} must be {rng}, got {value}")
            continue
        if key in _CHOICES and value not in _CHOICES[key]:
            hint = " (fp16 is not supported for Flux; use bf16)" if value == "fp16" else ""
            problems.append(f"train.{key} {value!r} is not one of: "
                            f"{', '.join(_CHOICES[key])}{hint}")
            continue
        values[key] = value
    if values.get("save_every_n_steps") and "save_every_n_epochs" not in section:
        # one interval asked for means only that one: the epoch default would interleave
        values["save_every_n_epochs"] = 0
    values["levers_set"] = sorted(k for k in tiers.LEVERS if k in values)
    cfg = TrainConfig(**values)
    for key in PATH_KEYS + ("dataset_dir",):
        path = getattr(cfg, key)
        if not path:
            if key in ("pretrained_model", "dataset_dir"):
                problems.append(f"train.{key} is required" + (
                    " (base_model is a catalog name that fluxgymd resolves to files: submit "
                    "the job to fluxgymd, or name the files)" if cfg.base_model and
                    key == "pretrained_model" else ""))
            continue
        path = os.path.expanduser(path)
        hub_id = key == "pretrained_model" and sources.HUB_ID.match(path) \
            and not os.path.exists(os.path.join(base_dir, path))
        if base_dir and not os.path.isabs(path) and not hub_id:
            path = os.path.normpath(os.path.join(base_dir, path))
        setattr(cfg, key, path)
        if not hub_id and not os.path.exists(path) and path not in pending:
            problems.append(f"train.{key}: {path} does not exist")
    if os.path.isdir(cfg.pretrained_model) and not os.path.exists(
            os.path.join(cfg.pretrained_model, "model_index.json")):
        problems.append(f"train.pretrained_model: {cfg.pretrained_model} has no "
                        "model_index.json; is it a diffusers-format Flux folder?")
    if cfg.dataset_dir and os.path.exists(cfg.dataset_dir) and not os.path.isdir(cfg.dataset_dir):
        problems.append(f"train.dataset_dir: {cfg.dataset_dir} is not a folder")
    if cfg.max_train_steps == 0 and cfg.max_train_epochs == 0:
        problems.append("set train.max_train_steps or train.max_train_epochs (both are 0)")
    if cfg.sample_every_n_steps and not cfg.sample_prompts:
        problems.append("train.sample_every_n_steps is set but train.sample_prompts is empty")
    if not cfg.network_target_modules:
        problems.append("train.network_target_modules is empty; the LoRA would train nothing")
    if problems:
        raise TrainConfigError(problems)
    return cfg


def load_job(path: str, pending: Any = ()) -> tuple[TrainConfig, str]:
    """A job file's [train] section, validated, and the job's name; SystemExit with the
    problems otherwise (the trainer's and trainer.plan's command lines). `pending`: keys of
    [train] whose files may not exist yet (a planner run before the download)."""
    try:
        with open(path, "rb") as fh:
            doc = tomllib.load(fh)
    except FileNotFoundError:
        raise SystemExit(f"trainer: job file {path} does not exist") from None
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise SystemExit(f"trainer: {path}: {e}") from None
    train = doc.get("train")
    if not isinstance(train, dict):
        raise SystemExit(f"trainer: {path} has no [train] section")
    try:
        cfg = parse(train, os.path.dirname(os.path.abspath(path)),
                    {train[k] for k in pending if isinstance(train.get(k), str)})
    except TrainConfigError as e:
        raise SystemExit(f"trainer: {path} has {len(e.problems)} problem(s):\n"
                         + "\n".join(f"  - {p}" for p in e.problems)) from None
    name = (doc.get("job") or {}).get("name") or os.path.splitext(os.path.basename(path))[0]
    return cfg, name
