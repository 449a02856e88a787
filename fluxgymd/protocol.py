"""The wire protocol shared by fluxgymd and its clients.

Requests and replies are single JSON objects (UTF-8) on the control socket:

    request  {"v": 1, "id": "<any string>", "op": "<op>", "args": {...}, "heartbeat": true}
    reply    {"v": 1, "id": "<same>", "ok": true,  "result": {...}}
             {"v": 1, "id": "<same>", "ok": false, "error": {"code": "...", "message": "..."}}
    working  {"v": 1, "id": "<same>", "working": true}   (only when the request asked for
             heartbeats: every HEARTBEAT_S while its answer is being worked out)

Events on the events socket are two frames: a topic (b"state", b"progress", b"log.<job id>")
and a JSON object. Error codes are stable strings; clients branch on them, people read the
message. This module does no I/O and imports no zmq, so everything here is testable alone.
"""
from __future__ import annotations

import enum
import json
import re
from typing import Any, NamedTuple

PROTOCOL_VERSION = 1
# Requests above this get a `too_large` reply. The socket's own hard limit (MAXMSGSIZE) is
# set higher so an oversized request still reaches us and can be answered, not dropped.
MAX_MESSAGE_BYTES = 1 << 20
SOCKET_MAX_MESSAGE_BYTES = 16 << 20

# A request that asks for them gets a `working` message this often until its reply, so a
# client's timeout bounds the daemon's silence, not how long an answer takes (a kohya job's
# submit runs sd-scripts' parser for seconds; a test alert waits out its retries).
HEARTBEAT_S = 1.0

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
    items: type | None = None  # for lists: the type of every element
    choices: tuple[str, ...] | None = None  # for strings
    multiline: bool = False  # a string that may hold line breaks (a job file); others may
    #                          not hold any control character (names, paths, job refs)


_JOB = Arg(str, required=True)
_JOBS = Arg(list, required=True, items=str)
_STATES = Arg(list, default=None, items=str)
PRIORITY_RANGE = (-1000, 1000)
# Settings `config` may change while the daemon runs (kept in the store across restarts).
RUNTIME_SETTINGS = {"max_concurrent_jobs": (1, 64)}

# The one closed set of operations, with their arguments.
OPS: dict[str, dict[str, Arg]] = {
    "ping": {},
    "version": {},
    "notify_test": {},
    "gpus": {},
    "web_url": {},
    # the model catalog: each entry, whether it is on disk, where
    "models": {},
    # fetch catalog models: the download job that does (a queued or running one that already
    # fetches them all, else a new one)
    "pull": {"models": Arg(list, required=True, items=str)},
    "models_rm": {"model": Arg(str, required=True)},
    "submit": {
        "text": Arg(str, required=True, multiline=True),  # the job file's TOML
        "source": Arg(str, default=""),  # its path, for messages and relative paths
        "name": Arg(str, default=""),  # overrides [job].name
        # higher runs first; equal priorities run in submission order
        "priority": Arg(int, default=0, minimum=PRIORITY_RANGE[0], maximum=PRIORITY_RANGE[1]),
        # jobs (ids or names) it waits for, besides the job file's [job] after
        "after": Arg(list, default=None, items=str),
    },
    # the memory planner's peak per tier for a catalog model, and each GPU's free memory
    "plan": {"base": Arg(str, required=True),
             "resolution": Arg(int, default=512, minimum=64, maximum=4096)},
    # save-now / sample-now: a request the running trainer takes at its next step boundary
    "control": {"job": _JOB, "action": Arg(str, required=True, choices=("save", "sample"))},
    # a publish job for a lora or kohya job's LoRA (kinds/publish.py)
    "publish": {"job": _JOB, "repo": Arg(str, required=True), "private": Arg(bool, default=False),
                "samples": Arg(bool, default=True), "name": Arg(str, default=""),
                "priority": Arg(int, default=0, minimum=PRIORITY_RANGE[0],
                                maximum=PRIORITY_RANGE[1])},
    # a folder of photos to a chain of jobs: download, caption, train, publish (flow.py)
    "new": {
        "name": Arg(str, required=True),
        "images": Arg(str, required=True),  # a folder on the daemon's machine
        "trigger": Arg(str, default=""),
        "base": Arg(str, default="flux-dev"),  # a catalog name
        "vram": Arg(str, default="auto", choices=("auto", "none", "24G", "16G", "12G", "8G")),
        "caption": Arg(bool, default=False),
        "caption_model": Arg(str, default=""),  # default: [caption] model
        "epochs": Arg(int, default=16, minimum=1, maximum=100_000),
        "steps": Arg(int, default=0, minimum=0, maximum=10_000_000),  # wins over epochs
        "repeats": Arg(int, default=10, minimum=1, maximum=10_000),
        "lr": Arg((int, float), default=8e-4),
        "rank": Arg(int, default=4, minimum=1, maximum=1024),
        "resolution": Arg(int, default=512, minimum=64, maximum=4096),
        "seed": Arg(int, default=42, minimum=0, maximum=2**32 - 1),
        "samples": Arg(list, default=None, items=str),  # sample prompts
        "sample_every": Arg(int, default=0, minimum=0, maximum=10_000_000),
        "publish": Arg(str, default=""),  # OWNER/REPO
        "private": Arg(bool, default=False),
        "resize": Arg(int, default=0, minimum=0, maximum=16384),  # longer side, px
        "set": Arg(list, default=None, items=str),  # more [train] keys, "KEY=VALUE"
        # the training job's file as the user edited it (the page's advanced view): its
        # [train], [publish] and [watchdog] tables replace the built ones; the name and
        # dataset_dir stay the chain's
        "job_file": Arg(str, default="", multiline=True),
        "dry_run": Arg(bool, default=False),
        "priority": Arg(int, default=0, minimum=PRIORITY_RANGE[0], maximum=PRIORITY_RANGE[1]),
    },
    "list": {"all": Arg(bool, default=True), "states": _STATES},
    "show": {"job": _JOB, "events": Arg(int, default=50, minimum=0, maximum=100_000)},
    "cancel": {"job": _JOB},
    # dependents: also queue again the jobs that failed because this one did
    "retry": {"job": _JOB, "dependents": Arg(bool, default=False)},
    "logs": {
        "job": _JOB,
        "lines": Arg(int, default=100, minimum=0, maximum=100_000),
        # return only lines with a sequence number above this (follow mode)
        "after": Arg(int, default=None, minimum=0, maximum=2**62),
        "timestamps": Arg(bool, default=False),
    },
    "metrics": {"job": _JOB, "limit": Arg(int, default=1000, minimum=1, maximum=1_000_000)},
    # queue control
    "remove": {"jobs": _JOBS, "delete_outputs": Arg(bool, default=False)},
    "clean": {"states": _STATES, "delete_outputs": Arg(bool, default=False)},
    "pause": {},
    "resume": {},
    "move": {"job": _JOB, "to": Arg(str, default=None, choices=("first", "last")),
             "priority": Arg(int, default=None, minimum=PRIORITY_RANGE[0],
                             maximum=PRIORITY_RANGE[1])},
    "config": {"key": Arg(str, default=None, choices=tuple(RUNTIME_SETTINGS)),
               "value": Arg(int, default=None), "reset": Arg(bool, default=False)},
}


