"""The wire protocol shared by fluxgymd and its clients.

Requests and replies are single JSON objects (UTF-8) on the control socket:

    request  {"v": 1, "id": "<any string>", "op": "<op>", "args": {...}}
    reply    {"v": 1, "id": "<same>", "ok": true,  "result": {...}}
             {"v": 1, "id": "<same>", "ok": false, "error": {"code": "...", "message": "..."}}

Events on the events socket are two frames: a topic (b"state", b"progress", b"log.<job id>")
and a JSON object. Error codes are stable strings; clients branch on them, people read the
message. This module does no I/O and imports no zmq, so everything here is testable alone.
"""
from __future__ import annotations

import enum
import json
from typing import Any, NamedTuple

PROTOCOL_VERSION = 1
# Requests above this get a `too_large` reply. The socket's own hard limit (MAXMSGSIZE) is
# set higher so an oversized request still reaches us and can be answered, not dropped.
MAX_MESSAGE_BYTES = 1 << 20
SOCKET_MAX_MESSAGE_BYTES = 16 << 20

CONTROL_SOCKET = "control.sock"
EVENTS_SOCKET = "events.sock"
PROGRESS_SOCKET = "progress.sock"
# Linux sun_path is 108 bytes including the NUL.
MAX_IPC_PATH = 107


class ErrorCode(str, enum.Enum):
    BAD_FRAME = "bad_frame"  # wrong number of frames
    BAD_JSON = "bad_json"  # not UTF-8 JSON, or not an object
    TOO_LARGE = "too_large"
    UNSUPPORTED_VERSION = "unsupported_version"
    BAD_REQUEST = "bad_request"  # missing/ill-typed envelope fields
    UNKNOWN_OP = "unknown_op"
    BAD_ARGS = "bad_args"
    INVALID_JOB = "invalid_job"  # the job file has mistakes
    NOT_FOUND = "not_found"
    AMBIGUOUS = "ambiguous"
    CONFLICT = "conflict"  # e.g. the job name is taken
    INVALID_STATE = "invalid_state"  # e.g. retry of a succeeded job
    FORBIDDEN = "forbidden"  # e.g. a command job where allow_command_jobs is off
    INTERNAL = "internal"


class FluxgymError(Exception):
    """An error with a stable code; the server turns it into an error reply."""

    def __init__(self, code: ErrorCode, message: str, details: Any = None):
        super().__init__(message)
        self.code = ErrorCode(code)
        self.message = message
        self.details = details


class Arg(NamedTuple):
    type: type | tuple[type, ...]
    required: bool = False
    default: Any = None
    minimum: int | None = None  # for integers
    maximum: int | None = None


_JOB = Arg(str, required=True)

# The one closed set of operations, with their arguments.
OPS: dict[str, dict[str, Arg]] = {
    "ping": {},
    "version": {},
    "submit": {
        "text": Arg(str, required=True),  # the job file's TOML
        "source": Arg(str, default=""),  # its path, for messages and relative paths
        "name": Arg(str, default=""),  # overrides [job].name
    },
    "list": {"all": Arg(bool, default=True), "states": Arg(list, default=None)},
    "show": {"job": _JOB, "events": Arg(int, default=50, minimum=0, maximum=100_000)},
    "cancel": {"job": _JOB},
    "retry": {"job": _JOB},
    "logs": {
        "job": _JOB,
        "lines": Arg(int, default=100, minimum=0, maximum=100_000),
        # return only lines with a sequence number above this (follow mode)
        "after": Arg(int, default=None, minimum=0),
    },
    "metrics": {"job": _JOB, "limit": Arg(int, default=1000, minimum=1, maximum=1_000_000)},
}


