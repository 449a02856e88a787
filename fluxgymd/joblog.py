"""A job's output: split into lines, written to outputs/<job>/train.log with size-capped
rotation, and kept in a numbered in-memory ring for `logs` and `logs -f`.

Lines are split on \\n, \\r\\n and a bare \\r, so each redraw of a tqdm bar is its own line
instead of being glued to the next one or lost.
"""
from __future__ import annotations

import collections
import logging
import os
import time
from pathlib import Path

log = logging.getLogger("fluxgymd.joblog")
LOG_NAME = "train.log"
MAX_LINE_BYTES = 64 * 1024


class LineSplitter:
    """Feed it byte chunks as they come off a pipe; get back complete lines."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, chunk: bytes) -> list[str]:
        data = self._buf + chunk
        end = len(data) - 1 if data.endswith(b"\r") else len(data)  # maybe half of \r\n
        cut = max(data.rfind(b"\n", 0, end), data.rfind(b"\r", 0, end))
        if cut < 0:
            self._buf = data
            return self._cut_runaway()
        head, self._buf = data[:cut], data[cut + 1:]
        bare_cr_last = data[cut] == 0x0D
        if not bare_cr_last and head.endswith(b"\r"):
            head = head[:-1]  # \r\n is one line end
        # Decoding the whole batch at once (line ends are ASCII, never inside a character)
        # keeps a chatty child from costing a Python call per line.
        text = head.decode("utf-8", "replace")
        if "\r" not in text:
            lines = text.split("\n")
        else:
            lines = []
            for segment in text.replace("\r\n", "\n").split("\n"):
                pieces = segment.split("\r")
                # a piece ended by a bare \r with nothing in it (tqdm's "\n\r") is noise
                lines.extend(p for p in pieces[:-1] if p)
                lines.append(pieces[-1])
        if bare_cr_last and not lines[-1]:
            lines.pop()
        return lines + self._cut_runaway()

    def _cut_runaway(self) -> list[str]:
        lines = []
        while len(self._buf) > MAX_LINE_BYTES:  # a runaway line without an end
            lines.append(self._buf[:MAX_LINE_BYTES].decode("utf-8", "replace"))
            self._buf = self._buf[MAX_LINE_BYTES:]
        return lines

    @property
    def held_bytes(self) -> int:
        """Bytes fed but not yet returned as lines (a reader that resumes from an offset
        starts this much before its end)."""
        return len(self._buf)

    @property
    def pending(self) -> str:
        """The unfinished last line: a progress bar being redrawn waits here for its \\r."""
        return self._buf.rstrip(b"\r").decode("utf-8", "replace")

    def close(self) -> list[str]:
        rest, self._buf = self._buf, b""
        rest = rest.rstrip(b"\r")
        return [rest.decode("utf-8", "replace")] if rest else []


def log_files(job_dir: Path, backups: int) -> list[Path]:
    """train.log first, then train.log.1 (older) ... that exist."""
    files = [job_dir / LOG_NAME] + [job_dir / f"{LOG_NAME}.{i}" for i in range(1, backups + 1)]
    return [p for p in files if p.exists()]


class JobLog:
    """The writer for one job's log plus the numbered ring of its recent lines."""

    def __init__(self, job_dir: Path, max_bytes: int, backups: int, memory_lines: int):
        self.dir = job_dir
        self.path = job_dir / LOG_NAME
        self.max_bytes = max_bytes
        self.backups = backups
        self.ring: collections.deque[tuple[int, str]] = collections.deque(maxlen=memory_lines)
        # when each ring line arrived (epoch seconds), for `logs -t`
        self.times: collections.deque[float] = collections.deque(maxlen=memory_lines)
        # number of the last line written: a job's lines are numbered as they stand in
        # train.log (rotated copies included), so the numbers go on across daemon restarts
        self.seq = count_lines(job_dir, backups)
        self._fh = None
        self._size = 0
        self.error: str | None = None  # why the last write to disk failed, if it did

    def _open(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "ab")
        self._size = self._fh.tell()

    def write(self, lines: list[str]) -> int:
        """Append lines; returns the sequence number of the first one."""
        first = self.seq + 1
        if not lines:
            return first
        data = ("\n".join(lines) + "\n").encode("utf-8", "replace")
        try:
            if self._fh is None:
                self._open()
            if self._size and self._size + len(data) > self.max_bytes:
                self._rotate()
            self._fh.write(data)
            self._fh.flush()
            self._size += len(data)
        except OSError as e:
            # A full disk must not stop the job or the daemon: the lines still reach the
            # ring and the events socket; the file catches up once writing works again.
            if self.error is None:
                log.warning("cannot write %s: %s; keeping its lines in memory only",
                            self.path, e.strerror or e)
            self.error = e.strerror or str(e)
            self._drop_handle()
        else:
            if self.error is not None:
                log.info("writing %s again", self.path)
                self.error = None
        self.ring.extend(zip(range(first, first + len(lines)), lines))
        self.times.extend([time.time()] * len(lines))
        self.seq += len(lines)
        return first

    def _rotate(self) -> None:
        self._fh.close()
        if self.backups == 0:
            self.path.unlink(missing_ok=True)
        else:
            for i in range(self.backups - 1, 0, -1):
                older = self.dir / f"{LOG_NAME}.{i}"
                if older.exists():
                    os.replace(older, self.dir / f"{LOG_NAME}.{i + 1}")
            os.replace(self.path, self.dir / f"{LOG_NAME}.1")
        self._open()

    def since(self, after: int, limit: int) -> tuple[list[tuple[int, str]], bool]:
        """Lines numbered above `after` (at most `limit`, the oldest first) and whether
        some were already gone from the ring."""
        if not self.ring:
            return [], after < self.seq  # numbered lines from before this daemon's start
        oldest = self.ring[0][0]
        out = [item for item in self.ring if item[0] > after][:limit]
        return out, after + 1 < oldest

    def time_of(self, seq: int) -> float | None:
        """When line `seq` arrived, while it is in the ring."""
        if not self.ring:
            return None
        i = seq - self.ring[0][0]
        return self.times[i] if 0 <= i < len(self.times) else None

    def tail(self, n: int) -> list[tuple[int, str]]:
        return list(self.ring)[-n:] if n > 0 else []

    def _drop_handle(self) -> None:
        fh, self._fh = self._fh, None
        if fh is not None:
            try:
                fh.close()
            except OSError:
                pass

    def close(self) -> None:
        self._drop_handle()


