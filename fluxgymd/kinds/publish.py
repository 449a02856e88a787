"""kind = "publish": a finished lora or kohya job's LoRA, its newest sample of each prompt
and a model card, uploaded to a Hugging Face Hub repo by a child of its own
(`python -m fluxgymd.publish`, huggingface_hub's create_repo and create_commit).

The job it publishes (`job`, a name or id) is found when the publish job is submitted; the
publish job waits for it, so a chain (train, then publish) is one more job. A lora or kohya
job file may carry `[publish] repo = "..."` and the daemon submits that publish job itself.
Publishing the same files again makes no commit. The token goes to its child only
(`hub_token`) and the job runs on this machine whatever the executor."""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import tomli_w

from .base import JobKind, typed_keys

REPO_RE = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
# the keys a lora or kohya job's own [publish] table may set (the job is that job)
CHAIN_KEYS = {"repo": str, "private": bool, "samples": bool, "base_model": str,
              "license": str, "title": str}
KEYS = {"job": str, "commit_message": str, **CHAIN_KEYS}
# a lora job's settings a model card lists (never a path of this machine)
SETTINGS = ("base_model", "resolution", "num_repeats", "max_train_epochs", "max_train_steps",
            "train_batch_size", "gradient_accumulation_steps", "learning_rate", "lr_scheduler",
            "lr_warmup_steps", "optimizer_type", "network_dim", "network_alpha", "seed",
            "mixed_precision", "timestep_sampling", "discrete_flow_shift", "guidance_scale",
            "vram", "fp8_base", "quantize_base", "gradient_checkpointing", "save_lora_format")
KOHYA_SETTINGS = ("--resolution", "--max_train_epochs", "--max_train_steps",
                  "--train_batch_size", "--learning_rate", "--lr_scheduler", "--optimizer_type",
                  "--network_dim", "--network_alpha", "--seed", "--mixed_precision",
                  "--timestep_sampling", "--discrete_flow_shift", "--guidance_scale")
# a sample's prompt index, from our trainer's (step-00000120-00.png) or sd-scripts' names
# (name_000120_00_20241002123456.png)
_SAMPLE_INDEX = re.compile(r"(?:step-(\d+)-(\d+)|_(\d{6})_(\d+)_\d+)\.(?:png|jpg|jpeg|webp)$")


def validate_keys(section: Any, keys: dict[str, type], where: str,
                  errors: list[str]) -> dict[str, Any]:
    if not isinstance(section, dict):
        errors.append(f"[{where}] must be a table with repo = \"OWNER/NAME\"")
        return {}
    out = typed_keys(section, keys, where, errors)
    repo = out.get("repo")
    if repo is None:
        errors.append(f"missing {where}.repo, the Hub repo to publish to (repo = \"OWNER/NAME\")")
    elif not REPO_RE.fullmatch(repo) or ".." in repo or repo.endswith((".git", ".")):
        errors.append(f"{where}.repo {repo!r:.80} is not a Hub repo id: write OWNER/NAME "
                      "(letters, digits, '-', '_', '.')")
    return out


def chain_section(section: Any, errors: list[str]) -> dict[str, Any]:
    """A lora or kohya job's own [publish] table: the publish job chained after it."""
    return validate_keys(section, CHAIN_KEYS, "publish", errors)


def pick_samples(folder: Path | None) -> list[tuple[int, Path]]:
    """The newest sample of each prompt, as (prompt index, file), by index."""
    if folder is None or not folder.is_dir():
        return []
    newest: dict[int, tuple[int, Path]] = {}
    for path in folder.iterdir():
        m = _SAMPLE_INDEX.search(path.name)
        if not m or not path.is_file():
            continue
        step, index = (int(m.group(1)), int(m.group(2))) if m.group(1) else \
            (int(m.group(3)), int(m.group(4)))
        if index not in newest or step > newest[index][0]:
            newest[index] = (step, path)
    return [(i, newest[i][1]) for i in sorted(newest)]


def _kohya_prompts(args: list[str]) -> list[str]:
    from ..fluxgym import flag

    path = flag(args, "--sample_prompts")
    try:
        text = Path(path).read_text(encoding="utf-8") if path else ""
    except OSError:
        return []
    # sd-scripts' prompt lines: the prompt, then options after " --"
    return [line.split(" --")[0].strip() for line in text.splitlines()
            if line.strip() and not line.startswith("#")]


