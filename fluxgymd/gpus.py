"""The daemon's side of GPU placement (the policy itself is placement.py): the inventory from
the probe, what a job asks for from its file and kind, and the planner's figures for a lora
job, asked of `python -m trainer.plan` at submit (the daemon never imports torch).
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import sys
import tempfile
from typing import Any

import tomli_w

from trainer import tiers

from .placement import GiB, Gpu, Need, gib_to_bytes

log = logging.getLogger("fluxgymd")
PLAN_TIMEOUT_S = 300.0
# FluxGym's kohya presets, by the flags its train.sh carries (app.py: 12G splits the model
# and trains single blocks with Adafactor, 16G uses Adafactor, else 20G with AdamW8bit)
KOHYA_PRESETS = (("12G", 12 * GiB), ("16G", 16 * GiB), ("20G", 20 * GiB))


def inventory(stats: list[dict[str, Any]], use: tuple[str, ...]) -> list[Gpu]:
    """The GPUs fluxgymd hands out: the probe's, each with its memory figures, less those
    [gpus] use leaves out (indices or UUIDs; () means all). A GPU read without its memory
    cannot be placed on and is left out."""
    out = []
    for g in stats:
        total = g.get("memory_total")
        if not isinstance(total, (int, float)) or total <= 0:
            continue
        uuid = g.get("uuid") or str(g["index"])
        if use and str(g["index"]) not in use and uuid not in use:
            continue
        used = g.get("memory_used") or 0
        out.append(Gpu(index=int(g["index"]), uuid=uuid, total=int(total),
                       free=max(0, int(total - used)), name=g.get("name") or ""))
    return sorted(out, key=lambda g: g.index)


def resolve(refs: list[Any], gpus: list[Gpu], where: str) -> tuple[str, ...]:
    """GPU references (indices, UUIDs, or CUDA_VISIBLE_DEVICES' words) as UUIDs; ValueError
    names one that is not here."""
    out = []
    for ref in refs:
        text = str(ref).strip()
        found = next((g for g in gpus if text in (str(g.index), g.uuid)
                      or (len(text) >= 8 and g.uuid.startswith(text))), None)
        if found is None:
            seen = ", ".join(f"{g.index} ({g.uuid})" for g in gpus) or "none"
            raise ValueError(f"{where} names GPU {text!r}, which fluxgymd does not hand out "
                             f"here (GPUs: {seen})")
        out.append(found.uuid)
    return tuple(dict.fromkeys(out))


def own_devices(spec: dict[str, Any]) -> list[str] | None:
    """The CUDA_VISIBLE_DEVICES a job sets in its own environment, if it does."""
    for section in ("command", "kohya"):
        env = (spec.get(section) or {}).get("env") or {}
        if "CUDA_VISIBLE_DEVICES" in env:
            return [w for w in str(env["CUDA_VISIBLE_DEVICES"]).split(",") if w.strip()]
    return None


def kohya_preset(args: list[str]) -> tuple[str, int]:
    """A kohya job's FluxGym preset, by its flags."""
    if "--split_mode" in args:
        return KOHYA_PRESETS[0]
    for i, a in enumerate(args):
        value = a.split("=", 1)[1] if a.startswith("--optimizer_type=") else \
            args[i + 1] if a == "--optimizer_type" and i + 1 < len(args) else None
        if value is not None and value.lower() == "adafactor":
            return KOHYA_PRESETS[1]
    return KOHYA_PRESETS[2]


def count_of(spec: dict[str, Any], default: int) -> int:
    asked = spec.get("gpus")
    if isinstance(asked, list):
        return len(asked)
    if isinstance(asked, int):
        return asked
    own = own_devices(spec)
    return len(own) if own is not None else default


def need_of(spec: dict[str, Any], default_count: int, gpus: list[Gpu],
            placement: dict[str, Any] | None = None) -> Need:
    """What a job asks for on these GPUs. `placement`: where its last attempt ran (a job
    requeued after a restart goes back to those GPUs) and whether it must have a GPU of its
    own (an out-of-memory failure beside another job). ValueError: a GPU it names is not
    here."""
    count = count_of(spec, default_count)
    if count == 0:
        return Need(count=0)
    pinned: tuple[str, ...] = ()
    if isinstance(spec.get("gpus"), list):
        pinned = resolve(spec["gpus"], gpus, "job.gpus")
    elif (own := own_devices(spec)) is not None:
        pinned = resolve(own, gpus, "the job's CUDA_VISIBLE_DEVICES")
    placement = placement or {}
    last = tuple(placement.get("gpus") or ())
    if not pinned and len(last) == count and all(u in {g.uuid for g in gpus} for u in last) \
            and not placement.get("alone"):
        pinned = last
    alone = bool(placement.get("alone"))
    if spec.get("gpu_memory_gib") is not None:
        return Need(count, gib_to_bytes(spec["gpu_memory_gib"]), pinned=pinned, alone=alone)
    kind = spec.get("kind")
    if kind == "lora":
        plan = spec.get("gpu_plan") or {}
        peaks = {t: int(plan[t]) for t in tiers.TIER_NAMES if t in plan} or \
            {t: b for t, b in tiers.BUDGET.items()}  # no plan: the tiers' budgets
        vram = spec["train"].get("vram", "auto")
        levers = placement.get("levers_tier")  # a resumed run keeps its checkpoints' tier
        if vram == "auto" and levers in peaks:
            return Need(count, peaks[levers], tiers=peaks, pinned=pinned, alone=alone)
        if vram == "auto":
            return Need(count, None, tiers=peaks, auto=True, pinned=pinned, alone=alone)
        return Need(count, peaks.get(vram, max(peaks.values())), tiers=peaks, pinned=pinned,
                    alone=alone)
    if kind == "kohya":
        _, need = kohya_preset(spec["kohya"]["args"])
        return Need(count, need, pinned=pinned, alone=alone)
    return Need(count, None, pinned=pinned, alone=alone)  # unknown need: whole GPUs


def with_gres(settings, spec: dict[str, Any]):
    """A Slurm attempt's sbatch settings: [job] gpus = N asks Slurm for N GPUs
    (--gres=gpu:N) unless the job or the config names a gres itself. Placement is then
    Slurm's; a list of GPUs pins nothing there (GPU numbers are the node's), only its
    length counts."""
    asked = spec.get("gpus")
    if not asked or settings.gres:
        return settings
    count = len(asked) if isinstance(asked, list) else asked
    return dataclasses.replace(settings, gres=f"gpu:{count}")


async def lora_plan(spec: dict[str, Any], models: dict | None = None) -> tuple[dict, str]:
    """({tier: planned peak bytes}, warning) for a lora job, from the trainer's planner in a
    child process; ({}, why) when it cannot plan (the tiers' budgets stand in)."""
    train = dict(spec["train"])
    model = None
    pending = [k for k in ("pretrained_model", "ae", "clip_l", "t5xxl", "tokenizers")
               if train.get(k) and not os.path.exists(train[k])]
    if pending:  # its model is still to be downloaded: plan for the architecture it is
        name = str(train.get("base_model") or "")
        entry = (models or {}).get(name)
        family = f"{name} {getattr(entry, 'base', '') or ''}"
        model = "flux-schnell" if "schnell" in family else "flux-dev"
    with tempfile.NamedTemporaryFile("w", suffix=".toml", prefix="fluxgymd-plan-",
                                     delete=False) as fh:
        fh.write(tomli_w.dumps({"job": {"name": spec["name"], "kind": "lora"},
                                "train": {k: v for k, v in train.items() if v is not None}}))
    argv = [sys.executable, "-m", "trainer.plan", fh.name, "--json"] + \
        (["--model", model] if model else [])
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "HF_HUB_OFFLINE": "1"})
        try:
            out, err = await asyncio.wait_for(proc.communicate(), PLAN_TIMEOUT_S)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            return {}, f"the memory planner took over {PLAN_TIMEOUT_S:.0f}s"
        if proc.returncode != 0:
            last = (err.decode("utf-8", "replace").strip().splitlines() or ["?"])[-1]
            return {}, f"the memory planner failed ({last[:200]})"
        plans = json.loads(out)["tiers"]
        return {t: int(p["peak_bytes"]) for t, p in plans.items()}, ""
    except (OSError, ValueError, KeyError) as e:
        return {}, f"the memory planner could not run: {e}"
    finally:
        os.unlink(fh.name)
