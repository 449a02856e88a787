"""fluxgymctl's queue control: remove, clean, pause, resume, move, config."""
from __future__ import annotations

from typing import Any

import click

from fluxgymd.protocol import PRIORITY_RANGE, RUNTIME_SETTINGS

from . import render
from .context import Ctx, command, fail
from .exitcodes import Exit


def _removed(ctx: Ctx, r: dict[str, Any]) -> None:
    if ctx.json:
        return render.emit_json(r)
    if not r["removed"]:
        click.echo("nothing to remove")
    for j in r["removed"]:
        kept = "outputs deleted" if j["outputs_deleted"] else f"outputs kept in {j['output_dir']}"
        click.echo(f"removed job {j['id']} ({j['name']}, {j['state']}); {kept}")


@click.command(short_help="Forget jobs that are not running (outputs kept unless asked).")
@click.argument("jobs", nargs=-1, required=True)
@click.option("--delete-outputs", is_flag=True, help="Also delete each job's output folder "
              "(checkpoints, LoRA, log).")
@command
def remove(ctx: Ctx, jobs: tuple[str, ...], delete_outputs: bool) -> None:
    """Forget JOBS (ids or names): queued, interrupted or finished ones; a running job must
    be cancelled first. Their output folders stay unless --delete-outputs."""
    _removed(ctx, ctx.call("remove", jobs=list(jobs), delete_outputs=delete_outputs))


@click.command(short_help="Forget finished jobs (outputs kept unless asked).")
@click.option("--state", "states", multiple=True, type=click.Choice(["succeeded", "failed",
              "cancelled"]), help="Only jobs in this state (repeatable; default: all three).")
@click.option("--delete-outputs", is_flag=True, help="Also delete their output folders.")
@command
def clean(ctx: Ctx, states: tuple[str, ...], delete_outputs: bool) -> None:
    """Forget every succeeded, failed and cancelled job."""
    _removed(ctx, ctx.call("clean", states=list(states) or None, delete_outputs=delete_outputs))


@click.command(short_help="Hold queued jobs; running ones go on.")
@command
def pause(ctx: Ctx) -> None:
    """Pause the queue: no queued job starts until `resume`; running jobs go on. Kept
    across restarts of fluxgymd."""
    r = ctx.call("pause")
    if ctx.json:
        return render.emit_json(r)
    click.echo(f"queue paused ({r['summary']})")


@click.command(short_help="Start queued jobs again after a pause.")
@command
def resume(ctx: Ctx) -> None:
    """Resume the queue after `pause`."""
    r = ctx.call("resume")
    if ctx.json:
        return render.emit_json(r)
    click.echo(f"queue running ({r['summary']})")


@click.command(short_help="Reorder a queued job (--first, --last, --priority).")
@click.argument("job")
@click.option("--first", "to", flag_value="first", help="Run it next.")
@click.option("--last", "to", flag_value="last", help="Run it after every other queued job.")
@click.option("--priority", type=click.IntRange(*PRIORITY_RANGE), default=None,
              help="Give it this priority (higher runs first).")
@command
def move(ctx: Ctx, job: str, to: str | None, priority: int | None) -> None:
    """Move a queued JOB in the queue."""
    if to is None and priority is None:
        fail(ctx, Exit.USAGE, "move: give --first, --last or --priority N", "usage")
    j = ctx.call("move", job=job, to=to, priority=priority)
    if ctx.json:
        return render.emit_json(j)
    click.echo(f"job {j['id']} ({j['name']}) {j['state']}, priority {j['priority']}")


@click.command(short_help="Show or change settings at run time.")
@click.argument("action", type=click.Choice(["show", "set", "reset"]), default="show")
@click.argument("key", required=False, type=click.Choice(sorted(RUNTIME_SETTINGS)))
@click.argument("value", required=False, type=int)
@command
def config(ctx: Ctx, action: str, key: str | None, value: int | None) -> None:
    """Run-time settings: `config`, `config set max_concurrent_jobs N`, `config reset
    max_concurrent_jobs` (back to the config file's value). A set value is kept across
    restarts of fluxgymd."""
    if action != "show" and key is None:
        fail(ctx, Exit.USAGE, f"config {action}: name a setting ({', '.join(RUNTIME_SETTINGS)})",
             "usage")
    if action == "set":
        if value is None:
            fail(ctx, Exit.USAGE, f"config set {key}: give a value", "usage")
        lo, hi = RUNTIME_SETTINGS[key]
        if not lo <= value <= hi:
            fail(ctx, Exit.USAGE, f"{key} must be between {lo} and {hi}", "usage")
        r = ctx.call("config", key=key, value=value)
    elif action == "reset":
        r = ctx.call("config", key=key, reset=True)
    else:
        r = ctx.call("config")
    if ctx.json:
        return render.emit_json(r)
    render.pairs([(k, f"{v} (config file: {r['from_config_file'][k]})")
                  for k, v in r["settings"].items()] +
                 [("queue", "paused" if r["paused"] else "running")])
