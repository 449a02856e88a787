"""The control socket under abuse: a fuzz of random frames and JSON shapes, and who may
connect at all."""
import _socket
import errno
import json
import os
import pwd
import random
import time

import psutil
import pytest
import zmq

from fluxgymd.protocol import OPS, PROTOCOL_VERSION
from fluxgymd.testing import PY, write_job

FRAMES = 10_000
STRUCTURED = 10_000  # with FRAMES: 20,000 requests in all
RSS_GROWTH_LIMIT_MB = 25
REPLY_WITHIN_S = 1.0

# Values that are wrong for some field in some way: types, nesting, text no store can hold.
EVIL = [
    None, True, False, 0, -1, 1, 2**31, 2**63, -(2**63), 2**70, 0.5, -0.0, 1e308,
    float("inf"), float("nan"), "", " ", "\x00", "a\x00b", "\x1b[31mred", "\r\n", "\ud800",
    "\udfff\ud800", "é" * 300, "x" * 100_000, "../../etc/passwd", "0", "-5", "first",
    [], [None], [1, 2], ["a", 1], [[["deep"]]], ["\ud800"], ["x"] * 20_000, {}, {"a": 1},
    {"job": "x"}, [{}], {"": None}, {"\ud800": 1},
]


# Job files that are valid TOML but hold what no OS call takes, or nest too deep to parse.
EVIL_TOML = [
    "a = " + "[" * 20_000 + "]" * 20_000,
    '[job]\nname = "fz"\nkind = "command"\n[command]\nargv = ["/bin/tr\\u0000ue"]\n',
    '[job]\nname = "fz"\nkind = "command"\n[command]\nargv = ["true"]\ncwd = "\\u0000"\n',
    '[job]\nname = "fz"\nkind = "command"\n[command]\nargv = ["true"]\nenv = {"A" = "\\u0000"}\n',
    '[job]\nname = "fz"\nkind = "lora"\n[train]\npretrained_model = "\\u0000"\ndataset_dir = "."\n',
    '[job]\nname = "12345"\nkind = "command"\n[command]\nargv = ["true"]\n',
    '[job]\nname = "fz"\nkind = "command"\n[command]\nargv = [["x"]]\nenv = [1]\n',
]


def deep(n: int) -> str:
    """A placeholder that `encode` turns into JSON nested n deep (json.dumps cannot)."""
    return f"__DEEP_{n}__"


def encode(env) -> bytes:
    text = json.dumps(env, allow_nan=True)
    for n in (10, 200, 3000, 5000):
        nested = "[" * n + '"x"' + "]" * n if n % 2 == 0 else '{"k":' * n + "1" + "}" * n
        text = text.replace(f'"__DEEP_{n}__"', nested)
    return text.encode("utf-8", "surrogatepass")


def valid_args(op: str) -> dict:
    """Arguments of the right shape that name no job the test keeps."""
    base = {"job": "no-such-job", "jobs": ["no-such-job"], "text": "[job]\nname = 1\n",
            "lines": 5, "events": 1, "limit": 1, "after": 0, "states": ["queued"],
            "to": "first", "priority": 1, "key": "max_concurrent_jobs", "value": 4,
            "all": True, "timestamps": True, "delete_outputs": False, "reset": False,
            "source": "", "name": ""}
    return {k: base[k] for k in OPS[op] if k in base}


