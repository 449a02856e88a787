"""The watchdog policy: readings in, decisions out. No I/O, no clock of its own.

Two halves:

- `Watch` follows one attempt of one job. The daemon feeds it what it sees (steps, phases,
  output lines, GPU utilization, process state) with the time from an injected monotonic
  clock, and asks `check(now)` whether the attempt is stalled and why.
- `after_exit` decides what an attempt's end means: succeeded, failed (and why, with advice),
  interrupted, or restart after a backoff — within the restart budget and the no-progress
  breaker. A finished job is never restarted.

Every rule has its own fast test in tests/test_watchdog.py.
"""
from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field, fields, replace
from typing import Any

EXIT_INTERRUPTED = 75
RECENT_STEPS = 20  # the adaptive limit looks at this many recent step intervals


@dataclass(frozen=True)
class Limits:
    """Every threshold, from [watchdog] in fluxgymd.toml, overridable per job."""
    stall_floor_s: float = 120.0  # a step may always take this long
    stall_factor: float = 5.0  # ... or this many times the longest recent step
    loading_limit_s: float = 1800.0  # generous limits for the phases without steps
    caching_limit_s: float = 3600.0
    saving_limit_s: float = 900.0
    sampling_limit_s: float = 1800.0
    publishing_limit_s: float = 3600.0  # a publish job's upload: no steps to count
    output_silence_s: float = 600.0  # jobs without progress: no output for this long
    gpu_idle_percent: float = 5.0  # training with the job's GPUs below this ...
    gpu_idle_window_s: float = 300.0  # ... for this long is a stall
    dstate_limit_s: float = 600.0  # uninterruptible sleep (D) this long is a stall
    max_rss_mb: float = 0.0  # 0: no memory limit
    kill_grace_s: float = 30.0  # SIGTERM, then SIGKILL after this
    backoff_s: float = 1.0  # first restart delay, doubled each restart ...
    backoff_max_s: float = 300.0  # ... up to this
    max_restarts: int = 5
    no_progress_restarts: int = 3  # this many restarts in a row without a newer checkpoint

    def with_overrides(self, overrides: dict[str, Any]) -> "Limits":
        return replace(self, **{k: type(getattr(self, k))(v) for k, v in overrides.items()})


LIMIT_NAMES = tuple(f.name for f in fields(Limits))
PHASE_LIMITS = {"loading": "loading_limit_s", "caching": "caching_limit_s",
                "saving": "saving_limit_s", "sampling": "sampling_limit_s",
                "publishing": "publishing_limit_s"}


@dataclass(frozen=True)
class Stall:
    rule: str  # progress | phase | silence | gpu | dstate | memory
    reason: str
    fatal: bool = False  # memory: not retried identically


