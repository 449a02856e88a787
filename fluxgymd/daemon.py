"""fluxgymd's wiring and event loop: sockets, the queue, shutdown and restore. The run of
one attempt is in runs.py, the watchdog's loop in stalls.py, the control operations in
operations.py, job kinds in kinds.py, a job's wire shape in views.py.

Policy lives elsewhere (states, jobspec, progress parsing); this module decides only when
to call it. Everything runs on one asyncio loop, so a job's state never changes under a
handler's feet between two awaits it did not write.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import fcntl
import logging
import os
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any, Callable

import zmq
import zmq.asyncio

from . import __version__, procs
from .config import Config, ConfigError
from .flow import Flow
from .joblog import JobLog
from .journal import Journal
from .alerts import Alerts
from .notify import Notifier, summary
from .operations import Operations
from .placing import Placing
from .probes import make_gpu_probe
from .protocol import (CONTROL_SOCKET, EVENTS_SOCKET, PROGRESS_SOCKET, TOPIC_STATE,
                       FluxgymError, encode)
from .runs import Run, Runs
from .server import ControlServer
from .stalls import Stalls
from .states import ACTIVE, FINISHED, JobState
from .store import Store, StoreError
from .executors.local import kill_orphan_group, same_process
from .executors.slurm import SlurmAttempt, SlurmExecutor
from .views import job_view, waiting_for
from .watchdog import Stall

log = logging.getLogger("fluxgymd")
S = JobState


EXIT_NEEDS_A_PERSON = 3  # the unit's RestartPreventExitStatus: restarting cannot help


class AlreadyRunning(Exception):
    pass


class UnsafeRuntimeDir(Exception):
    pass


def _waiting_or_active(counts: dict[str, int]) -> int:
    return sum(counts.get(s.value, 0) for s in ACTIVE | {S.QUEUED})


# What a reload (SIGHUP, systemctl reload) cannot change: where things are, the sockets'
# and the journal's plumbing, where attempts run, the dashboard, the alerts' senders.
RESTART_ONLY = ("state_dir", "runtime_dir", "outputs_dir", "journal", "journal_socket",
                "gpu_probe", "executor", "slurm", "notify", "hooks", "web", "config_file")


class Daemon(Runs, Stalls, Operations, Placing, Flow):
    def __init__(self, cfg: Config, journal: Journal | None = None,
                 load_config: Callable[[], Config] | None = None):
        self.cfg = cfg
        self.journal = journal
        self.load_config = load_config  # the config as the files and flags give it now
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
        self.alerts = Alerts(cfg.notify, cfg.hooks)
        # ("stall", rule) and ("restart", why) since this daemon started, for /metrics
        self.counters: collections.Counter = collections.Counter()
        self.web = None  # the dashboard (web.py), when [web] listen is set
        self._locks: list[int] = []
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        # jobs a previous daemon left active, until restore has stopped what is left of them
        self.restoring: set[int] = set()
        self.restored = asyncio.Event()
        self._pulling = asyncio.Lock()  # one pull decision at a time (operations._pull)
        self.gpu_waits: dict[int, str] = {}  # queued job -> why it waits for GPUs (placing.py)

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
        self._log_inventory()
        self.slurm = SlurmExecutor(cfg.slurm, cfg.outputs_dir)

    async def restore(self) -> None:
        """Decide what a previous daemon left behind: no active job survives a restart
        as active; leftover processes of it are stopped so a job never runs twice. The
        control socket is served meanwhile (status, cancel); nothing new starts until the
        leftovers are gone."""
        left = self.store.list_jobs([s.value for s in ACTIVE])
        self.restoring = {j["id"] for j in left}
        if self.cfg.executor == "slurm":
            self.slurm.check_shared()
        left = [j for j in left if not await self._take_up(j)]
        self.restoring = {j["id"] for j in left}
        stopped = await self._stop_leftovers(left)
        for job in left:
            note = stopped.get(job["id"], "")
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
        self.alerts.on_queue(_waiting_or_active(self.store.counts()))  # arms on_idle at start
        self.schedule()

    async def _stop_leftovers(self, left: list[dict[str, Any]]) -> dict[int, str]:
        """Stop every process that an attempt of this store left running: found by the
        token in its environment (an attempt whose pid was never stored, a process that left
        its group) and by the stored group. {job id: what was stopped, for its history}."""
        taken_up = {r.child.pid for r in self.runs.values() if r.child is not None}
        found: dict[int, list[procs.Proc]] = {}
        for pid, token in procs.with_tokens(self.store.id + ".").items():
            owner = procs.job_of(token)
            if owner is not None and pid not in taken_up:
                found.setdefault(owner[1], []).append(procs.Proc(pid))
        groups = [j for j in left if same_process(j["pid"], j["pid_started"])]
        jobs = {j["id"]: j for j in left}
        for job_id, found_procs in found.items():
            try:
                name = jobs[job_id]["name"] if job_id in jobs else self.store.get(job_id)["name"]
            except FluxgymError:
                name = "removed"
            log.info("job %s (%s): stopping %d process(es) a previous fluxgymd left running "
                     "(pids %s; SIGTERM, SIGKILL after %gs)", job_id, name, len(found_procs),
                     " ".join(str(p.pid) for p in found_procs), self.cfg.kill_grace_s,
                     extra={"job_id": job_id, "job_name": name})
        for j in groups:
            log.info("job %s (%s): waiting for the process group %s a previous fluxgymd left "
                     "running to exit (SIGTERM, SIGKILL after %gs)", j["id"], j["name"],
                     j["pid"], self.cfg.kill_grace_s,
                     extra={"job_id": j["id"], "job_name": j["name"]})
        if found or groups:
            self.notifier.status(f"stopping what {len(set(found) | {j['id'] for j in groups})} "
                                 "job(s) left running")
        counts = await asyncio.gather(
            *(procs.stop_all(ps, self.cfg.kill_grace_s) for ps in found.values()),
            *(kill_orphan_group(j["pid"], j["pid_started"], self.cfg.kill_grace_s)
              for j in groups))
        stopped: dict[int, list[str]] = {}
        for j, was in zip(groups, counts[len(found):]):
            if was:
                stopped.setdefault(j["id"], []).append(f"its leftover process group {j['pid']}")
        for job_id, n in zip(found, counts):
            if n:
                stopped.setdefault(job_id, []).append(f"{n} process(es) it left running")
        return {job_id: "; stopped " + " and ".join(what) for job_id, what in stopped.items()}

    async def _take_up(self, job: dict[str, Any]) -> bool:
        """A Slurm job outlives the daemon: the same attempt goes on, followed again."""
        if job["executor"] != "slurm" or job["cancel_requested"] or \
                job["state"] not in (S.STARTING.value, S.RUNNING.value, S.STALLED.value):
            return False  # a restart backoff has no Slurm job: it is requeued
        external_id = job["external_id"] or await self.slurm.find_by_name(
            self._slurm_name(job, job["attempts"]))
        if not external_id or not self._adopt(job, external_id):
            return False
        log.info("job %s (%s): taking up Slurm job %s again (attempt %s)", job["id"],
                 job["name"], external_id, job["attempts"],
                 extra={"job_id": job["id"], "job_name": job["name"]})
        if job["state"] == S.STALLED.value:
            # the previous daemon was stopping it: finish that
            run = self.runs[job["id"]]
            run.stall = Stall("progress", job["reason"])
            self._spawn(run.child.terminate(run.limits.kill_grace_s))
        return True

    # --- the loop -------------------------------------------------------------------
    def _begin_stop(self) -> None:
        # at once, not when shutdown() begins: a restore still under way must start nothing
        self.stopping = True
        self._stop.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._begin_stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        # orphans of our jobs come to us (a process that left its job is found and stopped);
        # as PID 1 of a container every orphan does: reap those nobody waits for
        if not procs.become_subreaper():
            log.warning("could not become a child subreaper: a process that leaves its job "
                        "is found by its token only while it is running")
        self.reaper = procs.Reaper(lambda: [r.child.pid for r in self.runs.values()
                                            if r.child is not None and r.child.pid])
        self.reaper.install(loop)
        if self.cfg.web.listen:
            # up before the control socket answers, so `web-url` right after a ping works
            from .web import Web  # aiohttp's server only when the dashboard is on
            web = Web(self.cfg.web, self._handlers(), self._find, self._figures)
            await web.start()
            self.web = web
        self._spawn(self.control.serve())
        restore = self._spawn(self.restore())
        self._spawn(self._serve_progress())
        self._spawn(self._flush_loop())
        self._spawn(self._watch_loop())
        self._spawn(self._placement_loop())
        interval = self.notifier.watchdog_interval()
        if interval:
            self._spawn(self._watchdog_pings(interval))
        log.info("fluxgymd %s serving %s (state %s, outputs %s, %d concurrent, executor %s)",
                 __version__, self.cfg.control_endpoint, self.cfg.state_dir,
                 self.cfg.outputs_dir, self.cfg.max_concurrent_jobs, self.cfg.executor)
        self.alerts.start()
        self.notifier.ready(self._summary())
        await self._stop.wait()
        if not restore.done():
            await restore  # leftovers are killed either way; let it record them
        await self.shutdown()
        await self.alerts.close()

    def reload(self) -> None:
        """SIGHUP: read the config again and apply what can change while jobs run:
        max_concurrent_jobs (unless `fluxgymctl config` set it), allow_command_jobs, [kohya]
        (checkouts, save_every_n_steps), the watchdog's limits (for attempts that start from
        now on), [logs], gpu_poll_s and log_level. Every other key that changed is logged
        as needing a restart; a config that does not load changes nothing."""
        if self.load_config is None or self.stopping:
            return
        self.notifier.reloading()
        try:
            new = self.load_config()
        except (ConfigError, OSError) as e:
            log.error("reload: the config does not load, nothing changed: %s", e)
            self.notifier.ready(self._summary())
            return
        old = self.cfg
        changed = [f.name for f in dataclasses.fields(Config)
                   if getattr(new, f.name) != getattr(old, f.name)]
        later = [k for k in changed if k in RESTART_ONLY]
        self.cfg = dataclasses.replace(new, **{k: getattr(old, k) for k in RESTART_ONLY})
        applied = [k for k in changed if k not in RESTART_ONLY]
        if "log_level" in applied:
            logging.getLogger().setLevel(new.log_level.upper())
        if "max_concurrent_jobs" in applied:
            if self.store.setting("max_concurrent_jobs") is None:
                self.max_concurrent = new.max_concurrent_jobs
            else:
                log.info("reload: max_concurrent_jobs stays %s, set at run time with "
                         "fluxgymctl config (`fluxgymctl config reset max_concurrent_jobs` "
                         "takes the file's %s)", self.max_concurrent, new.max_concurrent_jobs)
        log.info("reloaded the config%s: %s", f" ({old.config_file})" if old.config_file else "",
                 ", ".join(applied) + " changed" if applied else "nothing to apply changed")
        for key in later:
            log.warning("reload: %s changed and takes effect when fluxgymd restarts", key)
        self.notifier.ready(self._summary())
        self.schedule()

    def _figures(self) -> dict[str, Any]:
        """What /metrics shows (promexport.render), read when it is scraped."""
        self._flush()
        return {"counts": self.store.counts(),
                "running": [self.store.get(job_id) for job_id in list(self.runs)],
                "counters": dict(self.counters), "gpus": self._gpu_stats()}

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
        if self.web is not None:
            await self.web.close()
        for run in [r for r in self.runs.values() if isinstance(r.child, SlurmAttempt)]:
            # a Slurm job is not ours to stop: the next fluxgymd takes it up again
            self._flush_run(run)
            run.log.write([f"=== fluxgymd: stopping; Slurm job {run.child.external_id or '?'} "
                           "keeps running and is followed again when fluxgymd starts ==="])
            run.child.detach()
            if run.folder_lock is not None:
                run.folder_lock.release()
            self.runs.pop(run.job_id, None)
        self.slurm.close()
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
        if new in (S.FAILED, S.CANCELLED):
            self._fail_dependents(job)
        return job

    def _fail_dependents(self, job: dict[str, Any]) -> None:
        """A job that failed or was cancelled: every job waiting for it fails at once with
        why, and never runs (theirs in turn, through _transition)."""
        how = "failed" if job["state"] == S.FAILED.value else "was cancelled"
        for d in self.store.dependents(job["id"]):
            if d["state"] == S.QUEUED.value:
                self._transition(d["id"], S.FAILED,
                                 f"dependency {job['name']} {how}: {job['reason']}"[:2000])

    def _announce(self, job: dict[str, Any]) -> None:
        """A job changed state: tell subscribers, systemd, and the alerts and hooks (not for
        the jobs a stopping daemon interrupts: that is no news)."""
        view = self._view(job)
        self._publish(TOPIC_STATE, view)
        counts = self.store.counts()
        self.notifier.status(self._summary(counts))
        if not self.stopping:
            self.alerts.on_state(view)
            self.alerts.on_queue(_waiting_or_active(counts))

    def _summary(self, counts: dict[str, int] | None = None) -> str:
        return summary(counts if counts is not None else self.store.counts()) + \
            ("; queue paused" if self.paused else "")

    def _view(self, job: dict[str, Any], now: float | None = None) -> dict[str, Any]:
        run = self.runs.get(job["id"])
        view = job_view(job, now, run.pace if run is not None else None,
                        run.stepped if run is not None else False)
        view["after"] = [{"id": a["id"], "name": a["name"], "state": a["state"],
                          "kind": a["kind"], "progress": job_view(a, now)["progress"]}
                         for a in self.store.after(job["id"])]
        view["waiting"] = waiting_for(view)
        if view["waiting"] is None and job["state"] == S.QUEUED.value:
            view["waiting"] = self.gpu_waits.get(job["id"])
        return view

    def _publish(self, topic: bytes, obj: dict[str, Any]) -> None:
        if self.web is not None:
            try:
                self.web.publish(topic, obj)
            except Exception:  # the page is a viewer: it never breaks a transition
                log.exception("dashboard event dropped")
        try:
            self.pub.send_multipart([topic, encode(obj)], flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # a slow subscriber loses events; followers recover gaps by sequence number

    # --- the queue: placing.py (schedule) ---------------------------------------------
    async def _watchdog_pings(self, interval: float) -> None:
        """WATCHDOG=1 from a task on the loop itself: a loop wedged by a blocking call stops
        pinging, and systemd kills and restarts us as it should."""
        while True:
            self.notifier.ping()
            await asyncio.sleep(interval)


def run_daemon(cfg: Config, journal: Journal | None = None,
               load_config: Callable[[], Config] | None = None) -> int:
    daemon = Daemon(cfg, journal, load_config)
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
