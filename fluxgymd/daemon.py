"""fluxgymd's wiring and event loop: sockets, the queue, runs, shutdown and restore. The
control operations are in operations.py, a job's wire shape in views.py.

Policy lives elsewhere (states, jobspec, progress parsing); this module decides only when
to call it. Everything runs on one asyncio loop, so a job's state never changes under a
handler's feet between two awaits it did not write.
"""
from __future__ import annotations

import asyncio
import collections
import fcntl
import json
import logging
import os
import shlex
import shutil
import signal
import sqlite3
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w
import zmq
import zmq.asyncio

from . import __version__, ownership
from .config import Config
from .joblog import JobLog
from .journal import Journal, JobLines
from .notify import Notifier, summary
from .operations import Operations
from .probes import job_gpus, make_gpu_probe, oom_kills, process_reading
from .progress import parse_child_event, parse_tqdm
from .protocol import (
    CONTROL_SOCKET, ENV_ATTEMPT, ENV_JOB_ID, ENV_OUTPUT_DIR, ENV_PROGRESS_ENDPOINT, EVENTS_SOCKET,
    PROGRESS_SOCKET, TOPIC_PROGRESS, TOPIC_STATE, FluxgymError, encode, log_topic,
)
from .server import ControlServer
from .states import ACTIVE, FINISHED, JobState
from .store import Store, StoreError
from .supervisor import Child, Exit, SpawnError, kill_orphan_group, same_process
from .views import job_view
from .watchdog import Budget, Ending, Limits, Stall, Watch, after_exit

log = logging.getLogger("fluxgymd")
S = JobState
FLUSH_INTERVAL_S = 1.0
WATCH_INTERVAL_S = 0.25  # how often the watchdog looks: detection lags a limit by at most this
STACK_DUMP_WAIT_S = 1.0  # after SIGUSR1, time for the child to write its stacks
RECENT_LOGS = 32  # finished jobs whose numbered lines stay in memory for `logs -f`
# The daemon's own systemd plumbing is not the child's business.
_PRIVATE_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID",
                "LISTEN_FDNAMES", "INVOCATION_ID")


EXIT_NEEDS_A_PERSON = 3  # the unit's RestartPreventExitStatus: restarting cannot help


class AlreadyRunning(Exception):
    pass


class UnsafeRuntimeDir(Exception):
    pass


@dataclass
class Run:
    job_id: int
    attempt: int
    log: JobLog
    parse_tqdm: bool
    child: Child | None = None
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


def _progress_of(job: dict[str, Any]) -> int | None:
    """How far a job has come for the no-progress breaker: its newest checkpoint, or for a
    job that never reports one, its step."""
    return job["checkpoint_step"] if job["checkpoint_step"] is not None else job["step"]


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


