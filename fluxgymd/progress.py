"""Progress from children: contract events (JSON over ZeroMQ) and tqdm-style output lines.

Both become the same normalized dict, so the daemon treats a trainer that speaks the
contract and a command that only prints a progress bar alike. Nothing here does I/O.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any

from .protocol import CHILD_EVENTS, PHASES

# "steps:  25%|██▌   | 240/960 [01:00<03:00,  4.00it/s, avr_loss=0.123]"
_TQDM = re.compile(r"(\d+)/(\d+) \[([^\]]*)\]")
_RATE = re.compile(r"([\d.]+)\s*(it/s|s/it)")
_LOSS = re.compile(r"\b(?:avr_|avg_)?loss[=:]\s*([-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)")


def parse_tqdm(line: str) -> dict[str, Any] | None:
    m = _TQDM.search(line)
    if not m:
        return None
    step, total = int(m.group(1)), int(m.group(2))
    if total <= 0 or step > total:
        return None
    ev: dict[str, Any] = {"event": "step", "step": step, "total": total}
    rate = _RATE.search(m.group(3))
    if rate:
        value = float(rate.group(1)) if rate.group(1).count(".") <= 1 else 0.0
        if value > 0:
            ev["seconds_per_step"] = 1 / value if rate.group(2) == "it/s" else value
    loss = _LOSS.search(line)
    if loss:
        ev["loss"] = float(loss.group(1))
    return ev


def _num(v: Any, integer: bool = False) -> float | int | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return int(v) if integer else float(v)


def _plan(obj: dict[str, Any]) -> dict[str, Any] | None:
    """A trainer's memory plan: its tier, why, the peak and its parts in bytes, the free
    memory it was planned against, and the levers. Bounded, so a child can't bloat a row."""
    tier, why = obj.get("tier"), obj.get("why", "")
    if not isinstance(tier, str) or len(tier) > 16 or not isinstance(why, str):
        return None
    parts = obj.get("parts") or {}
    levers = obj.get("levers") or {}
    if not isinstance(parts, dict) or not isinstance(levers, dict) or len(parts) > 16 \
            or len(levers) > 16:
        return None
    out: dict[str, Any] = {"tier": tier, "why": why[:300]}
    for key in ("peak_bytes", "free_bytes"):
        v = _num(obj.get(key), integer=True)
        out[key] = v if v is not None and v >= 0 else None
    nums = {str(k)[:32]: _num(v, integer=True) for k, v in parts.items()}
    out["parts"] = {k: v for k, v in nums.items() if v is not None}
    out["levers"] = {str(k)[:32]: v for k, v in levers.items()
                     if isinstance(v, (bool, int)) or (isinstance(v, str) and len(v) <= 32)}
    return out


def parse_child_event(payload: bytes) -> dict[str, Any] | None:
    """A contract event, normalized; None for anything malformed (a child can't crash us)."""
    try:
        obj = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(obj, dict) or obj.get("event") not in CHILD_EVENTS:
        return None
    job = obj.get("job")
    if not isinstance(job, (str, int)) or not str(job).isdigit():
        return None
    ev: dict[str, Any] = {"event": obj["event"], "job": int(job)}
    attempt = _num(obj.get("attempt"), integer=True)
    if attempt is not None:
        ev["attempt"] = attempt
    if obj["event"] == "phase":
        if obj.get("phase") not in PHASES:
            return None
        ev["phase"] = obj["phase"]
    elif obj["event"] == "step":
        step = _num(obj.get("step"), integer=True)
        if step is None or step < 0:
            return None
        ev["step"] = step
        for key, integer in (("total", True), ("loss", False), ("lr", False),
                             ("seconds_per_step", False)):
            v = _num(obj.get(key), integer)
            if v is not None:
                ev[key] = v
    elif obj["event"] == "plan":
        plan = _plan(obj)
        if plan is None:
            return None
        ev["plan"] = plan
    elif obj["event"] == "gpu":
        util = _num(obj.get("utilization"))
        if util is None or not 0 <= util <= 100:
            return None
        ev["utilization"] = util
    elif obj["event"] in ("checkpoint", "sample"):
        if not isinstance(obj.get("path"), str):
            return None
        ev["path"] = obj["path"]
        step = _num(obj.get("step"), integer=True)
        if step is not None:
            ev["step"] = step
    return ev
