"""The interface every job kind offers (see the package's docstring)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

_STEP_IN_NAME = re.compile(r"(?:step-|_)(\d{6,8})(?:[-_.])")

# (lines, pending) -> normalized progress events (progress.py's shapes), newest last
OutputParser = Callable[[list[str], str], list[dict[str, Any]]]


@dataclass(frozen=True)
class Policy:
    """What this fluxgymd lets a job do. A job that asks for more is refused when it is
    submitted (before anything of it runs, its checks included) and again before each
    attempt, since the config may have changed while it waited."""
    allow_command_jobs: bool = False
    # sd-scripts checkouts kohya jobs may run: (folder, its Python, or "" for the one found
    # in the checkout as kohya.python's default finds it)
    kohya_checkouts: tuple[tuple[str, str], ...] = ()
    kohya_save_every_n_steps: int = 100
    config_file: str = ""  # where an administrator changes this, for the advice
    models: Any = None  # the model catalog: {name: catalog.Model}
    models_dir: str = ""  # where pulled models go (<dir>/<name>/<file>)
    caption_model: str = ""  # a caption job's model when it names none ([caption] model)

    @property
    def where(self) -> str:
        return self.config_file or "fluxgymd's config file (--config)"

    def command_jobs_off(self) -> str:
        return ("command jobs are turned off on this fluxgymd: a command job runs any program "
                "as the daemon's user, so anyone who can reach its socket could run code. To "
                f"allow them, set allow_command_jobs = true under [daemon] in {self.where} "
                "(or start fluxgymd with --allow-command-jobs) and restart it")


TYPE_NAMES = {bool: "true or false", str: "a string", int: "an integer", float: "a number",
              list: "a list", dict: "a table"}


def typed_keys(section: dict[str, Any], keys: dict[str, type], where: str,
               errors: list[str]) -> dict[str, Any]:
    """The keys of a kind's table that are known and of their type; one error for each
    other (an integer is never a bool, and the reverse)."""
    out: dict[str, Any] = {}
    for key, value in section.items():
        want = keys.get(key)
        if want is None:
            errors.append(f"unknown key {where}.{key}; known: {', '.join(keys)}")
        elif not isinstance(value, want) or (want is int and isinstance(value, bool)):
            errors.append(f"{where}.{key} must be {TYPE_NAMES.get(want, want.__name__)}")
        else:
            out[key] = value
    return out


class JobKind:
    name = ""
    section = ""  # the job file's table for this kind
    speaks_contract = False  # judged by progress events from its start, not only by output
    runs_any_program = False  # refused unless command jobs are allowed
    uses_gpu = True  # judged by the idle-GPU rule (where there are GPUs)
    default_gpus = 0  # GPUs it is placed on unless [job] gpus says (on a host with GPUs)
    hub_token = False  # its child gets the Hub token ([hub] token_file, HF_TOKEN); no other does
    local_only = False  # always on this machine, whatever the executor (a download: the
    #                     token never goes into a cluster's job environment)
    makes_lora = False  # its result is a LoRA: a publish job may publish it ([publish])
    controls: tuple[str, ...] = ()  # requests its running child takes at a step boundary
    #                                  (trainer.contract: "save", "sample")

    def validate(self, section: Any, base: Path, errors: list[str],
                 policy: Policy) -> dict[str, Any]:
        raise NotImplementedError

    def refusals(self, spec: dict[str, Any], policy: Policy) -> list[str]:
        """Why this fluxgymd may not run the (validated) job, or []: what the kind could run
        beyond what the administrator allowed."""
        if self.runs_any_program and not policy.allow_command_jobs:
            return [policy.command_jobs_off()]
        return []

    def models_needed(self, spec: dict[str, Any], policy: Policy) -> list[str]:
        """Catalog models the job names that are not on disk: a download job fetches them
        and the job waits for it."""
        return []

    def bind(self, spec: dict[str, Any], find: Callable[[str], dict[str, Any]],
             kind_of: Callable[[dict[str, Any]], "JobKind"],
             policy: Policy) -> list[dict[str, Any]]:
        """At submit, once the file is valid: resolve what the job names of other jobs
        (`find(ref)` gives a stored job or raises; `kind_of(job)` its kind), put what it
        needs of them in the spec, and return the jobs it must wait for."""
        return []

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

    def control_refused(self, job: dict[str, Any], action: str) -> str | None:
        """Why its running child cannot take this request (save-now, sample-now), or None."""
        if action not in self.controls:
            return f"a {self.name} job does not take {action}-now requests"
        return None

    def lora_path(self, job: dict[str, Any]) -> str | None:
        """Where its LoRA will be once it has finished (kinds that make one)."""
        return None

    def sample_dir(self, job: dict[str, Any]) -> Path | None:
        """Where its sample images appear: samples/ in its folder unless the kind says."""
        return Path(job["output_dir"]) / "samples"

    def sample_step(self, name: str) -> int | None:
        """The step a sample image was made at, from its file name."""
        m = _STEP_IN_NAME.search(name)
        return int(m.group(1)) if m else None
