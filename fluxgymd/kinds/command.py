"""kind = "command": any program, run again from the start on each attempt; its progress is
a tqdm bar in its output, when it prints one."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from ..progress import parse_tqdm
from .base import JobKind

PROGRESS_PARSERS = ("tqdm", "none")


def newest_bar(lines: list[str], pending: str) -> dict[str, Any] | None:
    """The newest tqdm bar: only it matters, and it is often still being drawn (pending)."""
    for line in [pending, *reversed(lines)]:
        if "/" in line:
            for segment in reversed(line.split("\r")):
                ev = parse_tqdm(segment)
                if ev:
                    return ev
    return None


class CommandKind(JobKind):
    name = section = "command"
    runs_any_program = True

    def validate(self, section, base, errors, policy):
        if not isinstance(section, dict):
            errors.append("a command job needs a [command] section with "
                          "argv = [\"program\", ...]")
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
                    errors.append(f"command.argv[0]: program {prog!r} is not on the daemon's "
                                  "PATH")
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
                errors.append(f"command.progress {progress!r} is unknown; use one of: "
                              f"{', '.join(PROGRESS_PARSERS)}")
            out["progress"] = progress
        return out

    def command(self, job):
        cmd = job["spec"]["command"]
        return list(cmd["argv"]), dict(cmd["env"]), cmd["cwd"]

    def output_parser(self, spec):
        if spec["command"]["progress"] != "tqdm":
            return None

        def parse(lines, pending):
            ev = newest_bar(lines, pending)
            return [ev] if ev else []
        return parse
