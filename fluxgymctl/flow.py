"""`fluxgymctl new` (a folder of photos to a chain of jobs) and `fluxgymctl publish` (a LoRA to
the Hugging Face Hub): the daemon's `new` and `publish` operations, which the dashboard
calls too."""
from __future__ import annotations

import os

import click

from . import render
from .context import Ctx, command


def _job_line(job: dict) -> str:
    after = ", ".join(a["name"] for a in job.get("after") or [])
    return (f"job {job['id']} ({job['name']}, {job['kind']}) {job['state']}"
            + (f", after {after}" if after else ""))


@click.command("new", short_help="A LoRA from a folder of photos: caption, train, publish.")
@click.argument("name")
@click.option("--images", required=True, type=click.Path(file_okay=False, exists=True),
              help="The folder of photos (PNG, JPEG, WebP), with any same-name .txt captions.")
@click.option("--trigger", default="", metavar="WORD", help="The trigger word, put first in "
              "every caption (e.g. \"ohwx person\").")
@click.option("--base", default="flux-dev", show_default=True, metavar="MODEL",
              help="The base model, by catalog name (fluxgymctl models list); fetched first "
              "when it is not on disk.")
@click.option("--vram", default="auto", show_default=True,
              type=click.Choice(["auto", "24G", "16G", "12G", "8G"]),
              help="The memory tier (README \"Training a real Flux LoRA\"); auto fits the GPU.")
@click.option("--caption", is_flag=True, help="Caption the photos without a .txt with "
              "Florence-2 first ([caption] model in fluxgymd.toml).")
@click.option("--epochs", type=click.IntRange(1), default=16, show_default=True)
@click.option("--steps", type=click.IntRange(0), default=0,
              help="Train this many steps (wins over --epochs).")
@click.option("--repeats", type=click.IntRange(1), default=10, show_default=True,
              help="Each photo this many times per epoch.")
@click.option("--lr", type=float, default=8e-4, show_default=True, help="Learning rate.")
@click.option("--rank", type=click.IntRange(1), default=4, show_default=True,
              help="The LoRA's rank (network_dim).")
@click.option("--resolution", type=click.IntRange(64), default=512, show_default=True)
@click.option("--seed", type=click.IntRange(0), default=42, show_default=True)
@click.option("--sample", "samples", multiple=True, metavar="PROMPT",
              help="A sample prompt (repeatable); samples are drawn four times a run unless "
              "--sample-every says.")
@click.option("--sample-every", type=click.IntRange(0), default=0, metavar="STEPS")
@click.option("--publish", "publish_to", default="", metavar="OWNER/REPO",
              help="Publish the LoRA, its samples and a model card there when it is trained.")
@click.option("--private", is_flag=True, help="With --publish: a private repo.")
@click.option("--resize", type=click.IntRange(0), default=0, metavar="PX",
              help="Shrink the copies so the longer side is at most PX (the photos "
              "themselves are never changed).")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="Any other [train] key (etc/jobs/lora.toml), e.g. --set network_alpha=4.")
@click.option("--priority", type=int, default=0, show_default=True)
@click.option("--dry-run", is_flag=True, help="Print the job files; submit nothing.")
@command
def new(ctx: Ctx, name: str, images: str, trigger: str, base: str, vram: str, caption: bool,
        epochs: int, steps: int, repeats: int, lr: float, rank: int, resolution: int,
        seed: int, samples: tuple[str, ...], sample_every: int, publish_to: str,
        private: bool, resize: int, settings: tuple[str, ...], priority: int,
        dry_run: bool) -> None:
    """A LoRA named NAME from a folder of photos, as FluxGym makes one: the photos are
    copied into the job's folder, and a chain of jobs is queued: a download of the base
    model (when it is missing), captions (--caption), training (FluxGym's defaults), and
    publishing (--publish). Each one is supervised, resumed and retried like any job."""
    r = ctx.call("new", name=name, images=os.path.abspath(images), trigger=trigger, base=base,
                 vram=vram, caption=caption, epochs=epochs, steps=steps, repeats=repeats,
                 lr=lr, rank=rank, resolution=resolution, seed=seed,
                 samples=list(samples) or None, sample_every=sample_every, publish=publish_to,
                 private=private, resize=resize, set=list(settings) or None,
                 priority=priority, dry_run=dry_run)
    if ctx.json:
        return render.emit_json(r)
    for w in r["warnings"]:
        click.echo(f"fluxgymctl: warning: {w}", err=True)
    how = (f"{r['steps']} steps" if steps else
           f"{r['images']} photos x {repeats} repeats x {epochs} epochs = {r['steps']} steps")
    click.echo(f"{name}: {how}; photos in {r['dataset_dir']}")
    if dry_run:
        for job_name, text in r["files"].items():
            click.echo(f"\n# --- {job_name}.toml ---\n{text}", nl=False)
        click.echo("\n(dry run: nothing was copied or submitted)")
        return
    for job in r["jobs"]:
        click.echo(_job_line(job))
    click.echo(f"follow it: fluxgymctl status   (or fluxgymctl logs -f {name}, "
               "fluxgymctl web for the dashboard)")


@click.command("publish", short_help="A LoRA, samples and model card to the Hub.")
@click.argument("job")
@click.option("--repo", required=True, metavar="OWNER/NAME", help="The Hub repo (created when "
              "it is not there).")
@click.option("--private", is_flag=True, help="Create the repo private (an existing repo keeps "
              "its visibility).")
@click.option("--no-samples", is_flag=True, help="Only the LoRA and the model card.")
@click.option("--name", default="", help="The publish job's name (default JOB-publish).")
@command
def publish(ctx: Ctx, job: str, repo: str, private: bool, no_samples: bool, name: str) -> None:
    """Publish JOB's LoRA (a lora or kohya job), its newest sample of each prompt and a model
    card to the Hugging Face Hub, as a job: it waits for JOB to finish, retries network
    errors, and publishing the same files again makes no new commit. Needs a write token
    ([hub] token_file in fluxgymd.toml, or HF_TOKEN in fluxgymd's environment)."""
    r = ctx.call("publish", job=job, repo=repo, private=private, samples=not no_samples,
                 name=name)
    if ctx.json:
        return render.emit_json(r)
    click.echo(_job_line(r) + f"; follow it with: fluxgymctl logs -f {r['name']}")
