"""The queue and the GPUs: which queued jobs start, and where, as the placement policy
(placement.py) decides from the probe's inventory and what is placed. A mixin of the Daemon
(daemon.py); the start of each attempt is runs.py's.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from trainer import tiers

from . import placement as policy
from .gpus import count_of, inventory, need_of
from .kinds import kind_of
from .protocol import TOPIC_STATE, ErrorCode, FluxgymError
from .states import JobState

log = logging.getLogger("fluxgymd")
S = JobState
QUEUE_WINDOW = 1000  # queued jobs one scheduling pass looks at


class Placing:
    def _inventory(self) -> list[policy.Gpu]:
        """The GPUs fluxgymd hands out now, with their memory as read this moment; [] where
        there are none, or the probe gives no memory figures (then jobs run as they always
        did, without CUDA_VISIBLE_DEVICES)."""
        if not self.gpu.available:
            return []
        try:
            stats = self.gpu.stats()
        except Exception:  # a probe that fails is no reason to stop the queue
            log.exception("reading the GPUs failed")
            return []
        return inventory(stats, self.cfg.gpus_use)

    def _log_inventory(self) -> None:
        gpus = self._inventory()
        if gpus:
            log.info("placing jobs on %d GPU(s): %s; %d MiB kept free on each%s", len(gpus),
                     ", ".join(f"{g.label} {g.total / policy.GiB:.0f} GiB ({g.uuid})"
                               for g in gpus), self.cfg.gpu_reserve_mib,
                     "; one job per GPU" if self.cfg.gpus_exclusive else "")
        elif self.gpu.available:
            log.info("GPU placement off: the GPU probe gives no memory figures (or [gpus] use "
                     "leaves none); jobs run without CUDA_VISIBLE_DEVICES from fluxgymd")

    def _places_gpus(self, spec: dict[str, Any]) -> bool:
        """Whether this daemon places the job on its own GPUs (a Slurm job is Slurm's)."""
        return self._executor_of({"spec": spec}) == "local"

    def _need(self, job: dict[str, Any], gpus: list[policy.Gpu]) -> policy.Need:
        spec = job["spec"]
        if not gpus or not self._places_gpus(spec):
            return policy.Need(count=0)
        last = dict(job.get("placement") or {})
        if job.get("checkpoint") and last.get("tier"):
            last["levers_tier"] = last["tier"]  # it resumes with its checkpoints' levers
        return need_of(spec, kind_of(spec).default_gpus, gpus, last)

    def _placed(self) -> list[policy.Placed]:
        """What holds GPUs now: the running attempts, and the jobs waiting out a restart
        backoff (they keep theirs)."""
        held = [(job_id, run.placement, run.stepped) for job_id, run in self.runs.items()]
        held += [(job_id, self.store.get(job_id).get("placement"), False)
                 for job_id in self.recovering]
        return [policy.Placed(job_id, tuple(p["gpus"]), p.get("bytes"), allocated=stepped)
                for job_id, p, stepped in held if p and p.get("gpus")]

    def schedule(self) -> None:
        """Start what may start: priority, then first in first out, while slots are free,
        each job where the placement policy puts it. A job may end as it starts (refused,
        already finished, its folder gone): its slot is then free for the next pass."""
        while self._schedule_pass():
            pass

    def _schedule_pass(self) -> bool:
        """One pass; whether it started something and slots are left for another."""
        if not self.restored.is_set() or self.paused or self.stopping:
            return False
        slots = self.max_concurrent - len(self.runs) - len(self.recovering)
        if slots <= 0:
            self.gpu_waits = {}
            return False
        queue = self.store.next_queued(QUEUE_WINDOW)
        if not queue:
            self.gpu_waits = {}
            return False
        gpus = self._inventory()
        waiting, jobs, unplaceable = [], {}, {}
        for job in queue:
            try:
                waiting.append(policy.Waiting(job["id"], self._need(job, gpus)))
                jobs[job["id"]] = job
            except ValueError as e:  # a GPU it is pinned to is gone
                unplaceable[job["id"]] = str(e)
        decided = policy.decide(gpus, self._placed(), waiting, slots,
                                self.cfg.gpu_reserve_mib * policy.MiB,
                                self.cfg.gpus_exclusive, tiers.choose)
        changed = {**decided.waits, **unplaceable} != self.gpu_waits
        self.gpu_waits = {**decided.waits, **unplaceable}
        by_uuid = {g.uuid: g for g in gpus}
        for d in decided.start:
            if self.stopping:
                return False
            job = jobs[d.job_id]
            place = None
            if d.gpus:
                shared = self._mark_sharing(d.gpus)
                place = {"gpus": list(d.gpus), "indices": [by_uuid[u].index for u in d.gpus],
                         "names": [by_uuid[u].name for u in d.gpus], "bytes": d.bytes,
                         "tier": d.tier, "room": d.room, "shared": shared,
                         "alone": bool((job.get("placement") or {}).get("alone"))}
            self._start(job, place)
        if changed:
            for job_id in decided.waits:
                if job_id in jobs:
                    self._publish(TOPIC_STATE, self._view(jobs[job_id]))
        return bool(decided.start) and \
            len(self.runs) + len(self.recovering) < self.max_concurrent

    def _mark_sharing(self, uuids: tuple[str, ...]) -> bool:
        """A job goes onto these GPUs: every running job there now shares its GPU (an
        out-of-memory failure of theirs may be the newcomer's doing). Whether one was."""
        shared = False
        for run in self.runs.values():
            p = run.placement or {}
            if set(p.get("gpus") or ()) & set(uuids):
                run.shared = True
                shared = True
        return shared

    async def _placement_loop(self) -> None:
        """GPU memory frees up without an event of ours (a job's allocator, another
        program): while a job waits for a GPU, look again at every poll."""
        while True:
            await asyncio.sleep(self.cfg.gpu_poll_s)
            if self.gpu_waits and not self.stopping:
                self.schedule()

    async def _plan_for_submit(self, spec: dict[str, Any]) -> None:
        """Before a job is queued: whether it can ever fit on this machine's GPUs (refused
        with the figures when not), and a lora job's planned memory per tier."""
        gpus = self._inventory()
        if not self._places_gpus(spec):
            return
        kind = kind_of(spec)
        count = count_of(spec, kind.default_gpus if gpus else 0)
        if count == 0:
            return
        if not gpus:
            raise FluxgymError(ErrorCode.INVALID_JOB, policy.never_fits([], policy.Need(count))
                               + f" ({self.gpu.describe()})")
        if kind.name == "lora" and spec.get("gpu_memory_gib") is None:
            from .gpus import lora_plan

            plan, why = await lora_plan(spec, self.cfg.models)
            if plan:
                spec["gpu_plan"] = plan
            else:
                spec["warnings"].append(f"{why}: placed by the tiers' budgets instead")
        try:
            need = need_of(spec, kind.default_gpus, gpus)
        except ValueError as e:
            raise FluxgymError(ErrorCode.INVALID_JOB, str(e)) from None
        why = policy.never_fits(gpus, need, self.cfg.gpu_reserve_mib * policy.MiB)
        if why:
            raise FluxgymError(ErrorCode.INVALID_JOB, f"this job can never run here: {why}")
