"""Job kinds, one class each behind one small interface: how an attempt starts (its command
line), how its progress is read (the contract's events, or a tqdm bar in its output), whether
it is trusted like a lora job, and what it leaves behind when it finishes. The daemon asks the
kind; it never tests `kind ==` itself.

Resume is each kind's own business inside its attempt: our trainer resumes from its newest
complete checkpoint by itself, and a command job is simply run again.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import tomli_w


class JobKind:
    name = ""
    speaks_contract = False  # judged by contract events from its start, not only by output
    runs_any_program = False  # refused unless command jobs are allowed

    def command(self, job: dict[str, Any]) -> tuple[list[str], dict[str, str], str | None]:
        """(argv, extra environment, working directory) of the job's next attempt."""
        raise NotImplementedError

    def parses_tqdm(self, spec: dict[str, Any]) -> bool:
        return False

    def result(self, job: dict[str, Any]) -> str | None:
        """The file a finished job produced, once it exists."""
        return None


class CommandKind(JobKind):
    name = "command"
    runs_any_program = True

    def command(self, job):
        cmd = job["spec"]["command"]
        return list(cmd["argv"]), dict(cmd["env"]), cmd["cwd"]

    def parses_tqdm(self, spec):
        return spec["command"]["progress"] == "tqdm"


class LoraKind(JobKind):
    name = "lora"
    speaks_contract = True

    def command(self, job):
        # the trainer reads the job file the user submitted, as the daemon validated it
        spec, out = job["spec"], Path(job["output_dir"])
        doc = {"job": {"name": spec["name"], "kind": "lora"}, "train": spec["train"]}
        if spec.get("watchdog"):
            doc["watchdog"] = spec["watchdog"]
        job_file = out / "job.toml"
        job_file.write_text(tomli_w.dumps(doc), encoding="utf-8")
        return [sys.executable, "-m", "trainer", str(job_file), "--output-dir", str(out)], {}, None

    def result(self, job):
        path = Path(job["output_dir"]) / f"{job['name']}.safetensors"
        return str(path) if path.is_file() else None


KINDS: dict[str, JobKind] = {k.name: k for k in (CommandKind(), LoraKind())}


def kind_of(job: dict[str, Any]) -> JobKind:
    """A job's kind, from a store row or a spec (both carry `kind`)."""
    return KINDS[job.get("kind") or job["spec"]["kind"]]
