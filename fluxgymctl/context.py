"""What every fluxgymctl command shares: the context (client, --json), failing with a
documented exit code, and the decorator that maps errors to those codes."""
from __future__ import annotations

import functools
import sys
from typing import Any

import click

from fluxgymd.client import Client, DaemonUnavailable, RemoteError

from . import render
from .exitcodes import Exit

DONE = ("succeeded", "failed", "cancelled")

ERROR_EXIT = {"not_found": Exit.NOT_FOUND, "ambiguous": Exit.NOT_FOUND,
              "internal": Exit.DAEMON_ERROR}


class Ctx:
    def __init__(self, runtime_dir: str | None, timeout: float, as_json: bool):
        self.runtime_dir, self.timeout, self.json = runtime_dir, timeout, as_json
        self._client: Client | None = None
        self.reached = False  # fluxgymd answered once: later silence is a restart

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = Client(self.runtime_dir, timeout=self.timeout)
        return self._client

    def call(self, op: str, **args: Any) -> Any:
        # --timeout bounds the daemon's silence: a slow answer (a kohya job's submit runs
        # sd-scripts' parser) comes with heartbeats, a frozen daemon sends none
        result = self.client.call(op, **args)
        self.reached = True
        return result


def fail(ctx: Ctx, code: Exit, message: str, error_code: str = "") -> None:
    if ctx.json:
        render.emit_json({"error": {"code": error_code or code.name.lower(), "message": message}})
    else:
        click.echo(f"fluxgymctl: {message}", err=True)
    sys.exit(int(code))


def command(fn):
    """Common to every command: --json, and errors as messages with documented exit codes."""

    @click.option("--json", "as_json", is_flag=True,
                  help="Print JSON (stable field names) instead of text.")
    @click.pass_obj
    @functools.wraps(fn)
    def wrapper(ctx: Ctx, *args, as_json: bool = False, **kwargs):
        ctx.json = ctx.json or as_json
        try:
            return fn(ctx, *args, **kwargs)
        except DaemonUnavailable as e:
            fail(ctx, Exit.DAEMON_UNAVAILABLE, str(e), "daemon_unavailable")
        except RemoteError as e:
            fail(ctx, ERROR_EXIT.get(e.code, Exit.REJECTED), e.message, e.code)
        except KeyboardInterrupt:
            sys.exit(130)

    return wrapper
