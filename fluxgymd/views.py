"""How a job looks on the wire: the stable `--json` shape, its progress, ETA and LoRA."""
from __future__ import annotations

import time
from typing import Any

from .kinds import kind_of
from .states import JobState as S

ETA_WINDOW_S = 300.0
HOLDS_GPUS = {S.STARTING.value, S.RUNNING.value, S.STALLED.value, S.RECOVERING.value}


def pace_eta(pace, step: int | None, total: int | None, now: float) -> float | None:
    """Seconds left at the pace of the last ETA_WINDOW_S of wall time (at least two
    samples 5 s apart), or None."""
    if not pace or step is None or not total:
        return None
    t_new, s_new = pace[-1]
    old = next(((t, s) for t, s in pace if t >= t_new - ETA_WINDOW_S), pace[0])
    if t_new - old[0] < 5.0 or s_new <= old[1]:
        return None
    rate = (s_new - old[1]) / (t_new - old[0])
    return max(0.0, (total - step) / rate - (now - t_new))


def job_view(job: dict[str, Any], now: float | None = None, pace=None,
             stepped: bool = False) -> dict[str, Any]:
    """The stable, documented shape of a job on the wire (`--json`). `stepped`: its running
    attempt has reported a step of its own."""
    now = time.time() if now is None else now
    view = {k: v for k, v in job.items()
            if k not in ("spec", "pid_started", "queued_at", "output_offset", "events_offset")}
    step, total, sps = job.get("step"), job.get("total_steps"), job.get("seconds_per_step")
    view["progress"] = (step / total) if (step is not None and total) else None
    # an attempt starts at its newest checkpoint's step, and shows it as such until it
    # reports one of its own
    attempt_on = job["state"] in (S.STARTING.value, S.RUNNING.value, S.STALLED.value)
    view["step_from"] = None if step is None else \
        "checkpoint" if attempt_on and not stepped else "attempt"
    started = job.get("started_at")
    view["elapsed_s"] = ((job.get("finished_at") or now) - started) if started else None
    running = job["state"] in (S.RUNNING.value, S.STARTING.value)
    eta = pace_eta(pace, step, total, now) if running else None
    if eta is None and running and None not in (step, total, sps):
        eta = (total - step) * sps  # before the pace has a window: the last step's time
    view["eta_s"] = eta
    view["lora"] = kind_of(job).result(job)
    if job.get("placement"):
        # the GPUs are its own while an attempt (or its restart backoff) holds them; after,
        # they say where it last ran (a requeued job goes back there)
        view["placement"] = dict(job["placement"], active=job["state"] in HOLDS_GPUS)
    return view


def waiting_for(view: dict[str, Any]) -> str | None:
    """What a queued job waits for, from its view's `after`: "after dl (running, 41 %), b
    (queued)"; None when it waits for nothing (or is not queued)."""
    if view["state"] != S.QUEUED.value:
        return None
    left = [a for a in view.get("after") or [] if a["state"] != S.SUCCEEDED.value]
    if not left:
        return None
    return "after " + ", ".join(
        f"{a['name']} ({a['state']}" + (f", {a['progress'] * 100:.0f} %" if
                                        a["progress"] is not None and a["state"] in
                                        (S.RUNNING.value, S.STALLED.value) else "") + ")"
        for a in left)
