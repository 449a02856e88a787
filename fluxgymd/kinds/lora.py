"""kind = "lora": fluxgymd's own trainer (trainer/), which speaks the supervision contract and
resumes from its newest complete checkpoint by itself."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import tomli_w

from trainer import config as train_config
from trainer.preflight import preflight

from .base import JobKind


# Which [train] key each catalog part fills in
PARTS = {"transformer": "pretrained_model", "ae": "ae", "clip_l": "clip_l", "t5xxl": "t5xxl",
         "tokenizers": "tokenizers"}


def _where(model, policy) -> str:
    """The path a [train] key takes for a catalog model: its folder for tokenizers (which
    holds tokenizer/ and tokenizer_2/), else its (first) file."""
    root = Path(policy.models_dir)
    return str(model.folder(root) if model.part == "tokenizers" else model.paths(root)[0])


def base_model_files(section: dict, policy, errors: list[str]) -> set[str]:
    """Fill the five model paths of a [train] section from its base_model (a catalog name),
    leaving those the job names itself; returns the ones not on disk yet (a download job
    fetches them before the job runs)."""
    from ..catalog import with_needs

    name, catalog = section["base_model"], policy.models or {}
    if not isinstance(name, str) or name not in catalog:
        transformers = sorted(n for n, m in catalog.items() if m.part == "transformer")
        errors.append(f"train.base_model {name!r:.60} is not in the model catalog; use one of "
                      f"{', '.join(transformers)} (fluxgymctl models list), or add it as "
                      "[models.NAME] in fluxgymd.toml")
        return set()
    if catalog[name].part != "transformer":
        errors.append(f"train.base_model {name}: a {catalog[name].part or 'model'} is not a "
                      "base model (its part must be \"transformer\")")
        return set()
    pending = set()
    for model in with_needs(catalog, [name]):
        key = PARTS.get(model.part)
        if key is None or section.get(key):
            continue  # the job's own file wins (a t5xxl_fp8 for a small card, say)
        section[key] = _where(model, policy)
        if not model.present(Path(policy.models_dir)):
            pending.add(section[key])
    return pending


class LoraKind(JobKind):
    name = "lora"
    section = "train"
    speaks_contract = True
    default_gpus = 1
    makes_lora = True
    controls = ("save", "sample")

    def control_refused(self, job, action):
        if action == "sample" and not job["spec"]["train"].get("sample_prompts"):
            return "it has no sample_prompts to draw (set them in its [train] table)"
        return super().control_refused(job, action)

    def validate(self, section, base, errors, policy):
        if not isinstance(section, dict):
            errors.append("a lora job needs a [train] section (see etc/jobs/tiny-lora.toml)")
            return {}
        section, pending = dict(section), set()
        if section.get("base_model"):
            pending = base_model_files(section, policy, errors)
            if errors:
                return {}
        # The trainer's own validation (stdlib only), so mistakes surface at submit.
        try:
            return train_config.parse(section, str(base), pending).to_dict()
        except train_config.TrainConfigError as e:
            errors.extend(e.problems)
            return {}

    def models_needed(self, spec, policy):
        """The catalog models its base_model needs that are not on disk yet."""
        name = spec["train"].get("base_model")
        if not name or not policy.models or name not in policy.models:
            return []
        from ..catalog import with_needs

        used = {spec["train"].get(key) for key in PARTS.values()}
        return [m.name for m in with_needs(policy.models, [name])
                if _where(m, policy) in used and not m.present(Path(policy.models_dir))]

    def check(self, spec, outputs_dir):
        cfg = train_config.TrainConfig(**spec["train"])
        present = all(os.path.exists(getattr(cfg, key)) for key in PARTS.values()
                      if getattr(cfg, key))
        return preflight(cfg, outputs_dir, model=present)

    def command(self, job):
        # the trainer reads the job file the user submitted, as the daemon validated it
        spec, out = job["spec"], Path(job["output_dir"])
        doc = {"job": {"name": spec["name"], "kind": "lora"}, "train": spec["train"]}
        if spec.get("watchdog"):
            doc["watchdog"] = spec["watchdog"]
        job_file = out / "job.toml"
        job_file.write_text(tomli_w.dumps(doc), encoding="utf-8")
        return [sys.executable, "-m", "trainer", str(job_file), "--output-dir", str(out)], {}, None

    def lora_path(self, job):
        return str(Path(job["output_dir"]) / f"{job['name']}.safetensors")

    def result(self, job):
        path = self.lora_path(job)
        return path if os.path.isfile(path) else None