def card_facts(source: dict[str, Any], own: dict[str, Any], policy) -> dict[str, Any]:
    """What the model card says about the source job, resolved when the publish job is
    submitted (the catalog may change later): base model and licence, trigger word,
    sample prompts and the training settings."""
    spec = source["spec"]
    facts: dict[str, Any] = {"title": own.get("title") or spec["name"], "trigger_word": "",
                             "prompts": [], "settings": {}}
    if source["kind"] == "lora":
        train = spec["train"]
        facts["trigger_word"] = train.get("trigger_word", "")
        facts["prompts"] = list(train.get("sample_prompts") or [])
        facts["settings"] = {k: train[k] for k in SETTINGS if train.get(k) not in (None, "")}
        model = (policy.models or {}).get(train.get("base_model") or "")
    else:
        from ..fluxgym import flag

        args = spec["kohya"]["args"]
        facts["prompts"] = _kohya_prompts(args)
        facts["settings"] = {k.lstrip("-"): v for k in KOHYA_SETTINGS
                             if (v := flag(args, k)) is not None}
        model = None
    facts["base_model"] = own.get("base_model") or (model.base or model.repo if model else "")
    facts["license"] = own.get("license") or (model.license if model else "")
    if model and not own.get("license"):
        facts["license_name"], facts["license_link"] = model.license_name, model.license_link
    return facts


class PublishKind(JobKind):
    name = section = "publish"
    speaks_contract = True
    uses_gpu = False
    hub_token = True
    local_only = True  # the token never goes into a cluster's job environment

    def validate(self, section, base, errors, policy):
        out = validate_keys(section, KEYS, "publish", errors)
        if isinstance(section, dict) and "job" not in section:
            errors.append("missing publish.job, the finished lora or kohya job to publish "
                          "(its name or id)")
        return out

    def bind(self, spec, find, kind_of, policy):
        """The job to publish, found now: it must be one that makes a LoRA, and not one that
        already failed. Its facts go into the spec; the publish job waits for it."""
        from ..protocol import ErrorCode, FluxgymError

        section = spec["publish"]
        try:
            source = find(section["job"])
        except FluxgymError:
            raise FluxgymError(ErrorCode.INVALID_JOB, f"publish.job: no job named or numbered "
                               f"{section['job']!r:.80} (`fluxgymctl status` lists them)") \
                from None
        src_kind = kind_of(source)
        if not src_kind.makes_lora:
            raise FluxgymError(ErrorCode.INVALID_JOB, f"publish.job: job {source['id']} "
                               f"({source['name']}) is a {source['kind']} job; only a lora or "
                               "kohya job's LoRA can be published")
        if source["state"] in ("failed", "cancelled"):
            raise FluxgymError(ErrorCode.INVALID_STATE, f"job {source['id']} ({source['name']}) "
                               f"{source['state']}: it has no LoRA to publish; retry it "
                               f"(fluxgymctl retry {source['id']}) and publish after it")
        src_spec = {k: v for k, v in source["spec"].items() if k != "warnings"}
        sample_dir = src_kind.sample_dir(source)
        section["source"] = {"id": source["id"], "name": source["name"],
                             "kind": source["kind"], "lora": src_kind.lora_path(source),
                             "samples": str(sample_dir) if sample_dir else "",
                             "spec": src_spec}
        section["card"] = card_facts(section["source"], section, policy)
        section["job"] = source["name"]
        return [source]

    def command(self, job):
        section = job["spec"]["publish"]
        source = section["source"]
        lora = source["lora"] if os.path.isfile(source["lora"]) else None
        card = dict(section["card"])
        files, widgets = [], []
        if lora:
            files.append({"local": lora, "path": Path(lora).name})
            if section.get("samples", True):
                prompts = card["prompts"]
                for index, path in pick_samples(Path(source["samples"]) if source["samples"]
                                                else None):
                    if index < len(prompts):
                        files.append({"local": str(path), "path": f"samples/{path.name}"})
                        widgets.append({"text": prompts[index],
                                        "output": {"url": f"samples/{path.name}"}})
        card["widgets"] = widgets
        card["lora_file"] = Path(lora).name if lora else ""
        doc = {"job": {"name": job["spec"]["name"], "kind": "publish"},
               "publish": {"repo": section["repo"], "private": section.get("private", False),
                           "source": f"{source['name']} (job {source['id']})",
                           "commit_message": section.get("commit_message") or
                           f"{source['name']}: LoRA, samples and model card (fluxgymd)",
                           "files": files, "card": json.dumps(card)}}
        path = Path(job["output_dir"]) / "job.toml"
        path.write_text(tomli_w.dumps(doc), encoding="utf-8")
        return ([sys.executable, "-m", "fluxgymd.publish", str(path)],
                {"HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}, None)

    def result(self, job):
        path = Path(job["output_dir"]) / "published.json"
        return str(path) if path.is_file() else None

    def sample_dir(self, job):
        return None
