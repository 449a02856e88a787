"""Memory tiers: `vram = "24G" | "16G" | "12G" | "8G" | "none" | "auto"` names a set of
levers, each also a [train] key of its own (named as kohya names it) that overrides the tier.

    tier   fp8_base  quantize_base  gradient_checkpointing  optimizer_type
    none   no        none           no                      AdamW       (full bf16 base)
    24G    yes       none           yes                     AdamW
    16G    yes       none           yes                     Adafactor   (FluxGym's 16G args)
    12G    no        nf4            yes                     AdamW8bit
    8G     no        nf4            yes + cpu_offload_checkpointing  Adafactor

`auto` picks the largest tier whose planned peak fits the GPU's free memory (on a CPU:
`none`). Stdlib only: the daemon validates these keys at submit time.
"""
from __future__ import annotations

TIER_NAMES = ("none", "24G", "16G", "12G", "8G")
VRAM_CHOICES = ("auto",) + TIER_NAMES
OPTIMIZERS = ("AdamW", "AdamW8bit", "Adafactor", "Prodigy")
QUANTIZE = ("none", "nf4", "int8")
LEVERS = ("fp8_base", "quantize_base", "gradient_checkpointing", "cpu_offload_checkpointing",
          "optimizer_type")
TIERS: dict[str, dict] = {
    "none": dict(fp8_base=False, quantize_base="none", gradient_checkpointing=False,
                 cpu_offload_checkpointing=False, optimizer_type="AdamW"),
    "24G": dict(fp8_base=True, quantize_base="none", gradient_checkpointing=True,
                cpu_offload_checkpointing=False, optimizer_type="AdamW"),
    "16G": dict(fp8_base=True, quantize_base="none", gradient_checkpointing=True,
                cpu_offload_checkpointing=False, optimizer_type="Adafactor"),
    "12G": dict(fp8_base=False, quantize_base="nf4", gradient_checkpointing=True,
                cpu_offload_checkpointing=False, optimizer_type="AdamW8bit"),
    "8G": dict(fp8_base=False, quantize_base="nf4", gradient_checkpointing=True,
               cpu_offload_checkpointing=True, optimizer_type="Adafactor"),
}
# FluxGym's 16G preset: Adafactor with a fixed learning rate, as sd-scripts is told
ADAFACTOR_ARGS = {"relative_step": False, "scale_parameter": False, "warmup_init": False}
GiB = 1 << 30
# Budgets a tier's plan must stay under (the bench targets): the tier's name minus headroom
# for the CUDA context and the allocator's fragmentation.
BUDGET = {"24G": 22 * GiB, "16G": 15 * GiB, "12G": int(11.5 * GiB), "8G": int(7.5 * GiB)}


def levers(cfg, tier: str) -> dict:
    """The lever values for `tier`, with the keys the job set itself winning."""
    out = dict(TIERS[tier])
    for key in cfg.levers_set:
        out[key] = getattr(cfg, key)
    return out


def choose(peaks: dict[str, int], free: int | None) -> tuple[str, str]:
    """(tier, why) for `auto`: the first of 24G, 16G, 12G, 8G whose planned peak fits the
    free memory (none when every plan fits with room: no lever costs speed for nothing)."""
    if free is None:
        return "none", "no CUDA GPU: the CPU has no memory tiers"
    if peaks.get("none", free + 1) <= free * 0.9:
        return "none", (f"the full-precision plan ({peaks['none'] / GiB:.1f} GiB) fits the "
                        f"{free / GiB:.1f} GiB free")
    for tier in ("24G", "16G", "12G", "8G"):
        if peaks[tier] <= free * 0.95:
            return tier, (f"the {tier} plan ({peaks[tier] / GiB:.1f} GiB) is the largest that "
                          f"fits the {free / GiB:.1f} GiB free")
    return "8G", (f"no plan fits the {free / GiB:.1f} GiB free (8G needs "
                  f"{peaks['8G'] / GiB:.1f} GiB)")
