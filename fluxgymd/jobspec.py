"""Job files: parse the TOML a user submits and validate every key before it is queued.

Every mistake is collected and reported together, each naming the key and what to write
instead, so a user fixes a job file in one round. The result is a plain dict (stored as JSON).
"""
from __future__ import annotations

import difflib
import os
import re
import shutil
import tomllib
from pathlib import Path
from typing import Any

from trainer import config as train_config
from trainer.preflight import preflight

from .protocol import ErrorCode, FluxgymError
from .kinds import KINDS
from .watchdog import LIMIT_NAMES

NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
PROGRESS_PARSERS = ("tqdm", "none")

SECTIONS = {
    "job": {"name": str, "kind": str, "description": str},
    "command": {"argv": list, "env": dict, "cwd": str, "progress": str},
    "train": None,  # the trainer validates its own keys
    "watchdog": {name: (int, float) for name in LIMIT_NAMES},
}


def _close(word: str, choices) -> str:
    m = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {m[0]!r}?)" if m else ""


def check_name(name: Any) -> str | None:
    """Return why a job name is unusable, or None. A valid name cannot leave outputs/."""
    if not isinstance(name, str):
        return "job.name must be a string"
    if not NAME_RE.fullmatch(name) or name in (".", ".."):
        return (
            f"job.name {name!r:.80} is not allowed: use 1-64 characters from a-z, 0-9, '.', "
            "'_' and '-', starting with a letter or digit (e.g. 'my-lora-v2')"
        )
    if name.isdigit():
        # `fluxgymctl logs 4` must mean one job: ids are all digits, so names are not
        return f"job.name {name!r} is all digits, which reads as a job id; add a letter " \
            f"(e.g. 'run-{name}')"
    return None


def parse(text: str, source: str = "", name_override: str = "",
          outputs_dir: Path | None = None) -> dict[str, Any]:
    """The validated job; for a lora job, also what can be checked without loading the model
    (dataset images, model class, free disk under `outputs_dir`). Warnings that do not stop
    the job are in spec["warnings"]."""
    where = source or "job file"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise FluxgymError(ErrorCode.INVALID_JOB, f"{where}: not valid TOML: {e}") from None
    except RecursionError:
        raise FluxgymError(ErrorCode.INVALID_JOB, f"{where}: arrays or tables nested too deeply "
                           "for a job file") from None
    nul = list(_with_nul(data, ""))
    if nul:
        # paths, argv and env cannot hold one: the OS refuses them at exec or stat
        raise FluxgymError(ErrorCode.INVALID_JOB, f"{where}: a NUL character (\\u0000) in "
                           f"{', '.join(nul[:5])}; remove it", details=nul)
    base = Path(source).resolve().parent if source else Path.cwd()
    errors: list[str] = []
    spec = _validate(data, base, errors, name_override)
    spec["warnings"] = []
    if not errors and spec.get("kind") == "lora":
        problems, spec["warnings"] = preflight(
            train_config.TrainConfig(**spec["train"]),
            str(outputs_dir) if outputs_dir is not None else str(base))
        errors.extend(problems)
    if errors:
        msg = f"{where} has {len(errors)} problem(s):\n" + "\n".join(f"  - {e}" for e in errors)
        raise FluxgymError(ErrorCode.INVALID_JOB, msg, details=errors)
    return spec


def _with_nul(value: Any, where: str):
    """The keys of every string (or key) that holds a NUL character."""
    if isinstance(value, str):
        if "\x00" in value:
            yield where or "a value"
    elif isinstance(value, dict):
        for k, v in value.items():
            name = f"{where}.{k}" if where else str(k)
            if "\x00" in str(k):
                yield repr(name)
            else:
                yield from _with_nul(v, name)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _with_nul(v, f"{where}[{i}]")


