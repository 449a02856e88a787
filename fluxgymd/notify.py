"""sd_notify: tell systemd we are ready, what we are doing, and that we are stopping.

A no-op without NOTIFY_SOCKET (the foreground and containers), so callers never check.
"""
from __future__ import annotations

import os
import time

import sdnotify


class Notifier:
    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._n = sdnotify.SystemdNotifier() if self.enabled else None
        self._last_status = ""

    def send(self, **fields: str | int) -> None:
        if self._n is not None:
            self._n.notify("\n".join(f"{k.upper()}={v}" for k, v in fields.items()))

    def ready(self, status: str) -> None:
        self._last_status = status
        self.send(ready=1, status=status)

    def status(self, status: str) -> None:
        if status != self._last_status:  # one datagram per change, not per tick
            self._last_status = status
            self.send(status=status)

    def reloading(self) -> None:
        # systemd 253+ wants the monotonic time with it (Type=notify-reload)
        self.send(reloading=1, status="reloading the config",
                  monotonic_usec=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def stopping(self, status: str = "stopping") -> None:
        self.send(stopping=1, status=status)

    def watchdog_interval(self) -> float | None:
        """Half of systemd's WatchdogSec, when it watches this very process; else None."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not self.enabled or not usec or (pid and pid != str(os.getpid())):
            return None
        try:
            return int(usec) / 2 / 1_000_000
        except ValueError:
            return None

    def ping(self) -> None:
        self.send(watchdog=1)

    def extend_timeout(self, seconds: float) -> None:
        self.send(extend_timeout_usec=int(seconds * 1_000_000))


def summary(counts: dict[str, int]) -> str:
    """'1 running, 3 queued' from state counts; 'idle' when nothing is active."""
    order = ["running", "starting", "stalled", "recovering", "queued", "interrupted"]
    parts = [f"{counts[s]} {s}" for s in order if counts.get(s)]
    return ", ".join(parts) if parts else "idle"
