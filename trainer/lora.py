"""The final LoRA: `<output-dir>/<name>.safetensors`, with training metadata (base model,
rank, alpha, steps, trigger word, dataset hash), in one of two layouts:

- diffusers: `transformer.…lora_A/lora_B` with the adapter's config, what diffusers'
  `FluxPipeline.load_lora_weights` reads (ComfyUI and Forge read it too);
- kohya: `lora_unet_double_blocks_0_img_attn_qkv.lora_down/lora_up/.alpha`, FluxGym's and
  sd-scripts' own naming on BFL's fused layers. Where diffusers splits a BFL layer (q, k, v;
  a single block's linear1), the parts' LoRAs are stacked: down weights one above the other,
  up weights block-diagonal, so the fused LoRA equals its parts exactly.

The strength is the same in every loader: `alpha / rank` is folded into the up weights and
the file says alpha = rank (diffusers' config; kohya's `.alpha` tensors). diffusers then
scales by 1; ComfyUI (and Forge, which vendors its loader) scale by `alpha / rank` only when a
`<module>.alpha` key is in the file and by 1.0 otherwise (comfy/weight_adapter/lora.py), so
all agree. A published LoRA must not leak the trainer's paths: the metadata names files."""
from __future__ import annotations

import json
import os
from typing import Any

import torch
from diffusers import FluxPipeline
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from .layouts import kohya_modules

METADATA_PREFIX = "fluxgym_"


def folded_state(transformer) -> tuple[dict[str, torch.Tensor], dict, float]:
    """(peft state dict with alpha / rank folded into lora_B, adapter config, the scale)."""
    adapter = json.loads(json.dumps(transformer.peft_config["default"].to_dict(), default=list))
    rank, alpha = adapter["r"], adapter["lora_alpha"]
    if adapter.get("rank_pattern") or adapter.get("alpha_pattern"):
        raise ValueError("per-module ranks or alphas are not supported when saving")
    scale = alpha / rank
    state = {k: v.detach().float().cpu() * (scale if ".lora_B." in k else 1.0)
             for k, v in get_peft_model_state_dict(transformer).items()}
    adapter["lora_alpha"] = rank  # folded: loaders that read alpha and those that don't agree
    return state, adapter, scale


def to_kohya(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """A folded diffusers LoRA state dict in kohya's names, with `.alpha` = rank."""
    out = {}
    for name, stems in kohya_modules(config):
        present = [s for s in stems if f"{s}.lora_A.weight" in state]
        if not present:
            continue
        downs, ups = [], []
        for stem in stems:
            a, b = state.get(f"{stem}.lora_A.weight"), state.get(f"{stem}.lora_B.weight")
            if a is None:  # a part not trained: a zero block keeps the fused layout
                ref_a = state[f"{present[0]}.lora_A.weight"]
                size = config["num_attention_heads"] * config["attention_head_dim"]
                rows = 4 * size if stem.endswith("proj_mlp") else size
                a, b = torch.zeros_like(ref_a), torch.zeros(rows, ref_a.shape[0])
            downs.append(a)
            ups.append(b)
        down = torch.cat(downs, dim=0)
        up = torch.block_diag(*ups)
        out[f"{name}.lora_down.weight"] = down.contiguous()
        out[f"{name}.lora_up.weight"] = up.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))
    return out


def save_lora(transformer, out: str, name: str, fmt: str, config: dict,
              training: dict[str, Any]) -> str:
    """Write the LoRA atomically (temporary file, fsync, rename) and return its path."""
    state, adapter, scale = folded_state(transformer)
    metadata = {"format": "pt"}
    if fmt == "kohya":
        weights = to_kohya(state, config)
        metadata.update({"ss_network_module": "networks.lora_flux",
                         "ss_network_dim": str(adapter["r"]),
                         "ss_network_alpha": str(adapter["r"]),
                         "ss_base_model_version": "flux1"})
    else:
        prefix = FluxPipeline.transformer_name
        # the layout diffusers' own save_lora_weights writes: keys and adapter config prefixed
        weights = FluxPipeline.pack_weights(state, prefix)
        packed = {f"{prefix}.{k}": v for k, v in adapter.items()}
        metadata[LORA_ADAPTER_METADATA_KEY] = json.dumps(packed, indent=2, sort_keys=True)
    metadata.update({f"{METADATA_PREFIX}{k}": str(v) for k, v in training.items()})
    metadata[f"{METADATA_PREFIX}alpha_folded"] = f"{scale:g}"  # the trained scale, now in lora_B
    metadata[f"{METADATA_PREFIX}format"] = fmt
    path = os.path.join(out, f"{name}.safetensors")
    tmp = f"{path}.tmp-{os.getpid()}"
    save_file({k: v.detach().float().cpu().contiguous() for k, v in weights.items()}, tmp,
              metadata=metadata)
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # an ordinary file for the user, not a private temp file
    os.replace(tmp, path)
    return path
