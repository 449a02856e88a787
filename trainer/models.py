"""Loading each part of a Flux model from wherever `sources` found it, straight into the
dtype it is kept in: the model is built on the meta device, and its tensors are read one at a
time (converted from BFL or ldm names when the file has them), so no full-precision copy of
the model is ever held. The transformer's base weights can be kept in fp8 (compute in bf16:
diffusers' layerwise casting, kohya's `fp8_base`) or quantized to NF4 / int8 through
bitsandbytes (QLoRA), each Linear quantized as it is read.
"""
from __future__ import annotations

from contextlib import ExitStack

import torch

from . import layouts
from .sources import Part, Source

BLOCKS = ("transformer_blocks.", "single_transformer_blocks.")
# fp8 storage for every Linear inside the blocks, modulation included (as kohya's fp8_base):
# diffusers' default skips keep the adaLN modulation Linears ("norm" in their names) in bf16,
# 3.2B of FLUX.1's 12B parameters, which leaves fp8 at 0.64 of bf16 instead of 0.51.
FP8_SKIP = (r"^(?!(single_)?transformer_blocks).",)  # ".": the root ("") is not skipped


def enable_fp8(model, compute: torch.dtype) -> None:
    # the hooks function, not ModelMixin.enable_layerwise_casting: that one always adds
    # Flux's own "norm" skip pattern
    from diffusers.hooks import apply_layerwise_casting

    apply_layerwise_casting(model, storage_dtype=torch.float8_e4m3fn, compute_dtype=compute,
                            skip_modules_pattern=FP8_SKIP)


