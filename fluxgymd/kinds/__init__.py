"""Job kinds, one module each behind one small interface. The daemon asks the kind; it never
tests `kind ==` itself.

- validate: the kind's section of a job file, checked at submit (every mistake collected);
- check: what can only be checked against the machine (files, the trainer's own parser);
- command: the next attempt's command line, resume included (each kind resumes its own way);
- output_parser: how progress, phases, checkpoints and samples are read from its output;
- finished: whether the run already wrote its final result (then it never runs again);
- result: that file;
- sample_dir / sample_step: where its sample images appear, and the step of each.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

_STEP_IN_NAME = re.compile(r"(?:step-|_)(\d{6,8})(?:[-_.])")

# (lines, pending) -> normalized progress events (progress.py's shapes), newest last
OutputParser = Callable[[list[str], str], list[dict[str, Any]]]


class JobKind:
    name = ""
    section = ""  # the job file's table for this kind
    speaks_contract = False  # judged by progress events from its start, not only by output
    runs_any_program = False  # refused unless command jobs are allowed

    def validate(self, section: Any, base: Path, errors: list[str],
                 defaults: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def check(self, spec: dict[str, Any], outputs_dir: str) -> tuple[list[str], list[str]]:
        """(problems, warnings) found on this machine; problems refuse the job."""
        return [], []

    def command(self, job: dict[str, Any]) -> tuple[list[str], dict[str, str], str | None]:
        """(argv, extra environment, working directory) of the job's next attempt."""
        raise NotImplementedError

    def output_parser(self, spec: dict[str, Any]) -> OutputParser | None:
        return None

    def finished(self, job: dict[str, Any]) -> bool:
        return False

    def result(self, job: dict[str, Any]) -> str | None:
        """The file a finished job produced, once it exists."""
        return None

    def sample_dir(self, job: dict[str, Any]) -> Path | None:
        """Where its sample images appear: samples/ in its folder unless the kind says."""
        return Path(job["output_dir"]) / "samples"

    def sample_step(self, name: str) -> int | None:
        """The step a sample image was made at, from its file name."""
        m = _STEP_IN_NAME.search(name)
        return int(m.group(1)) if m else None


from .command import CommandKind  # noqa: E402
from .kohya import KohyaKind  # noqa: E402
from .lora import LoraKind  # noqa: E402

KINDS: dict[str, JobKind] = {k.name: k for k in (CommandKind(), LoraKind(), KohyaKind())}


def kind_of(job: dict[str, Any]) -> JobKind:
    """A job's kind, from a store row or a spec (both carry `kind`)."""
    return KINDS[job.get("kind") or job["spec"]["kind"]]
