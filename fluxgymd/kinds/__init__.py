"""Job kinds, one module each behind one small interface. The daemon asks the kind; it never
tests `kind ==` itself.

- validate: the kind's section of a job file, checked at submit (every mistake collected);
- bind: what it names of other jobs, resolved at submit (a publish job's LoRA job);
- refusals: what it would run that this fluxgymd's Policy does not allow (checked before
  `check`, which may itself run code: sd-scripts' parser);
- check: what can only be checked against the machine (files, the trainer's own parser);
- command: the next attempt's command line, resume included (each kind resumes its own way);
- output_parser: how progress, phases, checkpoints and samples are read from its output;
- finished: whether the run already wrote its final result (then it never runs again);
- result: that file;
- sample_dir / sample_step: where its sample images appear, and the step of each.
"""
from __future__ import annotations

from typing import Any

from .base import JobKind, OutputParser, Policy  # noqa: F401  (for the kinds' users)
from .caption import CaptionKind
from .command import CommandKind
from .download import DownloadKind
from .kohya import KohyaKind
from .lora import LoraKind
from .publish import PublishKind

KINDS: dict[str, JobKind] = {k.name: k for k in (CommandKind(), LoraKind(), KohyaKind(),
                                                 DownloadKind(), CaptionKind(), PublishKind())}


def kind_of(job: dict[str, Any]) -> JobKind:
    """A job's kind, from a store row or a spec (both carry `kind`)."""
    return KINDS[job.get("kind") or job["spec"]["kind"]]