def _type_name(t: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", bool: "true or false", list: "a list"}
    ts = t if isinstance(t, tuple) else (t,)
    return " or ".join(names.get(x, x.__name__) for x in ts)


class Request(NamedTuple):
    id: str
    op: str
    args: dict[str, Any]


def request_id(obj: Any) -> str:
    """The id to answer with, from whatever arrived: a reply always carries the request's
    id when it had a usable one, even when the rest of the request is refused."""
    if isinstance(obj, dict):
        rid = obj.get("id", "")
        if isinstance(rid, str) and _clean_text(rid) and len(rid) <= 256:
            return rid
        if isinstance(rid, int) and not isinstance(rid, bool) and abs(rid) < 2**63:
            return str(rid)
    return ""


_ID_RE = re.compile(rb'^\s*\{\s*(?:"v"\s*:\s*\d+\s*,\s*)?"id"\s*:\s*"([A-Za-z0-9_.:-]{1,64})"')


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def salvage_id(payload: bytes) -> str:
    """The id of a request that could not be decoded (too deep, truncated), when it stands
    plainly at its start as fluxgymctl writes it; else ''."""
    m = _ID_RE.match(payload[:200])
    return m.group(1).decode() if m else ""


def _clean_text(value: str) -> bool:
    """True when a string can be stored and echoed: valid UTF-8 (JSON admits lone
    surrogates such as \\ud800, which SQLite and our log files cannot hold)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def decode_request(payload: bytes) -> Any:
    if len(payload) > MAX_MESSAGE_BYTES:
        raise FluxgymError(
            ErrorCode.TOO_LARGE,
            f"request is {len(payload)} bytes; the limit is {MAX_MESSAGE_BYTES} bytes",
        )
    try:
        return json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise FluxgymError(ErrorCode.BAD_JSON, f"request is not valid UTF-8 JSON: {e}") from None


def parse_request(payload: bytes) -> Request:
    """Parse and validate one request; raise FluxgymError saying what to fix."""
    return validate_request(decode_request(payload))


def validate_request(obj: Any) -> Request:
    if not isinstance(obj, dict):
        raise FluxgymError(ErrorCode.BAD_JSON, "request must be a JSON object")
    rid = obj.get("id", "")
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or request_id(obj) != str(rid):
        raise FluxgymError(ErrorCode.BAD_REQUEST, "'id' must be a string (at most 256 "
                           "characters of valid UTF-8) or an integer")
    v = obj.get("v")
    if v != PROTOCOL_VERSION or isinstance(v, bool):
        raise FluxgymError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"protocol version {v!r:.40} is not supported; this daemon speaks version "
            f"{PROTOCOL_VERSION} (upgrade fluxgymctl and fluxgymd together)",
        )
    op = obj.get("op")
    if not isinstance(op, str):
        raise FluxgymError(ErrorCode.BAD_REQUEST, "'op' must be a string naming an operation")
    if op not in OPS:
        raise FluxgymError(
            ErrorCode.UNKNOWN_OP, f"unknown op {op!r:.60}; known ops: {', '.join(sorted(OPS))}"
        )
    args = obj.get("args", {})
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise FluxgymError(ErrorCode.BAD_ARGS, "'args' must be a JSON object")
    return Request(id=str(rid), op=op, args=check_args(op, args))


def _is(value: Any, t: type | tuple[type, ...]) -> bool:
    # JSON true is not the integer 1, and an integer is not a bool
    if isinstance(value, bool):
        return t is bool or (isinstance(t, tuple) and bool in t)
    return isinstance(value, t)


def check_args(op: str, args: dict[str, Any]) -> dict[str, Any]:
    spec = OPS[op]
    unknown = sorted(set(args) - set(spec))
    if unknown:
        known = ", ".join(sorted(spec)) or "none"
        shown = ", ".join(repr(u)[:40] for u in unknown[:5])
        raise FluxgymError(
            ErrorCode.BAD_ARGS, f"{op}: unknown argument(s) {shown} (known: {known})"
        )
    out: dict[str, Any] = {}
    for name, arg in spec.items():
        if name not in args or args[name] is None:
            if arg.required:
                raise FluxgymError(ErrorCode.BAD_ARGS, f"{op}: missing argument {name!r}")
            out[name] = arg.default
            continue
        value = args[name]
        if not _is(value, arg.type):
            raise FluxgymError(
                ErrorCode.BAD_ARGS,
                f"{op}: argument {name!r} must be {_type_name(arg.type)}, got {value!r:.60}",
            )
        if isinstance(value, list):
            if arg.items is not None and not all(_is(x, arg.items) for x in value):
                raise FluxgymError(ErrorCode.BAD_ARGS, f"{op}: argument {name!r} must be a list "
                                   f"of {_type_name(arg.items)[2:]}s, got {value!r:.60}")
            if len(value) > 10_000:
                raise FluxgymError(ErrorCode.BAD_ARGS, f"{op}: argument {name!r} has "
                                   f"{len(value)} items; at most 10000")
        for text in (value if isinstance(value, list) else [value]):
            if isinstance(text, str) and not _clean_text(text):
                raise FluxgymError(ErrorCode.BAD_ARGS, f"{op}: argument {name!r} holds text "
                                   "that is not valid UTF-8 (a lone surrogate)")
            if isinstance(text, str) and not arg.multiline and _CONTROL.search(text):
                raise FluxgymError(ErrorCode.BAD_ARGS, f"{op}: argument {name!r} holds a "
                                   f"control character: {text!r:.60}")
        if arg.minimum is not None and value < arg.minimum or \
                arg.maximum is not None and value > arg.maximum:
            raise FluxgymError(
                ErrorCode.BAD_ARGS,
                f"{op}: argument {name!r} must be between {arg.minimum} and "
                f"{arg.maximum if arg.maximum is not None else 'any'}, got {value}",
            )
        if arg.choices is not None and value not in arg.choices:
            raise FluxgymError(ErrorCode.BAD_ARGS, f"{op}: argument {name!r} must be one of "
                               f"{', '.join(arg.choices)}, got {value!r:.60}")
        out[name] = value
    return out


def encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), default=str).encode("utf-8")


def request(op: str, args: dict[str, Any] | None = None, rid: str = "1",
            heartbeat: bool = False) -> bytes:
    obj = {"v": PROTOCOL_VERSION, "id": rid, "op": op, "args": args or {}}
    if heartbeat:
        obj["heartbeat"] = True
    return encode(obj)


def wants_heartbeat(payload: bytes) -> str | None:
    """The id of a request that asked for heartbeats, else None (it is read again only for
    a request that is still unanswered after HEARTBEAT_S)."""
    try:
        obj = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if isinstance(obj, dict) and obj.get("heartbeat") is True and request_id(obj):
        return request_id(obj)
    return None


def working_reply(rid: str) -> bytes:
    return encode({"v": PROTOCOL_VERSION, "id": rid, "working": True})


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
# A trainer on a Slurm node reports its own GPUs' utilization (NVML) every this many seconds.
ENV_GPU_REPORT_S = "FLUXGYM_GPU_REPORT_S"
# The memory (bytes) a placed job may take on its GPU, others' plans there counted: the
# trainer's `auto` tier is chosen for this, not for what the GPU reads free
ENV_GPU_ROOM = "FLUXGYM_GPU_ROOM_BYTES"
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: the child checkpointed and can be resumed
# downloading: a download job's files coming in (judged like training: by its steps, bytes)
PHASES = ("loading", "caching", "training", "sampling", "saving", "downloading")
CHILD_EVENTS = ("phase", "step", "checkpoint", "sample", "done", "plan", "gpu")