def structured_requests(rng):
    """Each op with valid arguments, then one field (or the envelope) made wrong."""
    ops = list(OPS)
    while True:
        op = rng.choice(ops)
        args = valid_args(op)
        env = {"v": PROTOCOL_VERSION, "id": f"s{rng.randrange(10**9)}", "op": op, "args": args}
        r = rng.random()
        if op == "submit" and r < 0.3:
            args["text"] = rng.choice(EVIL_TOML)
        elif r < 0.6 and OPS[op]:
            args[rng.choice(list(OPS[op]))] = rng.choice(EVIL)
        elif r < 0.7:
            args[rng.choice(["bogus", "", "\ud800", "job "])] = rng.choice(EVIL)
        elif r < 0.8:
            env[rng.choice(["v", "id", "op", "args"])] = rng.choice(EVIL)
        elif r < 0.85:
            if OPS[op]:
                args[rng.choice(list(OPS[op]))] = deep(rng.choice([10, 200, 3000, 5000]))
            else:
                env["args"] = deep(rng.choice([10, 200, 3000, 5000]))
        elif r < 0.9:
            env = rng.choice([[env], "request", 7, None, deep(3000)])
        yield env


def test_ten_thousand_structured_requests_each_answered_in_a_second(daemon_factory, short_tmp):
    d = daemon_factory(watchdog__kill_grace_s=3.0, max_concurrent_jobs=3).start()
    for i in range(3):  # running jobs: nothing a fuzzed request can remove or lose
        d.submit(write_job(short_tmp, f"keep{i}", [PY, "-c", "import time; time.sleep(300)"]))
    for i in range(3):
        d.wait_state(f"keep{i}", "running")
    before = {j["id"]: j["name"] for j in d.call("list")["jobs"]}
    proc = psutil.Process(d.proc.pid)
    rss_before = proc.memory_info().rss / 2**20
    rng = random.Random(int(os.environ.get("FLUXGYM_TEST_SEED", "77")))
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(f"ipc://{d.runtime_dir}/control.sock")
    codes: dict[str, int] = {}
    slowest = 0.0
    try:
        gen = structured_requests(rng)
        for n in range(STRUCTURED):
            env = next(gen)
            payload = encode(env)
            t0 = time.monotonic()
            s.send(payload)
            assert s.poll(int(REPLY_WITHIN_S * 1000)), f"request {n} unanswered: {payload[:300]!r}"
            reply = json.loads(s.recv())
            slowest = max(slowest, time.monotonic() - t0)
            code = "ok" if reply["ok"] else reply["error"]["code"]
            assert code != "internal", (payload[:300], reply)
            if isinstance(env, dict) and isinstance(env.get("id"), str) and \
                    env["id"].startswith("s"):
                assert reply["id"] == env["id"], (payload[:300], reply)
            codes[code] = codes.get(code, 0) + 1
    finally:
        s.close()
    assert d.call("ping")["pong"] and d.proc.poll() is None
    after = {j["id"]: j["name"] for j in d.call("list")["jobs"]}
    assert all(after.get(i) == name for i, name in before.items()), after
    assert all(d.job(i)["state"] == "running" for i in before)
    growth = proc.memory_info().rss / 2**20 - rss_before
    assert growth < RSS_GROWTH_LIMIT_MB, f"RSS grew {growth:.1f} MB"
    assert codes.get("bad_args", 0) > 1000 and len(codes) >= 5, codes
    print(f"structured fuzz: {codes}; slowest reply {slowest * 1000:.0f} ms; RSS +{growth:.1f} MB")


def random_value(rng, depth=0):
    kinds = ["int", "float", "str", "bool", "null"] + (["list", "dict"] if depth < 3 else [])
    kind = rng.choice(kinds)
    if kind == "int":
        return rng.choice([0, -1, 1, 2**63, -2**63, rng.randint(-10**6, 10**6)])
    if kind == "float":
        return rng.choice([0.5, -1e308, 1e308, float("inf")]) if rng.random() < 0.5 else rng.random()
    if kind == "str":
        return "".join(chr(rng.randint(0, 0x2FF)) for _ in range(rng.randint(0, 40)))
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "null":
        return None
    if kind == "list":
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 5))]
    return {str(rng.randint(0, 99)): random_value(rng, depth + 1)
            for _ in range(rng.randint(0, 5))}


