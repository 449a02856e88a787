"""The Slurm executor: one attempt is one Slurm batch job.

The daemon talks to Slurm only through its client commands (`sbatch --parsable`, `squeue`,
`scontrol -o show job`, `scancel`), so its host needs the client tools and munge, not a
Slurm library. Everything else goes through the job's output folder, which the nodes must
share with the daemon's host (checked at start by a probe job):

- `.slurm/attempt-N.sh`: the batch script. It runs the attempt in its own process group,
  passes Slurm's and fluxgymd's signals on to it, and writes the attempt's exit code to
  `attempt-N.exit` (an exit 75 leaves Slurm as 0: resuming is fluxgymd's business, not
  Slurm's requeue).
- `attempt-N.out`: stdout and stderr, followed into train.log, the journal and `logs -f`.
- `attempt-N.events`: the trainer's contract events, one JSON object a line. A file rather
  than a socket: nothing listens on the network, it needs no keys, it is private by its
  mode (0600 in a 0700 folder, both the service user's), and a restarted daemon reads on
  from where it stopped. The daemon creates it and refuses to read one it does not own or
  others can write.
- `attempt-N.node`: the Slurm job id, its node and the attempt's pid there.

The job's Slurm state comes from `squeue`, polled for every attempt at once.
"""
from __future__ import annotations

import asyncio
import logging
import os
import shlex
import signal
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import Exit
from .slurm_job import (ACTIVE, COMMAND_TIMEOUT_S, EXIT_FILE_GRACE_S, LOST, ON_NODE,
                        READ_BUDGET, TRANSIENT, Files, Follower, SlurmSettings, batch_script,
                        events_endpoint, parse_exit_file, parse_squeue)

log = logging.getLogger("fluxgymd.slurm")
__all__ = ["SlurmAttempt", "SlurmExecutor", "SlurmSettings", "events_endpoint"]


@dataclass(eq=False)  # each attempt is itself: hashed by identity
class SlurmAttempt:
    executor: "SlurmExecutor"
    files: Files
    on_output: Callable[[list[str], str, str], None]
    on_event: Callable[[bytes], None]
    on_status: Callable[["SlurmAttempt"], None]
    external_id: str | None = None
    node: str | None = None
    state: str = "SUBMITTING"
    reason: str = ""
    pid: None = None  # nothing local to read: the watchdog judges it by its events
    create_time: None = None
    out: Follower = None  # type: ignore[assignment]
    events: Follower = None  # type: ignore[assignment]
    exited: asyncio.Future = None  # type: ignore[assignment]
    ended_at: float | None = None  # when Slurm said it ended (exit file grace)
    ran: bool = False  # it reached a node (else no exit file is coming)
    _signals: asyncio.Queue = field(default_factory=asyncio.Queue)

    def __post_init__(self) -> None:
        self.exited = asyncio.get_running_loop().create_future()
        self._sender = asyncio.get_running_loop().create_task(self._send_signals())

    @property
    def running(self) -> bool:
        return not self.exited.done()

    @property
    def on_node(self) -> bool:
        return self.state in ON_NODE

    def describe(self) -> str:
        where = f" on {self.node}" if self.node else ""
        why = f" ({self.reason})" if self.reason else ""
        return f"Slurm job {self.external_id or '(not yet submitted)'}{where}: {self.state}{why}"

    # --- signals: in order, through scancel ---------------------------------------------
    def signal(self, sig: int) -> bool:
        """To the attempt through its batch script, which passes it on to the group."""
        if not self.running or self.external_id is None:
            return False
        self._signals.put_nowait(sig)
        return True

    def dump_stacks(self) -> None:
        self.signal(signal.SIGUSR1)  # the batch script sends it to the main process only

    async def _send_signals(self) -> None:
        while True:
            sig = await self._signals.get()
            if sig is None:
                return
            if self.running:
                name = signal.Signals(sig).name.removeprefix("SIG")
                await self.executor.command("scancel", "--batch", f"--signal={name}",
                                            self.external_id)

    async def cancel(self) -> None:
        if self.external_id is not None and self.running:
            await self.executor.command("scancel", self.external_id)

    async def terminate(self, grace_s: float) -> Exit:
        """SIGTERM (the trainer checkpoints and exits 75), then scancel after grace_s. A job
        still waiting in Slurm's queue is scancelled at once."""
        if self.running:
            while self.external_id is None and self.running:
                await asyncio.sleep(0.05)  # still being submitted
            if self.running and not self.on_node:
                await self.cancel()
            elif self.running:
                self.signal(signal.SIGTERM)
                try:
                    return await asyncio.wait_for(asyncio.shield(self.exited), grace_s)
                except asyncio.TimeoutError:
                    log.warning("Slurm job %s ignored SIGTERM for %.1fs; scancel",
                                self.external_id, grace_s)
                    await self.cancel()
        return await self.exited

    def detach(self) -> None:
        """Stop following it and leave it running (the daemon is stopping)."""
        self._signals.put_nowait(None)
        self.executor.forget(self)

    # --- following --------------------------------------------------------------------
    def follow(self, budget: int | None = READ_BUDGET) -> None:
        lines, pending = self.out.read(budget)
        if lines or pending:
            self.on_output(lines, pending, "stdout")
        lines, _ = self.events.read(budget)
        for line in lines:
            if line.strip():
                self.on_event(line.encode())

    def finish(self, result: Exit) -> None:
        if self.out is not None:
            self.follow(budget=None)  # everything it wrote, before its end is judged
            rest = self.out.splitter.close()
            if rest:
                self.on_output(rest, "", "stdout")
        self._signals.put_nowait(None)
        if not self.exited.done():
            self.exited.set_result(result)


