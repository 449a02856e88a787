"""The local executor: spawn each attempt in its own process group on this machine, read
its output, signal its whole tree, reap it.

Exit is noticed through a pidfd, which does not reap it: while the leader is an
unreaped zombie its pid (and so its process group id) cannot be reused, which makes it safe
to SIGKILL whatever the job left behind in its group before the pid is released. Processes
that left the group (setsid) are found by the attempt's token among fluxgymd's descendants
(procs.py) and signalled with the group, every time.
"""
from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import signal
import subprocess
import time
from typing import Callable

import psutil

from .. import procs
from ..joblog import LineSplitter
from . import Exit, SpawnError

log = logging.getLogger("fluxgymd.local")
READ_CHUNK = 1024 * 1024
BATCH_WINDOW_S = 0.005  # worst added delay for a log line; bounds wake-ups to 50/s a pipe
PIPE_SIZE = 1024 * 1024  # the unprivileged maximum (/proc/sys/fs/pipe-max-size)
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
# After the leader exits, how long to wait for its pipes to close before giving up on them
# (a grandchild that left the group can hold them open forever).
PIPE_DRAIN_S = 5.0


class Child:
    """One attempt as a local process group. `on_output(lines, pending, stream)` gets each batch of
    complete output lines, the unfinished line after them (a bar mid-redraw), and the stream
    ("stdout" or "stderr") they came from."""

    def __init__(
        self,
        argv: list[str],
        env: dict[str, str],
        cwd: str | None,
        on_output: Callable[[list[str], str, str], None],
        token: str | None = None,
    ):
        self.argv = argv
        self.token = token or env.get(procs.TOKEN_ENV)
        self.escaped: set[tuple[int, int | None]] = set()  # (pid, start) of those signalled
        self.on_output = on_output
        self.external_id: str | None = None  # local attempts are known by their pid
        self.node: str | None = None
        self.on_node = True
        self._loop = asyncio.get_running_loop()
        try:
            self.proc = subprocess.Popen(
                argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                start_new_session=True, close_fds=True,
            )
        except (OSError, ValueError) as e:  # ValueError: a NUL in argv, cwd or env
            raise SpawnError(f"could not start {argv[0]!r}: {getattr(e, 'strerror', None) or e}") \
                from None
        self.pid = self.proc.pid
        self.started = time.monotonic()
        try:
            self.create_time = psutil.Process(self.pid).create_time()
        except psutil.Error:
            self.create_time = None
        self.exited: asyncio.Future[Exit] = self._loop.create_future()
        self._open_pipes = 0
        self._pipes_closed = asyncio.Event()
        for stream, pipe in (("stdout", self.proc.stdout), ("stderr", self.proc.stderr)):
            fd = pipe.fileno()
            os.set_blocking(fd, False)
            try:  # a roomier pipe: a chatty child blocks less and we wake up less often
                fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE)
            except OSError:
                pass
            splitter = LineSplitter()
            self._open_pipes += 1
            self._loop.add_reader(fd, self._read, pipe, splitter, stream)
        self._pidfd = os.pidfd_open(self.pid)
        self._loop.add_reader(self._pidfd, self._on_pidfd)

    # --- output ----------------------------------------------------------------------
    def _read(self, pipe, splitter: LineSplitter, stream: str) -> None:
        fd = pipe.fileno()
        try:
            data = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            lines = splitter.feed(data)
            if len(data) < READ_CHUNK and not pipe.closed:
                # Let output gather for a moment: a child printing line by line would
                # otherwise wake us per line, and pay for it in its own speed.
                self._loop.remove_reader(fd)
                self._loop.call_later(BATCH_WINDOW_S, self._rearm, pipe, splitter, stream)
        else:
            lines = splitter.close()
            self._close_pipe(pipe)
        pending = splitter.pending if data else ""
        if lines or pending:
            try:
                self.on_output(lines, pending, stream)
            except Exception:  # a sink's bug must not stop us reading the pipe
                log.exception("output handler failed for pid %s", self.pid)

    def _rearm(self, pipe, splitter: LineSplitter, stream: str) -> None:
        if not pipe.closed:
            self._loop.add_reader(pipe.fileno(), self._read, pipe, splitter, stream)

    def _close_pipe(self, pipe) -> None:
        if pipe.closed:
            return
        self._loop.remove_reader(pipe.fileno())
        pipe.close()
        self._open_pipes -= 1
        if self._open_pipes == 0:
            self._pipes_closed.set()

    # --- exit ------------------------------------------------------------------------
    def _on_pidfd(self) -> None:
        self._loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        # Still an unreaped zombie here: its pgid is ours alone, so leftovers can be killed.
        leftovers, escaped = self._kill_leftovers()
        _, status = os.waitpid(self.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        self.proc.returncode = code  # so Popen never waits on a reaped pid
        result = Exit(code=code if code >= 0 else None,
                      signal=-code if code < 0 else None, leftovers=leftovers, escaped=escaped)
        self._loop.create_task(self._finish(result))

    def _kill_leftovers(self) -> tuple[int, int]:
        """SIGKILL what the attempt left running: (members of its group, processes that had
        left the group)."""
        members = 0
        for p in psutil.process_iter(["pid"]):
            try:
                if p.pid != self.pid and os.getpgid(p.pid) == self.pid:
                    members += 1
            except (OSError, psutil.Error):
                continue
        if members:
            self._killpg(signal.SIGKILL)
        self._stop_escapees(signal.SIGKILL, detached_only=False)
        return members, len(self.escaped)

    def escapees(self, detached_only: bool = False) -> list[procs.Proc]:
        """The attempt's processes outside its group: fluxgymd's descendants (it is their
        subreaper) that carry the attempt's token. `detached_only`: just those that also
        left the attempt's tree (re-parented to fluxgymd: setsid and a double fork); one
        whose parent is still the job's (DataLoader workers that the kohya launcher moves
        out of the group so a SIGTERM cannot kill them before the save) is its parent's to
        stop, and is SIGKILLed only with what is left when the attempt ends."""
        if not self.token:
            return []
        me = os.getpid()
        out = []
        for pid, token in procs.with_tokens(self.token, procs.descendants()).items():
            if token != self.token or pid == self.pid:
                continue
            try:
                if os.getpgid(pid) == self.pid:
                    continue  # the group's signal reaches it
            except OSError:
                continue
            if detached_only and procs.has_ancestor(pid, self.pid, stop_at=me):
                continue
            out.append(procs.Proc(pid))
        return out

    def _stop_escapees(self, sig: int, detached_only: bool) -> None:
        found = self.escapees(detached_only)
        self.escaped.update((p.pid, p.started) for p in found if p.alive())
        procs.stop_signal(found, sig)

    async def _finish(self, result: Exit) -> None:
        try:
            await asyncio.wait_for(self._pipes_closed.wait(), PIPE_DRAIN_S)
        except asyncio.TimeoutError:
            log.warning("pid %s: output pipes still open %.0fs after exit; closing them",
                        self.pid, PIPE_DRAIN_S)
            for stream, pipe in (("stdout", self.proc.stdout), ("stderr", self.proc.stderr)):
                self._close_pipe(pipe)
        if not self.exited.done():
            self.exited.set_result(result)

    # --- signals ---------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return not self.exited.done() and self.proc.returncode is None

    def _killpg(self, sig: int) -> bool:
        try:
            os.killpg(self.pid, sig)
            return True
        except ProcessLookupError:
            return False
        except OSError as e:
            if e.errno == errno.EPERM:
                log.error("no permission to signal process group %s", self.pid)
                return False
            raise

    def signal(self, sig: int) -> bool:
        """Signal the job's whole process group and what left it (never anything else); a
        stop signal comes with SIGCONT, so a frozen process acts on it at once."""
        if self.proc.returncode is not None:
            return False
        sent = self._killpg(sig)
        if sent and sig not in (signal.SIGKILL, signal.SIGCONT):
            self._killpg(signal.SIGCONT)
        self._stop_escapees(sig, detached_only=sig != signal.SIGKILL)
        return sent

    def dump_stacks(self) -> None:
        """The contract's SIGUSR1, to the main process only (its workers have no say)."""
        if self.proc.returncode is None:
            try:
                os.kill(self.pid, signal.SIGUSR1)
            except OSError:
                pass

    async def terminate(self, grace_s: float) -> Exit:
        """SIGTERM the group, wait up to grace_s, then SIGKILL it."""
        if self.running:
            self.signal(signal.SIGTERM)
            try:
                return await asyncio.wait_for(asyncio.shield(self.exited), grace_s)
            except asyncio.TimeoutError:
                log.warning("pid %s ignored SIGTERM for %.1fs; sending SIGKILL", self.pid, grace_s)
                self.signal(signal.SIGKILL)
        return await self.exited


def same_process(pid: int | None, create_time: float | None) -> bool:
    """Whether pid is still the process we started (not a later one reusing the number)."""
    if not pid:
        return False
    try:
        p = psutil.Process(pid)
        return create_time is None or abs(p.create_time() - create_time) < 0.01
    except psutil.Error:
        return False


async def kill_orphan_group(pid: int, create_time: float | None, grace_s: float) -> bool:
    """Stop the group of a child that a previous daemon left running (SIGCONT with the
    SIGTERM: a frozen one would otherwise wait out the whole grace)."""
    if not same_process(pid, create_time):
        return False
    try:
        os.killpg(pid, signal.SIGTERM)
        os.killpg(pid, signal.SIGCONT)
    except OSError:
        return False
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and same_process(pid, create_time):
        await asyncio.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass
    return True
