"""The watchdog's loop: read each running attempt's process, GPU and progress, ask the
policy (watchdog.py) whether it has stalled, and stop a stalled one with its diagnostics
first. A mixin of the Daemon (daemon.py).
"""
from __future__ import annotations

import asyncio
import shutil
import signal
import time

from .probes import process_reading
from .runs import Run
from .states import JobState
from .watchdog import Stall

S = JobState
WATCH_INTERVAL_S = 0.25  # how often the watchdog looks: detection lags a limit by at most this
STACK_DUMP_WAIT_S = 1.0  # after SIGUSR1, time for the child to write its stacks


class Stalls:
    async def _watch_loop(self) -> None:
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            now = time.monotonic()
            for run in list(self.runs.values()):
                if run.watch is None or run.stall is not None or run.cancel \
                        or not run.child.running:
                    continue  # a Slurm job still in the queue is not judged yet
                reading = process_reading(run.child.pid) if run.child.pid else None
                if reading is not None:
                    run.watch.on_process(now, *reading)
                if run.executor == "local" and self.gpu.available and now >= run.next_gpu_at:
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
        self.counters["stall", stall.rule] += 1
        self._transition(run.job_id, S.STALLED, stall.reason)
        pid = run.child.pid
        run.log.write([f"=== fluxgymd: stalled: {stall.reason}; capturing diagnostics ==="])
        # Where it runs elsewhere (Slurm), whether it is stopped is unknown: it always gets
        # the SIGCONT after the SIGTERM.
        status = (process_reading(pid) or ("gone", 0))[0] if pid else "unknown"
        if pid and shutil.which("py-spy"):
            await self._py_spy_dump(run, pid)
        if run.watch.contract:
            run.child.dump_stacks()  # the contract's stack dump, from the job's main process
        how = (f"SIGTERM to its process group, SIGKILL after {run.limits.kill_grace_s:g}s"
               if pid else f"SIGTERM through Slurm, scancel after {run.limits.kill_grace_s:g}s")
        run.log.write([f"=== fluxgymd: stopping attempt {run.attempt}: {how} ==="])
        if status in ("stopped", "unknown"):
            # A stopped process takes its signals when continued: the stack dump and the
            # SIGTERM both, so it cannot slip back into training in between.
            if run.watch.contract and status == "unknown":
                await asyncio.sleep(STACK_DUMP_WAIT_S)  # a running one dumps meanwhile
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
