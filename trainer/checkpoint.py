"""Checkpoints: one self-describing folder per step, holding only what training needs to
continue exactly — LoRA weights, optimizer, scheduler, RNG, step — never the base model.

A checkpoint is written into a temporary folder, every file fsynced, the manifest written
last, then renamed into place: a crash at any moment leaves either the whole checkpoint or
none. Only folders with a manifest whose files match it count.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import time
from dataclasses import dataclass
from typing import Any

FORMAT = 1
MANIFEST = "manifest.json"
DIR_RE = re.compile(r"step-(\d{8})")
TMP_PREFIX = ".tmp-"
# Test hook: "kill-in-checkpoint:<step>" SIGKILLs this process after the first file of that
# step's checkpoint, to prove a torn write is never resumed from.
FAULT_ENV = "TRAINER_FAULT"


class CheckpointError(Exception):
    pass


LOCK = ".trainer.lock"


class OutputBusy(Exception):
    """Another trainer holds the output folder: this one must not write beside it."""


def hold_output(out: str) -> int:
    """An exclusive lock on the output folder for as long as this process (and what it
    forks) lives: a second trainer of the same job, whoever started it, refuses to run
    instead of writing the same checkpoints. The fd is never closed on purpose."""
    os.makedirs(out, exist_ok=True)
    fd = os.open(os.path.join(out, LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise OutputBusy(f"another trainer (pid {holder}) is writing to {out}; refusing to "
                         "run beside it (stop that one first)") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


@dataclass
class Found:
    path: str
    step: int
    manifest: dict[str, Any]


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save(root: str, step: int, writers: dict[str, Any], meta: dict[str, Any]) -> str:
    """Write a checkpoint. `writers` maps file names to callables that write that file."""
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step-{step:08d}")
    tmp = os.path.join(root, f"{TMP_PREFIX}step-{step:08d}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    fault = os.environ.get(FAULT_ENV, "")
    files: dict[str, Any] = {}
    for i, (name, write) in enumerate(writers.items()):
        path = os.path.join(tmp, name)
        write(path)
        with open(path, "rb+") as fh:
            os.fsync(fh.fileno())
        files[name] = {"bytes": os.path.getsize(path), "sha256": _sha256(path)}
        if i == 0 and fault == f"kill-in-checkpoint:{step}":
            os.kill(os.getpid(), signal.SIGKILL)
    manifest = dict(meta, format=FORMAT, step=step, files=files, created_at=time.time())
    with open(os.path.join(tmp, MANIFEST), "w") as fh:
        json.dump(manifest, fh, indent=2, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if os.path.exists(final):  # the same step saved again (e.g. a resumed run's last step)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    return final


def _read_manifest(path: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(path, MANIFEST)) as fh:
            m = json.load(fh)
    except (OSError, ValueError):
        return None
    if not isinstance(m, dict) or m.get("format") != FORMAT or not isinstance(m.get("files"), dict):
        return None
    for name, info in m["files"].items():
        p = os.path.join(path, name)
        if not os.path.isfile(p) or os.path.getsize(p) != info.get("bytes"):
            return None
    return m


def complete(root: str) -> list[Found]:
    """Complete checkpoints, newest first (sizes checked; contents checked by verify)."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = DIR_RE.fullmatch(name)
        if not m:
            continue
        path = os.path.join(root, name)
        manifest = _read_manifest(path)
        if manifest is not None and manifest.get("step") == int(m.group(1)):
            found.append(Found(path, int(m.group(1)), manifest))
    return sorted(found, key=lambda f: f.step, reverse=True)


def verify(found: Found) -> str | None:
    """Why a checkpoint's files do not match its manifest, or None."""
    for name, info in found.manifest["files"].items():
        if _sha256(os.path.join(found.path, name)) != info.get("sha256"):
            return f"{name} does not match its checksum"
    return None


def prune(root: str, keep: int) -> list[str]:
    """Remove all but the `keep` newest complete checkpoints, and stale temporary folders
    (this trainer is the only writer of its output folder)."""
    removed = []
    for f in complete(root)[keep:]:
        shutil.rmtree(f.path, ignore_errors=True)
        removed.append(f.path)
    if os.path.isdir(root):
        for name in os.listdir(root):
            if name.startswith(TMP_PREFIX):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
                removed.append(os.path.join(root, name))
    return removed