def random_frames(rng):
    r = rng.random()
    if r < 0.25:
        return [os.urandom(rng.randint(0, 300))]
    if r < 0.35:
        return [os.urandom(rng.randint(0, 50)) for _ in range(rng.randint(2, 4))]
    if r < 0.55:
        return [json.dumps(random_value(rng), allow_nan=True).encode()]
    # well-formed envelopes with random ops and arguments
    op = rng.choice(list(OPS) + ["", "drop_tables", "submit "])
    args = {rng.choice(list(OPS.get(op, {}) or {"x": 0}) + ["bogus"]): random_value(rng)
            for _ in range(rng.randint(0, 3))}
    if op == "submit" and rng.random() < 0.5:
        args = {"text": random_value(rng) if rng.random() < 0.3 else
                "[job]\nname = \"" + str(random_value(rng)) + "\"\nkind = \"command\"\n"}
    env = {"v": rng.choice([PROTOCOL_VERSION, PROTOCOL_VERSION, 0, "1", None]),
           "id": random_value(rng), "op": op, "args": args}
    return [json.dumps(env, allow_nan=True).encode()]


def test_ten_thousand_random_frames(daemon, short_tmp):
    for i in range(3):
        daemon.submit(write_job(short_tmp, f"keep{i}", ["true"]))
    before_jobs = {j["id"]: j["name"] for j in daemon.call("list")["jobs"]}
    proc = psutil.Process(daemon.proc.pid)
    rss_before = proc.memory_info().rss / 2**20
    rng = random.Random(int(os.environ.get("FLUXGYM_TEST_SEED", "4242")))
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(f"ipc://{daemon.runtime_dir}/control.sock")
    sent = replies = 0
    removed: set[int] = set()  # jobs a fuzzed remove/clean took away, as its reply says
    try:
        while sent < FRAMES:
            batch = min(200, FRAMES - sent)
            for _ in range(batch):
                s.send_multipart(random_frames(rng))
            sent += batch
            while replies < sent:
                assert s.poll(int(REPLY_WITHIN_S * 1000)), f"no reply after {replies} of {sent}"
                reply = json.loads(s.recv_multipart()[-1])
                assert reply["v"] == PROTOCOL_VERSION and isinstance(reply["ok"], bool)
                if not reply["ok"]:
                    assert reply["error"]["code"] != "internal", reply
                elif isinstance(reply["result"], dict) and "removed" in reply["result"]:
                    removed.update(r["id"] for r in reply["result"]["removed"])
                replies += 1
    finally:
        s.close()
    assert daemon.call("ping")["pong"] and daemon.proc.poll() is None
    after = {j["id"]: j["name"] for j in daemon.call("list")["jobs"]}
    # nothing lost but what a (random, valid) remove or clean said it removed
    assert all(after.get(i) == name for i, name in before_jobs.items() if i not in removed)
    growth = proc.memory_info().rss / 2**20 - rss_before
    assert growth < RSS_GROWTH_LIMIT_MB, f"RSS grew {growth:.1f} MB"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_a_user_outside_the_service_group_cannot_connect(daemon, short_tmp):
    # Only the runtime dir's own mode may decide: open everything above it.
    for d in (short_tmp, daemon.root):
        d.chmod(0o755)
    assert daemon.runtime_dir.stat().st_mode & 0o777 in (0o700, 0o750)
    nobody = pwd.getpwnam("nobody")
    sock_path = str(daemon.runtime_dir / "control.sock")
    pid = os.fork()
    if pid == 0:  # the child becomes nobody and tries to connect; it only reports errno
        code = 99
        try:
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
            s.connect(sock_path)
            code = 0
        except OSError as e:
            code = e.errno or 98
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == errno.EACCES
    assert daemon.call("ping")["pong"]


def test_socket_modes_leave_access_to_the_runtime_dir(daemon):
    modes = {p.name: p.stat().st_mode & 0o777 for p in daemon.runtime_dir.glob("*.sock")}
    assert modes == {"control.sock": 0o660, "events.sock": 0o660, "progress.sock": 0o600}
