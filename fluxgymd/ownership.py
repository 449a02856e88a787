"""Who owns an output folder: exactly one job of exactly one store.

A job's folder holds its checkpoints and LoRA; a second job writing there (another daemon
with its own database, or this one after its database was recreated) would resume from the
wrong checkpoint and overwrite the LoRA. So a folder is claimed when a job is submitted, by a
marker file naming the store and the job, and a running attempt holds a lock on it. A folder
that exists and is not empty is never adopted by a new job.
"""
from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any

from .protocol import ErrorCode, FluxgymError

MARKER = ".fluxgymd-owner.json"
LOCK = ".fluxgymd-lock"


def read_owner(folder: Path) -> dict[str, Any] | None:
    try:
        with open(folder / MARKER, encoding="utf-8") as fh:
            owner = json.load(fh)
        return owner if isinstance(owner, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable: someone's, we cannot tell whose


def _describe(owner: dict[str, Any] | None, store_id: str) -> str:
    if owner is None:
        return "has files of its own and no owner marker (made by hand, or by an older fluxgymd)"
    if not owner:
        return f"has an unreadable {MARKER}"
    whose = "this fluxgymd's database" if owner.get("store") == store_id else \
        f"another fluxgymd database ({owner.get('store', '?')[:8]})"
    return f"belongs to job {owner.get('job')} ({owner.get('name')}) of {whose}"


def claim(folder: Path, store_id: str, job_id: int, spec: dict[str, Any]) -> None:
    """Create the folder (or take an empty one) and mark it as this job's; refuse a folder
    that holds anything."""
    folder.mkdir(parents=True, exist_ok=True)
    owner = read_owner(folder)
    if owner is not None and owner.get("store") == store_id and owner.get("job") == job_id:
        return
    if any(os.scandir(folder)) and not _prepared_for(folder, spec.get("name")):
        raise FluxgymError(
            ErrorCode.CONFLICT,
            f"the output folder {folder} {_describe(owner, store_id)}; a new job never reuses "
            "another's folder (its checkpoints and LoRA would be taken over). Choose another "
            "name (submit --name NEW), or move that folder aside",
        )
    write_owner(folder, store_id, job_id, spec)


DATASET = "dataset"  # the photos `fluxgymctl new` copies, inside the LoRA job's own folder
DATASET_MARKER = ".fluxgymd-dataset"  # names the job a prepared dataset folder is for


def _prepared_for(folder: Path, name: Any) -> bool:
    """The folder holds only the dataset `fluxgymctl new` copied for a job of this name."""
    try:
        marker = (folder / DATASET / DATASET_MARKER).read_text(encoding="utf-8")
    except OSError:
        return False
    return marker == name and [e.name for e in os.scandir(folder)] == [DATASET]


def write_owner(folder: Path, store_id: str, job_id: int, spec: dict[str, Any]) -> None:
    tmp = folder / (MARKER + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        # the spec too: `fluxgymd --recover-db` rebuilds a job whose row was lost from it
        json.dump({"store": store_id, "job": job_id, "name": spec.get("name"), "spec": spec},
                  fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, folder / MARKER)


def check(folder: Path, store_id: str, job_id: int, spec: dict[str, Any]) -> str | None:
    """Before an attempt: None when the folder is this job's (marking a folder of a job
    from before markers existed), else why it may not run there."""
    owner = read_owner(folder)
    if owner is None:
        folder.mkdir(parents=True, exist_ok=True)
        write_owner(folder, store_id, job_id, spec)
        return None
    if owner.get("store") == store_id and owner.get("job") == job_id:
        return None
    return (f"its output folder {folder} now {_describe(owner, store_id)}; it will not write "
            "there. Move that folder aside and retry this job, or submit it under a new name")


class FolderLock:
    """An exclusive lock on a folder while an attempt writes to it; a second daemon's
    attempt on the same folder is refused instead of interleaving checkpoints."""

    def __init__(self, folder: Path):
        self.fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise FluxgymError(ErrorCode.CONFLICT, f"{folder} is in use by another process "
                               f"(it holds {folder / LOCK})") from None

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
