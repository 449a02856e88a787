"""Alerts and hooks: what the daemon tells the outside world when a job stalls, recovers,
fails or succeeds, when the queue drains and when it has been idle a while.

- Webhooks ([notify]): a generic JSON body, or the shapes Discord, Slack and ntfy accept.
  Deliveries wait in a bounded queue and are sent by one task with retries and backoff, so a
  slow or dead endpoint never holds the daemon's loop. The URL and token are secrets: read
  from the config, a file or the environment (never from a job file), and never logged.
- Hooks ([hooks]): a shell command per event with the job's facts in its environment, run
  with a timeout, its output to the journal. A hook's failure changes no job.

The daemon calls `on_state` after every transition and `on_queue` with how many jobs are
queued or running; nothing here touches the store.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger("fluxgymd")

EVENTS = ("stalled", "recovering", "failed", "succeeded", "cancelled", "drained")
FORMATS = ("json", "discord", "slack", "ntfy")
QUEUE_MAX = 100  # undelivered alerts kept; the oldest is dropped (and counted) past this
HOOK_OUTPUT_MAX = 64 * 1024


@dataclass
class NotifyConfig:
    url: str = ""
    format: str = "json"
    events: tuple[str, ...] = ("stalled", "failed", "succeeded", "drained")
    token: str = ""
    timeout_s: float = 10.0
    retries: int = 5
    backoff_s: float = 2.0


@dataclass
class HooksConfig:
    commands: dict[str, str] = field(default_factory=dict)  # event (or "idle") -> command
    timeout_s: float = 60.0
    idle_after_s: float = 600.0


def parse_events(text: str) -> tuple[str, ...]:
    names = tuple(e.strip() for e in text.split(",") if e.strip())
    bad = [e for e in names if e not in EVENTS]
    if bad:
        raise ValueError(f"unknown event(s) {', '.join(bad)}; events are: {', '.join(EVENTS)}")
    return names


def read_secret(value: str, path: str, what: str) -> str:
    """A secret from the config value or, when `path` is set, the file's first line."""
    if not path:
        return value.strip()
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as fh:
            return fh.readline().strip()
    except OSError as e:
        raise ValueError(f"{what}: cannot read {path}: {e.strerror or e}") from None


def _facts(job: dict[str, Any], event: str) -> dict[str, Any]:
    return {"id": job.get("id"), "name": job.get("name"), "state": job.get("state"),
            "reason": job.get("reason") or "", "lora": job.get("lora") or "",
            "output_dir": job.get("output_dir") or "", "step": job.get("step"),
            "total_steps": job.get("total_steps"), "attempts": job.get("attempts"),
            "event": event}


def text_of(event: str, job: dict[str, Any] | None, host: str) -> str:
    if job is None:
        return {"drained": f"fluxgymd@{host}: the queue is empty, every job has ended",
                "test": f"fluxgymd@{host}: a test alert (fluxgymctl notify test)"}.get(
                    event, f"fluxgymd@{host}: {event}")
    step = f" at step {job['step']}/{job['total_steps']}" if job.get("step") is not None \
        and job.get("total_steps") else ""
    reason = f": {job['reason']}" if job.get("reason") else ""
    lora = f" LoRA: {job['lora']}" if event == "succeeded" and job.get("lora") else ""
    return f"fluxgymd@{host}: job {job['id']} ({job['name']}) {event}{step}{reason}.{lora}"


def body(fmt: str, event: str, job: dict[str, Any] | None, host: str,
         when: float) -> tuple[bytes, dict[str, str]]:
    """(body, extra headers) in the shape the receiving service accepts."""
    text = text_of(event, job, host)
    if fmt == "discord":
        return json.dumps({"content": text[:2000], "username": "fluxgymd"}).encode(), \
            {"Content-Type": "application/json"}
    if fmt == "slack":
        return json.dumps({"text": text}).encode(), {"Content-Type": "application/json"}
    if fmt == "ntfy":
        tags = {"failed": "x", "stalled": "warning", "recovering": "repeat",
                "succeeded": "white_check_mark", "drained": "checkered_flag"}.get(event, "bell")
        prio = {"failed": "high", "stalled": "high"}.get(event, "default")
        return text.encode(), {"Title": f"fluxgymd: {event}", "Tags": tags, "Priority": prio,
                               "Content-Type": "text/plain; charset=utf-8"}
    doc = {"event": event, "host": host, "time": when, "text": text,
           "job": _facts(job, event) if job is not None else None}
    return json.dumps(doc).encode(), {"Content-Type": "application/json"}


