"""The control socket against a real daemon: bad input never crashes it."""
import json
import os
import signal
import subprocess
import sys

import pytest
import zmq

from fluxgymd.protocol import MAX_MESSAGE_BYTES, PROTOCOL_VERSION, request


def raw(daemon, frames):
    with daemon.client(timeout=5) as c:
        reply = c.send_raw(frames)
    return json.loads(reply[-1])


@pytest.mark.parametrize("frames,code", [
    ([os.urandom(512)], "bad_json"),
    ([b"\x00\x01\x02"], "bad_json"),
    ([b"{\"v\": 1, \"op\": "], "bad_json"),
    ([b"null"], "bad_json"),
    ([request("explode")], "unknown_op"),
    ([json.dumps({"v": 7, "id": "x", "op": "ping"}).encode()], "unsupported_version"),
    ([request("show", {"job": 1})], "bad_args"),
    ([request("show", {"job": "999"})], "not_found"),
    ([request("list", {"states": ["runing"]})], "bad_args"),
    ([request("list", {"states": [3]})], "bad_args"),
    ([b"a", b"b", b"c"], "bad_frame"),
    ([b" " * (MAX_MESSAGE_BYTES + 10)], "too_large"),
])
def test_bad_input_gets_an_error_reply_and_the_daemon_still_answers(daemon, frames, code):
    reply = raw(daemon, frames)
    assert reply["ok"] is False
    assert reply["error"]["code"] == code
    assert reply["error"]["message"]  # says what is wrong
    assert reply["v"] == PROTOCOL_VERSION
    assert daemon.call("ping")["pong"] is True
    assert daemon.proc.poll() is None


def test_a_burst_of_garbage_from_many_peers(daemon):
    ctx = zmq.Context.instance()
    socks = []
    for i in range(20):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(f"ipc://{daemon.runtime_dir}/control.sock")
        s.send_multipart([os.urandom(i * 37 + 1)])
        socks.append(s)
    for s in socks:
        assert s.poll(5000), "no reply"
        assert json.loads(s.recv_multipart()[-1])["ok"] is False
        s.close()
    assert daemon.call("ping")["pong"] is True


def test_req_style_envelope_is_answered_in_kind(daemon):
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.REQ)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, 5000)
    s.connect(f"ipc://{daemon.runtime_dir}/control.sock")
    s.send(request("ping", rid="req-1"))
    reply = json.loads(s.recv())
    s.close()
    assert reply["ok"] and reply["id"] == "req-1"


def test_a_second_daemon_on_the_same_runtime_dir_refuses(daemon):
    r = subprocess.run(
        [sys.executable, "-m", "fluxgymd", "--runtime-dir", str(daemon.runtime_dir),
         "--state-dir", str(daemon.root / "other-state"), "--outputs-dir",
         str(daemon.root / "other-out")],
        capture_output=True, text=True, timeout=30,
    )
    assert r.returncode == 1
    assert "another fluxgymd is already running" in r.stderr
    # the first one still owns its socket
    assert daemon.call("ping")["pid"] == daemon.proc.pid


def test_a_second_daemon_on_the_same_state_dir_refuses(daemon):
    r = subprocess.run(
        [sys.executable, "-m", "fluxgymd", "--runtime-dir", str(daemon.root / "run2"),
         "--state-dir", str(daemon.state_dir), "--outputs-dir", str(daemon.outputs_dir)],
        capture_output=True, text=True, timeout=30,
    )
    assert r.returncode == 1 and "already running" in r.stderr


def test_sigterm_stops_an_idle_daemon_cleanly(daemon):
    assert daemon.stop(signal.SIGTERM) == 0
    assert "stopped" in daemon.logs()


def test_a_corrupt_database_is_refused_with_advice(short_tmp):
    state = short_tmp / "state"
    state.mkdir()
    (state / "fluxgymd.sqlite3").write_bytes(b"this is not a database" * 100)
    r = subprocess.run(
        [sys.executable, "-m", "fluxgymd", "--state-dir", str(state), "--runtime-dir",
         str(short_tmp / "run"), "--outputs-dir", str(short_tmp / "out")],
        capture_output=True, text=True, timeout=30,
    )
    assert r.returncode == 3  # the unit's RestartPreventExitStatus: no crash loop
    assert "cannot be used" in r.stderr and "fluxgymd --recover-db" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_world_writable_runtime_dir_is_refused(short_tmp):
    run = short_tmp / "shared"
    run.mkdir()
    run.chmod(0o777)
    r = subprocess.run(
        [sys.executable, "-m", "fluxgymd", "--runtime-dir", str(run), "--state-dir",
         str(short_tmp / "state"), "--outputs-dir", str(short_tmp / "out")],
        capture_output=True, text=True, timeout=30,
    )
    assert r.returncode == 1
    assert "is writable by everyone" in r.stderr and "chmod 750" in r.stderr
    assert not (run / "control.sock").exists()


def _serve(tmp, handlers):
    """A ControlServer on its own loop in a thread, with these handlers."""
    import asyncio
    import threading

    import zmq.asyncio

    from fluxgymd.server import ControlServer

    ready, stop = threading.Event(), []

    def run():
        async def main():
            ctx = zmq.asyncio.Context()
            server = ControlServer(ctx, f"ipc://{tmp}/control.sock", handlers)
            task = asyncio.ensure_future(server.serve())
            stop.append((asyncio.get_running_loop(), task))
            ready.set()
            try:
                await task
            except asyncio.CancelledError:
                pass
            server.close()
            ctx.term()
        asyncio.run(main())

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert ready.wait(5)
    return lambda: (stop[0][0].call_soon_threadsafe(stop[0][1].cancel), t.join(5))


def test_a_slow_answer_comes_with_heartbeats_and_the_timeout_bounds_silence(short_tmp):
    """--timeout is how long the daemon may stay silent: an answer that takes 3 s arrives
    through a 1.5 s timeout, because the daemon says every second that it is working."""
    import asyncio
    import time

    from fluxgymd.client import Client

    async def slow(args):
        await asyncio.sleep(3.0)
        return {"pong": True}

    stop = _serve(short_tmp, {"ping": slow})
    try:
        c = Client(short_tmp, timeout=1.5)
        t0 = time.monotonic()
        assert c.call("ping") == {"pong": True}
        assert 2.9 < time.monotonic() - t0 < 6
        # a peer that does not ask for heartbeats gets just the reply
        frames = c.send_raw([request("ping", {}, "7")], timeout=6)
        assert json.loads(frames[-1])["result"] == {"pong": True}
        c.close()
    finally:
        stop()


def test_a_frozen_daemon_is_reported_within_the_timeout(daemon, short_tmp):
    """A submit to a daemon that does not answer (SIGSTOP) waits --timeout, not minutes."""
    import time

    from fluxgymd.testing import write_job

    job = write_job(short_tmp, "frozen", ["true"])
    os.kill(daemon.proc.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        r = daemon.ctl("--timeout", "2", "submit", str(job), timeout=60)
        took = time.monotonic() - t0
    finally:
        os.kill(daemon.proc.pid, signal.SIGCONT)
    assert r.returncode == 3 and "did not answer within 2s" in r.stderr, r.stderr
    assert took < 10, took
