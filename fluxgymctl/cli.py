"""fluxgymctl: thin commands over fluxgymd.client. Each builds a request, calls the client
and renders the answer as a table or, with --json, as JSON with stable field names."""
from __future__ import annotations

import functools
import json
import os
import sys
import time
from typing import Any

import click

from fluxgymd.client import Client, DaemonUnavailable, RemoteError
from fluxgymd.protocol import TOPIC_STATE, log_topic

from . import render
from .exitcodes import Exit

DONE = ("succeeded", "failed", "cancelled")
ERROR_EXIT = {"not_found": Exit.NOT_FOUND, "ambiguous": Exit.NOT_FOUND,
              "internal": Exit.DAEMON_ERROR}


class Ctx:
    def __init__(self, runtime_dir: str | None, timeout: float, as_json: bool):
        self.runtime_dir, self.timeout, self.json = runtime_dir, timeout, as_json
        self._client: Client | None = None

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = Client(self.runtime_dir, timeout=self.timeout)
        return self._client

    def call(self, op: str, **args: Any) -> Any:
        return self.client.call(op, **args)


def fail(ctx: Ctx, code: Exit, message: str, error_code: str = "") -> None:
    if ctx.json:
        render.emit_json({"error": {"code": error_code or code.name.lower(), "message": message}})
    else:
        click.echo(f"fluxgymctl: {message}", err=True)
    sys.exit(int(code))


def command(fn):
    """Common to every command: --json, and errors as messages with documented exit codes."""

    @click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--runtime-dir", envvar="FLUXGYM_RUNTIME_DIR", metavar="DIR",
              help="fluxgymd's runtime dir (default: $FLUXGYM_RUNTIME_DIR, else the first of "
              "$XDG_RUNTIME_DIR/fluxgymd, /run/fluxgymd, /tmp/fluxgymd-$UID that has a socket).")
@click.option("--timeout", default=10.0, show_default=True, metavar="SECONDS",
              help="How long to wait for fluxgymd to answer a request.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (same as each command's --json).")
@click.pass_context
def cli(cctx: click.Context, runtime_dir: str | None, timeout: float, as_json: bool) -> None:
    """Submit, watch and control LoRA training jobs run by fluxgymd.

    Exit codes: 0 ok, 1 job did not succeed (wait), 2 usage, 3 daemon unavailable,
    4 request rejected, 5 no such job, 6 timed out, 7 daemon internal error.
    """
    cctx.obj = Ctx(runtime_dir, timeout, as_json)


# --- commands -----------------------------------------------------------------------------
@cli.command()
@command
def ping(ctx: Ctx) -> None:
    """Check that fluxgymd answers, and show where it keeps things."""
    t0 = time.perf_counter()
    r = ctx.call("ping")
    r["round_trip_ms"] = (time.perf_counter() - t0) * 1000
    if ctx.json:
        return render.emit_json(r)
    render.pairs([
        ("fluxgymd", f"{r['version']} (pid {r['pid']}, protocol {r['protocol']}, up "
                     f"{render.duration(r['uptime_s'])})"),
        ("jobs", r["summary"]), ("runtime dir", r["runtime_dir"]),
        ("state dir", r["state_dir"]), ("outputs", r["outputs_dir"]),
        ("round trip", f"{r['round_trip_ms']:.1f} ms"),
    ])


@cli.command()
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--name", default="", help="Use this job name instead of the file's job.name.")
@click.option("--wait", "wait_", is_flag=True, help="Wait until the job ends; exit 0 if it "
              "succeeded, 1 if not.")
@click.option("--wait-timeout", type=float, default=None, metavar="SECONDS",
              help="With --wait: give up after this long (exit 6).")
