"""fluxgymctl: thin commands over fluxgymd.client. Each builds a request, calls the client
and renders the answer as a table or, with --json, as JSON with stable field names."""
from __future__ import annotations

import os
import stat
import sys
import time

import click

from fluxgymd import __version__
from fluxgymd.protocol import MAX_MESSAGE_BYTES, OPS, PRIORITY_RANGE

from . import render
from .context import DONE, Ctx, command, fail
from .exitcodes import Exit

# The job file travels inside one request, with room for the envelope.
MAX_JOB_FILE_BYTES = MAX_MESSAGE_BYTES - 64 * 1024


def _range(op: str, arg: str) -> click.IntRange:
    """The daemon's own limits for an argument, checked before anything is sent."""
    spec = OPS[op][arg]
    return click.IntRange(spec.minimum, spec.maximum)


# Commands that live in modules of their own, imported only when one of them runs (or for
# --help): `fluxgymctl status` must not pay for the importer's or top's imports.
LAZY = {
    "import": "importer:import_", "top": "top:top", "notify": "alerts:notify",
    "models": "models:models", "new": "flow:new", "publish": "flow:publish",
    "save-now": "control:save_now", "sample-now": "control:sample_now",
    **{name: f"queue:{name}" for name in ("remove", "clean", "pause", "resume", "move",
                                            "config")},
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *LAZY])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in LAZY:
            return super().get_command(ctx, name)
        import importlib

        module, attr = LAZY[name].split(":")
        return getattr(importlib.import_module(f"{__package__}.{module}"), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="fluxgymctl",
                      message="%(prog)s %(version)s")
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
        ("jobs", r["summary"]),
        ("queue", "paused (fluxgymctl resume starts it)" if r.get("paused") else
         f"running, {r.get('max_concurrent_jobs')} job(s) at once"),
        ("command jobs", "allowed" if r.get("allow_command_jobs") else
         "refused (allow_command_jobs is off)"),
        ("kohya jobs", "any checkout (command jobs are allowed)" if r.get("allow_command_jobs")
         else "from " + ", ".join(r["kohya_checkouts"]) if r.get("kohya_checkouts") else
         "refused until a checkout is listed (checkouts under [kohya])"),
        ("runtime dir", r["runtime_dir"]),
        ("state dir", r["state_dir"]), ("outputs", r["outputs_dir"]),
        ("executor", "slurm: " + ((r.get("slurm") or {}).get("probe") or "?")
         if r.get("executor") == "slurm" else "local (slurm for jobs that ask for it)"),
        ("alerts", _alerts_line(r.get("alerts") or {})),
        ("hooks", _hooks_line(r.get("alerts") or {})),
        ("round trip", f"{r['round_trip_ms']:.1f} ms"),
    ])


@cli.command(short_help="GPU utilization, memory, temperature and power, with their jobs.")
@command
def gpus(ctx: Ctx) -> None:
    """Every GPU as fluxgymd reads it through NVML, and which job runs on which. Without
    NVML it says why there is nothing to show."""
    r = ctx.call("gpus")
    if ctx.json:
        return render.emit_json(r)
    if not r["gpus"]:
        click.echo(f"no GPU figures: {r['why']}")
        return
    render.table(r["gpus"], [
        ("index", "GPU", lambda g: str(g["index"])),
        ("name", "NAME", lambda g: g.get("name") or "-"),
        ("utilization", "UTIL", lambda g: "-" if g["utilization"] is None
         else f"{g['utilization']:.0f}%"),
        ("memory", "MEMORY GiB", lambda g: f"{render.gib(g['memory_used'])}/"
         f"{render.gib(g['memory_total'])}"),
        ("temperature", "TEMP", lambda g: "-" if g["temperature"] is None
         else f"{g['temperature']:.0f}°C"),
        ("power", "POWER W", lambda g: "-" if g["power_w"] is None else
         f"{g['power_w']:.0f}" + (f"/{g['power_limit_w']:.0f}" if g["power_limit_w"] else "")),
        ("planned", "PLANNED GiB", lambda g: render.gib(g.get("planned"))),
        ("jobs", "JOBS", lambda g: ", ".join(
            f"{j['id']} {j['name']}" + (f" ({render.gib(j['planned'])})"
                                        if j.get("planned") is not None else "")
            for j in g["jobs"]) or "-"),
    ])
    for w in r.get("waiting") or []:
        click.echo(f"job {w['id']} ({w['name']}) {w['why']}")