@dataclass
class Watch:
    """One attempt. `contract`: the child sends progress events (else: output silence)."""
    limits: Limits
    started: float
    contract: bool = False
    gpu_available: bool = False
    phase: str | None = None
    phase_since: float = 0.0
    last_step_at: float | None = None
    last_step: int | None = None
    intervals: deque = field(default_factory=lambda: deque(maxlen=RECENT_STEPS))
    last_output_at: float = 0.0
    gpu_low_since: float | None = None
    dstate_since: float | None = None
    rss_mb: float = 0.0

    def __post_init__(self) -> None:
        self.phase_since = self.started
        self.last_output_at = self.started

    # --- readings ------------------------------------------------------------------
    def on_phase(self, now: float, phase: str) -> None:
        if phase != self.phase:
            self.phase, self.phase_since = phase, now
            self.gpu_low_since = None  # idle GPU while loading or saving is expected
            if phase == "training":
                # the time spent saving or sampling is not a slow step
                self.last_step_at = now if self.last_step_at is not None else None

    def on_step(self, now: float, step: int) -> None:
        if self.last_step_at is not None and (self.last_step is None or step > self.last_step):
            self.intervals.append(now - self.last_step_at)
        if self.last_step is None or step != self.last_step:
            self.last_step_at, self.last_step = now, step
        if self.phase is None or self.phase in PHASE_LIMITS:
            # a step means training, whatever phase was announced before
            self.on_phase(now, "training")

    def on_output(self, now: float) -> None:
        self.last_output_at = now

    def on_gpu(self, now: float, utilization: float | None) -> None:
        """utilization: the job's GPUs' busiest reading in percent; None when unknown."""
        if utilization is None or utilization >= self.limits.gpu_idle_percent:
            self.gpu_low_since = None
        elif self.gpu_low_since is None:
            self.gpu_low_since = now

    def on_process(self, now: float, status: str, rss_mb: float) -> None:
        """status as psutil names it: running, sleeping, disk-sleep, stopped, zombie..."""
        self.rss_mb = rss_mb
        if status == "disk-sleep":
            if self.dstate_since is None:
                self.dstate_since = now
        else:
            self.dstate_since = None

    # --- the rules ------------------------------------------------------------------
    def step_limit(self) -> float:
        longest = max(self.intervals, default=0.0)
        return max(self.limits.stall_floor_s, self.limits.stall_factor * longest)

    def check(self, now: float) -> Stall | None:
        lim = self.limits
        if lim.max_rss_mb and self.rss_mb > lim.max_rss_mb:
            return Stall("memory", f"memory {self.rss_mb:.0f} MB is over max_rss_mb "
                         f"{lim.max_rss_mb:.0f}", fatal=True)
        if self.dstate_since is not None and now - self.dstate_since > lim.dstate_limit_s:
            return Stall("dstate", f"in uninterruptible sleep (D) for "
                         f"{now - self.dstate_since:.0f}s (limit {lim.dstate_limit_s:.0f}s)")
        if self.phase in PHASE_LIMITS:
            limit = getattr(lim, PHASE_LIMITS[self.phase])
            if now - self.phase_since > limit:
                return Stall("phase", f"{self.phase} for {now - self.phase_since:.0f}s "
                             f"(limit {limit:.0f}s)")
            return None
        if self.phase == "training" or self.last_step is not None:
            since = self.last_step_at if self.last_step_at is not None else self.phase_since
            limit = self.step_limit()
            if now - since > limit:
                what = f"step {self.last_step}" if self.last_step is not None else "training began"
                return Stall("progress", f"no step for {now - since:.0f}s since {what} "
                             f"(limit {limit:.0f}s)")
            if self.gpu_available and self.gpu_low_since is not None and \
                    now - self.gpu_low_since > lim.gpu_idle_window_s:
                return Stall("gpu", f"GPU below {lim.gpu_idle_percent:g}% for "
                             f"{now - self.gpu_low_since:.0f}s while training "
                             f"(window {lim.gpu_idle_window_s:.0f}s)")
            return None
        if not self.contract and now - self.last_output_at > lim.output_silence_s:
            return Stall("silence", f"no output for {now - self.last_output_at:.0f}s "
                         f"(limit {lim.output_silence_s:.0f}s)")
        return None


# --- after an attempt ends -------------------------------------------------------------
OOM_PATTERNS = re.compile(
    r"CUDA out of memory|OutOfMemoryError|CUBLAS_STATUS_ALLOC_FAILED|"
    r"HIP out of memory|MPS backend out of memory|DefaultCPUAllocator: can't allocate memory")
DISK_FULL = re.compile(r"No space left on device|ENOSPC|Disk quota exceeded")
EXIT_USAGE = 2  # the trainer's "fix the job" exit: a dataset, a setting, a checkpoint
OOM_ADVICE = ("out of memory: lower train_batch_size, turn on gradient_checkpointing, or "
              "lower the resolution, then retry")


@dataclass(frozen=True)
class Ending:
    code: int | None
    signal: int | None
    description: str  # "exited with code 1" / "killed by SIGKILL"
    output_tail: str = ""  # the last lines, for OOM text
    oom_killed: bool = False  # the kernel's OOM killer acted during the attempt
    stall: Stall | None = None  # why we stopped it, if we did
    cancelled: bool = False
    daemon_stopping: bool = False
    progress: int | None = None  # newest checkpoint step at the end of the attempt
    last_output: str = ""  # the child's last non-empty line: often the error itself
    contract: bool = False  # the child is our trainer (its exit 2 means: fix the job)
    lost: str = ""  # the cluster ended it (node failure, preemption): why
    shared_gpu: bool = False  # another job of ours was on its GPU (and it has not yet been
    #                           retried on one of its own)

    @property
    def what(self) -> str:
        """How it ended, with the last line when it exited with an error code."""
        if self.code not in (None, 0) and self.last_output:
            return f"{self.description}: {self.last_output[:200]}"
        return self.description


@dataclass(frozen=True)
class Budget:
    restarts: int = 0  # restarts spent so far
    no_progress: int = 0  # restarts in a row without a newer checkpoint
    progress_at_start: int | None = None  # newest checkpoint step when the attempt began


@dataclass(frozen=True)
class Outcome:
    action: str  # succeeded | failed | cancelled | interrupted | resume | restart
    reason: str
    delay_s: float = 0.0
    budget: Budget = Budget()
    alone: bool = False  # its next attempt must have a GPU to itself


