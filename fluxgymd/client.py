"""The one client of fluxgymd's sockets, used by fluxgymctl and the tests.

A DEALER with LINGER 0 and a poll timeout: it never hangs on a daemon that is gone, and it
says how to start one. Imports zmq but nothing heavy.
"""
from __future__ import annotations

import errno
import itertools
import json
import os
import time
from typing import Any, Iterator

import zmq

# The C module, not `socket`: the wrapper costs the CLI a few ms of start-up for nothing.
import _socket  # noqa: E402

from .paths import default_runtime_dir
from .protocol import CONTROL_SOCKET, EVENTS_SOCKET, request

START_HINT = ("start it with `fluxgymd` (foreground) or `systemctl start fluxgymd`, or point "
              "fluxgymctl at it with --runtime-dir / FLUXGYM_RUNTIME_DIR")


class DaemonUnavailable(Exception):
    pass


class RemoteError(Exception):
    def __init__(self, code: str, message: str, details: Any = None):
        super().__init__(message)
        self.code, self.message, self.details = code, message, details


def find_runtime_dir(explicit: str | None = None, env: dict[str, str] | None = None) -> str:
    """--runtime-dir > FLUXGYM_RUNTIME_DIR > the first usual place with a control socket."""
    env = dict(os.environ if env is None else env)
    if explicit:
        return explicit
    if env.get("FLUXGYM_RUNTIME_DIR"):
        return env["FLUXGYM_RUNTIME_DIR"]
    candidates = []
    if env.get("XDG_RUNTIME_DIR"):
        candidates.append(os.path.join(env["XDG_RUNTIME_DIR"], "fluxgymd"))
    candidates += ["/run/fluxgymd", f"/tmp/fluxgymd-{os.getuid()}"]
    for c in candidates:
        if os.path.exists(os.path.join(c, CONTROL_SOCKET)):
            return c
    return default_runtime_dir(env)


class Client:
    def __init__(self, runtime_dir: str | os.PathLike | None = None, timeout: float = 10.0):
        self.runtime_dir = find_runtime_dir(os.fspath(runtime_dir) if runtime_dir else None)
        self.timeout = timeout
        self.path = os.path.join(self.runtime_dir, CONTROL_SOCKET)
        self._ctx = zmq.Context.instance()
        self._sock = None
        self._ids = itertools.count(1)

    def _unavailable(self, why: str) -> DaemonUnavailable:
        return DaemonUnavailable(f"fluxgymd is not running at {self.runtime_dir} ({why}); "
                                 f"{START_HINT}")

    def _check_listening(self) -> None:
        """Fail at once, not after the timeout, when nothing listens on the socket."""
        s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            s.connect(self.path)
        except FileNotFoundError:
            raise self._unavailable(f"no {self.path}") from None
        except ConnectionRefusedError:
            raise self._unavailable(f"{self.path} is left over from a daemon that exited") from None
        except OSError as e:
            if e.errno == errno.EACCES:
                raise DaemonUnavailable(
                    f"permission denied on {self.path}; run as the daemon's user or a member "
                    "of its group"
                ) from None
            raise self._unavailable(str(e)) from None
        finally:
            s.close()

    def _dealer(self):
        if self._sock is None:
            self._check_listening()
            s = self._ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(f"ipc://{self.path}")
            self._sock = s
        return self._sock

    def send_raw(self, frames: list[bytes], timeout: float | None = None) -> list[bytes]:
        """Send frames as they are (tests use this for malformed input); return the reply."""
        self._dealer().send_multipart(frames)
        return self._recv(timeout)

    def _recv(self, timeout: float | None) -> list[bytes]:
        sock = self._dealer()
        if not sock.poll(int((timeout or self.timeout) * 1000)):
            self.close()
            raise DaemonUnavailable(
                f"fluxgymd at {self.runtime_dir} did not answer within "
                f"{timeout or self.timeout:g}s; it may be overloaded or stuck "
                "(journalctl -u fluxgymd shows its log)"
            )
        return sock.recv_multipart()

    def call(self, op: str, timeout: float | None = None, **args: Any) -> Any:
        """The op's result. `timeout` (default: the client's) bounds how long the daemon may
        stay silent: it sends a heartbeat every second while an answer takes longer."""
        rid = str(next(self._ids))
        frames = self.send_raw([request(op, args, rid, heartbeat=True)], timeout)
        while True:
            reply = json.loads(frames[-1])
            if str(reply.get("id")) == rid and reply.get("working"):
                frames = self._recv(timeout)  # still at it: the silence starts again
                continue
            if str(reply.get("id")) == rid:
                break
            if reply.get("id") == "" and not reply.get("ok"):
                break  # a refusal before the id could be read: ours, one request at a time
            frames = self._recv(timeout)  # a late reply to an earlier, timed-out request
        if reply.get("ok"):
            return reply["result"]
        err = reply.get("error") or {}
        raise RemoteError(err.get("code", "internal"), err.get("message", "unknown error"),
                          err.get("details"))

    def subscribe(self, *topics: bytes) -> "Subscription":
        return Subscription(self._ctx, os.path.join(self.runtime_dir, EVENTS_SOCKET), topics)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Subscription:
    def __init__(self, ctx: zmq.Context, path: str, topics: tuple[bytes, ...]):
        self.sock = ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVHWM, 100000)
        for t in topics or (b"",):
            self.sock.setsockopt(zmq.SUBSCRIBE, t)
        self.sock.connect(f"ipc://{path}")

    def events(self, timeout: float) -> Iterator[tuple[bytes, dict[str, Any]]]:
        """Events that arrive within `timeout` seconds (all that are queued, then waits)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(int(left * 1000)):
                return
            topic, payload = self.sock.recv_multipart()
            yield topic, json.loads(payload)

    def close(self) -> None:
        self.sock.close(linger=0)
