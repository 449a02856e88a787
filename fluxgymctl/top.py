"""`fluxgymctl top`: a full-terminal live view in the spirit of htop and nvtop.

Jobs with progress bars and a loss sparkline, the GPU panel, and the selected job's newest log
line. It redraws from the events socket (state, progress, log), not by polling: the jobs are
read once, then kept current by the events; GPU figures, which have no events, are read every
few seconds. Keys: up/down or k/j move, enter or l shows the selected job's log, esc or h
goes back, q quits. Not on a terminal, it prints one snapshot as plain text and exits.
"""
from __future__ import annotations

import json
import os
import select
import shutil
import sys
import termios
import time
import tty
from collections import deque
from typing import Any

import click
import zmq

from . import render
from .context import Ctx, command

SPARK = "▁▂▃▄▅▆▇█"
GPU_EVERY_S = 3.0
ACTIVE = ("queued", "starting", "running", "stalled", "recovering")


def sparkline(values: list[float], width: int) -> str:
    values = [v for v in values if v is not None][-width:]
    if not values:
        return ""
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return "".join(SPARK[int((v - lo) / span * (len(SPARK) - 1))] for v in values)


def bar(progress: float | None, width: int) -> str:
    if progress is None:
        return " " * width
    full = int(round(max(0.0, min(1.0, progress)) * width))
    return "█" * full + "░" * (width - full)


class View:
    def __init__(self, ctx: Ctx):
        self.ctx = ctx
        self.jobs: dict[int, dict[str, Any]] = {}
        self.losses: dict[int, deque] = {}
        self.last_line: dict[int, str] = {}
        self.log: deque = deque(maxlen=500)
        self.gpus: dict[str, Any] = {"gpus": [], "why": "…"}
        self.selected = 0
        self.mode = "jobs"

    def load(self) -> None:
        r = self.ctx.call("list")
        self.jobs = {j["id"]: j for j in r["jobs"]}
        for job_id, job in self.jobs.items():
            self.losses.setdefault(job_id, deque(maxlen=200))
            if job["state"] in ACTIVE and job.get("step") is not None:
                # the recent curve, so the sparkline starts full; events extend it
                points = self.ctx.call("metrics", job=str(job_id), limit=64)["metrics"]
                self.losses[job_id].extend(m["loss"] for m in points if m["loss"] is not None)
        self.read_gpus()

    def read_gpus(self) -> None:
        try:
            self.gpus = self.ctx.call("gpus")
        except Exception as e:  # noqa: BLE001 - an older daemon: no GPU op; say so
            self.gpus = {"gpus": [], "why": f"cannot read: {e}"}

    def ordered(self) -> list[dict[str, Any]]:
        return sorted(self.jobs.values(),
                      key=lambda j: (j["state"] not in ACTIVE, -j["id"]))

    def current(self) -> dict[str, Any] | None:
        jobs = self.ordered()
        if not jobs:
            return None
        self.selected = max(0, min(self.selected, len(jobs) - 1))
        return jobs[self.selected]

    def on_event(self, topic: bytes, ev: dict[str, Any]) -> None:
        if topic == b"state":
            self.jobs[ev["id"]] = {**self.jobs.get(ev["id"], {}), **ev}
            self.losses.setdefault(ev["id"], deque(maxlen=200))
        elif topic == b"progress":
            j = self.jobs.get(ev.get("job"))
            if j is None:
                return
            if ev["event"] == "step":
                j["step"] = ev["step"]
                j["total_steps"] = ev.get("total", j.get("total_steps"))
                if ev.get("loss") is not None:
                    j["loss"] = ev["loss"]
                    self.losses[j["id"]].append(ev["loss"])
                if j.get("total_steps"):
                    j["progress"] = j["step"] / j["total_steps"]
            elif ev["event"] == "phase":
                j["phase"] = ev["phase"]
        elif topic.startswith(b"log."):
            lines = [ln for ln in ev.get("lines", []) if ln.strip()]
            if lines:
                self.last_line[ev["job"]] = lines[-1]
                cur = self.current()
                if cur is not None and cur["id"] == ev["job"]:
                    self.log.extend(lines)

    def key(self, k: str) -> bool:
        """False to quit."""
        if k in ("q", "\x03"):
            return False
        if k in ("\x1b[A", "k"):
            self.selected -= 1
        elif k in ("\x1b[B", "j"):
            self.selected += 1
        elif k in ("\r", "\n", "l"):
            cur = self.current()
            if cur is not None:
                self.mode = "log"
                r = self.ctx.call("logs", job=str(cur["id"]), lines=200)
                self.log = deque(r["lines"], maxlen=500)
        elif k in ("\x1b", "h"):
            self.mode = "jobs"
        return True

    # --- drawing --------------------------------------------------------------------------
    def lines(self, width: int, height: int) -> list[str]:
        out = [f"fluxgymd top — {time.strftime('%H:%M:%S')} — ↑/↓ move, enter log, "
               f"esc back, q quit"[:width], ""]
        g = self.gpus.get("gpus") or []
        if g:
            out += [render.gpu_line(x)[:width] + "  " + ", ".join(
                f"{j['id']} {j['name']}" for j in x.get("jobs", [])) for x in g]
        else:
            out.append(f"GPUs: no figures: {self.gpus.get('why', '')}"[:width])
        out.append("")
        if self.mode == "log":
            cur = self.current()
            out.append(f"log of job {cur['id']} ({cur['name']}):" if cur else "no job")
            room = max(1, height - len(out))
            out += [ln[:width] for ln in list(self.log)[-room:]]
            return out[:height]
        out.append(f"{'ID':>4} {'NAME':<20} {'STATE':<11} {'PROGRESS':<24} {'STEP':>11} "
                   f"{'LOSS':>8}  {'LOSS TREND':<16} {'ETA':>7}"[:width])
        jobs = self.ordered()
        cur = self.current()
        for i, j in enumerate(jobs[:max(0, height - len(out) - 3)]):
            pct = j.get("progress")
            phase = j.get("phase") if j["state"] == "running" else None
            prog = (phase or "") if phase in ("loading", "caching", "sampling", "saving") else \
                f"{bar(pct, 16)} {'' if pct is None else f'{pct * 100:3.0f}%'}"
            step = f"{j.get('step') if j.get('step') is not None else '-'}/" \
                   f"{j.get('total_steps') or '-'}"
            loss = "-" if j.get("loss") is None else f"{j['loss']:.4f}"
            line = (f"{j['id']:>4} {j['name'][:20]:<20} {j['state']:<11} {prog:<24} {step:>11} "
                    f"{loss:>8}  {sparkline(list(self.losses.get(j['id'], [])), 16):<16} "
                    f"{render.duration(j.get('eta_s')):>7}")
            mark = "▶" if cur is not None and j["id"] == cur["id"] else " "
            out.append((mark + line)[:width])
        if cur is not None:
            why = cur.get("waiting") or cur.get("reason") or ""
            out += ["", f"job {cur['id']} ({cur['name']}): {why}"[:width],
                    ("  " + self.last_line.get(cur["id"], ""))[:width]]
        return out[:height]


