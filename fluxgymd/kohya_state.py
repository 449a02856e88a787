"""sd-scripts' state folders, judged from outside: which are complete, which is the newest,
whether the run has finished, and what to pass it to continue. Stdlib only.

sd-scripts (through accelerate's `save_state`) writes `<name>-step00000120-state`,
`<name>-000004-state` (per epoch) and, at the end, `<name>-state`. Inside: `train_state.json`
(`current_epoch`, `current_step`) first (sd-scripts' pre-save hook), then the network's
weights (`model.safetensors` or `pytorch_model.bin`), `optimizer.bin`, `scheduler.bin`,
maybe `sampler.bin` / `scaler.pt`, and `random_states_<rank>.pkl` last. Nothing is written
to a temporary name, so a folder being written (or torn by a kill) looks like a state folder:
it counts only when every file is there and whole — torch.save's files are zip archives whose
central directory comes last, safetensors files are exactly as long as their header says.
"""
from __future__ import annotations

import json
import os
import re
import struct
import zipfile
from dataclasses import dataclass

STATE_RE = re.compile(r"^(?P<name>.+?)-(?:step(?P<step>\d{8})-|(?P<epoch>\d{6})-)?state$")
TRAIN_STATE = "train_state.json"


@dataclass
class StateFolder:
    path: str
    name: str
    kind: str  # "step", "epoch" or "end"
    current_step: int
    current_epoch: int


def _safetensors_whole(path: str) -> bool:
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > size:
                return False
            header = json.loads(fh.read(n))
    except (OSError, ValueError, struct.error):
        return False
    ends = [v["data_offsets"][1] for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v]
    return size == 8 + n + max(ends, default=0)


def _torch_file_whole(path: str) -> bool:
    """torch.save's zip archive with its central directory (written last) in place."""
    try:
        if os.path.getsize(path) == 0 or not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as z:
            return bool(z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def why_incomplete(path: str) -> str | None:
    """None when the state folder is complete; else what is missing or torn."""
    try:
        names = set(os.listdir(path))
    except OSError as e:
        return f"cannot be read: {e.strerror}"
    try:
        int(_train_state(path)["current_step"])
    except FileNotFoundError:
        return f"no {TRAIN_STATE}"
    except (OSError, ValueError, KeyError, TypeError):
        return f"{TRAIN_STATE} is not readable"
    weights = re.compile(r"(model|pytorch_model)(_\d+)?\.(safetensors|bin)")
    models = sorted(n for n in names if weights.fullmatch(n))
    if not models:
        return "no network weights (model.safetensors)"
    for n in models:
        whole = _safetensors_whole if n.endswith(".safetensors") else _torch_file_whole
        if not whole(os.path.join(path, n)):
            return f"{n} is torn"
    for prefix in ("optimizer", "scheduler", "random_states"):
        found = sorted(n for n in names if n.startswith(prefix))
        if not found:
            return f"no {prefix} file"
        for n in found:
            if not _torch_file_whole(os.path.join(path, n)):
                return f"{n} is torn"
    for n in names & {"sampler.bin", "scaler.pt"}:
        if not _torch_file_whole(os.path.join(path, n)):
            return f"{n} is torn"
    return None


def _train_state(path: str) -> dict:
    with open(os.path.join(path, TRAIN_STATE), encoding="utf-8") as fh:
        return json.load(fh)


def complete_state(path: str) -> dict | None:
    """A complete state folder's train_state.json (current_step, current_epoch); else None."""
    return _train_state(path) if why_incomplete(path) is None else None


def state_folders(output_dir: str, name: str) -> list[StateFolder]:
    """The complete state folders of run `name`, newest (highest step) first."""
    out = []
    try:
        entries = os.listdir(output_dir)
    except OSError:
        return []
    for entry in entries:
        m = STATE_RE.match(entry)
        if not m or m.group("name") != name:
            continue
        path = os.path.join(output_dir, entry)
        ts = complete_state(path) if os.path.isdir(path) else None
        if ts is None:
            continue
        kind = "step" if m.group("step") else "epoch" if m.group("epoch") else "end"
        out.append(StateFolder(path, name, kind, int(ts["current_step"]),
                               int(ts.get("current_epoch", 0))))
    return sorted(out, key=lambda s: (s.current_step, s.kind == "end"), reverse=True)


def finished(output_dir: str, name: str, ext: str = ".safetensors") -> bool:
    """The run wrote its final model (`<name>.safetensors`, whole): it is never resumed, even
    though its end state `<name>-state` looks resumable."""
    path = os.path.join(output_dir, name + ext)
    return os.path.isfile(path) and (_safetensors_whole(path) if ext == ".safetensors"
                                     else os.path.getsize(path) > 0)


def resume_args(output_dir: str, name: str) -> list[str]:
    """What to add to sd-scripts' arguments so the next attempt continues the same run: the
    newest complete state, with the batches it already trained skipped and the step count
    continued (`--skip_until_initial_step`; kohya_launcher.py corrects the count past the
    first epoch). Never the end state `<name>-state`: it is saved after the last step, and
    sd-scripts refuses to resume at max_train_steps (an endless crash loop); a run that died
    between it and its final model resumes from its newest step or epoch state instead."""
    found = [s for s in state_folders(output_dir, name) if s.kind != "end"]
    if not found:
        return []
    return ["--resume", found[0].path, "--skip_until_initial_step"]