@cli.command("web-url", short_help="The dashboard's login URL (with its token).")
@command
def web_url(ctx: Ctx) -> None:
    """Print the dashboard's URL with its token. Open it in a browser; on a rented pod reach it
    through an SSH tunnel (ssh -L 8377:127.0.0.1:8377 pod) or the provider's HTTP port."""
    r = ctx.call("web_url")
    if ctx.json:
        return render.emit_json(r)
    click.echo(r["url"])


def _alerts_line(a: dict) -> str:
    w = a.get("webhook") or {}
    if not w.get("configured"):
        return "off (no url under [notify])"
    text = (f"{w['target']} on {', '.join(w['events'])}: {w['sent']} sent, {w['failed']} "
            f"failed")
    if w.get("pending"):
        text += f", {w['pending']} pending"
    if w.get("last_error"):
        text += f"; last failure at {render.when(w['last_error_at'])}: {w['last_error']}"
    return text


def _hooks_line(a: dict) -> str:
    h = a.get("hooks") or {}
    if not h.get("configured"):
        return "none"
    text = f"{', '.join('on_' + e for e in h['configured'])}: {h['ran']} ran, {h['failed']} failed"
    return text + (f"; last: {h['last_error']}" if h.get("last_error") else "")


@cli.command()
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--name", default="", help="Use this job name instead of the file's job.name.")
@click.option("--priority", type=click.IntRange(*PRIORITY_RANGE), default=0, show_default=True,
              help="Higher runs first; equal priorities run in submission order.")
@click.option("--after", multiple=True, metavar="JOB", help="Start only once JOB (id or name) "
              "has succeeded; fail at once if it fails (repeatable; adds to [job] after).")
@click.option("--wait", "wait_", is_flag=True, help="Wait until the job ends; exit 0 if it "
              "succeeded, 1 if not.")
@click.option("--wait-timeout", type=float, default=None, metavar="SECONDS",
              help="With --wait: give up after this long (exit 6).")
@command
def submit(ctx: Ctx, job_file: str, name: str, priority: int, after: tuple[str, ...],
           wait_: bool, wait_timeout: float | None) -> None:
    """Queue the job described by JOB_FILE (TOML).

    Exits 0 when the job is queued or running, 1 when it failed at once (the reason is
    printed), 4 when fluxgymd refused the file."""
    text = _read_job_file(ctx, job_file)
    job = ctx.call("submit", text=text, source=os.path.abspath(job_file), name=name,
                   priority=priority, after=list(after) or None)
    if not ctx.json:
        for w in job.get("warnings") or []:
            click.echo(f"fluxgymctl: warning: {w}", err=True)
    if not wait_:
        if ctx.json:
            render.emit_json(job)
        elif job["state"] in DONE:
            click.echo(f"job {job['id']} ({job['name']}) {job['state']}: {job['reason']}")
        else:
            click.echo(f"job {job['id']} ({job['name']}) {job['state']}"
                       + (f", {job['waiting']}" if job.get("waiting") else "")
                       + f"; follow it with: fluxgymctl logs -f {job['name']}")
        if job["state"] in ("failed", "cancelled"):
            sys.exit(int(Exit.JOB_NOT_SUCCEEDED))
        return
    if not ctx.json:
        click.echo(f"job {job['id']} ({job['name']}) {job['state']}; waiting...")
    from .follow import finish_wait, wait_for  # only commands that follow a job need it

    finish_wait(ctx, wait_for(ctx, str(job["id"]), wait_timeout))


