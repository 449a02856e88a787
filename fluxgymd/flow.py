"""FluxGym's whole flow as daemon operations: `new` (a folder of photos to a chain of jobs:
download if the base model is missing, caption if asked, train, publish if a repo is given)
and `publish` (a finished LoRA to the Hub). `fluxgymctl new`/`publish` and the dashboard
call these same operations; each job of a chain is submitted through op_submit, so it is
validated, planned and supervised like any other.

Mixed into the Daemon (see operations.py for what it provides)."""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tomllib
from pathlib import Path
from typing import Any

import tomli_w

from . import jobspec
from .ownership import DATASET, DATASET_MARKER
from .protocol import ErrorCode, FluxgymError

log = logging.getLogger("fluxgymd")

# FluxGym's defaults (its app.py): 10 repeats, 16 epochs, lr 8e-4, rank 4, 512 px, seed 42
DEFAULTS = {"repeats": 10, "epochs": 16, "lr": 8e-4, "rank": 4, "resolution": 512, "seed": 42}
MIN_IMAGES = 2  # as FluxGym: "Please upload at least 2 images"


def expected_steps(images: int, repeats: int, epochs: int, batch: int = 1) -> int:
    """FluxGym's count: images × repeats × epochs / batch."""
    return images * repeats * epochs // max(1, batch)


def usable_images(folder: Path) -> tuple[list[Path], list[str]]:
    """The images of a folder (by their first bytes, not their names) and what was skipped."""
    from trainer.data import dataset_files
    from trainer.preflight import sniff

    images, skipped = [], []
    for path, kind in dataset_files(str(folder)):
        if kind == "image" and sniff(path) is not None:
            images.append(Path(path))
        elif kind != "caption":
            skipped.append(f"{Path(path).name} is not a PNG, JPEG or WebP image: left out")
    return images, skipped


def copy_dataset(images: list[Path], dest: Path, name: str, resize: int) -> int:
    """The images (and the .txt beside each) into dest, resized so the longer side is at
    most `resize` px when asked; the marker says which job the folder is for."""
    dest.mkdir(parents=True)
    (dest / DATASET_MARKER).write_text(name, encoding="utf-8")
    for src in images:
        if resize:
            from PIL import Image

            with Image.open(src) as img:
                img.thumbnail((resize, resize), Image.Resampling.LANCZOS)
                img.save(dest / src.name)
        else:
            shutil.copyfile(src, dest / src.name)
        caption = src.with_suffix(".txt")
        if caption.is_file():
            shutil.copyfile(caption, dest / caption.name)
    return len(images)


def _value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word is a string


