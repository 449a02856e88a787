"""The trainer's side of the supervision contract: events to the daemon, signals, and
progress for a person at a terminal.

Events go over a ZeroMQ PUSH socket with NOBLOCK and a small high-water mark: a step never
waits for the daemon, and a lost event is fine. On a Slurm node the endpoint is a file
(file:///...events) that the daemon made and follows: one JSON object a line, appended. There
a thread also reports this process's GPUs' utilization, which the daemon cannot read. SIGTERM/SIGINT ask for a checkpoint at the
next step boundary and exit 75; SIGUSR1 dumps every thread's stack to stderr. Output whose
reader has gone (the daemon died) is dropped instead of ending the training.
"""
from __future__ import annotations

import faulthandler
import io
import json
import os
import signal
import sys
import time
from typing import Any

EXIT_INTERRUPTED = 75
# Requests from the daemon to a running trainer ("save now", "sample now"): an empty file per
# request in <output dir>/.control/, put there atomically by the daemon and taken (unlinked)
# by the trainer at its next step boundary. A file, not a signal: it reaches a trainer on a
# Slurm node through the shared filesystem as well, and costs a stat per step.
CONTROL_DIR = ".control"
CONTROLS = ("save", "sample")


def ask(output_dir: str, action: str) -> None:
    """Leave a request for the trainer of this output folder."""
    folder = os.path.join(output_dir, CONTROL_DIR)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{action}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(f"{time.time():.3f}\n")
    os.replace(tmp, os.path.join(folder, action))


def take(output_dir: str) -> list[str]:
    """The requests waiting for this trainer, each taken once."""
    taken = []
    for action in CONTROLS:
        try:
            os.unlink(os.path.join(output_dir, CONTROL_DIR, action))
            taken.append(action)
        except FileNotFoundError:
            pass
    return taken


class StopNow(BaseException):
    """A stop outside the step loop (loading, caching): there is nothing to save, so the
    trainer leaves at once with 75. BaseException, so no `except Exception` swallows it."""

    def __init__(self, signame: str):
        super().__init__(signame)
        self.signame = signame


