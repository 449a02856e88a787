"""Executors: where an attempt runs. The daemon starts, signals, follows and reaps an attempt
only through one; job kinds (what runs) and executors (where) are independent.

- local (local.py): a process group on this machine, its output read from pipes, its exit
  seen through a pidfd. A daemon restart stops what is left of it and resumes the job.
- slurm (slurm.py): one Slurm batch job per attempt; output and contract events are files
  on the filesystem the nodes share, followed by the daemon. A daemon restart takes the
  running Slurm job up again.

An attempt, whatever runs it, offers: `pid` (a local group leader, else None),
`external_id` and `node` (the Slurm job and where it runs), `on_node` (it has begun
running), `exited` (a future of its Exit), `running`, `signal(sig)`, `dump_stacks()`,
`terminate(grace_s)`.
"""
from __future__ import annotations

import signal
from dataclasses import dataclass

EXECUTORS = ("local", "slurm")


class SpawnError(Exception):
    """The attempt could not be started, and trying again the same way cannot help."""


@dataclass
class Exit:
    code: int | None  # exit status, or None when killed by a signal (or never known)
    signal: int | None
    leftovers: int = 0  # processes of its group killed after the leader exited
    escaped: int = 0  # processes that had left its group (setsid), stopped with it
    # The cluster ended it (node failure, preemption, a time limit it could not checkpoint
    # before): the job is resumed without spending a restart.
    lost: str = ""
    oom: bool = False  # the cluster's or kernel's memory limit killed it
    fatal: bool = False  # it could not be started, and trying again the same way cannot help
    text: str = ""  # how it ended, when neither a code nor a signal says it

    def describe(self) -> str:
        if self.text:
            return self.text
        if self.signal is not None:
            return f"killed by {signal.Signals(self.signal).name}"
        return f"exited with code {self.code}"
