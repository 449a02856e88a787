"""kind = "lora": fluxgymd's own trainer (trainer/), which speaks the supervision contract and
resumes from its newest complete checkpoint by itself."""
from __future__ import annotations

import sys
from pathlib import Path

import tomli_w

from trainer import config as train_config
from trainer.preflight import preflight

from .base import JobKind


class LoraKind(JobKind):
    name = "lora"
    section = "train"
    speaks_contract = True

    def validate(self, section, base, errors, policy):
        if not isinstance(section, dict):
            errors.append("a lora job needs a [train] section (see etc/jobs/tiny-lora.toml)")
            return {}
        # The trainer's own validation (stdlib only), so mistakes surface at submit.
        try:
            return train_config.parse(section, str(base)).to_dict()
        except train_config.TrainConfigError as e:
            errors.extend(e.problems)
            return {}

    def check(self, spec, outputs_dir):
        return preflight(train_config.TrainConfig(**spec["train"]), outputs_dir)

    def command(self, job):
        # the trainer reads the job file the user submitted, as the daemon validated it
        spec, out = job["spec"], Path(job["output_dir"])
        doc = {"job": {"name": spec["name"], "kind": "lora"}, "train": spec["train"]}
        if spec.get("watchdog"):
            doc["watchdog"] = spec["watchdog"]
        job_file = out / "job.toml"
        job_file.write_text(tomli_w.dumps(doc), encoding="utf-8")
        return [sys.executable, "-m", "trainer", str(job_file), "--output-dir", str(out)], {}, None

    def result(self, job):
        path = Path(job["output_dir"]) / f"{job['name']}.safetensors"
        return str(path) if path.is_file() else None
