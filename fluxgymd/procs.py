"""Every process of an attempt, wherever it went, and every child fluxgymd inherits.

An attempt runs in its own process group, but a child that calls setsid() (a daemonizing
tool, a shell's `setsid cmd &`) leaves the group. Two things keep it in sight:

- a token in the environment of every process of the attempt (FLUXGYM_ATTEMPT_TOKEN:
  store id, job id, attempt), which children inherit whatever group or session they move to;
  it is written to the store (the attempt number) before the spawn, so a daemon that died
  before it recorded the pid still finds the attempt's processes after a restart;
- fluxgymd is a child subreaper (PR_SET_CHILD_SUBREAPER): an orphan of an attempt is
  re-parented to fluxgymd, not to init, so it stays among fluxgymd's descendants.

A cgroup per job (systemd's Delegate=yes) would find them too, but only under systemd with
a delegated, writable cgroup tree; containers without an init and foreground runs have none.
The token and the subreaper work wherever fluxgymd runs, PID 1 of a container included.

A subreaper (and PID 1) must reap the orphans it inherits, without taking an exit status
that a waiter of its own (an attempt's executor, subprocess, asyncio) is about to collect:
`Reaper` reaps only a zombie child that no live Popen object of this process owns, and only
once it has stayed unclaimed for a moment.
"""
from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import os
import signal
import subprocess
import time
from typing import Callable, Iterable

log = logging.getLogger("fluxgymd.procs")

TOKEN_ENV = "FLUXGYM_ATTEMPT_TOKEN"
PR_SET_CHILD_SUBREAPER = 36
CLAIM_WAIT_S = 0.2  # how long an unowned zombie may wait for its waiter before we reap it


def attempt_token(store_id: str, job_id: int, attempt: int) -> str:
    return f"{store_id}.{job_id}.{attempt}"


def job_of(token: str) -> tuple[str, int, int] | None:
    """(store id, job id, attempt) of a token, or None."""
    store, _, rest = token.rpartition(".")
    store, _, job = store.rpartition(".")
    try:
        return store, int(job), int(rest)
    except ValueError:
        return None


def become_subreaper() -> bool:
    """Orphans of our descendants come to us instead of init (Linux 3.4+)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, ppid, pgid, start time in clock ticks) from /proc/PID/stat, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2:].split()
    try:
        return fields[0].decode(), int(fields[1]), int(fields[2]), int(fields[19])
    except (IndexError, ValueError):
        return None


def has_ancestor(pid: int, ancestor: int, stop_at: int) -> bool:
    """Whether `ancestor` is among pid's parents, looking no higher than `stop_at`."""
    for _ in range(64):
        st = _stat(pid)
        if st is None or st[1] in (0, 1, stop_at):
            return False
        if st[1] == ancestor:
            return True
        pid = st[1]
    return False


def children(pid: int) -> list[int]:
    """pid's direct children (every thread's), from /proc."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                out += [int(c) for c in fh.read().split()]
        except (OSError, ValueError):
            continue
    return out


def descendants(pid: int | None = None) -> list[int]:
    pid = os.getpid() if pid is None else pid
    seen: list[int] = []
    todo = children(pid)
    while todo:
        p = todo.pop()
        if p not in seen:
            seen.append(p)
            todo += children(p)
    return seen


def with_cmdline(part: bytes) -> list[int]:
    """Live processes whose command line holds `part`, all alive together at the end of the
    scan (reading /proc takes milliseconds, in which one may exit and another start). A
    child of one of them that holds it too is left out: between its fork and its exec (a
    helper the program runs: ldconfig, a compiler probe) a child shows its parent's command
    line, and is not a second instance."""
    found = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/cmdline", "rb") as fh:
                if part not in fh.read():
                    continue
        except OSError:
            continue
        found.append(int(p))
    live = {p: st for p in found if (st := _stat(p)) is not None and st[0] not in ("Z", "X")}
    return [p for p, st in live.items() if st[1] not in live]


def token_of(pid: int) -> str | None:
    """The attempt token in a process's environment (None: none, a zombie, not ours to read)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            env = fh.read()
    except OSError:
        return None
    key = TOKEN_ENV.encode() + b"="
    for item in env.split(b"\0"):
        if item.startswith(key):
            return item[len(key):].decode(errors="replace")
    return None


