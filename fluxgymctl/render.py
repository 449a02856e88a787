"""One place that renders the same rows as a table (rich on a terminal, plain aligned
text in a pipe) or as JSON. rich is imported only when a terminal will see its output: it
costs more start-up time than the whole request does.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable, Sequence

Column = tuple[str, str, Callable[[dict[str, Any]], str]]  # (key, header, formatter)

STATE_STYLE = {
    "queued": "cyan", "starting": "blue", "running": "green", "stalled": "yellow",
    "recovering": "yellow", "succeeded": "bold green", "failed": "bold red",
    "cancelled": "magenta", "interrupted": "yellow",
}


def is_tty() -> bool:
    return sys.stdout.isatty()


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def table(rows: Sequence[dict[str, Any]], columns: Sequence[Column], title: str = "") -> None:
    cells = [[fmt(r) for _, _, fmt in columns] for r in rows]
    if is_tty():
        from rich import box
        from rich.console import Console
        from rich.table import Table

        console = Console()
        t = Table(title=title or None, header_style="bold", box=box.SIMPLE_HEAD,
                  pad_edge=False, collapse_padding=True)
        keys = [key for key, _, _ in columns]
        widths = [max([len(header)] + [len(row[i]) for row in cells])
                  for i, (_, header, _) in enumerate(columns)]
        # Numbers and states keep their full width; free text (names, reasons) gives way
        # and is cut with an ellipsis (rich alone would drop whole columns instead).
        widths = fit(widths, keys, console.width - 2)  # the box keeps a space at each edge
        for (key, header, _), width in zip(columns, widths):
            t.add_column(header, justify="right" if key in _RIGHT else "left",
                         no_wrap=True, overflow="ellipsis", width=width)
        for r, row_cells in zip(rows, cells):
            styled = [
                f"[{STATE_STYLE.get(c, '')}]{c}[/]" if key == "state" and c in STATE_STYLE
                else _escape(c)
                for (key, _, _), c in zip(columns, row_cells)
            ]
            t.add_row(*styled)
        console.print(t)
        return
    headers = [h for _, h, _ in columns]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]
    columns_env = os.environ.get("COLUMNS", "")
    if columns_env.isdigit() and int(columns_env):  # a pipe has no width, unless asked for
        widths = fit(widths, [key for key, _, _ in columns], int(columns_env))
    cells = [[clip(c, w) for c, w in zip(row, widths)] for row in cells]
    out = [_line(headers, widths, columns)]
    out += [_line(row, widths, columns) for row in cells]
    sys.stdout.write("\n".join(out) + "\n")


_RIGHT = {"id", "step", "loss", "elapsed_s", "eta_s", "attempts", "progress"}
# Columns that give way, in this order, when a row is wider than the terminal; the others
# (ID, STATE, PROGRESS, ...) always show in full.
_FREE_TEXT = {"reason": 6, "name": 7}


def fit(widths: list[int], keys: list[str], columns: int) -> list[int]:
    widths = list(widths)
    over = sum(widths) + 2 * (len(widths) - 1) - columns
    for key, least in _FREE_TEXT.items():
        if over <= 0:
            break
        if key in keys:
            i = keys.index(key)
            give = min(over, max(0, widths[i] - least))
            widths[i] -= give
            over -= give
    return widths


def clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[:max(0, width - 1)] + "…"


def _line(values: Sequence[str], widths: Sequence[int], columns: Sequence[Column]) -> str:
    parts = [v.rjust(w) if c[0] in _RIGHT else v.ljust(w)
             for v, w, c in zip(values, widths, columns)]
    return "  ".join(parts).rstrip()


def _escape(text: str) -> str:
    return text.replace("[", r"\[")


def pairs(items: Sequence[tuple[str, str]]) -> None:
    width = max((len(k) for k, _ in items), default=0)
    sys.stdout.write("\n".join(f"{k.ljust(width)}  {v}" for k, v in items) + "\n")


# --- value formatting ---------------------------------------------------------------------
def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def memory_plan(plan: dict[str, Any] | None) -> str:
    """`tier 12G, planned peak 8.1 GiB (of 10.0 GiB free): base weights 5.8, ...`"""
    if not plan:
        return "-"
    gib = 1 << 30
    text = f"tier {plan['tier']}"
    if plan.get("peak_bytes") is not None:
        text += f", planned peak {plan['peak_bytes'] / gib:.1f} GiB"
        if plan.get("free_bytes") is not None:
            text += f" (of {plan['free_bytes'] / gib:.1f} GiB free)"
    parts = plan.get("parts") or {}
    if parts:
        text += ": " + ", ".join(f"{k.replace('_', ' ')} {v / gib:.2f}" for k, v in parts.items())
    if plan.get("why"):
        text += f"; {plan['why']}"
    return text


def percent(fraction: float | None) -> str:
    return f"{fraction * 100:.0f}%" if fraction is not None else "-"


def progress(job: dict[str, Any]) -> str:
    """The percentage, or while a job loads, caches, samples or saves, that phase."""
    if job.get("phase") and job.get("phase") not in ("training", "downloading") and \
            job["state"] in ("starting", "running"):
        return job["phase"]
    return percent(job.get("progress"))


def number(v: float | None, digits: int = 4) -> str:
    return f"{v:.{digits}g}" if v is not None else "-"


def steps(job: dict[str, Any]) -> str:
    if job.get("step") is None:
        return "-"
    if job.get("kind") == "download":  # its steps are bytes
        return f"{size(job['step'])}/{size(job['total_steps'])}" if job.get("total_steps") \
            else size(job["step"])
    return f"{job['step']}/{job['total_steps']}" if job.get("total_steps") else str(job["step"])


def size(n: float | None) -> str:
    """Bytes as people read them: 7.9 GB, 340 MB, 12 kB."""
    if n is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def status_reason(j: dict) -> str:
    """The status table's REASON: why it is not running as it should, if it is not; a job
    waiting in Slurm's queue says why Slurm keeps it waiting."""
    if j["state"] == "queued" and j.get("waiting"):
        return j["waiting"][:60]
    if j["state"] in ("running", "queued"):
        return ""
    if j["state"] == "starting" and j.get("executor") == "slurm" and j.get("external_state"):
        return f"Slurm: {j['external_state']}"[:60]
    return j["reason"][:60]