@dataclass
class Delivery:
    event: str
    job: dict[str, Any] | None
    when: float
    done: asyncio.Future | None = None  # set by `notify test`, to wait for the outcome


class Webhook:
    def __init__(self, cfg: NotifyConfig, host: str | None = None):
        self.cfg = cfg
        self.host = host or socket.gethostname()
        self.queue: deque[Delivery] = deque()
        self.wake = asyncio.Event()
        self.sent = self.failed = self.dropped = 0
        self.last_error = ""
        self.last_error_at: float | None = None
        self.last_sent_at: float | None = None
        self._task: asyncio.Task | None = None
        # where it goes, for logs and `ping`: never the path or query, which hold the secret
        parts = urlsplit(cfg.url)
        self.where = f"{cfg.format} webhook to {parts.scheme}://{parts.hostname or '?'}"

    @property
    def enabled(self) -> bool:
        return bool(self.cfg.url)

    def start(self) -> None:
        if self.enabled and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._deliver_loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass

    def submit(self, event: str, job: dict[str, Any] | None, wait: bool = False):
        if not self.enabled:
            return None
        fut = asyncio.get_running_loop().create_future() if wait else None
        if len(self.queue) >= QUEUE_MAX:
            self.queue.popleft()
            self.dropped += 1
        self.queue.append(Delivery(event, job, time.time(), fut))
        self.wake.set()
        return fut

    def status(self) -> dict[str, Any]:
        return {"configured": self.enabled, "target": self.where if self.enabled else "",
                "events": list(self.cfg.events), "sent": self.sent, "failed": self.failed,
                "dropped": self.dropped, "pending": len(self.queue),
                "last_error": self.last_error, "last_error_at": self.last_error_at,
                "last_sent_at": self.last_sent_at}

    async def _deliver_loop(self) -> None:
        import aiohttp  # the daemon's only HTTP client; imported when alerts are on
        headers = {"User-Agent": "fluxgymd"}
        if self.cfg.token:
            headers["Authorization"] = f"Bearer {self.cfg.token}"
        timeout = aiohttp.ClientTimeout(total=self.cfg.timeout_s)
        async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session:
            while True:
                if not self.queue:
                    self.wake.clear()
                    await self.wake.wait()
                    continue
                d = self.queue.popleft()
                ok, error = await self._send(session, d)
                if ok:
                    self.sent += 1
                    self.last_sent_at = time.time()
                else:
                    self.failed += 1
                    self.last_error, self.last_error_at = error, time.time()
                    log.warning("alert %s for %s not delivered (%s): %s", d.event,
                                f"job {d.job['id']}" if d.job else "the daemon", self.where,
                                error)
                if d.done is not None and not d.done.done():
                    d.done.set_result({"ok": ok, "error": error, "target": self.where})

    async def _send(self, session, d: Delivery) -> tuple[bool, str]:
        import aiohttp
        data, extra = body(self.cfg.format, d.event, d.job, self.host, d.when)
        error = ""
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                await asyncio.sleep(min(self.cfg.backoff_s * 2 ** (attempt - 1), 300.0))
            try:
                async with session.post(self.cfg.url, data=data, headers=extra) as r:
                    if r.status < 300:
                        return True, ""
                    error = f"HTTP {r.status}"
                    if r.status < 500 and r.status != 429:
                        return False, error + " (not retried)"
            except asyncio.CancelledError:
                raise
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                # the exception text may carry the URL: name only its kind
                error = type(e).__name__
        return False, f"{error} after {self.cfg.retries + 1} tries"


