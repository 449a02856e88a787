"""The final LoRA: `<output-dir>/<name>.safetensors`, in the layout diffusers'
`FluxPipeline.load_lora_weights` reads, with the adapter's config and training metadata
(base model, rank, alpha, steps, trigger word, dataset hash).

The strength is the same in every loader: `alpha / rank` is folded into the up weights
(`lora_B`) and the saved config says alpha = rank. diffusers then scales by 1; ComfyUI (and
Forge, which vendors its loader) scale by `alpha / rank` only when a `<module>.alpha` key is
in the file and by 1.0 otherwise (comfy/weight_adapter/lora.py), so they agree. A published
LoRA must not leak the trainer's paths: the metadata names files, not folders."""
from __future__ import annotations

import json
import os
from typing import Any

from diffusers import FluxPipeline
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

METADATA_PREFIX = "fluxgym_"


def save_lora(transformer, out: str, name: str, training: dict[str, Any]) -> str:
    """Write the LoRA atomically (temporary file, fsync, rename) and return its path."""
    prefix = FluxPipeline.transformer_name
    adapter = json.loads(json.dumps(transformer.peft_config["default"].to_dict(), default=list))
    rank, alpha = adapter["r"], adapter["lora_alpha"]
    if adapter.get("rank_pattern") or adapter.get("alpha_pattern"):
        raise ValueError("per-module ranks or alphas are not supported when saving")
    state = get_peft_model_state_dict(transformer)
    scale = alpha / rank
    state = {k: (v.detach().float() * scale if ".lora_B." in k else v) for k, v in state.items()}
    adapter["lora_alpha"] = rank  # folded: loaders that read alpha and those that don't agree
    # the layout diffusers' own save_lora_weights writes: keys and adapter config prefixed
    weights = FluxPipeline.pack_weights(state, prefix)
    packed = {f"{prefix}.{k}": v for k, v in adapter.items()}
    metadata = {"format": "pt",
                LORA_ADAPTER_METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True)}
    metadata.update({f"{METADATA_PREFIX}{k}": str(v) for k, v in training.items()})
    metadata[f"{METADATA_PREFIX}alpha_folded"] = f"{scale:g}"  # the trained scale, now in lora_B
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
