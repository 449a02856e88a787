"""Following a job: `logs -f` and `wait`, which reconnect while fluxgymd restarts and
announce what they could not show."""
from __future__ import annotations

import functools
import json
import sys
import time
from typing import Any

import click

from fluxgymd.client import DaemonUnavailable
from fluxgymd.protocol import TOPIC_STATE, log_topic

from . import render
from .context import DONE, Ctx, fail
from .exitcodes import Exit

RECONNECT_S = 120.0  # how long logs -f and wait keep trying while fluxgymd restarts


def _stamp(t: float | None) -> str:
    if t is None:
        return "-".ljust(23)
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) + f".{int(t % 1 * 1000):03d}"


def print_lines(lines: list[str], as_json: bool = False, first: int | None = None,
                times: list[float | None] | None = None) -> None:
    if as_json:
        for i, line in enumerate(lines):
            seq = None if first is None else first + i
            obj: dict[str, Any] = {"seq": seq, "line": line}
            if times is not None:
                obj["time"] = times[i] if i < len(times) else None
            sys.stdout.write(json.dumps(obj) + "\n")
    elif lines:
        if times is not None:
            lines = [f"{_stamp(times[i] if i < len(times) else None)}  {line}"
                     for i, line in enumerate(lines)]
        sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()


def _notice(ctx: Ctx, text: str) -> None:
    """A line about the stream itself (a gap, a restart): on stderr, so stdout stays the
    job's own lines; in --json mode an object with "notice"."""
    if ctx.json:
        sys.stdout.write(json.dumps({"notice": text}) + "\n")
        sys.stdout.flush()
    else:
        click.echo(f"fluxgymctl: {text}", err=True)


def _reconnecting(ctx: Ctx, fn, *args, **kwargs):
    """Call fn; while fluxgymd is away (restarting), say so once and try again for up to
    RECONNECT_S seconds."""
    deadline = None
    while True:
        try:
            result = fn(*args, **kwargs)
        except DaemonUnavailable as e:
            if not ctx.reached:
                raise  # never there at all: say so at once
            now = time.monotonic()
            if deadline is None:
                deadline = now + RECONNECT_S
                _notice(ctx, f"lost fluxgymd ({str(e).split(';')[0]}); reconnecting for up to "
                        f"{RECONNECT_S:g}s")
            elif now >= deadline:
                raise
            time.sleep(0.5)
            continue
        if deadline is not None:
            _notice(ctx, "reconnected to fluxgymd")
        return result


def follow_logs(ctx: Ctx, ref: str, n: int, timestamps: bool = False) -> None:
    """Tail, then stream. Live lines come from the events socket; any gap (a late
    subscription, a dropped event, a restart of fluxgymd) is filled by number from the
    daemon, which numbers a job's lines as they stand in train.log, across restarts. A gap
    that cannot be filled is announced, never silent."""
    call = functools.partial(_reconnecting, ctx, ctx.call)
    job_id = call("show", job=ref, events=0)["id"]
    sub = ctx.client.subscribe(log_topic(job_id), TOPIC_STATE)
    try:
        r = call("logs", job=str(job_id), lines=n, timestamps=timestamps)
        print_lines(r["lines"], ctx.json, (r["seq"] or 0) - len(r["lines"]) + 1,
                    r.get("times") if timestamps else None)
        last, epoch = r["seq"] or 0, r.get("epoch")

        def fill() -> dict:
            nonlocal last, epoch
            while True:
                r = call("logs", job=str(job_id), after=last, lines=5000, timestamps=timestamps)
                if r.get("epoch") != epoch:
                    _notice(ctx, "fluxgymd restarted; following on from line "
                            f"{last + 1} of train.log")
                    epoch = r.get("epoch")
                if r["lines"] and r["first"] > last + 1:
                    _notice(ctx, f"lines {last + 1}-{r['first'] - 1} are no longer kept "
                            "(see train.log and its rotated copies)")
                if r["lines"]:
                    print_lines(r["lines"], ctx.json, r["first"],
                                r.get("times") if timestamps else None)
                    last = r["first"] + len(r["lines"]) - 1
                if len(r["lines"]) < 5000:
                    return r

        while True:
            quiet, done = True, False
            for topic, ev in sub.events(timeout=1.0):
                quiet = False
                if topic == TOPIC_STATE:
                    done = done or (ev["id"] == job_id and ev["state"] in DONE)
                    continue
                if timestamps or ev.get("epoch") != epoch or ev["first"] > last + 1:
                    fill()
                    continue
                skip = last + 1 - ev["first"]
                fresh = ev["lines"][skip:]
                if fresh:
                    print_lines(fresh, ctx.json, ev["first"] + skip)
                    last = ev["first"] + len(ev["lines"]) - 1
                if done:
                    break
            if quiet or done:
                r = fill()
                if r["state"] in DONE:
                    return
    finally:
        sub.close()


def wait_for(ctx: Ctx, ref: str, timeout: float | None) -> dict[str, Any]:
    """Until the job is succeeded, failed or cancelled. An interrupted job is requeued and
    resumed, so waiting goes on, through restarts of fluxgymd too."""
    deadline = None if timeout is None else time.monotonic() + timeout
    sub = ctx.client.subscribe(TOPIC_STATE)
    try:
        while True:
            j = _reconnecting(ctx, ctx.call, "show", job=ref, events=0)
            if j["state"] in DONE:
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


def finish_wait(ctx: Ctx, j: dict[str, Any]) -> None:
    if ctx.json:
        render.emit_json(j)
    else:
        click.echo(f"job {j['id']} ({j['name']}) {j['state']}: {j['reason']}")
    sys.exit(int(Exit.OK if j["state"] == "succeeded" else Exit.JOB_NOT_SUCCEEDED))
