"""Key layouts of Flux files, both ways: BFL's transformer names (what FluxGym, ComfyUI and
kohya hold) and the ldm VAE names of `ae.safetensors`, against diffusers' names.

One table per model serves loading (BFL → diffusers, tensor by tensor, so a 12B model is
never held twice), writing the tiny model as single files, and naming LoRA modules the kohya
way. diffusers' own converters hard-code FLUX.1's width (3072); this one reads it from the
config, so the tiny and bench models go through the same code as the real one.
"""
from __future__ import annotations

from typing import Callable, Iterator

# (BFL stem, diffusers stems whose weights are stacked along dim 0 into it, how)
# how: "linear" (weight and bias), "norm" (BFL .scale = diffusers .weight),
#      "swap" (linear whose two output halves are in the other order)
_GLOBAL = [
    ("img_in", ["x_embedder"], "linear"),
    ("txt_in", ["context_embedder"], "linear"),
    ("time_in.in_layer", ["time_text_embed.timestep_embedder.linear_1"], "linear"),
    ("time_in.out_layer", ["time_text_embed.timestep_embedder.linear_2"], "linear"),
    ("vector_in.in_layer", ["time_text_embed.text_embedder.linear_1"], "linear"),
    ("vector_in.out_layer", ["time_text_embed.text_embedder.linear_2"], "linear"),
    ("final_layer.linear", ["proj_out"], "linear"),
    ("final_layer.adaLN_modulation.1", ["norm_out.linear"], "swap"),
]
_GUIDANCE = [
    ("guidance_in.in_layer", ["time_text_embed.guidance_embedder.linear_1"], "linear"),
    ("guidance_in.out_layer", ["time_text_embed.guidance_embedder.linear_2"], "linear"),
]
_DOUBLE = [
    ("img_mod.lin", ["norm1.linear"], "linear"),
    ("txt_mod.lin", ["norm1_context.linear"], "linear"),
    ("img_attn.qkv", ["attn.to_q", "attn.to_k", "attn.to_v"], "linear"),
    ("img_attn.proj", ["attn.to_out.0"], "linear"),
    ("img_attn.norm.query_norm", ["attn.norm_q"], "norm"),
    ("img_attn.norm.key_norm", ["attn.norm_k"], "norm"),
    ("txt_attn.qkv", ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"], "linear"),
    ("txt_attn.proj", ["attn.to_add_out"], "linear"),
    ("txt_attn.norm.query_norm", ["attn.norm_added_q"], "norm"),
    ("txt_attn.norm.key_norm", ["attn.norm_added_k"], "norm"),
    ("img_mlp.0", ["ff.net.0.proj"], "linear"),
    ("img_mlp.2", ["ff.net.2"], "linear"),
    ("txt_mlp.0", ["ff_context.net.0.proj"], "linear"),
    ("txt_mlp.2", ["ff_context.net.2"], "linear"),
]
_SINGLE = [
    ("linear1", ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"], "linear"),
    ("linear2", ["proj_out"], "linear"),
    ("modulation.lin", ["norm.linear"], "linear"),
    ("norm.query_norm", ["attn.norm_q"], "norm"),
    ("norm.key_norm", ["attn.norm_k"], "norm"),
]


def transformer_table(config: dict) -> list[tuple[str, list[str], str]]:
    """Every (BFL stem, diffusers stems, how) of a transformer with this config."""
    table = list(_GLOBAL) + (list(_GUIDANCE) if config.get("guidance_embeds") else [])
    for i in range(config["num_layers"]):
        table += [(f"double_blocks.{i}.{b}", [f"transformer_blocks.{i}.{d}" for d in ds], how)
                  for b, ds, how in _DOUBLE]
    for i in range(config["num_single_layers"]):
        table += [(f"single_blocks.{i}.{b}", [f"single_transformer_blocks.{i}.{d}" for d in ds],
                   how) for b, ds, how in _SINGLE]
    return table


def split_sizes(config: dict, stems: list[str]) -> list[int]:
    """The output rows of each diffusers part of a fused BFL layer."""
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    return [4 * inner if s.endswith("proj_mlp") else inner for s in stems]


def _suffixes(how: str) -> list[tuple[str, str]]:
    return [(".scale", ".weight")] if how == "norm" else [(".weight", ".weight"),
                                                          (".bias", ".bias")]


def to_diffusers(get: Callable[[str], "object"], config: dict) -> Iterator[tuple[str, object]]:
    """(diffusers key, tensor) for every weight, reading BFL tensors one at a time."""
    import torch

    for bfl, stems, how in transformer_table(config):
        for b_suf, d_suf in _suffixes(how):
            t = get(bfl + b_suf)
            if how == "swap":
                shift, scale = t.chunk(2, dim=0)
                t = torch.cat([scale, shift], dim=0)
            if len(stems) == 1:
                yield stems[0] + d_suf, t
            else:
                for stem, part in zip(stems, torch.split(t, split_sizes(config, stems), dim=0)):
                    yield stem + d_suf, part.contiguous()


def to_bfl(state: dict, config: dict) -> dict:
    """A diffusers transformer state dict in BFL names."""
    import torch

    out = {}
    for bfl, stems, how in transformer_table(config):
        for b_suf, d_suf in _suffixes(how):
            t = torch.cat([state[s + d_suf] for s in stems], dim=0)
            if how == "swap":
                scale, shift = t.chunk(2, dim=0)
                t = torch.cat([shift, scale], dim=0)
            out[bfl + b_suf] = t.contiguous()
    return out


def kohya_modules(config: dict) -> list[tuple[str, list[str]]]:
    """(kohya LoRA module name, diffusers modules it fuses) for every Linear of the blocks:
    `lora_unet_double_blocks_0_img_attn_qkv` ← to_q, to_k, to_v."""
    return [("lora_unet_" + bfl.replace(".", "_"), stems)
            for bfl, stems, how in transformer_table(config)
            if how == "linear" and bfl.startswith(("double_blocks.", "single_blocks."))]


def vae_to_ldm(state: dict, config: dict) -> dict:
    """A diffusers AutoencoderKL state dict in the ldm names of Flux's `ae.safetensors`
    (what diffusers' convert_ldm_vae_checkpoint reads back)."""
    levels = len(config["block_out_channels"])
    out = {}
    for key, t in state.items():
        k = key
        for side in ("encoder", "decoder"):
            k = k.replace(f"{side}.mid_block.resnets.0.", f"{side}.mid.block_1.")
            k = k.replace(f"{side}.mid_block.resnets.1.", f"{side}.mid.block_2.")
            k = k.replace(f"{side}.mid_block.attentions.0.", f"{side}.mid.attn_1.")
            k = k.replace(f"{side}.conv_norm_out.", f"{side}.norm_out.")
        if ".mid.attn_1." in k:
            k = (k.replace("group_norm.", "norm.").replace("to_q.", "q.").replace("to_k.", "k.")
                 .replace("to_v.", "v.").replace("to_out.0.", "proj_out."))
            if t.dim() == 2:
                t = t[:, :, None, None]  # ldm's attention projections are 1x1 convolutions
        for i in range(levels):
            k = k.replace(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.")
            k = k.replace(f"encoder.down_blocks.{i}.downsamplers.0.conv.",
                          f"encoder.down.{i}.downsample.conv.")
            j = levels - 1 - i  # ldm numbers the decoder's levels from the bottom
            k = k.replace(f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{j}.block.")
            k = k.replace(f"decoder.up_blocks.{i}.upsamplers.0.conv.",
                          f"decoder.up.{j}.upsample.conv.")
        out[k.replace("conv_shortcut.", "nin_shortcut.")] = t.contiguous()
    return out