def with_tokens(prefix: str, pids: Iterable[int] | None = None) -> dict[int, str]:
    """{pid: token} of the live processes whose token starts with prefix: among `pids`, or
    among every process on the machine."""
    if pids is None:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    me = os.getpid()
    out = {}
    for pid in pids:
        if pid == me:
            continue
        token = token_of(pid)
        if token is not None and token.startswith(prefix):
            out[pid] = token
    return out


class Proc:
    """A process known by pid and start time, so a later process reusing its pid is never
    signalled."""

    def __init__(self, pid: int):
        st = _stat(pid)
        self.pid = pid
        self.started = st[3] if st else None

    def alive(self) -> bool:
        st = _stat(self.pid)
        return st is not None and st[3] == self.started and st[0] not in ("Z", "X")

    def signal(self, sig: int) -> bool:
        if self.started is None or not self.alive():
            return False
        try:
            os.kill(self.pid, sig)
            return True
        except OSError:
            return False


def stop_signal(procs: Iterable[Proc], sig: int) -> int:
    """sig to each live process; a stopped (SIGSTOPped) one gets SIGCONT after it, so a
    SIGTERM is acted on at once and not after the kill grace. How many were signalled."""
    n = 0
    for p in procs:
        if p.signal(sig):
            n += 1
            if sig not in (signal.SIGKILL, signal.SIGCONT):
                p.signal(signal.SIGCONT)
    return n


async def stop_all(procs: list[Proc], grace_s: float, poll_s: float = 0.05) -> int:
    """SIGTERM (and SIGCONT) each, SIGKILL what is left after grace_s; how many there were."""
    live = [p for p in procs if p.alive()]
    stop_signal(live, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while any(p.alive() for p in live) and time.monotonic() < deadline:
        await asyncio.sleep(poll_s)
    stop_signal([p for p in live if p.alive()], signal.SIGKILL)
    while any(p.alive() for p in live) and time.monotonic() < deadline + 5:
        await asyncio.sleep(poll_s)  # gone (or a zombie the reaper collects)
    return len(live)


def _owned_pids() -> set[int]:
    """Children that a live Popen of this process will wait for (subprocess, asyncio's
    subprocesses, the local executor's attempts)."""
    return {o.pid for o in gc.get_objects()
            if isinstance(o, subprocess.Popen) and getattr(o, "returncode", 0) is None
            and isinstance(getattr(o, "pid", None), int)}


class Reaper:
    """Reaps the zombie children nobody in this process waits for: orphans re-parented to a
    subreaper or to PID 1. Driven by SIGCHLD (and a check after CLAIM_WAIT_S for one that
    was seen once); counts what it reaped."""

    def __init__(self, also_owned: Callable[[], Iterable[int]] = lambda: ()):
        self.also_owned = also_owned
        self.reaped = 0
        self._seen: set[int] = set()
        self._scheduled = False

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        loop.add_signal_handler(signal.SIGCHLD, self.soon)
        self.soon()  # orphans that came before we listened

    def soon(self, delay: float = 0.0) -> None:
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_later(delay, self._sweep)

    def _sweep(self) -> None:
        self._scheduled = False
        try:
            self.sweep()
        except Exception:  # never let housekeeping break the loop
            log.exception("reaping orphans failed")

    def sweep(self) -> int:
        zombies = [p for p in children(os.getpid()) if (st := _stat(p)) and st[0] == "Z"]
        if not zombies:
            self._seen.clear()
            return 0
        owned = _owned_pids() | set(self.also_owned())
        reaped, waiting = 0, set()
        for pid in zombies:
            if pid in owned:
                continue
            if pid not in self._seen:
                waiting.add(pid)  # give a waiter we do not know of its moment
                continue
            try:
                got, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                continue
            if got == pid:
                reaped += 1
        self._seen = waiting
        self.reaped += reaped
        if reaped:
            log.debug("reaped %d orphaned process(es)", reaped)
        if waiting:
            self.soon(CLAIM_WAIT_S)
        return reaped