def backoff(limits: Limits, restarts_done: int) -> float:
    return min(limits.backoff_max_s, limits.backoff_s * (2 ** restarts_done))


# The children of ours that speak the contract, by the word their lines start with.
VOICES = ("trainer: ", "fetch: ", "caption: ", "publish: ")


def trainer_message(tail: str) -> str:
    """The child's own error: its last `trainer: ...` (or `fetch: ...`) line and the indented
    lines under it (a list of problems)."""
    lines = tail.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        voice = next((v for v in VOICES if lines[i].startswith(v)), None)
        if voice:
            more = [l.strip() for l in lines[i + 1:] if l.startswith("  ")]
            return " ".join([lines[i][len(voice):].strip(), *more])[:1000]
    return ""


def after_exit(e: Ending, budget: Budget, limits: Limits) -> Outcome:
    """What an attempt's end means. The order of the rules is the policy."""
    if e.cancelled:
        return Outcome("cancelled", f"cancelled by user ({e.description})", budget=budget)
    if e.code == 0:
        # Exit 0 means finished, even when it came while we were stopping a stall: a
        # finished job is never restarted.
        return Outcome("succeeded", "exited with code 0", budget=budget)
    if e.daemon_stopping:
        return Outcome("interrupted", f"fluxgymd stopping; {e.description}", budget=budget)
    if e.stall is not None and e.stall.fatal:
        return Outcome("failed", f"{e.stall.reason}; not retried: raise the limit or use less "
                       "memory (smaller batch, gradient checkpointing, lower resolution)",
                       budget=budget)
    if e.shared_gpu and not e.oom_killed and OOM_PATTERNS.search(e.output_tail):
        # its neighbour may have taken the memory: once more, with no one beside it
        return Outcome("resume", f"{e.what}: out of memory on a GPU it shared with another "
                       "job; resumed once on a GPU of its own before it is judged as out of "
                       "memory", budget=budget, alone=True)
    if e.oom_killed or OOM_PATTERNS.search(e.output_tail):
        how = "killed by the kernel's OOM killer" if e.oom_killed else e.what
        return Outcome("failed", f"{how}: {OOM_ADVICE}", budget=budget)
    # What cannot work by trying again: fail at once with the child's own words.
    if e.contract and e.code == EXIT_USAGE:
        return Outcome("failed", f"{trainer_message(e.output_tail) or e.what} (exit 2: not "
                       "retried; fix the job, then `fluxgymctl retry` it)", budget=budget)
    if e.code not in (0, EXIT_INTERRUPTED) and DISK_FULL.search(e.output_tail):
        return Outcome("failed", f"{e.what}: the disk is full; free space under the job's "
                       "output folder, then `fluxgymctl retry` it (not retried meanwhile)",
                       budget=budget)

    moved = e.progress is not None and (budget.progress_at_start is None
                                        or e.progress > budget.progress_at_start)
    no_progress = 0 if moved else budget.no_progress + 1
    why = e.stall.reason if e.stall else e.what
    since = f"step {e.progress}" if e.progress is not None else "the start"
    if no_progress >= limits.no_progress_restarts:
        return Outcome("failed", f"no progress since {since}: {no_progress} attempts in a row "
                       f"ended without a newer checkpoint (last: {why})",
                       budget=replace(budget, no_progress=no_progress))
    if e.lost and e.stall is None:
        # not the job's fault: resumed without spending a restart (the breaker still counts)
        return Outcome("resume", f"{e.lost} ({e.description}); resuming from its newest "
                       "checkpoint", budget=replace(budget, no_progress=no_progress))
    if e.code == EXIT_INTERRUPTED and e.stall is None:
        # the child checkpointed and asked to be resumed: that costs no restart
        return Outcome("resume", "exited 75 (interrupted with a checkpoint); resuming",
                       budget=replace(budget, no_progress=no_progress))
    if limits.max_restarts == 0:
        return Outcome("failed", f"{why} (not restarted: max_restarts = 0)",
                       budget=replace(budget, no_progress=no_progress))
    if budget.restarts >= limits.max_restarts:
        return Outcome("failed", f"gave up after {budget.restarts} restarts (max_restarts); "
                       f"last: {why}", budget=replace(budget, no_progress=no_progress))
    delay = backoff(limits, budget.restarts)
    n = budget.restarts + 1
    label = "stalled" if e.stall else "crashed"
    return Outcome("restart", f"{label}: {why}; restart {n}/{limits.max_restarts} in {delay:g}s",
                   delay_s=delay, budget=replace(budget, restarts=n, no_progress=no_progress))