def _type_name(t: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", bool: "true or false", list: "a list"}
    ts = t if isinstance(t, tuple) else (t,)
    return " or ".join(names.get(x, x.__name__) for x in ts)


class Request(NamedTuple):
    id: str
    op: str
    args: dict[str, Any]


def parse_request(payload: bytes) -> Request:
    """Parse and validate one request; raise FluxgymError saying what to fix."""
    if len(payload) > MAX_MESSAGE_BYTES:
        raise FluxgymError(
            ErrorCode.TOO_LARGE,
            f"request is {len(payload)} bytes; the limit is {MAX_MESSAGE_BYTES} bytes",
        )
    try:
        obj = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise FluxgymError(ErrorCode.BAD_JSON, f"request is not valid UTF-8 JSON: {e}") from None
    if not isinstance(obj, dict):
        raise FluxgymError(ErrorCode.BAD_JSON, "request must be a JSON object")
    rid = obj.get("id", "")
    if not isinstance(rid, (str, int)) or isinstance(rid, bool):
        raise FluxgymError(ErrorCode.BAD_REQUEST, "'id' must be a string or an integer")
    v = obj.get("v")
    if v != PROTOCOL_VERSION:
        raise FluxgymError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"protocol version {v!r} is not supported; this daemon speaks version "
            f"{PROTOCOL_VERSION} (upgrade fluxgymctl and fluxgymd together)",
        )
    op = obj.get("op")
    if not isinstance(op, str):
        raise FluxgymError(ErrorCode.BAD_REQUEST, "'op' must be a string naming an operation")
    if op not in OPS:
        raise FluxgymError(
            ErrorCode.UNKNOWN_OP, f"unknown op {op!r}; known ops: {', '.join(sorted(OPS))}"
        )
    args = obj.get("args", {})
    if not isinstance(args, dict):
        raise FluxgymError(ErrorCode.BAD_ARGS, "'args' must be a JSON object")
    return Request(id=str(rid), op=op, args=check_args(op, args))


def check_args(op: str, args: dict[str, Any]) -> dict[str, Any]:
    spec = OPS[op]
    unknown = sorted(set(args) - set(spec))
    if unknown:
        known = ", ".join(sorted(spec)) or "none"
        raise FluxgymError(
            ErrorCode.BAD_ARGS, f"{op}: unknown argument(s) {', '.join(unknown)} (known: {known})"
        )
    out: dict[str, Any] = {}
    for name, arg in spec.items():
        if name not in args or args[name] is None:
            if arg.required:
                raise FluxgymError(ErrorCode.BAD_ARGS, f"{op}: missing argument {name!r}")
            out[name] = arg.default
            continue
        value = args[name]
        ok = isinstance(value, arg.type) and not (
            isinstance(value, bool) and arg.type is int
        )
        if not ok:
            raise FluxgymError(
                ErrorCode.BAD_ARGS,
                f"{op}: argument {name!r} must be {_type_name(arg.type)}, got {value!r:.60}",
            )
        if arg.minimum is not None and value < arg.minimum or \
                arg.maximum is not None and value > arg.maximum:
            raise FluxgymError(
                ErrorCode.BAD_ARGS,
                f"{op}: argument {name!r} must be between {arg.minimum} and "
                f"{arg.maximum if arg.maximum is not None else 'any'}, got {value}",
            )
        out[name] = value
    return out


def encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), default=str).encode("utf-8")


def request(op: str, args: dict[str, Any] | None = None, rid: str = "1") -> bytes:
    return encode({"v": PROTOCOL_VERSION, "id": rid, "op": op, "args": args or {}})


def ok_reply(rid: str, result: Any) -> bytes:
    return encode({"v": PROTOCOL_VERSION, "id": rid, "ok": True, "result": result})


def error_reply(rid: str, code: ErrorCode, message: str, details: Any = None) -> bytes:
    err: dict[str, Any] = {"code": ErrorCode(code).value, "message": message}
    if details is not None:
        err["details"] = details
    return encode({"v": PROTOCOL_VERSION, "id": rid, "ok": False, "error": err})


# --- events -------------------------------------------------------------------------------
TOPIC_STATE = b"state"
TOPIC_PROGRESS = b"progress"
TOPIC_LOG = b"log."


def log_topic(job_id: int) -> bytes:
    # The trailing dot keeps job 1's subscription from matching job 12's lines.
    return TOPIC_LOG + str(job_id).encode() + b"."


# --- the supervision contract (daemon <-> child) ----------------------------------------
ENV_JOB_ID = "FLUXGYM_JOB_ID"
ENV_OUTPUT_DIR = "FLUXGYM_OUTPUT_DIR"
ENV_PROGRESS_ENDPOINT = "FLUXGYM_PROGRESS_ENDPOINT"
ENV_ATTEMPT = "FLUXGYM_ATTEMPT"
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: the child checkpointed and can be resumed
PHASES = ("loading", "caching", "training", "sampling", "saving")
CHILD_EVENTS = ("phase", "step", "checkpoint", "sample", "done")