class Flow:
    def _free(self, name: str) -> bool:
        """Neither a job nor a folder in the outputs dir has the name."""
        return not self._taken(name) and not (self.cfg.outputs_dir / name).exists()

    def _free_name(self, stem: str) -> str:
        name, n = stem, 1
        while not self._free(name):
            n += 1
            name = f"{stem}-{n}"
        return name

    async def op_plan(self, args) -> dict[str, Any]:
        """The memory planner's peak for each tier of a catalog model at a resolution, and
        each GPU's free memory: what the new-LoRA page shows beside its VRAM choice."""
        from .gpus import lora_plan
        from .kinds.lora import base_model_files

        section: dict[str, Any] = {"base_model": args["base"], "resolution": args["resolution"],
                                   "dataset_dir": str(self.cfg.outputs_dir)}
        errors: list[str] = []
        base_model_files(section, self._policy(), errors)
        if errors:
            raise FluxgymError(ErrorCode.BAD_ARGS, "; ".join(errors))
        tiers, why = await lora_plan({"name": "plan", "train": section}, self.cfg.models)
        gpus = [{"index": g["index"], "name": g.get("name"),
                 "free": g["memory_total"] - (g.get("memory_used") or 0) - g.get("planned", 0)}
                for g in self._gpu_stats() if g.get("memory_total")]
        return {"base": args["base"], "resolution": args["resolution"], "tiers": tiers,
                "why": why, "gpus": gpus}

    def op_control(self, args) -> dict[str, Any]:
        """save-now / sample-now: a request the running trainer takes at its next step
        boundary (trainer.contract.ask: a file in its folder, so it reaches a Slurm node)."""
        from trainer.contract import ask

        from .kinds import kind_of

        job, action = self._find(args["job"]), args["action"]
        why = kind_of(job).control_refused(job, action)
        if why is None and job["state"] != "running":
            why = f"it is {job['state']}; {action}-now reaches a running job"
        if why is not None:
            raise FluxgymError(ErrorCode.INVALID_STATE, f"job {job['id']} ({job['name']}) "
                               f"cannot {action} now: {why}")
        try:
            ask(job["output_dir"], action)
        except OSError as e:
            raise FluxgymError(ErrorCode.INVALID_STATE, f"cannot leave the request in "
                               f"{job['output_dir']}: {e.strerror or e}") from None
        run = self.runs.get(job["id"])
        if run is not None:
            run.log.write([f"=== fluxgymd: {action} now requested at step {job['step']} ==="])
        log.info("job %s (%s): %s now requested", job["id"], job["name"], action,
                 extra={"job_id": job["id"], "job_name": job["name"]})
        return {**self._view(job), "requested": action}

    async def op_publish(self, args) -> dict[str, Any]:
        """A publish job for a finished (or queued, or running) lora or kohya job."""
        source = self._find(args["job"])
        name = args["name"] or self._free_name(f"{source['name']}-publish"[:64])
        section = {"job": str(source["id"]), "repo": args["repo"], "private": args["private"],
                   "samples": args["samples"]}
        text = tomli_w.dumps({"job": {"name": name, "kind": "publish",
                                      "description": f"publishes {source['name']} to "
                                      f"{args['repo']}"}, "publish": section})
        return await self.op_submit({"text": text, "source": "", "name": "", "priority":
                                     args["priority"], "after": None})

    def _new_docs(self, args, dataset: Path, images: int) -> tuple[dict[str, str], int]:
        """The chain's job files ({name: TOML}), in submission order, and the step count."""
        name = args["name"]
        steps = args["steps"] or expected_steps(images, args["repeats"], args["epochs"])
        train: dict[str, Any] = {
            "base_model": args["base"], "dataset_dir": str(dataset),
            "trigger_word": args["trigger"], "num_repeats": args["repeats"],
            "max_train_epochs": args["epochs"], "max_train_steps": args["steps"],
            "learning_rate": float(args["lr"]), "network_dim": args["rank"],
            "resolution": args["resolution"], "seed": args["seed"], "vram": args["vram"]}
        if args["samples"]:
            train["sample_prompts"] = list(args["samples"])
            # FluxGym samples only when asked; a prompt given here asks: four times a run
            train["sample_every_n_steps"] = args["sample_every"] or max(1, steps // 4)
        for item in args["set"] or []:
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise FluxgymError(ErrorCode.BAD_ARGS, f"--set {item!r:.80}: write KEY=VALUE "
                                   "(a [train] key of etc/jobs/lora.toml, e.g. "
                                   "resolution=768)")
            train[key.strip()] = _value(value.strip())
        docs: dict[str, str] = {}
        after: list[str] = []
        if args["caption"]:
            caption = {"dataset_dir": str(dataset), "trigger_word": args["trigger"]}
            if args["caption_model"]:
                caption["model"] = args["caption_model"]
            docs[f"{name}-caption"] = tomli_w.dumps({
                "job": {"name": f"{name}-caption", "kind": "caption",
                        "description": f"captions {name}'s photos"}, "caption": caption})
            after = [f"{name}-caption"]
        lora: dict[str, Any] = {"job": {"name": name, "kind": "lora",
                                        "description": f"fluxgymctl new {name}",
                                        **({"after": after} if after else {})},
                                "train": train}
        if args["publish"]:
            lora["publish"] = {"repo": args["publish"], "private": args["private"]}
        if args["job_file"]:
            try:
                edited = tomllib.loads(args["job_file"])
            except tomllib.TOMLDecodeError as e:
                raise FluxgymError(ErrorCode.BAD_ARGS, f"the edited job file is not valid "
                                   f"TOML: {e}") from None
            if not isinstance(edited.get("train"), dict):
                raise FluxgymError(ErrorCode.BAD_ARGS, "the edited job file needs its [train] "
                                   "table")
            train = {**edited["train"], "dataset_dir": str(dataset)}
            lora = {"job": lora["job"], "train": train,
                    **{k: edited[k] for k in ("publish", "watchdog") if k in edited}}
            steps = train.get("max_train_steps") or expected_steps(
                images, train.get("num_repeats", DEFAULTS["repeats"]),
                train.get("max_train_epochs", DEFAULTS["epochs"]),
                train.get("train_batch_size", 1))
        docs[name] = tomli_w.dumps(lora)
        return docs, steps

    async def op_new(self, args) -> dict[str, Any]:
        name = args["name"]
        if (why := jobspec.check_name(name)) is not None:
            raise FluxgymError(ErrorCode.BAD_ARGS, why.replace("job.name", "the LoRA's name"))
        names = [name] + [f"{name}-caption"] * args["caption"] + \
            [f"{name}-publish"] * bool(args["publish"])
        taken = [n for n in names if not self._free(n)]
        if taken:
            raise FluxgymError(ErrorCode.CONFLICT, f"{', '.join(taken)}: a job or an output "
                               "folder has that name already; choose another NAME, or remove "
                               "the old one (fluxgymctl remove --delete-outputs)")
        folder = Path(args["images"]).expanduser()
        if not folder.is_dir():
            raise FluxgymError(ErrorCode.BAD_ARGS, f"--images {folder}: not a folder; give the "
                               "folder holding the photos (and any .txt captions)")
        images, skipped = await asyncio.to_thread(usable_images, folder)
        if len(images) < MIN_IMAGES:
            raise FluxgymError(ErrorCode.BAD_ARGS, f"{folder} holds {len(images)} usable "
                               f"image(s); a LoRA needs at least {MIN_IMAGES} (4 to 30 is the "
                               "sweet spot with these defaults)")
        if not args["trigger"]:
            skipped.append("no trigger word: the LoRA is used without one (--trigger WORD)")
        dataset = self.cfg.outputs_dir / name / DATASET
        docs, steps = self._new_docs(args, dataset, len(images))
        summary = {"name": name, "images": len(images), "steps": steps,
                   "dataset_dir": str(dataset), "warnings": skipped}
        if args["dry_run"]:
            return {**summary, "files": docs, "jobs": []}
        try:
            await asyncio.to_thread(copy_dataset, images, dataset, name, args["resize"])
        except OSError as e:
            shutil.rmtree(self.cfg.outputs_dir / name, ignore_errors=True)
            raise FluxgymError(ErrorCode.INVALID_STATE, f"cannot copy the photos to {dataset}: "
                               f"{e.strerror or e}") from None
        log.info("new %s: %d photo(s) copied to %s", name, len(images), dataset)
        # every file of the chain is checked before any job of it is queued; a refusal
        # takes the copied photos back, so the same `new` can be run again
        try:
            for text in docs.values():
                await asyncio.to_thread(jobspec.parse, text, "", "", self.cfg.outputs_dir,
                                        self._policy())
        except FluxgymError:
            shutil.rmtree(self.cfg.outputs_dir / name, ignore_errors=True)
            raise
        jobs: list[dict[str, Any]] = []
        for job_name, text in docs.items():
            try:
                job = await self.op_submit({"text": text, "source": "", "name": "",
                                            "priority": args["priority"], "after": None})
            except FluxgymError:
                if not jobs:  # nothing of the chain is queued: as if it never ran
                    shutil.rmtree(self.cfg.outputs_dir / name, ignore_errors=True)
                raise
            for chained in (job, *job.pop("chained", [])):
                # the downloads op_submit queued for it come first: the whole chain is listed
                listed = {j["id"] for j in jobs}
                jobs += [self._view(self.store.find(a["name"])) for a in chained["after"] or []
                         if a["kind"] == "download" and a["id"] not in listed]
                jobs.append(chained)
        return {**summary, "files": docs, "jobs": jobs}
