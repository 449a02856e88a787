"""Flux specifics: loading the pipeline, caching what the frozen encoders produce, and the
flow-matching loss, as Flux LoRA trainers compute it (shifted timestep sampling, guidance
embedding, packed latents, image and text position ids).
"""
from __future__ import annotations

import hashlib
import os

import torch
from diffusers import FluxPipeline
from safetensors.torch import load_file, save_file

from .data import Item, load_image
from .models import load_text_encoder
from .sources import identity


def _atomic_save(tensors: dict[str, torch.Tensor], path: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)


class Cache:
    """Latents and text-encoder outputs on disk under the job's output dir, keyed by what
    they were made from, so a resumed or repeated run reuses them."""

    def __init__(self, root: str, src, max_len: int):
        self.root = root
        self.vae_id = identity(src.vae)
        self.text_id = hashlib.sha256(
            (identity(src.clip) + identity(src.t5) + str(max_len)).encode()).hexdigest()[:16]
        os.makedirs(os.path.join(root, "latents"), exist_ok=True)
        os.makedirs(os.path.join(root, "text"), exist_ok=True)

    def latent_path(self, item: Item, bucket: tuple[int, int]) -> str:
        key = hashlib.sha256(f"{item.sha256}\0{bucket}\0{self.vae_id}".encode()).hexdigest()[:32]
        return os.path.join(self.root, "latents", f"{key}.safetensors")

    def text_path(self, caption: str) -> str:
        key = hashlib.sha256(f"{caption}\0{self.text_id}".encode()).hexdigest()[:32]
        return os.path.join(self.root, "text", f"{key}.safetensors")


@torch.no_grad()
def cache_latents(vae, cache: Cache, items: list[Item],
                  bucket_of: list[tuple[int, int]], device) -> list[torch.Tensor]:
    """Every item's latents, encoding (with `vae`) those not in the cache yet."""
    out = []
    for item, bucket in zip(items, bucket_of):
        path = cache.latent_path(item, bucket)
        if not os.path.exists(path):
            pixels = load_image(item, bucket).unsqueeze(0).to(device, vae.dtype)
            # the distribution's mode, not a sample: the cache must not depend on an RNG
            lat = vae.encode(pixels).latent_dist.mode()
            lat = (lat - vae.config.shift_factor) * vae.config.scaling_factor
            _atomic_save({"latents": lat[0].float()}, path)
        out.append(load_file(path)["latents"])
    return out


def _encoder_pipeline(src, dtype: torch.dtype, which: str, device) -> FluxPipeline:
    """A pipeline holding one text encoder and its tokenizer, for encode_prompt's helpers."""
    model, tokenizer = load_text_encoder(src, dtype, which, device)
    parts = dict(scheduler=None, vae=None, transformer=None, text_encoder=None, tokenizer=None,
                 text_encoder_2=None, tokenizer_2=None)
    if which == "clip":
        parts.update(text_encoder=model, tokenizer=tokenizer)
    else:
        parts.update(text_encoder_2=model, tokenizer_2=tokenizer)
    return FluxPipeline(**parts)


@torch.no_grad()
def cache_text(src, dtype: torch.dtype, cache: Cache, captions: list[str], device,
               max_len: int, free) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """Every caption's embeddings, and which encoders had to be loaded. CLIP-L (pooled) and
    then T5 (per token) are each loaded only when a caption is missing, one at a time, and
    freed (`free()`) before the next: what encode_prompt computes, in half the memory."""
    missing = [c for c in dict.fromkeys(captions) if not os.path.exists(cache.text_path(c))]
    loaded = []
    if missing:
        clip = _encoder_pipeline(src, dtype, "clip", device)
        clip.text_encoder.to(device)
        pooled = {c: clip._get_clip_prompt_embeds(prompt=[c], device=device)[0].float().cpu()
                  for c in missing}
        del clip
        free()
        t5 = _encoder_pipeline(src, dtype, "t5", device)
        t5.text_encoder_2.to(device)
        for c in missing:
            embeds = t5._get_t5_prompt_embeds(prompt=[c], max_sequence_length=max_len,
                                              device=device, dtype=dtype)
            _atomic_save({"prompt_embeds": embeds[0].float(), "pooled": pooled[c]},
                         cache.text_path(c))
        del t5
        free()
        loaded = ["CLIP-L", "T5"]
    return {c: load_file(cache.text_path(c)) for c in dict.fromkeys(captions)}, loaded


def sample_timesteps(kind: str, n: int, g: torch.Generator, shift: float,
                     sigmoid_scale: float) -> torch.Tensor:
    """t in (0, 1): the noise level of each sample in a batch."""
    if kind == "uniform":
        return torch.rand(n, generator=g)
    t = torch.sigmoid(sigmoid_scale * torch.randn(n, generator=g))
    if kind == "shift":
        t = (t * shift) / (1 + (shift - 1) * t)
    return t


def flow_matching_loss(transformer, latents: torch.Tensor, embeds: torch.Tensor,
                       pooled: torch.Tensor, cfg, g: torch.Generator, device,
                       dtype: torch.dtype) -> torch.Tensor:
    """One batch's loss. Every random draw comes from `g`, never the global RNG, which is
    what makes a resumed run bit-identical to an uninterrupted one."""
    b, c, h, w = latents.shape
    noise = torch.randn(latents.shape, generator=g)
    t = sample_timesteps(cfg.timestep_sampling, b, g, cfg.discrete_flow_shift, cfg.sigmoid_scale)
    latents, noise, t = latents.to(device), noise.to(device), t.to(device)
    sigma = t.view(b, 1, 1, 1)
    noisy = (1 - sigma) * latents + sigma * noise
    packed = FluxPipeline._pack_latents(noisy.to(dtype), b, c, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, device, dtype)
    txt_ids = torch.zeros(embeds.shape[1], 3, device=device, dtype=dtype)
    # schnell has no guidance embedding
    guidance = torch.full((b,), cfg.guidance_scale, device=device, dtype=torch.float32) \
        if getattr(transformer, "module", transformer).config.guidance_embeds else None
    pred = transformer(
        hidden_states=packed, timestep=t.to(dtype), guidance=guidance,
        pooled_projections=pooled.to(device, dtype), encoder_hidden_states=embeds.to(device, dtype),
        txt_ids=txt_ids, img_ids=img_ids, return_dict=False,
    )[0]
    # _unpack_latents takes pixel sizes; with the VAE's factor of 1 these are latent sizes
    pred = FluxPipeline._unpack_latents(pred, h, w, 1)
    target = noise - latents
    return torch.nn.functional.mse_loss(pred.float(), target.float())