class Hooks:
    def __init__(self, cfg: HooksConfig):
        self.cfg = cfg
        self.ran = self.failed = 0
        self.last_error = ""
        self._tasks: set[asyncio.Task] = set()

    @property
    def enabled(self) -> bool:
        return any(self.cfg.commands.values())

    def fire(self, event: str, job: dict[str, Any] | None) -> None:
        cmd = self.cfg.commands.get(event)
        if not cmd:
            return
        env = dict(os.environ, FLUXGYM_EVENT=event)
        if job is not None:
            for key, value in _facts(job, event).items():
                if key != "event":
                    env[f"FLUXGYM_JOB_{key.upper()}"] = "" if value is None else str(value)
        task = asyncio.get_running_loop().create_task(self._run(event, cmd, env, job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, event: str, cmd: str, env: dict[str, str],
                   job: dict[str, Any] | None) -> None:
        extra = {"job_id": job["id"], "job_name": job["name"]} if job else {}
        what = f"hook on_{event}" + (f" for job {job['id']} ({job['name']})" if job else "")
        try:
            proc = await asyncio.create_subprocess_exec(
                "/bin/sh", "-c", cmd, env=env, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                start_new_session=True)
        except OSError as e:
            self.failed += 1
            self.last_error = f"{what}: cannot start: {e}"
            log.warning("%s", self.last_error, extra=extra)
            return
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), self.cfg.timeout_s)
            code = proc.returncode
        except asyncio.TimeoutError:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
            out, _ = await proc.communicate()
            code = None
        except asyncio.CancelledError:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
            raise
        for line in out[:HOOK_OUTPUT_MAX].decode("utf-8", "replace").splitlines():
            log.info("%s: %s", what, line, extra=extra)
        self.ran += 1
        if code == 0:
            log.info("%s: done", what, extra=extra)
            return
        self.failed += 1
        self.last_error = f"{what}: " + (f"killed after {self.cfg.timeout_s:g}s (timeout_s)"
                                         if code is None else f"exit {code}")
        log.warning("%s (no job is changed by a hook)", self.last_error, extra=extra)

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass

    def status(self) -> dict[str, Any]:
        return {"configured": sorted(k for k, v in self.cfg.commands.items() if v),
                "ran": self.ran, "failed": self.failed, "last_error": self.last_error,
                "running": len(self._tasks)}


class Alerts:
    """What the daemon calls: `on_state` per transition, `on_queue` as the queue changes."""
    STATES = {"stalled": "stalled", "recovering": "recovering", "failed": "failed",
              "succeeded": "succeeded", "cancelled": "cancelled"}

    def __init__(self, notify: NotifyConfig, hooks: HooksConfig):
        self.webhook = Webhook(notify)
        self.hooks = Hooks(hooks)
        self.busy: bool | None = None  # None until the first report
        self._idle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self.webhook.start()

    async def close(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
        await self.webhook.close()
        await self.hooks.close()

    def on_state(self, job: dict[str, Any]) -> None:
        event = self.STATES.get(job["state"])
        if event is None:
            return
        if event in self.webhook.cfg.events:
            self.webhook.submit(event, job)
        self.hooks.fire(event, job)

    def on_queue(self, active: int) -> None:
        """active: jobs queued, starting, running, stalled or recovering."""
        busy = active > 0
        if busy == self.busy:
            return
        was, self.busy = self.busy, busy
        if busy:
            if self._idle is not None:
                self._idle.cancel()
                self._idle = None
            return
        if was:  # work has just ended (not: the daemon started with nothing to do)
            if "drained" in self.webhook.cfg.events:
                self.webhook.submit("drained", None)
            self.hooks.fire("drained", None)
        if self.hooks.cfg.commands.get("idle"):
            self._idle = asyncio.get_running_loop().call_later(
                self.hooks.cfg.idle_after_s, self._on_idle)

    def _on_idle(self) -> None:
        self._idle = None
        log.info("idle for %gs: running hook on_idle", self.hooks.cfg.idle_after_s)
        self.hooks.fire("idle", None)

    def status(self) -> dict[str, Any]:
        return {"webhook": self.webhook.status(), "hooks": self.hooks.status()}
