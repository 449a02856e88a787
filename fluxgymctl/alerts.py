"""fluxgymctl notify: the daemon's alerts ([notify] webhooks) from the command line."""
from __future__ import annotations

import click

from . import render
from .context import Ctx, command, fail
from .exitcodes import Exit


@click.group(short_help="Alerts: send a test webhook.")
def notify() -> None:
    """The webhook fluxgymd sends alerts to ([notify] in fluxgymd.toml)."""


@notify.command("test")
@command
def notify_test(ctx: Ctx) -> None:
    """Send one test alert through the configured webhook, with its retries, and say how it
    went. Exits 1 when it was not delivered."""
    r = ctx.call("notify_test")
    if ctx.json:
        render.emit_json(r)
    elif r["ok"]:
        click.echo(f"delivered ({r['target']})")
    if not r["ok"]:
        fail(ctx, Exit.JOB_NOT_SUCCEEDED, f"not delivered ({r['target']}): {r['error']}",
             "not_delivered")