class Reader:
    """The tensors of a part's files, by name (prefix stripped), read lazily."""

    def __init__(self, part: Part):
        from safetensors import safe_open

        self.part = part
        self._stack = ExitStack()
        self.index = {}
        for path in part.files:
            handle = self._stack.enter_context(safe_open(path, framework="pt"))
            for key in handle.keys():
                if key.startswith(part.prefix):
                    self.index[key[len(part.prefix):]] = handle

    def __call__(self, key: str) -> torch.Tensor:
        if key not in self.index:
            raise KeyError(f"{self.part.files[0]} has no tensor {self.part.prefix}{key}")
        return self.index[key].get_tensor(self.part.prefix + key)

    def all(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Every tensor, floating ones cast to `dtype` as each is read: a T5-XXL file in fp16
        is never held twice (as read and as cast)."""
        out = {}
        for k in self.index:
            t = self(k)
            out[k] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        return out

    def close(self) -> None:
        self._stack.close()


def _config(part: Part) -> dict:
    return {k: v for k, v in part.config.items() if not k.startswith("_")}


# A tensor read from a file lies where the file's layout puts it (a safetensors header's
# length, a view into a fused BFL weight); CPU kernels take other code paths, with other
# rounding, for memory aligned otherwise. Measured: the same weights from a diffusers folder
# (64-byte offset 24) and from FluxGym's single file (8) trained LoRAs 1e-6 apart in 20 steps.
ALIGN = 64


def _aligned(t: torch.Tensor, device) -> torch.Tensor:
    """t in memory of its own, aligned as a fresh allocation is, where it will be computed
    on the CPU (a GPU copy is a fresh allocation anyway)."""
    if torch.device(device).type != "cpu" or t.device.type != "cpu" or \
            t.data_ptr() % ALIGN == 0:
        return t
    return t.clone()


def _assign(model: torch.nn.Module, tensors: dict[str, torch.Tensor], what: str,
            may_miss: tuple[str, ...] = (), device="cpu") -> None:
    """Put loaded tensors into a meta-built model, each in the dtype the model holds it and
    aligned for the device it will run on."""
    want = model.state_dict()
    cast = {k: _aligned(t.to(want[k].dtype) if k in want and want[k].dtype != t.dtype else t,
                        device)
            for k, t in tensors.items()}
    missing, unexpected = model.load_state_dict(cast, strict=False, assign=True)
    missing = [k for k in missing if not k.endswith(may_miss)]
    if missing:
        raise ValueError(f"{what}: the file lacks {len(missing)} weight(s), e.g. {missing[0]}")


def _linear_kind(quantize: str):
    import bitsandbytes as bnb

    return bnb.nn.Linear4bit if quantize == "nf4" else bnb.nn.Linear8bitLt


def _quantized(in_f: int, out_f: int, weight: torch.Tensor, bias: torch.Tensor | None,
               quantize: str, compute: torch.dtype, device) -> torch.nn.Module:
    """A bitsandbytes Linear holding `weight` quantized: bitsandbytes quantizes when the
    parameter is moved to its device, so only this one layer is ever dense."""
    import bitsandbytes as bnb

    if quantize == "nf4":
        layer = bnb.nn.Linear4bit(in_f, out_f, bias=bias is not None, compute_dtype=compute,
                                  quant_type="nf4", compress_statistics=True, device="meta")
        layer.weight = bnb.nn.Params4bit(weight.to(compute), requires_grad=False,
                                         quant_type="nf4", compress_statistics=True)
    else:
        layer = bnb.nn.Linear8bitLt(in_f, out_f, bias=bias is not None, has_fp16_weights=False,
                                    threshold=6.0, device="meta")
        layer.weight = bnb.nn.Int8Params(weight.to(compute), requires_grad=False,
                                         has_fp16_weights=False)
    if bias is not None:
        layer.bias = torch.nn.Parameter(bias.to(compute), requires_grad=False)
    return layer.to(device)


def load_transformer(src: Source, compute: torch.dtype, fp8: bool = False, quantize: str = "",
                     device="cpu"):
    """The transformer on `device`: base weights in `compute`, or fp8 storage with `compute`
    arithmetic, or NF4/int8 Linears in the blocks."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    part = src.transformer
    with init_empty_weights():
        model = FluxTransformer2DModel(**_config(part)).to(compute)
    if fp8:
        enable_fp8(model, compute)  # after .to(compute): what it skips stays in compute
    linears = {n: m for n, m in model.named_modules()
               if quantize and isinstance(m, torch.nn.Linear) and n.startswith(BLOCKS)}
    read = Reader(part)
    try:
        stream = layouts.to_diffusers(read, part.config) if part.layout == "bfl" else \
            ((k, read(k)) for k in list(read.index))
        dense: dict[str, torch.Tensor] = {}
        pending: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in stream:
            mod, _, name = key.rpartition(".")
            if mod not in linears:
                dense[key] = t
                continue
            pending.setdefault(mod, {})[name] = t
            lin = linears[mod]
            if len(pending[mod]) == (2 if lin.bias is not None else 1):
                got = pending.pop(mod)
                parent, _, child = mod.rpartition(".")
                setattr(model.get_submodule(parent), child, _quantized(
                    lin.in_features, lin.out_features, got["weight"], got.get("bias"), quantize,
                    compute, device))
    finally:
        read.close()
    _assign(model, dense, f"transformer {part.files[0]}",
            may_miss=tuple(f"{m}.{p}" for m in linears for p in ("weight", "bias")),
            device=device)
    return model.to(device) if not quantize else _to_device_dense(model, device)


def _to_device_dense(model, device):
    # bitsandbytes layers are already on the device; moving the rest must not touch them
    for name, module in model.named_modules():
        if name and not list(module.children()) and not type(module).__module__.startswith(
                "bitsandbytes"):
            module.to(device)
    return model


def load_vae(src: Source, dtype: torch.dtype, device="cpu"):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL

    part = src.vae
    with init_empty_weights():
        vae = AutoencoderKL(**_config(part)).to(dtype)
    read = Reader(part)
    try:
        tensors = read.all(dtype)
    finally:
        read.close()
    if part.layout == "ldm":
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

        tensors = convert_ldm_vae_checkpoint(tensors, part.config)
    _assign(vae, tensors, f"VAE {part.files[0]}", device=device)
    return vae


def load_text_encoder(src: Source, dtype: torch.dtype, which: str, device="cpu"):
    """(encoder, tokenizer) for "clip" (CLIP-L) or "t5" (T5-XXL's encoder)."""
    from accelerate import init_empty_weights
    from transformers import (AutoTokenizer, CLIPTextConfig, CLIPTextModel, T5Config,
                              T5EncoderModel)

    part = src.clip if which == "clip" else src.t5
    with init_empty_weights():
        if which == "clip":
            model = CLIPTextModel(CLIPTextConfig(**_config(part))).to(dtype)
        else:
            model = T5EncoderModel(T5Config(**_config(part))).to(dtype)
    read = Reader(part)
    try:
        tensors = read.all(dtype)
    finally:
        read.close()
    own = model.state_dict()
    if which == "clip" and not any(k.startswith("text_model.") for k in own):
        # transformers 5 dropped the text_model. prefix that the files keep
        tensors = {k.removeprefix("text_model."): v for k, v in tensors.items()}
    if which == "t5":  # files hold the embedding once, as shared or as encoder.embed_tokens
        emb = tensors.get("shared.weight", tensors.get("encoder.embed_tokens.weight"))
        tensors["shared.weight"] = tensors["encoder.embed_tokens.weight"] = emb
    _assign(model, {k: v for k, v in tensors.items() if k in own},
            f"{which} {part.files[0]}", may_miss=("position_ids",), device=device)
    # never a download, never a model's own code (sources refuses a folder that asks for it)
    tokenizer = AutoTokenizer.from_pretrained(src.tokenizer if which == "clip" else src.tokenizer_2,
                                              local_files_only=True, trust_remote_code=False)
    return model.eval(), tokenizer


def vae_scale_factor(src: Source) -> int:
    return 2 ** (len(src.vae.config["block_out_channels"]) - 1)


def storage_bytes(model: torch.nn.Module) -> int:
    """Bytes the model's weights occupy as stored (fp8, NF4 packing and its statistics
    included)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for m in model.modules():
        state = getattr(getattr(m, "weight", None), "quant_state", None)
        if state is not None:
            total += state.absmax.numel() * state.absmax.element_size()
            if getattr(state, "state2", None) is not None:
                total += state.state2.absmax.numel() * state.state2.absmax.element_size()
    return total