def snapshot(view: View) -> None:
    for line in view.lines(shutil.get_terminal_size((120, 40)).columns, 1000):
        click.echo(line.rstrip())


@click.command(short_help="A live full-terminal view: jobs, loss trend, GPUs, logs.")
@click.option("--once", is_flag=True, help="Print one snapshot and exit (also when not on a "
              "terminal).")
@command
def top(ctx: Ctx, once: bool) -> None:
    """Jobs with progress bars and a loss sparkline, the GPUs, and the selected job's newest
    log line, redrawn as the daemon's events arrive. Keys: ↑/↓ (k/j) move, enter (l) opens
    the selected job's log, esc (h) goes back, q quits."""
    view = View(ctx)
    sub = ctx.client.subscribe()  # before the first read: nothing falls between them
    try:
        view.load()
        if once or not (sys.stdin.isatty() and sys.stdout.isatty()):
            snapshot(view)
            return
        _interactive(view, sub)
    finally:
        sub.close()


def _interactive(view: View, sub) -> None:
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    out = sys.stdout
    out.write("\x1b[?1049h\x1b[?25l")  # the alternate screen, no cursor
    try:
        tty.setcbreak(fd)
        dirty, next_gpu = True, time.monotonic() + GPU_EVERY_S
        while True:
            if dirty:
                size = shutil.get_terminal_size((120, 40))
                text = "\n".join(line.ljust(size.columns)[:size.columns]
                                 for line in view.lines(size.columns, size.lines))
                out.write("\x1b[H\x1b[2J" + text)
                out.flush()
                dirty = False
            wait = max(0.0, next_gpu - time.monotonic())
            # the events socket's FD is edge-triggered: wake on it, then drain every message
            ready, _, _ = select.select([fd, sub.sock.getsockopt(zmq.FD)], [], [], wait)
            if fd in ready:
                key = os.read(fd, 16).decode("utf-8", "replace")
                if not view.key(key):
                    return
                dirty = True
            while sub.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                topic, payload = sub.sock.recv_multipart()
                view.on_event(topic, json.loads(payload))
                dirty = True
            if time.monotonic() >= next_gpu:
                view.read_gpus()
                next_gpu = time.monotonic() + GPU_EVERY_S
                dirty = True
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        out.write("\x1b[?25h\x1b[?1049l")
        out.flush()