def executor(j: dict) -> str:
    """Where the job's attempts run: this machine, or which Slurm job and node."""
    if j.get("executor", "local") == "local":
        return "local"
    if not j.get("external_id"):
        return "slurm (not submitted yet)"
    where = f" on {j['node']}" if j.get("node") else ""
    state = f", {j['external_state']}" if j.get("external_state") else ""
    return f"slurm: job {j['external_id']}{where}{state}"


# --- GPUs --------------------------------------------------------------------------------
def gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.1f}"


def placed_on(j: dict[str, Any]) -> str:
    """The status table's GPU: the indices of the GPUs the job runs on now."""
    p = j.get("placement") or {}
    if not p.get("active"):
        return "-"
    return ",".join(str(i) for i in p.get("indices") or []) or "-"


def placement(j: dict[str, Any]) -> str:
    """`show`'s GPUs placed: `GPU 2 (card2), 20.0 GiB planned (tier 24G)...`"""
    p = j.get("placement") or {}
    if not p.get("gpus"):
        return "-" if not j.get("waiting") else j["waiting"]
    where = ", ".join(f"GPU {i}" + (f" ({n})" if n else "")
                      for i, n in zip(p.get("indices") or [], p.get("names") or []))
    what = "each GPU to itself" if p.get("bytes") is None else \
        f"{gib(p['bytes'])} GiB planned" + (" per GPU" if len(p["gpus"]) > 1 else "")
    more = [f"tier {p['tier']} for {gib(p['room'])} GiB of room" if p.get("tier") else "",
            "shared with other jobs" if p.get("shared") else "",
            "on a GPU of its own after an out-of-memory failure" if p.get("alone") else ""]
    now = "" if p.get("active") else " (last attempt)"
    return f"{where}: {what}" + "".join(f"; {m}" for m in more if m) + now


def gpu_line(g: dict[str, Any]) -> str:
    """`GPU 0 NVIDIA H200: 97% busy, 61.2/139.8 GiB, 64°C, 512/700 W`"""
    parts = []
    if g.get("utilization") is not None:
        parts.append(f"{g['utilization']:.0f}% busy")
    if g.get("memory_total"):
        parts.append(f"{gib(g.get('memory_used'))}/{gib(g['memory_total'])} GiB")
    if g.get("temperature") is not None:
        parts.append(f"{g['temperature']:.0f}°C")
    if g.get("power_w") is not None:
        limit = f"/{g['power_limit_w']:.0f}" if g.get("power_limit_w") else ""
        parts.append(f"{g['power_w']:.0f}{limit} W")
    name = f" {g['name']}" if g.get("name") else ""
    return f"GPU {g['index']}{name}: " + (", ".join(parts) or "no figures")
