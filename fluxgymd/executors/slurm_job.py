"""What a Slurm attempt is made of, without any I/O of its loop: the [slurm] settings and
the sbatch options they make, the attempt's files and batch script, a follower of a growing
file, and readers of squeue's and the batch script's answers. The executor is slurm.py.
"""
from __future__ import annotations

import logging
import os
import shlex
import signal
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..joblog import LineSplitter

log = logging.getLogger("fluxgymd.slurm")

READ_CHUNK = 1024 * 1024
READ_BUDGET = 8 * READ_CHUNK  # a follower's most bytes a tick
# After Slurm says a job ended, how long its exit file may take to show up here (a shared
# filesystem's attribute cache) before the end is judged from Slurm's state alone.
EXIT_FILE_GRACE_S = 5.0
COMMAND_TIMEOUT_S = 60.0
ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "STOPPED",
          "RESIZING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "SIGNALING", "STAGE_OUT",
          "RESV_DEL_HOLD"}
ON_NODE = {"RUNNING", "COMPLETING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT"}
# Ends that are the cluster's doing, not the program's: the job resumes without spending a
# restart (whether or not the program managed to checkpoint on the way out).
LOST = {"PREEMPTED": "preempted by Slurm", "NODE_FAIL": "its node failed",
        "BOOT_FAIL": "its node failed to boot", "TIMEOUT": "it reached its Slurm time limit",
        "DEADLINE": "it reached its Slurm deadline"}
# sbatch's answers that trying again later can fix
TRANSIENT = ("Unable to contact slurm controller", "Socket timed out", "temporarily unavailable",
             "Slurm temporarily unable", "Connection refused", "Resource temporarily unavailable",
             "Zero Bytes were transmitted", "not responding")
# sbatch options fluxgymd sets itself (the executor relies on them), or that would run the
# job as someone else: refused in sbatch_args, with the reason.
RESERVED_OPTIONS = {
    "--output": "fluxgymd sets it", "-o": "fluxgymd sets it", "--error": "fluxgymd sets it",
    "-e": "fluxgymd sets it", "--open-mode": "fluxgymd sets it", "--chdir": "fluxgymd sets it",
    "-D": "fluxgymd sets it", "--job-name": "fluxgymd sets it", "-J": "fluxgymd sets it",
    "--parsable": "fluxgymd sets it", "--requeue": "resuming is fluxgymd's",
    "--no-requeue": "fluxgymd sets it", "--signal": "set signal_before_end_s instead",
    "--wrap": "fluxgymd writes the batch script", "--array": "one attempt is one job",
    "-a": "one attempt is one job", "--uid": "jobs run as the service user",
    "--gid": "jobs run as the service user", "--export": "fluxgymd passes the environment",
    "--wait": "fluxgymd follows the job", "-W": "fluxgymd follows the job",
}


def refused_options(args) -> list[str]:
    """Why each of these sbatch arguments may not be given, as 'ARG: why'."""
    out = []
    for arg in args:
        name = arg.split("=", 1)[0] if arg.startswith("--") else arg[:2]
        if name in RESERVED_OPTIONS:
            out.append(f"{arg}: {RESERVED_OPTIONS[name]}")
    return out


SETTINGS = ("partition", "gres", "time_limit", "signal_before_end_s", "cpus_per_task", "mem",
            "sbatch_args", "python")


@dataclass(frozen=True)
class SlurmSettings:
    """[slurm] in fluxgymd.toml; a job's own [slurm] table overrides the first eight."""
    partition: str = ""
    gres: str = ""  # e.g. gpu:1
    time_limit: str = ""  # sbatch --time, e.g. 4:00:00
    signal_before_end_s: int = 300  # SIGTERM this long before the time limit: checkpoint
    cpus_per_task: int = 0
    mem: str = ""  # e.g. 64G
    sbatch_args: tuple[str, ...] = ()
    python: str = ""  # the Python on the nodes, in place of the daemon's own
    bin_dir: str = ""  # where sbatch & co are; empty: PATH
    poll_s: float = 2.0  # squeue, for every attempt at once
    follow_s: float = 0.25  # output and event files
    probe: bool = True  # a probe job checks at start that the nodes share outputs_dir

    def with_overrides(self, overrides: dict[str, Any]) -> "SlurmSettings":
        fixed = {k: tuple(v) if k == "sbatch_args" else v for k, v in overrides.items()
                 if k in SETTINGS}
        return replace(self, **fixed)

    def probe_options(self) -> list[str]:
        """What the shared-filesystem probe asks for: no GPU, no long time (it must not
        wait behind training jobs for a GPU), but the partition and account options."""
        return ([f"--partition={self.partition}"] if self.partition else []) + \
            list(self.sbatch_args)

    def options(self) -> list[str]:
        opts = []
        if self.partition:
            opts.append(f"--partition={self.partition}")
        if self.gres:
            opts.append(f"--gres={self.gres}")
        if self.time_limit:
            opts += [f"--time={self.time_limit}",
                     f"--signal=B:TERM@{int(self.signal_before_end_s)}"]
        if self.cpus_per_task:
            opts.append(f"--cpus-per-task={self.cpus_per_task}")
        if self.mem:
            opts.append(f"--mem={self.mem}")
        return opts + list(self.sbatch_args)