class Daemon(Operations):
    def __init__(self, cfg: Config, journal: Journal | None = None):
        self.cfg = cfg
        self.journal = journal
        self.runs: dict[int, Run] = {}
        # jobs waiting out a restart backoff; they keep their slot in the queue
        self.recovering: dict[int, asyncio.TimerHandle] = {}
        self.logs: collections.OrderedDict[int, JobLog] = collections.OrderedDict()
        self.stopping = False
        self.started_mono = time.monotonic()
        # Identifies this daemon run, so a client that follows can announce a restart (line
        # numbers themselves carry on across runs: they count train.log's lines).
        self.epoch = f"{os.getpid()}-{time.time():.6f}"
        self.max_concurrent = cfg.max_concurrent_jobs
        self.paused = False
        self.notifier = Notifier()
        self._locks: list[int] = []
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        # jobs a previous daemon left active, until restore has stopped what is left of them
        self.restoring: set[int] = set()
        self.restored = asyncio.Event()

    # --- start-up -------------------------------------------------------------------
    def _lock(self, directory: Path) -> None:
        path = directory / "fluxgymd.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AlreadyRunning(
                f"another fluxgymd is already running with {directory} (it holds {path}); "
                "stop it first, or give this one its own --runtime-dir and --state-dir"
            ) from None
        self._locks.append(fd)

    def open(self) -> None:
        cfg = self.cfg
        cfg.runtime_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        mode = cfg.runtime_dir.stat().st_mode
        if mode & 0o002:
            # anyone could replace our sockets, or reach one and run code as us
            raise UnsafeRuntimeDir(
                f"runtime dir {cfg.runtime_dir} is writable by everyone "
                f"(mode {mode & 0o7777:o}); use a private one (chmod 750 or 700), e.g. "
                f"--runtime-dir {cfg.runtime_dir}/fluxgymd")
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        cfg.outputs_dir.mkdir(parents=True, exist_ok=True)
        # Lock before binding: a second bind on an ipc path silently steals it.
        self._lock(cfg.runtime_dir)
        if cfg.state_dir.resolve() != cfg.runtime_dir.resolve():
            self._lock(cfg.state_dir)
        self.store = Store(cfg.state_dir / "fluxgymd.sqlite3")
        self.paused = self.store.setting("paused") == "1"
        saved = self.store.setting("max_concurrent_jobs")
        if saved is not None:
            self.max_concurrent = int(saved)
            log.info("max_concurrent_jobs = %s (set at run time with fluxgymctl config; "
                     "`fluxgymctl config reset max_concurrent_jobs` returns to the config's %s)",
                     saved, cfg.max_concurrent_jobs)
        self.ctx = zmq.asyncio.Context()
        self.control = ControlServer(self.ctx, cfg.control_endpoint, self._handlers())
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.setsockopt(zmq.SNDHWM, 10000)
        self.pub.bind(f"ipc://{cfg.runtime_dir / EVENTS_SOCKET}")
        self.progress_endpoint = f"ipc://{cfg.runtime_dir / PROGRESS_SOCKET}"
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.LINGER, 0)
        self.pull.setsockopt(zmq.MAXMSGSIZE, 64 * 1024)
        self.pull.bind(self.progress_endpoint)
        # Who may connect is decided by the runtime dir (0750: root and the service group);
        # the sockets themselves are group-writable so that group can, and no one else.
        for name in (CONTROL_SOCKET, EVENTS_SOCKET):
            os.chmod(cfg.runtime_dir / name, 0o660)
        os.chmod(cfg.runtime_dir / PROGRESS_SOCKET, 0o600)  # only our own children
        self.gpu = make_gpu_probe(cfg.gpu_probe)
        log.info("GPU rule %s", self.gpu.describe())

    async def restore(self) -> None:
        """Decide what a previous daemon left behind: no active job survives a restart
        as active; leftover processes of it are stopped so a job never runs twice. The
        control socket is served meanwhile (status, cancel); nothing new starts until the
        leftovers are gone."""
        left = self.store.list_jobs([s.value for s in ACTIVE])
        self.restoring = {j["id"] for j in left}
        alive = [j for j in left if same_process(j["pid"], j["pid_started"])]
        for j in alive:
            log.info("job %s (%s): waiting for the process group %s a previous fluxgymd left "
                     "running to exit (SIGTERM, SIGKILL after %gs)", j["id"], j["name"],
                     j["pid"], self.cfg.kill_grace_s,
                     extra={"job_id": j["id"], "job_name": j["name"]})
        if alive:
            self.notifier.status(f"stopping {len(alive)} leftover job process group(s)")
        await asyncio.gather(*(kill_orphan_group(j["pid"], j["pid_started"],
                                                 self.cfg.kill_grace_s) for j in alive))
        for job in left:
            note = f"; stopped its leftover process group {job['pid']}" if job in alive else ""
            job = self.store.get(job["id"])  # a cancel may have come in meanwhile
            if job["cancel_requested"]:
                self._transition(job["id"], S.CANCELLED,
                                 f"cancelled (fluxgymd restarted before it stopped){note}")
                continue
            self._transition(
                job["id"], S.INTERRUPTED,
                f"fluxgymd restarted while attempt {job['attempts']} was {job['state']}{note}",
                pid=None,
            )
            self._transition(job["id"], S.QUEUED, "requeued after fluxgymd restart")
        self.restoring.clear()
        self.restored.set()
        self.schedule()

    # --- the loop -------------------------------------------------------------------
    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        self._spawn(self.control.serve())
        restore = self._spawn(self.restore())
        self._spawn(self._serve_progress())
        self._spawn(self._flush_loop())
        self._spawn(self._watch_loop())
        interval = self.notifier.watchdog_interval()
        if interval:
            self._spawn(self._watchdog_pings(interval))
        log.info("fluxgymd %s serving %s (state %s, outputs %s, %d concurrent)",
                 __version__, self.cfg.control_endpoint, self.cfg.state_dir,
                 self.cfg.outputs_dir, self.cfg.max_concurrent_jobs)
        self.notifier.ready(self._summary())
        await self._stop.wait()
        if not restore.done():
            await restore  # leftovers are killed either way; let it record them
        await self.shutdown()

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())

    async def shutdown(self) -> None:
        self.stopping = True
        active = [r for r in self.runs.values() if r.child is not None]
        log.info("stopping: asking %d job(s) to checkpoint and exit", len(active))
        self.notifier.stopping(f"stopping; waiting for {len(active)} job(s) to checkpoint")
        for run in active:
            run.child.signal(signal.SIGTERM)
        deadline = time.monotonic() + self.cfg.kill_grace_s
        while any(r.child.running for r in active):
            left = deadline - time.monotonic()
            if left <= 0:
                for r in active:
                    if r.child.running:
                        log.warning("job %s did not exit in %.0fs; SIGKILL", r.job_id,
                                    self.cfg.kill_grace_s)
                        r.child.signal(signal.SIGKILL)
                break
            # Tell systemd we are making progress so it does not SIGKILL us meanwhile.
            self.notifier.extend_timeout(min(left, 5.0) + 5.0)
            await asyncio.wait([asyncio.shield(r.child.exited) for r in active if r.child.running],
                               timeout=min(left, 5.0))
        for r in active:
            await r.child.exited
        for job_id, timer in list(self.recovering.items()):
            timer.cancel()
            del self.recovering[job_id]
            self._transition(job_id, S.INTERRUPTED, "fluxgymd stopping during a restart backoff")
            self._transition(job_id, S.QUEUED, "resumes when fluxgymd starts again")
        # let the exit handlers record every job before the store closes
        while self.runs:
            await asyncio.sleep(0.01)
        self._flush()
        for task in list(self._tasks):
            task.cancel()
        self.control.close()
        self.pub.close(linger=0)
        self.pull.close(linger=0)
        self.ctx.term()
        self.store.close()
        for jl in self.logs.values():
            jl.close()
        for fd in self._locks:
            os.close(fd)
        log.info("stopped")

    # --- state changes --------------------------------------------------------------
    def _transition(self, job_id: int, new: JobState, reason: str, **fields) -> dict:
        if new in FINISHED or new is S.QUEUED:
            fields.setdefault("phase", None)  # a phase belongs to a running attempt
        job = self.store.transition(job_id, new, reason, **fields)
        log.info("job %s (%s): %s: %s", job_id, job["name"], new.value, reason,
                 extra={"job_id": job_id, "job_name": job["name"]})
        self._announce(job)
        return job

    def _announce(self, job: dict[str, Any]) -> None:
        """A job changed state: tell subscribers and systemd."""
        self._publish(TOPIC_STATE, self._view(job))
        self.notifier.status(self._summary())

    def _summary(self) -> str:
        return summary(self.store.counts()) + ("; queue paused" if self.paused else "")

    def _view(self, job: dict[str, Any], now: float | None = None) -> dict[str, Any]:
        run = self.runs.get(job["id"])
        return job_view(job, now, run.pace if run is not None else None)

    def _publish(self, topic: bytes, obj: dict[str, Any]) -> None:
        try:
            self.pub.send_multipart([topic, encode(obj)], flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # a slow subscriber loses events; followers recover gaps by sequence number

    # --- the queue ------------------------------------------------------------------
    def schedule(self) -> None:
        if not self.restored.is_set() or self.paused:
            return
        while not self.stopping and \
                len(self.runs) + len(self.recovering) < self.max_concurrent:
            nxt = self.store.next_queued(1)
            if not nxt:
                return
            self._start(nxt[0])

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

    def _command_for(self, job: dict[str, Any]) -> tuple[list[str], dict[str, str], str | None]:
        spec = job["spec"]
        out = Path(job["output_dir"])
        if spec["kind"] == "command":
            cmd = spec["command"]
            return list(cmd["argv"]), dict(cmd["env"]), cmd["cwd"]
        # lora: the trainer reads the same job file the user submitted
        job_file = out / "job.toml"
        doc = {"job": {"name": spec["name"], "kind": "lora"}, "train": spec["train"]}
        if spec.get("watchdog"):
            doc["watchdog"] = spec["watchdog"]
        job_file.write_text(tomli_w.dumps(doc), encoding="utf-8")
        return [sys.executable, "-m", "trainer", str(job_file), "--output-dir", str(out)], {}, None

    def _start(self, job: dict[str, Any]) -> None:
        job_id, attempt = job["id"], job["attempts"] + 1
        job = self._transition(job_id, S.STARTING, f"attempt {attempt}", attempts=attempt,
                               started_at=job["started_at"] or time.time(), exit_code=None)
        if (why := self._command_jobs_off(job["spec"])) is not None:
            # queued while they were allowed, and the config changed since
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
        try:
            argv, extra_env, cwd = self._command_for(job)
        except OSError as e:
            folder_lock.release()
            self._transition(job_id, S.FAILED, f"could not prepare {out}: {e}")
            return
        env = {k: v for k, v in os.environ.items() if k not in _PRIVATE_ENV}
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.update(extra_env)
        env.update({ENV_JOB_ID: str(job_id), ENV_OUTPUT_DIR: str(out), ENV_ATTEMPT: str(attempt),
                    ENV_PROGRESS_ENDPOINT: self.progress_endpoint})
        spec = job["spec"]
        run = Run(job_id, attempt, self._job_log(job),
                  parse_tqdm=spec["kind"] == "command" and spec["command"]["progress"] == "tqdm",
                  folder_lock=folder_lock)
        if self.journal is not None:
            run.journal = JobLines(self.journal, job_id, job["name"], attempt)
        run.log.write([f"=== fluxgymd: attempt {attempt} at "
                       f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {_one_line(shlex.join(argv))} ==="])
        try:
            run.child = Child(argv, env, cwd, lambda lines, pending, stream:
                              self._on_output(run, lines, pending, stream))
        except SpawnError as e:
            folder_lock.release()
            run.log.write([f"=== fluxgymd: {e} ==="])
            self._transition(job_id, S.FAILED, str(e))
            return
        run.limits = self._limits_for(job)
        run.watch = Watch(run.limits, started=time.monotonic(), contract=spec["kind"] == "lora",
                          gpu_available=self.gpu.available)
        run.budget = Budget(restarts=job["restarts"], no_progress=job["no_progress"],
                            progress_at_start=_progress_of(job))
        run.gpus = job_gpus(env)
        run.oom_at_start = oom_kills()
        self.runs[job_id] = run
        self._transition(job_id, S.RUNNING, f"attempt {attempt}: pid {run.child.pid}",
                         pid=run.child.pid, pid_started=run.child.create_time)
        self._spawn(self._watch(run))

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
        note = f" (killed {ex.leftovers} leftover process(es) of its group)" if ex.leftovers else ""
        run.log.write([f"=== fluxgymd: attempt {run.attempt} {ex.describe()}{note} ==="])
        job = self.store.get(run.job_id)
        oom_now = oom_kills()
        ending = Ending(
            code=ex.code, signal=ex.signal, description=ex.describe(),
            output_tail="\n".join(line for _, line in run.log.tail(60)),
            oom_killed=None not in (oom_now, run.oom_at_start) and oom_now > run.oom_at_start,
            stall=run.stall, cancelled=run.cancel, daemon_stopping=self.stopping,
            progress=_progress_of(job), last_output=run.last_line,
            contract=job["kind"] == "lora")
        out = after_exit(ending, run.budget, run.limits)
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

    async def _watchdog_pings(self, interval: float) -> None:
        """WATCHDOG=1 from a task on the loop itself: a loop wedged by a blocking call stops
        pinging, and systemd kills and restarts us as it should."""
        while True:
            self.notifier.ping()
            await asyncio.sleep(interval)

    # --- the watchdog -----------------------------------------------------------------
    async def _watch_loop(self) -> None:
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            now = time.monotonic()
            for run in list(self.runs.values()):
                if run.stall is not None or run.cancel or not run.child.running:
                    continue
                reading = process_reading(run.child.pid)
                if reading is not None:
                    run.watch.on_process(now, *reading)
                if self.gpu.available and now >= run.next_gpu_at:
                    run.watch.on_gpu(now, self.gpu.read(run.gpus))
                    run.next_gpu_at = now + self.cfg.gpu_poll_s
                stall = run.watch.check(now)
                if stall is not None:
                    run.stall = stall
                    self._spawn(self._stop_stalled(run, stall))

    async def _stop_stalled(self, run: Run, stall: Stall) -> None:
        """Diagnostics first, then SIGTERM to the group, SIGKILL after the grace."""
        if not run.child.running:
            return  # it ended on its own meanwhile; _on_exit has judged it
        self._flush_run(run)
        self._transition(run.job_id, S.STALLED, stall.reason)
        pid = run.child.pid
        run.log.write([f"=== fluxgymd: stalled: {stall.reason}; capturing diagnostics ==="])
        status = (process_reading(pid) or ("gone", 0))[0]
        if shutil.which("py-spy"):
            await self._py_spy_dump(run, pid)
        if run.watch.contract:
            try:  # the contract's stack dump, from the job's main process
                os.kill(pid, signal.SIGUSR1)
            except OSError:
                pass
        run.log.write([f"=== fluxgymd: stopping attempt {run.attempt}: SIGTERM to its process "
                       f"group, SIGKILL after {run.limits.kill_grace_s:g}s ==="])
        if status == "stopped":
            # A stopped process takes its signals when continued: the stack dump and the
            # SIGTERM both, so it cannot slip back into training in between.
            run.child.signal(signal.SIGTERM)
            run.child.signal(signal.SIGCONT)
        elif run.watch.contract:
            await asyncio.sleep(STACK_DUMP_WAIT_S)
        await run.child.terminate(run.limits.kill_grace_s)

    async def _py_spy_dump(self, run: Run, pid: int) -> None:
        try:
            proc = await asyncio.create_subprocess_exec(
                "py-spy", "dump", "--pid", str(pid), stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT)
            out, _ = await asyncio.wait_for(proc.communicate(), 15)
            run.log.write(["=== fluxgymd: py-spy dump ==="]
                          + out.decode("utf-8", "replace").splitlines())
        except (OSError, asyncio.TimeoutError) as e:
            run.log.write([f"=== fluxgymd: py-spy dump failed: {e} ==="])

    # --- output and progress ----------------------------------------------------------
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
        if run.parse_tqdm:
            # Only the newest bar matters, and the newest is often still being drawn.
            for line in [pending, *reversed(lines)]:
                if "/" in line:
                    ev = parse_tqdm(line)
                    if ev:
                        self._on_progress(run, ev)
                        break

    async def _serve_progress(self) -> None:
        while True:
            payload = await self.pull.recv()
            ev = parse_child_event(payload)
            if ev is None:
                log.debug("ignored a malformed progress event: %.200r", payload)
                continue
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
        if kind == "step":
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

def run_daemon(cfg: Config, journal: Journal | None = None) -> int:
    daemon = Daemon(cfg, journal)
    try:
        daemon.open()
    except (AlreadyRunning, UnsafeRuntimeDir) as e:
        log.error("%s", e)
        return 1
    except (StoreError, sqlite3.DatabaseError) as e:
        # exit 3: systemd does not restart it (RestartPreventExitStatus), no crash loop
        log.error("the job database cannot be used: %s", e)
        return EXIT_NEEDS_A_PERSON
    except zmq.ZMQError as e:
        log.error("cannot bind the sockets in %s: %s", cfg.runtime_dir, e)
        return 1

    async def main():
        await daemon.run()

    asyncio.run(main())
    return 0
