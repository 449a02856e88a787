"""sd_notify over a real datagram socket, as systemd's NOTIFY_SOCKET."""
import signal
import socket

import pytest

from fluxgymd.testing import PY, wait_until, write_job


@pytest.fixture
def notify_sock(short_tmp):
    """A datagram socket standing in for systemd's NOTIFY_SOCKET: (socket, its path)."""
    path = short_tmp / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    yield sock, str(path)
    sock.close()


def read_all(sock, until: str, timeout: float = 10.0) -> list[str]:
    sock.settimeout(timeout)
    got = []
    while not any(until in m for m in got):
        got.append(sock.recv(4096).decode())
    return got


def quiet_for(sock, seconds: float) -> list[str]:
    """Everything that arrives within `seconds`."""
    sock.settimeout(seconds)
    got = []
    try:
        while True:
            got.append(sock.recv(4096).decode())
    except TimeoutError:
        return got


def test_ready_status_and_stopping(daemon_factory, short_tmp, notify_sock):
    sock, path = notify_sock
    d = daemon_factory()
    d.extra_env = {"NOTIFY_SOCKET": path}
    d.start()
    msgs = read_all(sock, "READY=1")
    assert "READY=1\nSTATUS=idle" in msgs
    d.submit(write_job(short_tmp, "a", ["sleep", "600"]))
    d.submit(write_job(short_tmp, "b", ["true"]))
    read_all(sock, "STATUS=1 running, 1 queued")
    d.stop(signal.SIGTERM)
    msgs = read_all(sock, "STOPPING=1")
    assert any(m.startswith("STOPPING=1\nSTATUS=stopping") for m in msgs)


def test_no_notify_socket_is_a_quiet_no_op(daemon):
    # the fixture's daemon runs without NOTIFY_SOCKET: it must start and answer all the same
    assert daemon.call("ping")["summary"] == "idle"


SLOW_EXIT = ("import signal, sys, time\n"
             "def bye(*_):\n    time.sleep(2); sys.exit(75)\n"
             "signal.signal(signal.SIGTERM, bye)\nprint('up', flush=True)\ntime.sleep(600)")


def test_stopping_extends_systemds_timeout_while_jobs_checkpoint(daemon_factory, short_tmp,
                                                                 notify_sock):
    sock, path = notify_sock
    d = daemon_factory(watchdog__kill_grace_s=20.0)
    d.extra_env = {"NOTIFY_SOCKET": path}
    d.start()
    d.submit(write_job(short_tmp, "slow", [PY, "-c", SLOW_EXIT]))
    wait_until(lambda: "up" in d.call("logs", job="slow")["lines"])
    d.proc.send_signal(signal.SIGTERM)
    msgs = read_all(sock, "EXTEND_TIMEOUT_USEC=")
    usec = int([m for m in msgs if "EXTEND_TIMEOUT_USEC=" in m][0].split("=")[1])
    assert 5_000_000 <= usec <= 10_000_000
    assert d.stop(timeout=30) == 0


def test_watchdog_pings_while_the_loop_turns_and_stop_when_it_is_frozen(daemon_factory,
                                                                       notify_sock):
    sock, path = notify_sock
    d = daemon_factory()
    d.extra_env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"}
    d.start()
    read_all(sock, "READY=1")
    assert read_all(sock, "WATCHDOG=1", timeout=2)[-1] == "WATCHDOG=1"
    d.proc.send_signal(signal.SIGSTOP)  # a wedged daemon: no loop, no pings
    try:
        quiet_for(sock, 1.0)  # what was already queued
        assert quiet_for(sock, 1.0) == [], "a frozen daemon sent something"
    finally:
        d.proc.send_signal(signal.SIGCONT)
    assert read_all(sock, "WATCHDOG=1", timeout=2)


def test_no_pings_for_another_process_watchdog(daemon_factory, notify_sock):
    sock, path = notify_sock
    d = daemon_factory()
    d.extra_env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000", "WATCHDOG_PID": "1"}
    d.start()
    msgs = read_all(sock, "READY=1") + quiet_for(sock, 1.0)
    assert not any("WATCHDOG=1" in m for m in msgs)