@dataclass
class Files:
    """One attempt's files in its job's folder."""
    folder: Path
    attempt: int

    def _p(self, ext: str) -> Path:
        return self.folder / ".slurm" / f"attempt-{self.attempt}.{ext}"

    script = property(lambda self: self._p("sh"))
    out = property(lambda self: self._p("out"))
    events = property(lambda self: self._p("events"))
    exit = property(lambda self: self._p("exit"))
    node = property(lambda self: self._p("node"))


def events_endpoint(folder: Path, attempt: int) -> str:
    return f"file://{Files(folder, attempt).events}"


def batch_script(argv: list[str], cwd: str | None, files: Files, title: str) -> str:
    """The batch script: the attempt in its own process group, signals passed on (a stack
    dump to its main process, the rest to the group), its exit code written down."""
    q = shlex.quote
    return f"""#!/bin/bash
# {title}: written by fluxgymd, run by Slurm.
cd {q(cwd or str(files.folder))} || {{ echo 1 > {q(str(files.exit))}; exit 1; }}
child=
pass_on() {{
    [ -n "$child" ] || return 0
    echo "fluxgymd-slurm: SIG$1 passed on to pid $child"
    if [ "$1" = USR1 ]; then kill -USR1 "$child" 2>/dev/null
    else kill -s "$1" -- "-$child" 2>/dev/null; fi
}}
for s in TERM INT USR1 USR2 CONT HUP; do trap "pass_on $s" "$s"; done
setsid {' '.join(q(a) for a in argv)} </dev/null &
child=$!
echo "$SLURM_JOB_ID $(hostname) $child" > {q(str(files.node))}
while :; do
    wait "$child"; code=$?
    kill -0 "$child" 2>/dev/null || break
done
kill -KILL -- "-$child" 2>/dev/null
echo "$code" > {q(str(files.exit))}.tmp && mv -f {q(str(files.exit))}.tmp {q(str(files.exit))}
[ "$code" = 75 ] && exit 0
exit "$code"
"""


class Follower:
    """Reads what was appended to a file since the last look, as lines. Opened afresh each
    time: on a shared filesystem that is what makes another host's writes visible."""

    def __init__(self, path: Path, offset: int = 0, private: bool = False):
        self.path = path
        self.offset = offset
        self.private = private  # refuse a file others could have written
        self.splitter = LineSplitter()
        self.refused = ""

    @property
    def resume_offset(self) -> int:
        """Where a reader starting over should begin: before an unfinished last line."""
        return self.offset - self.splitter.held_bytes

    def read(self, budget: int | None = READ_BUDGET) -> tuple[list[str], str]:
        """New complete lines and the unfinished one; at most `budget` bytes a call, so a
        backlog (a daemon restarted after hours) is taken in over several ticks."""
        if self.refused:
            return [], ""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return [], ""
        try:
            st = os.fstat(fd)
            if self.private and (st.st_uid != os.getuid() or st.st_mode & 0o022):
                self.refused = (f"{self.path} is not this service's own private file (owner "
                                f"uid {st.st_uid}, mode {st.st_mode & 0o777:o}); its events "
                                "are ignored")
                log.error("%s", self.refused)
                return [], ""
            if st.st_size < self.offset:  # truncated behind our back: read it anew
                self.offset, self.splitter = 0, LineSplitter()
            if st.st_size == self.offset:
                return [], self.splitter.pending
            lines: list[str] = []
            os.lseek(fd, self.offset, os.SEEK_SET)
            taken = 0
            while budget is None or taken < budget:
                data = os.read(fd, READ_CHUNK)
                if not data:
                    break
                self.offset += len(data)
                taken += len(data)
                lines += self.splitter.feed(data)
            return lines, self.splitter.pending
        finally:
            os.close(fd)


def parse_exit_file(text: str) -> tuple[int | None, int | None] | None:
    """(code, signal) from the batch script's record; a shell reports a death by signal N
    as 128 + N."""
    text = text.strip()
    if not text.lstrip("-").isdigit():
        return None
    code = int(text)
    if code > 128 and code - 128 in signal.valid_signals():
        return None, code - 128
    return code, None


def parse_squeue(text: str) -> dict[str, tuple[str, str, str]]:
    """`squeue -h -o %i|%T|%r|%N` lines: {job id: (state, reason, node)}."""
    out = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 4 and parts[0]:
            jid, state, reason, node = parts
            out[jid] = (state.strip(), "" if reason in ("None", "(null)") else reason,
                        "" if node in ("", "(null)") else node)
    return out
