"""The run of one attempt: start it as its kind says, follow its output and contract
events into the log, the journal and the store, judge its exit with the watchdog's policy,
and restart or resume it within its budget. A mixin of the Daemon (daemon.py), which owns the
sockets, the store and the queue.
"""
from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import ownership, procs
from .gpus import with_gres
from .joblog import JobLog
from .journal import JobLines
from .kinds import kind_of
from .probes import job_gpus, oom_kills
from .progress import parse_child_event
from .protocol import (
    ENV_ATTEMPT, ENV_GPU_REPORT_S, ENV_GPU_ROOM, ENV_JOB_ID, ENV_OUTPUT_DIR, ENV_PROGRESS_ENDPOINT,
    TOPIC_PROGRESS, TOPIC_STATE, FluxgymError, log_topic,
)
from .states import JobState
from .executors import Exit, SpawnError
from .executors.local import Child
from .executors.slurm import SlurmAttempt, events_endpoint
from .watchdog import Budget, Ending, Limits, Stall, Watch, after_exit

log = logging.getLogger("fluxgymd")
S = JobState
FLUSH_INTERVAL_S = 1.0
RECENT_LOGS = 32  # finished jobs whose numbered lines stay in memory for `logs -f`
# The daemon's own systemd plumbing is not the child's business.
# Test hook: "stop-after-spawn" freezes this daemon (SIGSTOP) right after it started an
# attempt and before it stored the pid: the window in which a crash once ran a job twice.
FAULT_ENV = "FLUXGYMD_FAULT"
# The Hub token is given only to children that download (hub_token).
_PRIVATE_ENV = (FAULT_ENV, "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS",
                "LISTEN_PID", "LISTEN_FDNAMES", "INVOCATION_ID", "HF_TOKEN",
                "HUGGING_FACE_HUB_TOKEN")


@dataclass
class Run:
    job_id: int
    attempt: int
    log: JobLog
    executor: str = "local"
    parser: Any = None  # the kind's reader of progress from output, if it has one
    child: Child | SlurmAttempt | None = None  # the attempt, as its executor runs it
    cancel: bool = False
    pending: dict[str, Any] = field(default_factory=dict)  # progress not yet in the store
    metrics: list[tuple] = field(default_factory=list)
    last_line: str = ""
    limits: Limits = field(default_factory=Limits)
    watch: Watch | None = None
    budget: Budget = field(default_factory=Budget)
    stall: Stall | None = None  # set once the watchdog has judged this attempt stalled
    gpus: list[int] | None = None
    next_gpu_at: float = 0.0
    oom_at_start: int | None = None
    journal: JobLines | None = None  # this attempt's lines to journald, when it is on
    folder_lock: ownership.FolderLock | None = None
    # (wall time, step) samples of this attempt: the ETA is the rate over the last
    # ETA_WINDOW_S, checkpoints and samples included, so it does not jump between phases
    pace: collections.deque = field(default_factory=lambda: collections.deque(maxlen=4096))
    offsets: tuple[int, int] | None = None  # a Slurm attempt's file offsets, as stored
    placement: dict[str, Any] | None = None  # its GPUs (placing.py), when it has some
    shared: bool = False  # another job of ours was on one of its GPUs during the attempt
    stepped: bool = False  # this attempt reported a step (until then the store's is where
    #                        it resumes from: its newest checkpoint's)


def hub_token(token_file: str) -> str | None:
    """The Hugging Face token: [hub] token_file (its first line; private to the service
    user, mode 0600), else HF_TOKEN in the daemon's own environment, else None. ValueError
    says what is wrong with the file, never what is in it."""
    if token_file:
        try:
            st = os.stat(token_file)
            if st.st_mode & 0o077:
                raise ValueError(f"[hub] token_file {token_file} is readable by others (mode "
                                 f"{st.st_mode & 0o777:o}); chmod 600 it")
            with open(token_file, encoding="utf-8") as fh:
                token = fh.readline().strip()
        except OSError as e:
            raise ValueError(f"[hub] token_file {token_file} cannot be read: "
                             f"{e.strerror or e}") from None
        if not token:
            raise ValueError(f"[hub] token_file {token_file} is empty")
        return token
    return os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or None


