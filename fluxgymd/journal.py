"""journald's native protocol: the daemon's own log, and every job's output lines with
JOB_ID, JOB_NAME and JOB_ATTEMPT fields, so `journalctl -u fluxgymd JOB_ID=7` shows one job.

One datagram per entry to /run/systemd/journal/socket, `KEY=value` lines (the length-prefixed
form for values with newlines). Never blocks: a full socket drops the entry. Progress-bar
redraws are thinned so journald's rate limit keeps the lines that matter.
"""
from __future__ import annotations

import logging
import os
import socket
import struct
import time

from .progress import parse_tqdm

DEFAULT_SOCKET = "/run/systemd/journal/socket"
MAX_MESSAGE = 48 * 1024  # keep a datagram well under the socket's limit
BAR_INTERVAL_S = 10.0  # at most one progress-bar line per job this often (and the last one)

# syslog priorities
ERR, WARNING, INFO, DEBUG = 3, 4, 6, 7
_LEVELS = {logging.CRITICAL: 2, logging.ERROR: ERR, logging.WARNING: WARNING,
           logging.INFO: INFO, logging.DEBUG: DEBUG}


def encode(fields: dict[str, object]) -> bytes:
    out = bytearray()
    for key, value in fields.items():
        data = str(value).encode("utf-8", "replace")
        if b"\n" in data:
            out += key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


class Journal:
    def __init__(self, path: str = DEFAULT_SOCKET, identifier: str = "fluxgymd"):
        self.path = path
        self.identifier = identifier
        self.dropped = 0
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setblocking(False)

    def send(self, message: str, priority: int = INFO, **fields: object) -> None:
        entry = {"MESSAGE": message[:MAX_MESSAGE], "PRIORITY": priority,
                 "SYSLOG_IDENTIFIER": self.identifier}
        entry.update({k: v for k, v in fields.items() if v is not None})
        try:
            self.sock.sendto(encode(entry), self.path)
        except OSError:
            self.dropped += 1  # journald busy or gone: never hold up a job for it

    def close(self) -> None:
        self.sock.close()


def wanted(mode: str, path: str, env: dict[str, str] | None = None) -> bool:
    """journal = "on" | "off" | "auto" (on when systemd started us and the socket is there)."""
    env = os.environ if env is None else env
    if mode == "off":
        return False
    if mode == "on":
        return True
    return bool(env.get("JOURNAL_STREAM") or env.get("INVOCATION_ID")) and os.path.exists(path)


class JournalHandler(logging.Handler):
    """The daemon's own log records, as journal entries."""

    def __init__(self, journal: Journal):
        super().__init__()
        self.journal = journal

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            self.journal.send(message, _LEVELS.get(record.levelno, INFO),
                              CODE_FILE=record.pathname, CODE_LINE=record.lineno,
                              CODE_FUNC=record.funcName, LOGGER=record.name,
                              JOB_ID=getattr(record, "job_id", None),
                              JOB_NAME=getattr(record, "job_name", None))
        except Exception:
            self.handleError(record)


class JobLines:
    """Output lines of one job attempt to the journal: stderr as warnings, tracebacks as
    errors, progress bars thinned to one per BAR_INTERVAL_S (plus the finishing one)."""

    def __init__(self, journal: Journal, job_id: int, name: str, attempt: int,
                 clock=time.monotonic):
        self.journal = journal
        self.fields = {"JOB_ID": job_id, "JOB_NAME": name, "JOB_ATTEMPT": attempt}
        self.clock = clock
        self.last_bar = -1e18
        self.in_traceback = {"stdout": False, "stderr": False}

    def lines(self, lines: list[str], stream: str) -> None:
        for line in lines:
            priority = WARNING if stream == "stderr" else INFO
            if line.startswith("Traceback (most recent call last):"):
                self.in_traceback[stream] = True
            if self.in_traceback[stream]:
                priority = ERR
                if line and not line[0].isspace() and not line.startswith("Traceback"):
                    self.in_traceback[stream] = False  # the exception line ends it
            elif "/" in line and "[" in line:
                bar = parse_tqdm(line)
                if bar is not None:
                    now = self.clock()
                    if now - self.last_bar < BAR_INTERVAL_S and bar["step"] != bar["total"]:
                        continue
                    self.last_bar = now
            self.journal.send(line, priority, STREAM=stream, **self.fields)