def count_lines(job_dir: Path, backups: int) -> int:
    total = 0
    for path in log_files(job_dir, backups):
        try:
            with open(path, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    total += chunk.count(b"\n")
        except OSError:
            pass
    return total


def lines_after(job_dir: Path, after: int, limit: int, backups: int,
                total: int | None = None) -> tuple[int | None, list[str]]:
    """Lines numbered above `after` from the files (oldest first, at most `limit`): the
    first one's number and the lines. Used when the ring no longer holds them."""
    total = count_lines(job_dir, backups) if total is None else total
    want = total - after
    if want <= 0:
        return None, []
    lines = read_tail(job_dir, want, backups)
    first = total - len(lines) + 1
    return first, lines[:limit]


def read_tail(job_dir: Path, n: int, backups: int) -> list[str]:
    """The last n lines on disk, reading backwards through rotated files as needed."""
    if n <= 0:
        return []
    lines: list[str] = []
    for path in log_files(job_dir, backups):
        lines = _tail_file(path, n - len(lines)) + lines
        if len(lines) >= n:
            break
    return lines[-n:]


def _tail_file(path: Path, n: int, block: int = 65536) -> list[str]:
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        pos = fh.tell()
        data = b""
        while pos > 0 and data.count(b"\n") <= n:
            step = min(block, pos)
            pos -= step
            fh.seek(pos)
            data = fh.read(step) + data
    text = data.decode("utf-8", "replace")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines[-n:]