def _read_job_file(ctx: Ctx, job_file: str) -> str:
    """The job file's text, refusing at once what would never be sent: not a regular file
    (a FIFO, /dev/zero), over the size limit, not UTF-8."""
    try:
        fd = os.open(job_file, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        fail(ctx, Exit.USAGE, f"cannot read {job_file}: {e.strerror or e}", "usage")
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            fail(ctx, Exit.USAGE, f"{job_file} is not a regular file; give a TOML job file",
                 "usage")
        if st.st_size > MAX_JOB_FILE_BYTES:
            fail(ctx, Exit.USAGE, f"{job_file} is {st.st_size} bytes; a job file may have at "
                 f"most {MAX_JOB_FILE_BYTES} bytes", "usage")
        data = os.read(fd, MAX_JOB_FILE_BYTES + 1)
    except OSError as e:
        fail(ctx, Exit.USAGE, f"cannot read {job_file}: {e.strerror or e}", "usage")
    finally:
        os.close(fd)
    if len(data) > MAX_JOB_FILE_BYTES:
        fail(ctx, Exit.USAGE, f"{job_file} is larger than {MAX_JOB_FILE_BYTES} bytes", "usage")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        fail(ctx, Exit.USAGE, f"{job_file} is not UTF-8 text: {e}", "usage")
    return ""


@cli.command()
@click.option("--state", "states", multiple=True, metavar="STATE",
              help="Only jobs in this state (repeatable).")
@click.option("-w", "--watch", is_flag=False, flag_value=2.0, type=click.FloatRange(0.2),
              default=None, metavar="SECONDS", help="Redraw every SECONDS (default 2) until "
              "Ctrl-C.")
@command
def status(ctx: Ctx, states: tuple[str, ...], watch: float | None) -> None:
    """List jobs: state, progress, loss, elapsed time and ETA."""
    if watch is None:
        return _status_once(ctx, states)
    while True:
        if sys.stdout.isatty():
            click.clear()
        click.echo(time.strftime("%H:%M:%S") + f"  every {watch:g}s, Ctrl-C to stop")
        _status_once(ctx, states)
        sys.stdout.flush()
        time.sleep(watch)


def _status_once(ctx: Ctx, states: tuple[str, ...]) -> None:
    r = ctx.call("list", states=list(states) or None)
    if ctx.json:
        return render.emit_json(r)
    if not r["jobs"]:
        click.echo("no jobs" + (" in that state" if states else
                                "; submit one with: fluxgymctl submit JOB_FILE"))
        return
    if r.get("paused"):
        click.echo("queue paused: queued jobs wait (fluxgymctl resume)")
    render.table(r["jobs"], [
        ("id", "ID", lambda j: str(j["id"])),
        ("name", "NAME", lambda j: j["name"]),
        ("state", "STATE", lambda j: j["state"]),
        ("progress", "PROGRESS", render.progress),
        ("step", "STEP", render.steps),
        ("loss", "LOSS", lambda j: render.number(j["loss"])),
        ("elapsed_s", "ELAPSED", lambda j: render.duration(j["elapsed_s"])),
        ("eta_s", "ETA", lambda j: render.duration(j["eta_s"])),
        ("attempts", "ATTEMPTS", lambda j: str(j["attempts"])),
        *([("gpu", "GPU", render.placed_on)] if any(j.get("placement")
                                                    for j in r["jobs"]) else []),
        ("reason", "REASON", render.status_reason),
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
                     f"{j['phase'] or '-'}" + (f"; attempt {j['attempts']} resumes from its "
                                               "newest checkpoint and has reported no step yet"
                                               if j.get("step_from") == "checkpoint" else "")),
        ("priority", str(j.get("priority", 0))),
        ("after", ", ".join(f"{a['name']} ({a['state']})" for a in j.get("after") or [])
         or "-"),
        ("waited for by", ", ".join(f"{d['name']} ({d['state']})"
                                    for d in j.get("dependents") or []) or "-"),
        ("loss / lr", f"{render.number(j['loss'])} / {render.number(j['lr'])}"),
        ("attempts", f"{j['attempts']} (restarts {j['restarts']})"),
        ("runs on", render.executor(j)),
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
        ("placed on", render.placement(j)),
        ("GPUs", "; ".join(render.gpu_line(g) for g in j.get("gpus") or []) or
         ("- (not running)" if j["state"] not in ("running", "stalled") else
          f"- ({j['watchdog']['gpu']})")),
        ("memory", render.memory_plan(j.get("memory_plan"))),
        ("output dir", j["output_dir"]),
        ("LoRA", j.get("lora") or "-"),
        ("log", j["log_file"]),
    ])
    click.echo("")
    render.table(j["events"], [
        ("at", "AT", lambda e: render.when(e["at"])),
        ("from", "FROM", lambda e: e["from_state"] or "-"),
        ("state", "TO", lambda e: e["to_state"]),
        ("reason", "REASON", lambda e: e["reason"]),
    ], title="history")