def _validate(data: dict, base: Path, errors: list[str], name_override: str) -> dict[str, Any]:
    for section, value in data.items():
        if section not in SECTIONS:
            errors.append(f"unknown section [{section}]{_close(section, SECTIONS)}")
        elif not isinstance(value, dict):
            errors.append(f"{section} must be a table: write [{section}] on its own line")
        elif SECTIONS[section] is not None:
            for key, v in value.items():
                types = SECTIONS[section]
                if key not in types:
                    errors.append(f"unknown key {section}.{key}{_close(key, types)}")
                elif not isinstance(v, types[key]) or isinstance(v, bool):
                    want = types[key]
                    tname = "a number" if isinstance(want, tuple) else {
                        str: "a string", list: "a list", dict: "a table"}[want]
                    errors.append(f"{section}.{key} must be {tname}, got {v!r:.60}")

    job = data.get("job") if isinstance(data.get("job"), dict) else {}
    if "job" not in data:
        errors.append("missing [job] section (with name and kind)")
    name = name_override or job.get("name")
    if name is None:
        errors.append("missing job.name (e.g. name = \"my-lora\")")
    elif (why := check_name(name)) is not None:
        errors.append(why)
    kind = job.get("kind")
    if kind is None:
        errors.append(f"missing job.kind (one of: {', '.join(KINDS)})")
    elif kind not in KINDS:
        errors.append(f"job.kind {kind!r} is unknown; use one of: {', '.join(KINDS)}")

    watchdog = data.get("watchdog") if isinstance(data.get("watchdog"), dict) else {}
    for key, value in watchdog.items():
        if key in LIMIT_NAMES and isinstance(value, (int, float)) and value < 0:
            errors.append(f"watchdog.{key} must be 0 or more, got {value}")
    spec: dict[str, Any] = {
        "name": name,
        "kind": kind,
        "description": job.get("description", ""),
        "watchdog": dict(watchdog),
    }
    if kind == "command":
        spec["command"] = _command(data.get("command"), base, errors)
        if "train" in data:
            errors.append("[train] is only for kind = \"lora\" jobs")
    elif kind == "lora":
        train = data.get("train")
        if not isinstance(train, dict):
            errors.append("a lora job needs a [train] section (see etc/jobs/tiny-lora.toml)")
        else:
            # The trainer's own validation (stdlib only), so mistakes surface at submit.
            try:
                spec["train"] = train_config.parse(train, str(base)).to_dict()
            except train_config.TrainConfigError as e:
                errors.extend(e.problems)
        if "command" in data:
            errors.append("[command] is only for kind = \"command\" jobs")
    return spec


def _command(section: Any, base: Path, errors: list[str]) -> dict[str, Any]:
    if not isinstance(section, dict):
        errors.append("a command job needs a [command] section with argv = [\"program\", ...]")
        return {}
    argv = section.get("argv")
    out: dict[str, Any] = {"argv": argv, "env": {}, "cwd": None, "progress": "tqdm"}
    if argv is None:
        errors.append("missing command.argv (e.g. argv = [\"python3\", \"train.py\"])")
    elif isinstance(argv, list):
        if not argv:
            errors.append("command.argv is empty; give at least the program to run")
        elif not all(isinstance(a, str) for a in argv):
            errors.append("command.argv must hold only strings")
        else:
            prog = argv[0]
            if "/" in prog:
                # normpath, not resolve: a venv's bin/python is a symlink that must stay one
                path = Path(os.path.normpath(base / prog))
                if not path.exists():
                    errors.append(f"command.argv[0]: {path} does not exist")
                elif not os.access(path, os.X_OK):
                    errors.append(f"command.argv[0]: {path} is not executable (chmod +x it)")
                out["argv"] = [str(path)] + argv[1:]
            elif shutil.which(prog) is None:
                errors.append(f"command.argv[0]: program {prog!r} is not on the daemon's PATH")
    env = section.get("env", {})
    if isinstance(env, dict):
        for k, v in env.items():
            if not isinstance(v, str):
                errors.append(f"command.env.{k} must be a string, got {v!r:.60}")
        out["env"] = env
    cwd = section.get("cwd")
    if isinstance(cwd, str):
        p = (base / cwd).resolve()
        if not p.is_dir():
            errors.append(f"command.cwd: {p} is not a directory")
        out["cwd"] = str(p)
    progress = section.get("progress", "tqdm")
    if isinstance(progress, str):
        if progress not in PROGRESS_PARSERS:
            errors.append(
                f"command.progress {progress!r} is unknown; use one of: "
                f"{', '.join(PROGRESS_PARSERS)}"
            )
        out["progress"] = progress
    return out


def output_dir(outputs_root: Path, name: str) -> Path:
    """The job's folder; refuses anything that would resolve outside the outputs root."""
    if check_name(name) is not None:
        raise FluxgymError(ErrorCode.INVALID_JOB, check_name(name) or "")
    root = outputs_root.resolve()
    path = (root / name).resolve()
    if path.parent != root:
        raise FluxgymError(ErrorCode.INVALID_JOB, f"job name {name!r} escapes {root}")
    return path
