"""sd_notify over a real datagram socket, as systemd's NOTIFY_SOCKET."""
import signal
import socket

from fluxgymd.testing import write_job


def read_all(sock, until: str, timeout: float = 10.0) -> list[str]:
    sock.settimeout(timeout)
    got = []
    while not any(until in m for m in got):
        got.append(sock.recv(4096).decode())
    return got


def test_ready_status_and_stopping(daemon_factory, short_tmp):
    path = short_tmp / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    try:
        d = daemon_factory()
        d.extra_env = {"NOTIFY_SOCKET": str(path)}
        d.start()
        msgs = read_all(sock, "READY=1")
        assert "READY=1\nSTATUS=idle" in msgs
        d.submit(write_job(short_tmp, "a", ["sleep", "600"]))
        d.submit(write_job(short_tmp, "b", ["true"]))
        msgs = read_all(sock, "STATUS=1 running, 1 queued")
        d.stop(signal.SIGTERM)
        msgs = read_all(sock, "STOPPING=1")
        assert any(m.startswith("STOPPING=1\nSTATUS=stopping") for m in msgs)
    finally:
        sock.close()


def test_no_notify_socket_is_a_quiet_no_op(daemon):
    # the fixture's daemon runs without NOTIFY_SOCKET: it must start and answer all the same
    assert daemon.call("ping")["summary"] == "idle"