@cli.command(short_help="Print or follow (-f) a job's output.")
@click.argument("job")
@click.option("-n", "--lines", default=50, show_default=True, type=_range("logs", "lines"),
              help="How many lines to show.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines until the job "
              "ends; survives a restart of fluxgymd.")
@click.option("-t", "--timestamps", is_flag=True, help="Prefix each line with when fluxgymd "
              "received it (lines from before its last start show '-').")
@command
def logs(ctx: Ctx, job: str, lines: int, follow: bool, timestamps: bool) -> None:
    """Print a job's output (stdout and stderr, tqdm bars split into lines).

    With --json, one JSON object per line: {"seq", "line"} (and "time" with -t)."""
    from .follow import follow_logs, print_lines

    if not follow:
        r = ctx.call("logs", job=job, lines=lines, timestamps=timestamps)
        if ctx.json:
            return render.emit_json(r)
        print_lines(r["lines"], times=r.get("times") if timestamps else None)
        return
    follow_logs(ctx, job, lines, timestamps)


@cli.command(short_help="Stop a job (SIGTERM to its group, SIGKILL after a grace).")
@click.argument("job")
@click.option("--no-wait", is_flag=True, help="Return at once instead of waiting for the "
              "job's processes to exit.")
@command
def cancel(ctx: Ctx, job: str, no_wait: bool) -> None:
    """Stop JOB: SIGTERM to its whole process group, SIGKILL after the grace period."""
    j = ctx.call("cancel", job=job)
    if not no_wait and j["state"] not in DONE:
        from .follow import wait_for

        j = wait_for(ctx, str(j["id"]), None)
    if ctx.json:
        return render.emit_json(j)
    click.echo(f"job {j['id']} ({j['name']}) {j['state']}: {j['reason']}")


@cli.command(short_help="Queue a failed, cancelled or interrupted job again.")
@click.argument("job")
@click.option("--dependents", is_flag=True, help="Also queue again the jobs that failed "
              "because this one did (those waiting for it, and theirs).")
@command
def retry(ctx: Ctx, job: str, dependents: bool) -> None:
    """Queue a failed, cancelled or interrupted JOB again (it resumes where it can)."""
    j = ctx.call("retry", job=job, dependents=dependents)
    if ctx.json:
        return render.emit_json(j)
    click.echo(f"job {j['id']} ({j['name']}) {j['state']}")
    for name in j.get("dependents_requeued") or []:
        click.echo(f"job {name} queued again, waiting for {j['name']}")


@cli.command()
@click.argument("job")
@click.option("--timeout", "wait_timeout", type=float, default=None, metavar="SECONDS",
              help="Give up after this long (exit 6).")
@command
def wait(ctx: Ctx, job: str, wait_timeout: float | None) -> None:
    """Wait until JOB ends. Exit 0 only if it succeeded.

    An interrupted job resumes, so waiting goes on; while fluxgymd restarts, wait says so
    and reconnects (for up to two minutes)."""
    from .follow import finish_wait, wait_for

    finish_wait(ctx, wait_for(ctx, job, wait_timeout))


@cli.command(short_help="A job's loss curve: step, loss, learning rate.")
@click.argument("job")
@click.option("-n", "--limit", default=1000, show_default=True, type=_range("metrics", "limit"),
              help="Most recent points.")
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


def main() -> None:
    cli(prog_name="fluxgymctl")