class SlurmExecutor:
    def __init__(self, settings: SlurmSettings, outputs_dir: Path):
        self.settings = settings
        self.outputs_dir = outputs_dir
        self.attempts: dict[str, SlurmAttempt] = {}  # by Slurm job id
        self.problem = ""  # why no attempt can run (the probe failed)
        self.probe_state = "not checked"
        self._probed: asyncio.Future | None = None
        self._task: asyncio.Task | None = None
        self._complaint_at = 0.0

    # --- Slurm's commands -------------------------------------------------------------
    def _exe(self, name: str) -> str:
        return str(Path(self.settings.bin_dir) / name) if self.settings.bin_dir else name

    async def command(self, name: str, *args: str, env: dict[str, str] | None = None
                      ) -> tuple[int, str, str]:
        try:
            proc = await asyncio.create_subprocess_exec(
                self._exe(name), *args, env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                start_new_session=True)
        except OSError as e:
            return 127, "", f"cannot run {self._exe(name)}: {e.strerror or e}"
        try:
            out, err = await asyncio.wait_for(proc.communicate(), COMMAND_TIMEOUT_S)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            return 124, "", f"{name} gave no answer within {COMMAND_TIMEOUT_S:g}s"
        return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")

    # --- the shared filesystem --------------------------------------------------------
    def check_shared(self) -> None:
        if self._probed is None:
            self._probed = asyncio.get_running_loop().create_future()
            if self.settings.probe:
                asyncio.get_running_loop().create_task(self._probe())
            else:
                self.probe_state = "not checked (probe = false)"
                self._probed.set_result(None)
        self._ensure_polling()

    async def ready(self) -> str:
        """'' once the probe passed, else why Slurm attempts cannot run."""
        self.check_shared()
        await asyncio.shield(self._probed)
        return self.problem

    async def _probe(self) -> None:
        """A probe job writes a file into outputs_dir on a node; it must appear here."""
        token = uuid.uuid4().hex[:12]
        mark = self.outputs_dir / f".fluxgymd-slurm-probe-{token}"
        self.probe_state = "probe job being submitted"
        try:
            rc, out, err = await self.command(
                "sbatch", "--parsable", "--job-name=fluxgymd-probe", "--output=/dev/null",
                "--no-requeue", "--time=1", "--mem=64M", *self.settings.probe_options(),
                f"--wrap=echo \"$SLURM_JOB_ID $(hostname)\" > {shlex.quote(str(mark))}")
            if rc != 0:
                self.problem = (f"the Slurm probe job was refused: {_first_line(err or out)}; "
                                "fix [slurm] in fluxgymd.toml (or the cluster) and restart "
                                "fluxgymd")
                return
            jid = out.strip().split(";")[0]
            ended_at = None
            while True:
                if mark.exists():
                    node = (mark.read_text().split() or ["a node"])[-1]
                    self.probe_state = (f"outputs dir shared with the nodes (probe job {jid} "
                                        f"on {node})")
                    log.info("Slurm: %s", self.probe_state)
                    return
                _, seen, _ = await self._squeue([jid])
                state, reason, node = seen.get(jid, ("", "", ""))
                if state in ACTIVE:
                    self.probe_state = f"probe job {jid} {state}" + \
                        (f" ({reason})" if reason else "")
                    ended_at = None
                else:
                    ended_at = ended_at or time.monotonic()
                    if time.monotonic() - ended_at > EXIT_FILE_GRACE_S:
                        self.problem = (
                            f"the outputs dir {self.outputs_dir} is not shared with the Slurm "
                            f"nodes: probe job {jid} ended ({state or 'gone'}"
                            f"{' on ' + node if node else ''}) but the file it wrote there "
                            "never appeared here. Put outputs_dir on the filesystem the "
                            "nodes mount at the same path, then restart fluxgymd")
                        return
                await asyncio.sleep(min(self.settings.poll_s, 1.0))
        finally:
            if self.problem:
                self.probe_state = self.problem
                log.error("Slurm: %s", self.problem)
            try:
                mark.unlink()
            except OSError:
                pass
            self._probed.set_result(None)

    # --- attempts ---------------------------------------------------------------------
    def start(self, folder: Path, attempt: int, title: str, job_name: str, argv: list[str],
              env: dict[str, str], cwd: str | None, settings: SlurmSettings,
              on_output, on_event, on_status) -> SlurmAttempt:
        files = Files(folder, attempt)
        run = SlurmAttempt(self, files, on_output, on_event, on_status)
        run.out, run.events = Follower(files.out), Follower(files.events, private=True)
        asyncio.get_running_loop().create_task(
            self._submit(run, title, job_name, argv, env, cwd, settings))
        return run

    async def _submit(self, run: SlurmAttempt, title: str, job_name: str, argv: list[str],
                      env: dict[str, str], cwd: str | None, settings: SlurmSettings) -> None:
        problem = await self.ready()
        if problem:
            run.finish(Exit(None, None, text=f"not submitted: {problem}", fatal=True))
            return
        files = run.files
        try:
            files.script.parent.mkdir(mode=0o700, exist_ok=True)
            os.chmod(files.script.parent, 0o700)
            for stale in (files.exit, files.node, files.out, files.events):
                stale.unlink(missing_ok=True)
            # ours, private, before the trainer opens it to append
            os.close(os.open(files.events, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            files.script.write_text(batch_script(argv, cwd, files, title))
        except OSError as e:
            run.finish(Exit(None, None, text=f"could not write its Slurm files: {e}",
                            fatal=True))
            return
        rc, out, err = await self.command(
            "sbatch", "--parsable", f"--job-name={job_name}", f"--output={files.out}",
            "--open-mode=append", "--no-requeue", f"--chdir={files.folder}",
            *settings.options(), str(files.script), env=env)
        if rc != 0:
            why = _first_line(err or out) or f"exit {rc}"
            run.finish(Exit(None, None, text=f"sbatch failed: {why}",
                            fatal=not any(t in why for t in TRANSIENT)))
            return
        run.external_id = out.strip().split(";")[0]
        run.state = "PENDING"
        self.attempts[run.external_id] = run
        run.on_status(run)
        self._ensure_polling()

    def adopt(self, folder: Path, attempt: int, external_id: str, out_offset: int,
              events_offset: int, on_output, on_event, on_status) -> SlurmAttempt:
        """Follow a Slurm job a previous daemon submitted, from where it stopped reading."""
        files = Files(folder, attempt)
        run = SlurmAttempt(self, files, on_output, on_event, on_status,
                           external_id=external_id, state="UNKNOWN", ran=True)
        run.out = Follower(files.out, out_offset)
        run.events = Follower(files.events, events_offset, private=True)
        self.attempts[external_id] = run
        self.check_shared()
        return run

    async def find_by_name(self, job_name: str) -> str | None:
        """A job submitted just before a daemon died, before its id was stored."""
        rc, out, _ = await self.command("squeue", "-h", "-n", job_name, "-o", "%i")
        ids = out.split()
        return ids[-1] if rc == 0 and ids else None

    def forget(self, run: SlurmAttempt) -> None:
        if run.external_id is not None:
            self.attempts.pop(run.external_id, None)

    # --- the loop -----------------------------------------------------------------------
    def _ensure_polling(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop())

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _loop(self) -> None:
        next_poll = 0.0
        while True:
            for run in list(self.attempts.values()):
                try:
                    run.follow()
                except Exception:  # a sink's bug must not stop the others
                    log.exception("following Slurm job %s failed", run.external_id)
            if time.monotonic() >= next_poll and self.attempts:
                next_poll = time.monotonic() + self.settings.poll_s
                try:
                    await self._poll()
                except Exception:  # one bad answer must not stop following every job
                    log.exception("asking Slurm about its jobs failed")
            await asyncio.sleep(self.settings.follow_s)

    async def _poll(self) -> None:
        ids = sorted(self.attempts, key=int)
        rc, seen, err = await self._squeue(ids)
        if rc != 0 and "Invalid job id" not in err:
            if time.monotonic() - self._complaint_at > 60:
                self._complaint_at = time.monotonic()
                log.warning("squeue failed (exit %s): %s; Slurm jobs are judged when it "
                            "answers again", rc, _first_line(err))
            return
        for jid in ids:
            run = self.attempts.get(jid)
            if run is None:
                continue
            state, reason, node = seen.get(jid) or await self._confirm_gone(run)
            if not state:
                continue  # Slurm could not say: ask again next time
            changed = (state, reason, node or run.node) != (run.state, run.reason, run.node)
            run.state, run.reason = state, reason
            run.node = node or run.node
            run.ran = run.ran or state in ON_NODE
            if changed:
                run.on_status(run)
            if state in ACTIVE:
                run.ended_at = None
                continue
            await self._judge_end(run)

    async def _squeue(self, ids: list[str]) -> tuple[int, dict[str, tuple[str, str, str]], str]:
        """(exit code, {id: (state, reason, node)}, stderr) for these Slurm jobs, ended
        ones included while Slurm remembers them."""
        rc, out, err = await self.command("squeue", "-h", "-t", "all", "-j", ",".join(ids),
                                          "-o", "%i|%T|%r|%N")
        return rc, parse_squeue(out) if rc == 0 else {}, err

    async def _scontrol(self, run: SlurmAttempt) -> tuple[int, dict[str, str], str]:
        """(exit code, the job's KEY=VALUE fields, stderr) from `scontrol -o show job`."""
        rc, out, err = await self.command("scontrol", "-o", "show", "job", run.external_id)
        return rc, dict(w.split("=", 1) for w in out.split() if "=" in w), err

    async def _confirm_gone(self, run: SlurmAttempt) -> tuple[str, str, str]:
        """squeue left it out: ask scontrol, so a glitch never makes a running job look
        gone (it would be resubmitted while it still trains into the same folder)."""
        rc, fields, err = await self._scontrol(run)
        if rc == 0:
            state = fields.get("JobState", "")
            return state, fields.get("Reason", "").replace("None", ""), run.node or ""
        if "Invalid job id" in err:
            return "GONE", "", run.node or ""
        return "", "", ""

    async def _judge_end(self, run: SlurmAttempt) -> None:
        """Slurm says it ended: its exit file says how, else Slurm's state does."""
        recorded = None
        try:
            recorded = parse_exit_file(run.files.exit.read_text())
        except OSError:
            pass
        state = run.state
        if recorded is None:
            run.ended_at = run.ended_at or time.monotonic()
            if run.ran and time.monotonic() - run.ended_at < EXIT_FILE_GRACE_S:
                return
            result = await self._exit_from_slurm(run)
        else:
            code, sig = recorded
            result = Exit(code, sig, oom=state == "OUT_OF_MEMORY")
            if state in LOST:
                result.lost = LOST[state]
                result.text = f"{result.describe()}; Slurm job {run.external_id} ended {state}"
        self.forget(run)
        run.finish(result)

    async def _exit_from_slurm(self, run: SlurmAttempt) -> Exit:
        state = run.state
        if state == "GONE":
            return Exit(None, None, lost=f"Slurm no longer knows job {run.external_id} and it "
                        "left no exit code", text=f"Slurm job {run.external_id} vanished")
        if state in LOST:
            return Exit(None, None, lost=LOST[state], text=f"Slurm job {run.external_id} "
                        f"ended {state} and left no exit code")
        if state == "OUT_OF_MEMORY":
            return Exit(None, signal.SIGKILL, oom=True,
                        text="killed by Slurm's memory limit (OUT_OF_MEMORY)")
        if state == "CANCELLED":
            return Exit(None, signal.SIGKILL,
                        text=f"Slurm job {run.external_id} was cancelled in Slurm")
        _, fields, _ = await self._scontrol(run)
        code, _, sig = fields.get("ExitCode", "").partition(":")
        if sig.isdigit() and int(sig):
            return Exit(None, int(sig))
        if code.isdigit():
            return Exit(int(code), None)
        return Exit(None, None, text=f"Slurm job {run.external_id} ended {state} with no "
                    "exit code on record")

    def status(self) -> dict[str, Any]:
        return {"probe": self.probe_state, "problem": self.problem,
                "jobs": {jid: r.describe() for jid, r in self.attempts.items()}}


def _first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip().removeprefix("sbatch: error: ")[:300]
    return ""