class Stop:
    """Set by SIGTERM/SIGINT/SIGABRT. While `deferred` (the step loop) the loop checks it
    between steps and checkpoints; before that, a stop raises StopNow at once. A second
    SIGINT (an impatient Ctrl-C) stops at once, without a checkpoint.

    SIGABRT is what systemd's watchdog sends to the whole service cgroup when the daemon
    wedges: checkpointing then saves the steps since the last one. An abort() from native
    code still ends the process (abort re-raises with the default action after a handler)."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self.deferred = False
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGABRT):
            signal.signal(sig, self._on_signal)
        faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True, chain=False)

    def _on_signal(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        if not self.deferred:
            raise StopNow(self.requested)

    def __bool__(self) -> bool:
        return self.requested is not None


class LossyStream(io.TextIOBase):
    """stdout/stderr for a trainer whose reader may vanish: when the daemon dies, its end of
    the pipe closes and the next print would raise BrokenPipeError in the training loop. The
    run should instead go on, and checkpoint when it is asked to stop; its lines are lost."""

    def __init__(self, stream):
        self._stream = stream
        self.lost = False

    def write(self, text: str) -> int:
        if not self.lost:
            try:
                self._stream.write(text)
            except (BrokenPipeError, ConnectionResetError):
                self.lost = True
        return len(text)

    def flush(self) -> None:
        if not self.lost:
            try:
                self._stream.flush()
            except (BrokenPipeError, ConnectionResetError):
                self.lost = True

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._stream.fileno()

    def isatty(self) -> bool:
        return self._stream.isatty()

    @property
    def encoding(self) -> str:
        return self._stream.encoding

    def __getattr__(self, name: str):  # buffer, reconfigure, ...: as the real stream
        return getattr(self._stream, name)


def keep_going_without_a_reader() -> None:
    sys.stdout = LossyStream(sys.stdout)
    sys.stderr = LossyStream(sys.stderr)


class Reporter:
    def __init__(self, voice: str = "trainer") -> None:
        self.voice = voice  # what its lines start with ("trainer: ..."): the daemon quotes
        #                     the last one when the child exits 2
        self.endpoint = os.environ.get("FLUXGYM_PROGRESS_ENDPOINT", "")
        self.job = os.environ.get("FLUXGYM_JOB_ID", "")
        self.attempt = int(os.environ.get("FLUXGYM_ATTEMPT", "1") or 1)
        self.supervised = bool(self.endpoint and self.job)
        self._sock = None
        self._file = -1
        if self.supervised and self.endpoint.startswith("file://"):
            # the daemon created it 0600; O_APPEND: each event is one write at the end
            self._file = os.open(self.endpoint[len("file://"):],
                                 os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            every = float(os.environ.get("FLUXGYM_GPU_REPORT_S") or 0)
            if every > 0:
                GpuReports(self, every).start()
        elif self.supervised:
            import zmq

            self._zmq = zmq
            self._sock = zmq.Context.instance().socket(zmq.PUSH)
            self._sock.setsockopt(zmq.SNDHWM, 100)
            self._sock.setsockopt(zmq.LINGER, 0)
            self._sock.connect(self.endpoint)
        self._bar = None
        self._last_line = 0.0
        self.total = 0

    # --- events -----------------------------------------------------------------------
    def send(self, event: str, **fields: Any) -> None:
        msg = dict(fields, event=event, job=self.job, attempt=self.attempt)
        if self._file >= 0:
            try:
                os.write(self._file, (json.dumps(msg) + "\n").encode())
            except OSError:
                pass  # a full or gone filesystem: training goes on, its checkpoint will tell
            return
        if self._sock is None:
            return
        try:
            self._sock.send(json.dumps(msg).encode(), self._zmq.NOBLOCK)
        except self._zmq.ZMQError:
            pass  # the daemon is slow or gone: training goes on

    def phase(self, name: str, detail: str = "") -> None:
        self.send("phase", phase=name)
        self.say(f"{name}{': ' + detail if detail else ''}")

    def step(self, step: int, loss: float, lr: float, seconds: float, log_every: int) -> None:
        self.send("step", step=step, total=self.total, loss=loss, lr=lr,
                  seconds_per_step=seconds)
        if self._bar is not None:
            self._bar[0].update(self._bar[1], completed=step,
                                description=f"loss {loss:.4f} lr {lr:.2e}")
        elif step % log_every == 0 or step == self.total or time.monotonic() - self._last_line > 30:
            self._last_line = time.monotonic()
            self.say(f"step {step}/{self.total} loss {loss:.6f} lr {lr:.3e} "
                     f"{seconds:.3f} s/step")

    def checkpoint(self, path: str, step: int) -> None:
        self.send("checkpoint", path=path, step=step)
        self.say(f"checkpoint step {step}: {path}")

    def sample(self, path: str, step: int) -> None:
        self.send("sample", path=path, step=step)
        self.say(f"sample step {step}: {path}")

    def done(self) -> None:
        self.send("done")

    # --- people ---------------------------------------------------------------------
    def say(self, text: str) -> None:
        if self._bar is not None:
            self._bar[0].console.print(text)
        else:
            # stdout: these are news, not warnings (journald files stderr lines as warnings)
            print(f"{self.voice}: {text}", flush=True)

    def start_bar(self, start: int, total: int) -> None:
        self.total = total
        if self.supervised or not sys.stdout.isatty():
            return
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TimeRemainingColumn(), transient=False)
        progress.start()
        self._bar = (progress, progress.add_task("training", total=total, completed=start))

    def close(self) -> None:
        if self._bar is not None:
            self._bar[0].stop()
            self._bar = None
        if self._sock is not None:
            self._sock.close(linger=500)  # let "done" reach the daemon
            self._sock = None
        if self._file >= 0:
            os.close(self._file)
            self._file = -1


class GpuReports:
    """A daemon thread that sends the busiest of this process's GPUs' utilization every
    `every` seconds, through NVML, for the watchdog's idle-GPU rule on a remote node. It
    keeps reporting while the training loop hangs: that is what the rule is for."""

    def __init__(self, reporter: Reporter, every: float):
        self.reporter, self.every = reporter, every

    def start(self) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
        except Exception:
            return  # no NVML here (a CPU node): nothing to report
        # Slurm's own list is of the node's GPU indexes, as NVML counts them; a device
        # cgroup may renumber what CUDA_VISIBLE_DEVICES says
        visible = os.environ.get("SLURM_JOB_GPUS") or os.environ.get("CUDA_VISIBLE_DEVICES")
        indexes = [int(i) for i in visible.split(",") if i.strip().isdigit()] \
            if visible else list(range(count))
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in indexes if i < count]
        if not handles:
            return
        import threading

        def report():
            while True:
                try:
                    busiest = max(pynvml.nvmlDeviceGetUtilizationRates(h).gpu for h in handles)
                    self.reporter.send("gpu", utilization=float(busiest))
                except Exception:
                    pass
                time.sleep(self.every)

        threading.Thread(target=report, name="gpu-reports", daemon=True).start()
