"""The memory planner: `python -m trainer.plan JOBFILE [--model flux-dev|flux-schnell] [--json]`.

Expected peak GPU memory of a job, by part, for each tier: base weights, LoRA weights and
gradients, optimizer state, activations at the job's resolution and batch, and the transient
copy of one layer that fp8 and NF4 weights are widened into for each matmul. The transformer
is built on the meta device from its config, so no weight is read: storage dtypes come from
the same layerwise casting and the same Linear selection the trainer uses.

The activation figures are measured, not guessed: the bytes autograd saves for backward per
block, per token, per unit of width, in bf16 with a LoRA on every Linear (25 without
gradient checkpointing, 1.1 with it; measured with saved_tensors_hooks on the bench model).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys

from . import tiers
from .config import TrainConfig, lora_targets

GiB = 1 << 30
SAVED_PER_BLOCK = 25.0  # × tokens × width × 2 bytes, without gradient checkpointing
SAVED_PER_BLOCK_GC = 1.1  # with it: the block's inputs only
TRANSIENT_BLOCKS = 2.0  # one block being recomputed, and the forward's temporaries
FIXED = 400 << 20  # cuBLAS workspaces, the allocator's rounding, RNG and position tensors
MODELS = {"flux-dev": True, "flux-schnell": False}  # guidance embedding
MODEL_KEYS = ("pretrained_model", "ae", "clip_l", "t5xxl", "tokenizers")


@functools.lru_cache(maxsize=4)
def _meta_model_cached(config_json: str, fp8: bool):
    return _meta_model(json.loads(config_json), fp8)


def _meta_model(config: dict, fp8: bool):
    import torch
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    with init_empty_weights():
        model = FluxTransformer2DModel(**{k: v for k, v in config.items()
                                          if not k.startswith("_")}).to(torch.bfloat16)
    if fp8:
        from .models import enable_fp8
        enable_fp8(model, torch.bfloat16)
    return model


def plan_tier(config: dict, cfg: TrainConfig, lever: dict) -> dict:
    """{"peak_bytes": …, "parts": {part: bytes}} for one lever set."""
    import torch

    from .models import BLOCKS

    # one meta model per storage choice: five tiers need two builds, not five
    model = _meta_model_cached(json.dumps(config, sort_keys=True), lever["fp8_base"])
    quant = lever["quantize_base"]
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    base = 0
    widest = 0
    for name, p in model.named_parameters():
        mod = name.rpartition(".")[0]
        n = p.numel()
        if quant != "none" and mod in linears and mod.startswith(BLOCKS) and name.endswith(
                ".weight"):
            # NF4: half a byte, one byte of absmax per 64, one float per 256 of those
            base += n // 2 + n // 64 + 4 * n // (64 * 256) if quant == "nf4" else n + 4 * \
                p.shape[0]
            widest = max(widest, n)
        else:
            base += n * p.element_size()
            if p.element_size() == 1:
                widest = max(widest, n)
    target = re.compile(lora_targets(cfg.network_target_modules))
    lora = sum(cfg.network_dim * (m.in_features + m.out_features)
               for n, m in linears.items() if target.fullmatch(n))
    shapes = [(cfg.network_dim, m.in_features) for n, m in linears.items() if target.fullmatch(n)]
    shapes += [(m.out_features, cfg.network_dim) for n, m in linears.items()
               if target.fullmatch(n)]
    opt = lever["optimizer_type"]
    optimizer = {"AdamW": 8 * lora, "AdamW8bit": 2 * lora + 8 * len(shapes),
                 "Prodigy": 16 * lora,
                 "Adafactor": sum(4 * (a + b) for a, b in shapes)}[opt]
    width = config["num_attention_heads"] * config["attention_head_dim"]
    img = (cfg.resolution // 16) ** 2
    tokens = cfg.train_batch_size * (img + cfg.t5xxl_max_token_length)
    unit = tokens * width * 2
    blocks = config["num_layers"] + config["num_single_layers"]
    if lever["gradient_checkpointing"]:
        kept = 0 if lever.get("cpu_offload_checkpointing") else blocks * SAVED_PER_BLOCK_GC
        activations = int(unit * (kept + TRANSIENT_BLOCKS * SAVED_PER_BLOCK))
    else:
        activations = int(unit * (blocks * SAVED_PER_BLOCK + TRANSIENT_BLOCKS))
    parts = {"base_weights": base, "lora": 4 * lora, "gradients": 4 * lora,
             "optimizer_state": optimizer, "activations": activations,
             "widened_layer": 2 * widest, "fixed": FIXED}
    return {"peak_bytes": sum(parts.values()), "parts": parts, "levers": lever}


def plan_all(config: dict, cfg: TrainConfig) -> dict[str, dict]:
    return {tier: plan_tier(config, cfg, tiers.levers(cfg, tier)) for tier in tiers.TIER_NAMES}


def model_config(cfg: TrainConfig, model: str | None) -> dict:
    from .sources import resolve, shipped

    if model:
        conf = shipped("flux", "transformer")
        conf["guidance_embeds"] = MODELS[model]
        return conf
    return resolve(cfg.pretrained_model, cfg.clip_l, cfg.t5xxl, cfg.ae,
                   cfg.tokenizers).transformer.config


def render(plans: dict[str, dict], chosen: str) -> str:
    names = list(next(iter(plans.values()))["parts"])
    lines = [f"{'tier':6}" + "".join(f"{n.replace('_', ' '):>16}" for n in names)
             + f"{'peak':>10}{'budget':>9}"]
    for tier, p in plans.items():
        budget = tiers.BUDGET.get(tier)
        lines.append(f"{tier + ('*' if tier == chosen else ''):6}"
                     + "".join(f"{p['parts'][n] / GiB:>14.2f}Gi" for n in names)
                     + f"{p['peak_bytes'] / GiB:>8.2f}Gi"
                     + (f"{budget / GiB:>7.1f}Gi" if budget else f"{'-':>9}"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer.plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("job_file")
    ap.add_argument("--model", choices=sorted(MODELS),
                    help="plan for the full-size architecture, whatever the job's model is")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--free-gib", type=float, help="plan `auto` for this much free memory")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from . import quiet
    from .config import load_job

    # planning for a named architecture reads no model file: they may not be here yet
    cfg, _ = load_job(args.job_file, MODEL_KEYS if args.model else ())
    quiet()
    plans = plan_all(model_config(cfg, args.model), cfg)
    if cfg.vram != "auto":
        chosen = cfg.vram
    else:
        free = int(args.free_gib * GiB) if args.free_gib else None
        chosen, _ = tiers.choose({t: p["peak_bytes"] for t, p in plans.items()}, free)
    if args.json:
        print(json.dumps({"tiers": plans, "chosen": chosen}, indent=1))
    else:
        print(render(plans, chosen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