@command
def submit(ctx: Ctx, job_file: str, name: str, wait_: bool, wait_timeout: float | None) -> None:
    """Queue the job described by JOB_FILE (TOML)."""
    try:
        with open(job_file, encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as e:
        fail(ctx, Exit.USAGE, f"cannot read {job_file}: {getattr(e, 'strerror', None) or e}",
             "usage")
    job = ctx.call("submit", text=text, source=os.path.abspath(job_file), name=name)
    if not wait_:
        if ctx.json:
            return render.emit_json(job)
        click.echo(f"job {job['id']} ({job['name']}) {job['state']}; "
                   f"follow it with: fluxgymctl logs -f {job['name']}")
        return
    if not ctx.json:
        click.echo(f"job {job['id']} ({job['name']}) {job['state']}; waiting...")
    _finish_wait(ctx, _wait_for(ctx, str(job["id"]), wait_timeout))


@cli.command()
@click.option("--state", "states", multiple=True, metavar="STATE",
              help="Only jobs in this state (repeatable).")
@command
def status(ctx: Ctx, states: tuple[str, ...]) -> None:
    """List jobs: state, progress, loss, elapsed time and ETA."""
    r = ctx.call("list", states=list(states) or None)
    if ctx.json:
        return render.emit_json(r)
    if not r["jobs"]:
        click.echo("no jobs" + (" in that state" if states else
                                "; submit one with: fluxgymctl submit JOB_FILE"))
        return
    render.table(r["jobs"], [
        ("id", "ID", lambda j: str(j["id"])),
        ("name", "NAME", lambda j: j["name"]),
        ("state", "STATE", lambda j: j["state"]),
        ("progress", "PROGRESS", lambda j: render.percent(j["progress"])),
        ("step", "STEP", render.steps),
        ("loss", "LOSS", lambda j: render.number(j["loss"])),
        ("elapsed_s", "ELAPSED", lambda j: render.duration(j["elapsed_s"])),
        ("eta_s", "ETA", lambda j: render.duration(j["eta_s"])),
        ("attempts", "ATTEMPTS", lambda j: str(j["attempts"])),
        ("reason", "REASON", lambda j: "" if j["state"] in ("running", "queued")
         else j["reason"][:60]),
    ])


@cli.command()
@click.argument("job")
@command
def show(ctx: Ctx, job: str) -> None:
    """Everything about one JOB (id or name), with its state history."""
    j = ctx.call("show", job=job)
    if ctx.json:
        return render.emit_json(j)
    render.pairs([
        ("job", f"{j['id']} ({j['name']}, {j['kind']})"),
        ("state", f"{j['state']}: {j['reason']}"),
        ("progress", f"{render.steps(j)} ({render.percent(j['progress'])}), phase "
                     f"{j['phase'] or '-'}"),
        ("loss / lr", f"{render.number(j['loss'])} / {render.number(j['lr'])}"),
        ("attempts", f"{j['attempts']} (restarts {j['restarts']})"),
        ("pid", str(j["pid"] or "-")),
        ("checkpoint", f"{j['checkpoint'] or '-'}"
                       + (f" (step {j['checkpoint_step']})" if j["checkpoint_step"] else "")),
        ("exit code", "-" if j["exit_code"] is None else str(j["exit_code"])),
        ("created", render.when(j["created_at"])),
        ("started", render.when(j["started_at"])),
        ("finished", render.when(j["finished_at"])),
        ("elapsed / eta", f"{render.duration(j['elapsed_s'])} / {render.duration(j['eta_s'])}"),
        ("watchdog", f"restarts {j['watchdog']['restarts']}, no-progress "
                     f"{j['watchdog']['no_progress']}, step limit "
                     f"{render.duration(j['watchdog']['step_limit_s'])}"),
        ("GPU rule", j["watchdog"]["gpu"]),
        ("output dir", j["output_dir"]),
        ("log", j["log_file"]),
    ])
    click.echo("")
    render.table(j["events"], [
        ("at", "AT", lambda e: render.when(e["at"])),
        ("from", "FROM", lambda e: e["from_state"] or "-"),
        ("state", "TO", lambda e: e["to_state"]),
        ("reason", "REASON", lambda e: e["reason"]),
    ], title="history")


@cli.command()
@click.argument("job")
@click.option("-n", "--lines", default=50, show_default=True, help="How many lines to show.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines until the job ends.")
@command
def logs(ctx: Ctx, job: str, lines: int, follow: bool) -> None:
    """Print the output of JOB (stdout and stderr, tqdm bars split into lines)."""
    if not follow:
        r = ctx.call("logs", job=job, lines=lines)
        if ctx.json:
            return render.emit_json(r)
        _print_lines(r["lines"])
        return
    _follow(ctx, job, lines)


def _print_lines(lines: list[str], as_json: bool = False, first: int | None = None) -> None:
    if as_json:
        for i, line in enumerate(lines):
            seq = None if first is None else first + i
            sys.stdout.write(json.dumps({"seq": seq, "line": line}) + "\n")
    elif lines:
        sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()


def _follow(ctx: Ctx, ref: str, n: int) -> None:
    """Tail, then stream. Live lines come from the events socket; any gap (a late
    subscription, a dropped event, a daemon restart) is filled from the daemon's numbered
    ring, so no line is lost or printed twice."""
    job_id = ctx.call("show", job=ref, events=0)["id"]
    sub = ctx.client.subscribe(log_topic(job_id), TOPIC_STATE)
    try:
        r = ctx.call("logs", job=str(job_id), lines=n)
        _print_lines(r["lines"], ctx.json)
        last, epoch = r["seq"] or 0, r.get("epoch")

        def fill() -> dict:
            nonlocal last, epoch
            while True:
                r = ctx.call("logs", job=str(job_id), after=last, lines=5000)
                if r.get("epoch") != epoch:  # the daemon restarted: its numbering did too
                    epoch, last = r.get("epoch"), 0
                    continue
                if r["gap"]:
                    _print_lines(["... (some lines were dropped from memory; see "
                                  "train.log) ..."], ctx.json)
                if r["lines"]:
                    _print_lines(r["lines"], ctx.json, r["first"])
                    last = r["first"] + len(r["lines"]) - 1
                if len(r["lines"]) < 5000:
                    return r

        while True:
            quiet, done = True, False
            for topic, ev in sub.events(timeout=1.0):
                quiet = False
                if topic == TOPIC_STATE:
                    done = done or (ev["id"] == job_id and ev["state"] in DONE + ("interrupted",))
                    continue
                if ev.get("epoch") != epoch or ev["first"] > last + 1:
                    fill()
                    continue
                skip = last + 1 - ev["first"]
                fresh = ev["lines"][skip:]
                if fresh:
                    _print_lines(fresh, ctx.json, ev["first"] + skip)
                    last = ev["first"] + len(ev["lines"]) - 1
                if done:
                    break
            if quiet or done:
                r = fill()
                if r["state"] in DONE or (r["state"] == "interrupted" and done):
                    return
    finally:
        sub.close()


@cli.command()
@click.argument("job")
@click.option("--no-wait", is_flag=True, help="Return at once instead of waiting for the "
              "job's processes to exit.")
@command
def cancel(ctx: Ctx, job: str, no_wait: bool) -> None:
    """Stop JOB: SIGTERM to its whole process group, SIGKILL after the grace period."""
    j = ctx.call("cancel", job=job)
    if not no_wait and j["state"] not in DONE:
        j = _wait_for(ctx, str(j["id"]), None)
    if ctx.json:
        return render.emit_json(j)
    click.echo(f"job {j['id']} ({j['name']}) {j['state']}: {j['reason']}")


@cli.command()
@click.argument("job")
@command
def retry(ctx: Ctx, job: str) -> None:
    """Queue a failed, cancelled or interrupted JOB again (it resumes where it can)."""
    j = ctx.call("retry", job=job)
    if ctx.json:
        return render.emit_json(j)
    click.echo(f"job {j['id']} ({j['name']}) {j['state']}")


@cli.command()
@click.argument("job")
@click.option("--timeout", "wait_timeout", type=float, default=None, metavar="SECONDS",
              help="Give up after this long (exit 6).")
@command
def wait(ctx: Ctx, job: str, wait_timeout: float | None) -> None:
    """Wait until JOB ends. Exit 0 only if it succeeded."""
    _finish_wait(ctx, _wait_for(ctx, job, wait_timeout))


@cli.command()
@click.argument("job")
@click.option("-n", "--limit", default=1000, show_default=True, help="Most recent points.")
@command
def metrics(ctx: Ctx, job: str, limit: int) -> None:
    """The loss curve of JOB: step, loss and learning rate per reported step."""
    r = ctx.call("metrics", job=job, limit=limit)
    if ctx.json:
        return render.emit_json(r)
    render.table(r["metrics"], [
        ("attempt", "ATTEMPT", lambda m: str(m["attempt"])),
        ("step", "STEP", lambda m: str(m["step"])),
        ("loss", "LOSS", lambda m: render.number(m["loss"], 6)),
        ("lr", "LR", lambda m: render.number(m["lr"])),
    ])


def _wait_for(ctx: Ctx, ref: str, timeout: float | None) -> dict[str, Any]:
    deadline = None if timeout is None else time.monotonic() + timeout
    sub = ctx.client.subscribe(TOPIC_STATE)
    try:
        while True:
            j = ctx.call("show", job=ref, events=0)
            if j["state"] in DONE or j["state"] == "interrupted":
                return j
            if deadline is not None and time.monotonic() >= deadline:
                fail(ctx, Exit.TIMEOUT, f"job {j['id']} ({j['name']}) is still {j['state']} "
                     f"after {timeout:g}s", "timeout")
            # a state event wakes us early; the poll covers a missed one
            for _topic, ev in sub.events(timeout=1.0):
                if ev.get("id") == j["id"]:
                    break
    finally:
        sub.close()


def _finish_wait(ctx: Ctx, j: dict[str, Any]) -> None:
    if ctx.json:
        render.emit_json(j)
    else:
        click.echo(f"job {j['id']} ({j['name']}) {j['state']}: {j['reason']}")
    sys.exit(int(Exit.OK if j["state"] == "succeeded" else Exit.JOB_NOT_SUCCEEDED))


def main() -> None:
    cli(prog_name="fluxgymctl")
