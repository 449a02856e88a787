"""`fluxgymctl save-now` and `sample-now`: a request the running trainer takes at its next
step boundary (the daemon's `control` operation, which the dashboard's buttons call too)."""
from __future__ import annotations

import click

from . import render
from .context import Ctx, command


def _request(ctx: Ctx, job: str, action: str, what: str) -> None:
    r = ctx.call("control", job=job, action=action)
    if ctx.json:
        return render.emit_json(r)
    click.echo(f"job {r['id']} ({r['name']}): {what} at its next step (it is at step "
               f"{r['step'] or 0}); fluxgymctl logs -f {r['name']} shows it")


@click.command("save-now", short_help="A checkpoint of a running job at its next step.")
@click.argument("job")
@command
def save_now(ctx: Ctx, job: str) -> None:
    """Ask JOB's trainer for a checkpoint now: a normal complete checkpoint at its next step
    boundary; training goes on, and the LoRA it ends with is the same as without it."""
    _request(ctx, job, "save", "a checkpoint")


@click.command("sample-now", short_help="Samples of a running job at its next step.")
@click.argument("job")
@command
def sample_now(ctx: Ctx, job: str) -> None:
    """Ask JOB's trainer to draw its sample prompts now (the images appear in the dashboard's
    gallery with their step); training goes on unchanged."""
    _request(ctx, job, "sample", "samples")
