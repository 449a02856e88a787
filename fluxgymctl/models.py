"""`fluxgymctl models`: the model catalog, pulling models (as a supervised download job), and
removing them."""
from __future__ import annotations

import sys
import time

import click

from . import render
from .context import DONE, Ctx, command, fail
from .exitcodes import Exit


@click.group(short_help="The model catalog: list, pull, rm.")
def models() -> None:
    """Base models from the Hugging Face Hub, by catalog name (etc/models.toml and [models.NAME]
    in fluxgymd.toml), in fluxgymd's models dir."""


@models.command("list")
@command
def models_list(ctx: Ctx) -> None:
    """Every catalog entry: on disk or not, its size, where it goes."""
    r = ctx.call("models")
    if ctx.json:
        return render.emit_json(r)
    click.echo(f"models dir: {r['models_dir']}")
    render.table(r["models"], [
        ("name", "NAME", lambda m: m["name"]),
        ("part", "PART", lambda m: m["part"] or "-"),
        ("present", "ON DISK", lambda m: "yes" if m["present"] else
         (f"partly, {render.size(m['on_disk'])}" if m["on_disk"] else "no")),
        ("size", "SIZE", lambda m: render.size(m["size"]) if m["size"] else "?"),
        ("repo", "REPO", lambda m: m["repo"] + (" (gated)" if m["gated"] else "")),
        ("description", "DESCRIPTION", lambda m: m["description"]),
    ])


@models.command("pull")
@click.argument("names", nargs=-1, required=True)
@click.option("--no-wait", is_flag=True, help="Return once the download job is queued.")
@command
def models_pull(ctx: Ctx, names: tuple[str, ...], no_wait: bool) -> None:
    """Fetch NAMES (and the parts each needs) as a download job fluxgymd supervises: it
    resumes after a dropped connection or a restart, and you may log out meanwhile. Follows
    its progress until it ends (exit 0 when it succeeded)."""
    job = ctx.call("pull", models=list(names))
    if ctx.json and no_wait:
        return render.emit_json(job)
    if not ctx.json:
        click.echo(f"job {job['id']} ({job['name']}) {job['state']}; fluxgymctl logs -f "
                   f"{job['name']} shows its log")
    if no_wait:
        return
    tty = sys.stdout.isatty() and not ctx.json
    last = ""
    while job["state"] not in DONE:
        time.sleep(0.5)
        job = ctx.call("show", job=str(job["id"]), events=0)
        line = f"{render.steps(job):>20} {render.percent(job['progress']):>5}  " \
               f"{job['state']:<10} ETA {render.duration(job['eta_s'])}"
        if tty:
            width = 30
            done = int(width * (job["progress"] or 0))
            click.echo(f"\r[{'#' * done}{'.' * (width - done)}] {line}", nl=False)
        elif line != last and (job["state"] != "running" or job["step"] is not None):
            click.echo(line)
        last = line
    if tty:
        click.echo("")
    if ctx.json:
        render.emit_json(job)
    else:
        click.echo(f"job {job['id']} ({job['name']}) {job['state']}: {job['reason']}")
    if job["state"] != "succeeded":
        sys.exit(int(Exit.JOB_NOT_SUCCEEDED))


@models.command("rm")
@click.argument("name")
@command
def models_rm(ctx: Ctx, name: str) -> None:
    """Delete a model's files (refused while a queued or running job uses them)."""
    r = ctx.call("models_rm", model=name)
    if ctx.json:
        return render.emit_json(r)
    if not r["removed"]:
        fail(ctx, Exit.NOT_FOUND, f"{name} is not on disk ({r['path']})", "not_found")
    click.echo(f"removed {name}: {r['path']} ({render.size(r['freed'])})")
