"""Job files: parse the TOML a user submits and validate every key before it is queued.

Every mistake is collected and reported together, each naming the key and what to write
instead, so a user fixes a job file in one round. The result is a plain dict (stored as JSON).
"""
from __future__ import annotations

import difflib
import re
import tomllib
from pathlib import Path
from typing import Any

from .executors import EXECUTORS
from .executors.slurm_job import refused_options
from .kinds import KINDS, Policy
from .protocol import ErrorCode, FluxgymError
from .watchdog import LIMIT_NAMES

NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")

SECTIONS = {
    "job": {"name": str, "kind": str, "description": str, "executor": str, "after": list,
            "gpus": (int, list), "gpu_memory_gib": (int, float)},
    "command": {"argv": list, "env": dict, "cwd": str, "progress": str},
    "train": None,  # the trainer validates its own keys
    "kohya": None,  # the kohya kind validates its own keys
    "download": None,  # the download kind validates its own keys
    "caption": None,  # the caption kind validates its own keys
    # the publish kind's own keys; on a lora or kohya job, the publish job chained after it
    "publish": None,
    "watchdog": {name: (int, float) for name in LIMIT_NAMES},
    # this job's own sbatch settings over the daemon's [slurm]
    "slurm": {"partition": str, "gres": str, "time_limit": str, "signal_before_end_s": int,
              "cpus_per_task": int, "mem": str, "sbatch_args": list, "python": str},
}


GPUS_FORM = "a number of GPUs (gpus = 1) or a list of GPU indices or UUIDs (gpus = [2])"


def _gpus(job: dict, errors: list[str]) -> dict[str, Any]:
    """[job] gpus and gpu_memory_gib, checked for their form (which GPUs exist is the
    daemon's to say at submit)."""
    out: dict[str, Any] = {}
    gpus = job.get("gpus")
    if isinstance(gpus, int) and not isinstance(gpus, bool):
        if not 0 <= gpus <= 64:
            errors.append(f"job.gpus must be 0 to 64, got {gpus}")
        out["gpus"] = gpus
    elif isinstance(gpus, list):
        bad = [g for g in gpus if isinstance(g, bool) or not isinstance(g, (int, str))
               or (isinstance(g, int) and g < 0) or (isinstance(g, str) and not g.strip())]
        if bad or not gpus:
            errors.append(f"job.gpus must be {GPUS_FORM}, got {gpus!r:.80}")
        elif len(set(map(str, gpus))) != len(gpus):
            errors.append(f"job.gpus names a GPU twice: {gpus!r:.80}")
        out["gpus"] = list(gpus)
    mem = job.get("gpu_memory_gib")
    if isinstance(mem, (int, float)) and not isinstance(mem, bool):
        if not 0 < mem <= 4096:
            errors.append(f"job.gpu_memory_gib must be more than 0 (GiB per GPU), got {mem}")
        out["gpu_memory_gib"] = float(mem)
    return out


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
          outputs_dir: Path | None = None, policy: Policy | None = None) -> dict[str, Any]:
    """The validated job, and what its kind checks on this machine before it is queued (for
    a lora job the dataset, the model files and free disk under `outputs_dir`; for a kohya
    job sd-scripts' own argument parser). `policy`: what this daemon allows (the default
    allows nothing beyond lora jobs) and its per-kind defaults; a job it does not allow is
    refused (FORBIDDEN) before its kind's checks run anything. Warnings that do not stop the
    job are in spec["warnings"]."""
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
    policy = policy or Policy()
    spec = _validate(data, base, errors, name_override, policy)
    spec["warnings"] = []
    if not errors:
        refused = KINDS[spec["kind"]].refusals(spec, policy)
        if refused:
            raise FluxgymError(ErrorCode.FORBIDDEN, f"{where}: " + (refused[0] if len(refused)
                               == 1 else f"{len(refused)} refusals:\n" + "\n".join(
                                   f"  - {r}" for r in refused)), details=refused)
        problems, spec["warnings"] = KINDS[spec["kind"]].check(
            spec, str(outputs_dir) if outputs_dir is not None else str(base))
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


def _validate(data: dict, base: Path, errors: list[str], name_override: str,
              policy: Policy) -> dict[str, Any]:
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
                    tname = GPUS_FORM if want == (int, list) else \
                        "a number" if isinstance(want, tuple) else {
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

    after = job.get("after", [])
    if not isinstance(after, list) or not all(isinstance(a, (str, int)) and
                                              not isinstance(a, bool) for a in after):
        errors.append("job.after must be a list of job names or ids, e.g. after = "
                      "[\"flux-dev-download\"]")
        after = []
    executor = job.get("executor")
    if executor is not None and executor not in EXECUTORS:
        errors.append(f"job.executor {executor!r:.40} is unknown; use one of: "
                      f"{', '.join(EXECUTORS)} (or leave it out: the daemon's executor)")
    slurm = data.get("slurm") if isinstance(data.get("slurm"), dict) else {}
    sbatch_args = slurm.get("sbatch_args") or []
    if not isinstance(sbatch_args, list) or not all(isinstance(a, str) for a in sbatch_args):
        errors.append("slurm.sbatch_args must be a list of strings, e.g. [\"--qos=high\"]")
    else:
        errors += [f"slurm.sbatch_args may not hold {why}" for why in refused_options(sbatch_args)]
    for key, least in (("signal_before_end_s", 1), ("cpus_per_task", 0)):
        if isinstance(slurm.get(key), int) and slurm[key] < least:
            errors.append(f"slurm.{key} must be {least} or more")
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
    if after:
        spec["after"] = [str(a) for a in after]  # checked against the store at submit
    spec.update(_gpus(job, errors))
    if executor is not None:
        spec["executor"] = executor
    if slurm:
        spec["slurm"] = dict(slurm)
    if kind in KINDS:
        own = KINDS[kind].section
        spec[own] = KINDS[kind].validate(data.get(own), base, errors, policy)
        chained = set()
        if "publish" in data and own != "publish" and KINDS[kind].makes_lora:
            from .kinds.publish import chain_section

            spec["publish"] = chain_section(data["publish"], errors)
            chained.add("publish")
        for other in {k.section for k in KINDS.values()} - {own} - chained:
            if other in data:
                users = [k.name for k in KINDS.values() if k.section == other]
                errors.append(f"[{other}] is only for kind = \"{users[0]}\" jobs")
    return spec


def output_dir(outputs_root: Path, name: str) -> Path:
    """The job's folder; refuses anything that would resolve outside the outputs root."""
    if check_name(name) is not None:
        raise FluxgymError(ErrorCode.INVALID_JOB, check_name(name) or "")
    root = outputs_root.resolve()
    path = (root / name).resolve()
    if path.parent != root:
        raise FluxgymError(ErrorCode.INVALID_JOB, f"job name {name!r} escapes {root}")
    return path
