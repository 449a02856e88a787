"""kind = "caption": captions a dataset folder's images with Florence-2
(`python -m trainer.caption`, transformers' native Florence2ForConditionalGeneration, no
remote code). It writes a .txt beside each image that has none, each one atomically, so an
attempt that resumes skips what is done; progress is images done/total as contract steps.
`model` is a local Florence-2 folder, or a catalog name ([models.NAME] in fluxgymd.toml):
one not on disk yet is fetched first by a download job the caption job waits for."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import tomli_w

from trainer.caption import IMAGE_EXTS, TASKS  # stdlib at import: the child's own lists

from .base import JobKind, typed_keys

KEYS = {"dataset_dir": str, "model": str, "task": str, "trigger_word": str, "overwrite": bool,
        "batch_size": int, "num_beams": int, "max_new_tokens": int}
LIMITS = {"batch_size": (1, 256), "num_beams": (1, 16), "max_new_tokens": (1, 4096)}


class CaptionKind(JobKind):
    name = section = "caption"
    speaks_contract = True
    default_gpus = 1

    def validate(self, section, base, errors, policy):
        if not isinstance(section, dict):
            errors.append("a caption job needs a [caption] section with dataset_dir and model "
                          "(see etc/jobs/caption.toml)")
            return {}
        out = typed_keys(section, KEYS, "caption", errors)
        for key, (low, high) in LIMITS.items():
            if key in out and not low <= out[key] <= high:
                errors.append(f"caption.{key} must be {low} to {high}, got {out[key]}")
        if "task" in out and out["task"] not in TASKS:
            errors.append(f"caption.task {out['task']!r:.40} is not one of {', '.join(TASKS)}")
        if "dataset_dir" not in section:
            errors.append("missing caption.dataset_dir")
        if "model" not in section:
            if not policy.caption_model:
                errors.append("missing caption.model (and no [caption] model in fluxgymd.toml)")
            else:
                out["model"] = policy.caption_model
        if "dataset_dir" in out:
            folder = (base / out["dataset_dir"]).resolve()
            out["dataset_dir"] = str(folder)
            if not folder.is_dir():
                errors.append(f"caption.dataset_dir {folder} is not a folder")
            elif not any(n.lower().endswith(IMAGE_EXTS) and not n.startswith(".")
                         for n in os.listdir(folder)):
                errors.append(f"caption.dataset_dir {folder} holds no image (PNG, JPEG, WebP)")
        if "model" in out:
            catalog = policy.models or {}
            if out["model"] in catalog:
                out["model_name"] = out["model"]
                out["model"] = str(catalog[out["model"]].folder(Path(policy.models_dir)))
            else:
                folder = (base / out["model"]).resolve()
                out["model"] = str(folder)
                if not (folder / "config.json").is_file():
                    errors.append(f"caption.model {folder} is not a model folder (no "
                                  "config.json) nor a catalog name (fluxgymctl models list)")
        return out

    def models_needed(self, spec, policy):
        name = spec["caption"].get("model_name")
        catalog = policy.models or {}
        if name and name in catalog and not catalog[name].present(Path(policy.models_dir)):
            return [name]
        return []

    def command(self, job):
        out = Path(job["output_dir"])
        section = {k: v for k, v in job["spec"]["caption"].items() if k != "model_name"}
        path = out / "job.toml"
        path.write_text(tomli_w.dumps({"job": {"name": job["spec"]["name"], "kind": "caption"},
                                       "caption": section}), encoding="utf-8")
        return [sys.executable, "-m", "trainer.caption", str(path)], {}, None

    def sample_dir(self, job):
        return None