def _progress_of(job: dict[str, Any]) -> int | None:
    """How far a job has come for the no-progress breaker: its newest checkpoint, or for a
    job that never reports one, its step."""
    return job["checkpoint_step"] if job["checkpoint_step"] is not None else job["step"]


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


class Runs:
    def _job_log(self, job: dict[str, Any]) -> JobLog:
        jl = self.logs.pop(job["id"], None)
        if jl is None:
            jl = JobLog(Path(job["output_dir"]), self.cfg.log_max_bytes, self.cfg.log_backups,
                        self.cfg.log_memory_lines)
        self.logs[job["id"]] = jl  # most recent last
        while len(self.logs) > RECENT_LOGS + len(self.runs) + 1:
            old_id, old = next(iter(self.logs.items()))
            if old_id in self.runs:
                break
            self.logs.pop(old_id).close()
        return jl

    def _start(self, job: dict[str, Any], place: dict[str, Any] | None = None) -> None:
        """Start the job's next attempt; `place`: the GPUs the placement policy gave it (a
        job restarted after a backoff keeps the ones it has)."""
        job_id, attempt = job["id"], job["attempts"] + 1
        kind = kind_of(job)
        progress = _progress_of(job)  # what the no-progress breaker compares this attempt with
        if place is None and job["state"] == S.RECOVERING.value:
            place = job.get("placement") if (job.get("placement") or {}).get("gpus") else None
        # the step shown is this attempt's: until it reports one, where it resumes from
        job = self._transition(job_id, S.STARTING, f"attempt {attempt}", attempts=attempt,
                               started_at=job["started_at"] or time.time(), exit_code=None,
                               step=job["checkpoint_step"], loss=None, lr=None,
                               seconds_per_step=None,
                               **({"placement": json.dumps(place)} if place else {}))
        if (why := self._refused(job["spec"])) is not None:
            # queued while it was allowed, and the config changed since
            self._transition(job_id, S.FAILED, why)
            return
        out = Path(job["output_dir"])
        try:
            why = ownership.check(out, self.store.id, job_id, job["spec"])
            if why is not None:
                self._transition(job_id, S.FAILED, why)
                return
            folder_lock = ownership.FolderLock(out)
        except OSError as e:
            self._transition(job_id, S.FAILED, f"could not prepare {out}: {e}")
            return
        except FluxgymError as e:
            self._transition(job_id, S.FAILED, e.message)
            return
        if kind.finished(job):
            folder_lock.release()
            self._transition(job_id, S.SUCCEEDED, f"its final model {kind.result(job)} "
                             "already exists: the run finished, so it is not run again")
            return
        try:
            argv, extra_env, cwd = kind.command(job)
        except OSError as e:
            folder_lock.release()
            self._transition(job_id, S.FAILED, f"could not prepare {out}: {e}")
            return
        env = {k: v for k, v in os.environ.items() if k not in _PRIVATE_ENV}
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.update(extra_env)
        if kind.hub_token:  # the Hub token goes to the children that download, and no other
            try:
                token = hub_token(self.cfg.hub_token_file)
            except ValueError as e:
                folder_lock.release()
                self._transition(job_id, S.FAILED, str(e))
                return
            if token:
                env["HF_TOKEN"] = token
        env.update({ENV_JOB_ID: str(job_id), ENV_OUTPUT_DIR: str(out), ENV_ATTEMPT: str(attempt),
                    ENV_PROGRESS_ENDPOINT: self.progress_endpoint})
        if place:
            # by UUID: an index can name another GPU once devices are reordered
            env["CUDA_VISIBLE_DEVICES"] = ",".join(place["gpus"])
            if place.get("room"):
                # what this job may take, others' plans there counted (auto's tier)
                env[ENV_GPU_ROOM] = str(place["room"])
        executor = self._executor_of(job)
        run = self._new_run(job, attempt, executor, folder_lock, progress)
        run.placement = place
        run.shared = bool(place and place.get("shared"))
        run.log.write([f"=== fluxgymd: attempt {attempt} at "
                       f"{time.strftime('%Y-%m-%d %H:%M:%S')}"
                       f"{' through Slurm' if executor == 'slurm' else ''}: "
                       f"{_one_line(shlex.join(argv))} ==="])
        if executor == "slurm":
            self._start_on_slurm(job, run, argv, env, cwd)
            return
        # every process of the attempt carries its token, whatever group it moves to; the
        # attempt's number was stored (STARTING) before this spawn, so a restarted daemon
        # finds them even if this one dies before it stores the pid
        env[procs.TOKEN_ENV] = procs.attempt_token(self.store.id, job_id, attempt)
        try:
            run.child = Child(argv, env, cwd, lambda lines, pending, stream:
                              self._on_output(run, lines, pending, stream))
        except SpawnError as e:
            folder_lock.release()
            run.log.write([f"=== fluxgymd: {e} ==="])
            self._transition(job_id, S.FAILED, str(e))
            return
        if os.environ.get(FAULT_ENV) == "stop-after-spawn":
            os.kill(os.getpid(), signal.SIGSTOP)
        run.watch = self._new_watch(job, run)
        run.gpus = list(place["indices"]) if place else job_gpus(env)
        run.oom_at_start = oom_kills()
        self.runs[job_id] = run
        self._transition(job_id, S.RUNNING, f"attempt {attempt}: pid {run.child.pid}",
                         pid=run.child.pid, pid_started=run.child.create_time,
                         executor="local", external_id=None, node=None, external_state=None)
        self._spawn(self._watch(run))

    def _new_run(self, job: dict[str, Any], attempt: int, executor: str,
                 folder_lock: ownership.FolderLock, progress: int | None = None) -> Run:
        run = Run(job["id"], attempt, self._job_log(job), executor=executor,
                  parser=kind_of(job).output_parser(job["spec"]), folder_lock=folder_lock)
        if self.journal is not None:
            run.journal = JobLines(self.journal, job["id"], job["name"], attempt)
        run.limits = self._limits_for(job)
        run.budget = Budget(restarts=job["restarts"], no_progress=job["no_progress"],
                            progress_at_start=progress)
        return run

    def _new_watch(self, job: dict[str, Any], run: Run) -> Watch:
        # a Slurm attempt's GPUs are the trainer's to report (the daemon cannot read them)
        kind = kind_of(job)
        return Watch(run.limits, started=time.monotonic(), contract=kind.speaks_contract,
                     gpu_available=self.gpu.available and run.executor == "local"
                     and kind.uses_gpu)

    def _executor_of(self, job: dict[str, Any]) -> str:
        if kind_of(job).local_only:
            return "local"
        return job["spec"].get("executor") or self.cfg.executor

    # --- Slurm ----------------------------------------------------------------------
    def _slurm_name(self, job: dict[str, Any], attempt: int) -> str:
        """The Slurm job name: the job, this store, the attempt (found again by it)."""
        return f"fluxgymd-{job['name']}-{self.store.id[:6]}-{attempt}"

    def _slurm_callbacks(self, run: Run):
        return (lambda lines, pending, stream: self._on_output(run, lines, pending, stream),
                self._on_child_event, lambda att: self._on_slurm_status(run, att))

    def _start_on_slurm(self, job: dict[str, Any], run: Run, argv: list[str],
                        env: dict[str, str], cwd: str | None) -> None:
        settings = with_gres(self.cfg.slurm.with_overrides(job["spec"].get("slurm") or {}),
                             job["spec"])
        if settings.python and argv and argv[0] == sys.executable:
            argv = [settings.python, *argv[1:]]
        out = Path(job["output_dir"])
        env[ENV_PROGRESS_ENDPOINT] = events_endpoint(out, run.attempt)
        env[ENV_GPU_REPORT_S] = f"{self.cfg.gpu_poll_s:g}"
        title = f"fluxgymd job {job['id']} ({job['name']}), attempt {run.attempt}"
        run.child = self.slurm.start(out, run.attempt, title, self._slurm_name(job, run.attempt),
                                     argv, env, cwd, settings, *self._slurm_callbacks(run))
        run.offsets = (0, 0)
        self.runs[job["id"]] = run
        self.store.update(job["id"], executor="slurm", external_id=None, node=None,
                          external_state="submitting", output_offset=0, events_offset=0,
                          pid=None, pid_started=None)
        self._spawn(self._watch(run))

    def _on_slurm_status(self, run: Run, att: SlurmAttempt) -> None:
        """Slurm's view of the attempt changed: its id, state, reason or node."""
        if self.runs.get(run.job_id) is not run:
            return
        shown = att.state + (f" ({att.reason})" if att.reason else "")
        self.store.update(run.job_id, external_id=att.external_id, node=att.node,
                          external_state=shown)
        job = self.store.get(run.job_id)
        if att.on_node and run.watch is None:
            run.watch = self._new_watch(job, run)
            if job["state"] == S.STARTING.value:
                self._transition(run.job_id, S.RUNNING, f"attempt {run.attempt}: Slurm job "
                                 f"{att.external_id} on {att.node or 'its node'}")
                return
        self._publish(TOPIC_STATE, self._view(job))

    def _adopt(self, job: dict[str, Any], external_id: str) -> bool:
        """Take up a Slurm job a previous daemon left running: the same attempt goes on."""
        out = Path(job["output_dir"])
        try:
            folder_lock = ownership.FolderLock(out)
        except (OSError, FluxgymError) as e:
            log.error("job %s: cannot take up Slurm job %s again: %s", job["id"], external_id, e)
            return False
        run = self._new_run(job, job["attempts"], "slurm", folder_lock, _progress_of(job))
        run.stepped = True  # the same attempt goes on: its step is its own
        run.offsets = (job["output_offset"] or 0, job["events_offset"] or 0)
        run.log.write([f"=== fluxgymd: restarted; following attempt {run.attempt} "
                       f"(Slurm job {external_id}) again ==="])
        run.child = self.slurm.adopt(out, run.attempt, external_id, *run.offsets,
                                     *self._slurm_callbacks(run))
        if job["state"] != S.STARTING.value:
            run.watch = self._new_watch(job, run)
        self.runs[job["id"]] = run
        self.store.update(job["id"], external_id=external_id)
        self._spawn(self._watch(run))
        return True

    def _limits_for(self, job: dict[str, Any]) -> Limits:
        return self.cfg.limits.with_overrides(job["spec"].get("watchdog") or {})

    async def _watch(self, run: Run) -> None:
        result = await run.child.exited
        try:
            self._on_exit(run, result)
        finally:
            if run.folder_lock is not None:
                run.folder_lock.release()
            self.runs.pop(run.job_id, None)
            self.schedule()

    def _on_exit(self, run: Run, ex: Exit) -> None:
        self._flush_run(run)
        notes = ([f"killed {ex.leftovers} leftover process(es) of its group"]
                 if ex.leftovers else []) + \
            ([f"stopped {ex.escaped} process(es) that had left its process group"]
             if ex.escaped else [])
        note = f" ({'; '.join(notes)})" if notes else ""
        where = f" (Slurm job {run.child.external_id})" if run.child.external_id else ""
        run.log.write([f"=== fluxgymd: attempt {run.attempt}{where} {ex.describe()}{note} ==="])
        job = self.store.get(run.job_id)
        if ex.fatal and not run.cancel:
            self._transition(run.job_id, S.FAILED, f"{ex.describe()} (not retried; fix it, "
                             "then `fluxgymctl retry` the job)", pid=None)
            return
        oom_now = oom_kills() if run.executor == "local" else None
        ending = Ending(
            code=ex.code, signal=ex.signal, description=ex.describe(),
            output_tail="\n".join(line for _, line in run.log.tail(60)),
            oom_killed=ex.oom or (None not in (oom_now, run.oom_at_start)
                                  and oom_now > run.oom_at_start),
            stall=run.stall, cancelled=run.cancel, daemon_stopping=self.stopping,
            progress=_progress_of(job), last_output=run.last_line,
            contract=kind_of(job).speaks_contract, lost=ex.lost,
            shared_gpu=run.shared and not (run.placement or {}).get("alone"))
        out = after_exit(ending, run.budget, run.limits)
        if out.alone:
            self.store.update(run.job_id, placement=json.dumps(
                {**(job.get("placement") or {}), "alone": True}))
        reason = out.reason
        fields = {"exit_code": ex.code, "pid": None, "restarts": out.budget.restarts,
                  "no_progress": out.budget.no_progress}
        job_id = run.job_id
        if out.action == "succeeded":
            self._transition(job_id, S.SUCCEEDED, reason, **fields)
        elif out.action == "cancelled":
            self._transition(job_id, S.CANCELLED, reason, **fields)
        elif out.action == "failed":
            self._transition(job_id, S.FAILED, reason, **fields)
        elif out.action == "interrupted":
            self._transition(job_id, S.INTERRUPTED, reason, **fields)
            self._transition(job_id, S.QUEUED, "resumes when fluxgymd starts again")
        elif out.action == "resume":
            self._transition(job_id, S.INTERRUPTED, reason, **fields)
            self._transition(job_id, S.QUEUED, "resuming from its checkpoint")
        else:  # restart after a backoff, keeping the job's slot
            self.counters["restart", run.stall.rule if run.stall else "exit"] += 1
            self._transition(job_id, S.RECOVERING, reason, **fields)
            self.recovering[job_id] = asyncio.get_running_loop().call_later(
                out.delay_s, self._restart, job_id)

    def _restart(self, job_id: int) -> None:
        self.recovering.pop(job_id, None)
        if self.stopping:
            return
        job = self.store.get(job_id)
        if job["state"] == S.RECOVERING.value:
            self._start(job)
        self.schedule()

    def _on_output(self, run: Run, lines: list[str], pending: str, stream: str) -> None:
        if run.watch is not None:
            run.watch.on_output(time.monotonic())
        if lines and run.journal is not None:
            run.journal.lines(lines, stream)
        if lines:
            first = run.log.write(lines)
            self._publish(log_topic(run.job_id),
                          {"job": run.job_id, "epoch": self.epoch, "first": first, "lines": lines})
            for line in reversed(lines):
                if line.strip():
                    run.last_line = line.strip()
                    break
        if run.parser is not None:
            for ev in run.parser(lines, pending):
                self._on_progress(run, ev)

    async def _serve_progress(self) -> None:
        while True:
            self._on_child_event(await self.pull.recv())

    def _on_child_event(self, payload: bytes) -> None:
        """A contract event, from the progress socket or a Slurm attempt's events file."""
        ev = parse_child_event(payload)
        if ev is None:
            log.debug("ignored a malformed progress event: %.200r", payload)
            return
        run = self.runs.get(ev["job"])
        if run is not None and ev.get("attempt", run.attempt) == run.attempt:
            if run.watch is not None:
                run.watch.contract = True  # it speaks the contract: judge it by events
            self._on_progress(run, ev)

    def _on_progress(self, run: Run, ev: dict[str, Any]) -> None:
        kind = ev["event"]
        if run.watch is not None:
            now = time.monotonic()
            if kind == "step":
                run.watch.on_step(now, ev["step"])
            elif kind == "phase":
                run.watch.on_phase(now, ev["phase"])
            elif kind == "gpu" and run.executor != "local":
                # a node's trainer reads its own GPUs; here the daemon's probe is the judge
                run.watch.gpu_available = True
                run.watch.on_gpu(now, ev["utilization"])
        if kind == "gpu":
            return  # a reading, not news
        if kind == "step":
            run.stepped = True
            run.pace.append((time.time(), ev["step"]))
            upd = {"step": ev["step"]}
            for src, dst in (("total", "total_steps"), ("loss", "loss"), ("lr", "lr"),
                             ("seconds_per_step", "seconds_per_step")):
                if src in ev:
                    upd[dst] = ev[src]
            run.pending.update(upd)
            if "loss" in ev or "lr" in ev:
                run.metrics.append((run.job_id, time.time(), run.attempt, ev["step"],
                                    ev.get("loss"), ev.get("lr")))
        elif kind == "phase":
            self.store.update(run.job_id, phase=ev["phase"])
        elif kind == "plan":
            self.store.update(run.job_id, memory_plan=json.dumps(ev["plan"]))
        elif kind == "checkpoint":
            self.store.update(run.job_id, checkpoint=ev["path"],
                              checkpoint_step=ev.get("step"))
        self._publish(TOPIC_PROGRESS, dict(ev, job=run.job_id))

    def _flush_run(self, run: Run) -> None:
        if isinstance(run.child, SlurmAttempt) and run.child.out is not None:
            # a restarted daemon reads the attempt's files on from here
            offsets = (run.child.out.resume_offset, run.child.events.resume_offset)
            if offsets != run.offsets:
                run.offsets = offsets
                self.store.update(run.job_id, output_offset=offsets[0], events_offset=offsets[1])
        if run.pending:
            self.store.update(run.job_id, **run.pending)
            run.pending = {}
        if run.metrics:
            self.store.add_metrics(run.metrics)
            run.metrics = []

    def _flush(self) -> None:
        for run in list(self.runs.values()):
            self._flush_run(run)

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            self._flush()
