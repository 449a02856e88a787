"""Which memory levers a run uses: its tier's (trainer/tiers.py), with the keys the job set
itself winning; for `vram = "auto"` the largest tier whose plan fits the GPU's free memory as
NVML reads it. A run that resumes keeps the levers its checkpoints were made with, since an
optimizer's state belongs to its optimizer. A plan that cannot fit fails the job (exit 2)."""
from __future__ import annotations

import os

from . import checkpoint as ckpt
from . import tiers
from .config import TrainError


def free_gpu_bytes(device) -> int | None:
    """Free memory of the GPU this run uses, from NVML (by the device's UUID, so
    CUDA_VISIBLE_DEVICES is respected); from CUDA when NVML is missing. None on a CPU."""
    if getattr(device, "type", str(device)) != "cuda":
        return None
    free = _free_gpu_bytes(device)
    # placed by fluxgymd beside other jobs: their plans count, allocated or not yet
    room = os.environ.get("FLUXGYM_GPU_ROOM_BYTES", "")
    return min(free, int(room)) if room.isdigit() else free


def _free_gpu_bytes(device) -> int:
    import torch

    index = device.index or 0
    try:
        import pynvml

        pynvml.nvmlInit()
        uuid = str(torch.cuda.get_device_properties(index).uuid)
        handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else
                                                  f"GPU-{uuid}")
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).free)
    except Exception:  # no NVML here: CUDA's own count is the same figure
        return int(torch.cuda.mem_get_info(index)[0])


def _saved_levers(ckpt_root: str) -> dict | None:
    for found in ckpt.complete(ckpt_root):
        saved = found.manifest.get("levers", {})
        if isinstance(saved, dict) and all(k in saved for k in tiers.LEVERS):
            return {k: saved[k] for k in tiers.LEVERS}
    return None


def _tier_of(lever: dict) -> str:
    return next((t for t, v in tiers.TIERS.items() if v == lever), "custom")


def choose_levers(cfg, src, ckpt_root: str, device, rep) -> dict:
    """The levers this run uses; says which and why, and reports the plan to the daemon."""
    from .plan import plan_all, plan_tier

    free = free_gpu_bytes(device)
    saved = _saved_levers(ckpt_root) if cfg.vram == "auto" else None
    plans = plan_all(src.transformer.config, cfg) if free is not None else {}
    if saved is not None:
        lever, tier = saved, _tier_of(saved)
        why = "the levers the checkpoints were made with"
    elif cfg.vram == "auto":
        tier, why = tiers.choose({t: p["peak_bytes"] for t, p in plans.items()}, free)
        lever = tiers.levers(cfg, tier)
    else:
        tier, why = cfg.vram, "set by the job"
        lever = tiers.levers(cfg, tier)
    if cfg.levers_set and saved is None:
        why += f"; {', '.join(cfg.levers_set)} set by the job"
    rep.say(f"memory: tier {tier} ({why}): {_fmt(lever)}")
    planned = plan_tier(src.transformer.config, cfg, lever)
    rep.send("plan", tier=tier, why=why, peak_bytes=planned["peak_bytes"],
             parts=planned["parts"], free_bytes=free, levers=lever)
    if free is not None and planned["peak_bytes"] > free:
        fits = [t for t in tiers.TIER_NAMES if plans[t]["peak_bytes"] <= free]
        raise TrainError(
            f"this job's plan for tier {tier} needs {planned['peak_bytes'] / tiers.GiB:.1f} GiB "
            f"and the GPU has {free / tiers.GiB:.1f} GiB free; "
            + (f"set train.vram = \"{fits[0]}\" (or \"auto\")" if fits else
               "no tier fits: lower resolution, train_batch_size or network_dim"))
    return lever


def _fmt(lever: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in lever.items())
