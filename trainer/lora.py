"""The final LoRA: `<output-dir>/<name>.safetensors`, in the layout diffusers'
`FluxPipeline.load_lora_weights` reads, with the adapter's config (so alpha survives) and
training metadata (base model, rank, alpha, steps, trigger word, dataset hash)."""
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
    # the layout diffusers' own save_lora_weights writes: keys and adapter config prefixed
    weights = FluxPipeline.pack_weights(get_peft_model_state_dict(transformer), prefix)
    packed = {f"{prefix}.{k}": v for k, v in adapter.items()}
    metadata = {"format": "pt",
                LORA_ADAPTER_METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True)}
    metadata.update({f"{METADATA_PREFIX}{k}": str(v) for k, v in training.items()})
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
