"""The journal sink, against a datagram socket standing in for journald's native socket
(the end-to-end test with a real journald is the systemd issue's)."""
import socket
import struct
import textwrap
import threading
import time

from fluxgymd.journal import ERR, INFO, WARNING, JobLines, Journal, encode
from fluxgymd.testing import PY, write_job


def decode(datagram: bytes) -> dict[str, str]:
    fields, i = {}, 0
    while i < len(datagram):
        nl = datagram.index(b"\n", i)
        line = datagram[i:nl]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            fields[key.decode()] = value.decode()
            i = nl + 1
        else:  # KEY\n<u64 length><data>\n
            size = struct.unpack("<Q", datagram[nl + 1:nl + 9])[0]
            fields[line.decode()] = datagram[nl + 9:nl + 9 + size].decode()
            i = nl + 9 + size + 1
    return fields


def drain(sock) -> list[dict[str, str]]:
    sock.settimeout(0.5)
    out = []
    try:
        while True:
            out.append(decode(sock.recv(65536)))
    except TimeoutError:
        return out


def test_encoding_is_journald_native_including_multiline_values():
    data = encode({"MESSAGE": "two\nlines", "JOB_ID": 7})
    assert data == b"MESSAGE\n" + struct.pack("<Q", 9) + b"two\nlines\nJOB_ID=7\n"
    assert decode(data) == {"MESSAGE": "two\nlines", "JOB_ID": "7"}


def test_priorities_tracebacks_and_thinned_bars(tmp_path):
    path = tmp_path / "journal.sock"
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(str(path))
    now = [0.0]
    jl = JobLines(Journal(str(path)), 7, "my-lora", 2, clock=lambda: now[0])
    jl.lines(["hello"], "stdout")
    jl.lines(["careful"], "stderr")
    jl.lines(["Traceback (most recent call last):", '  File "x.py", line 1, in <module>',
              "ValueError: boom", "after"], "stderr")
    for i in range(1, 101):  # 100 redraws within 5 s: the first, and the finished one
        now[0] = i * 0.05
        jl.lines([f"{i}/100 [00:01<00:10, 20.00it/s]"], "stdout")
    got = drain(sink)
    sink.close()
    msgs = [(e["MESSAGE"], int(e["PRIORITY"])) for e in got]
    assert msgs[:6] == [("hello", INFO), ("careful", WARNING),
                        ("Traceback (most recent call last):", ERR),
                        ('  File "x.py", line 1, in <module>', ERR), ("ValueError: boom", ERR),
                        ("after", WARNING)]
    assert [m for m, _ in msgs[6:]] == ["1/100 [00:01<00:10, 20.00it/s]",
                                        "100/100 [00:01<00:10, 20.00it/s]"]
    assert all(e["JOB_ID"] == "7" and e["JOB_NAME"] == "my-lora" and e["JOB_ATTEMPT"] == "2"
               and e["SYSLOG_IDENTIFIER"] == "fluxgymd" for e in got)


def test_a_missing_journal_drops_entries_instead_of_failing(tmp_path):
    j = Journal(str(tmp_path / "nobody-listens.sock"))
    j.send("lost")
    assert j.dropped == 1


def test_the_daemon_sends_job_lines_and_its_own_log(daemon_factory, short_tmp):
    path = short_tmp / "journal.sock"
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(str(path))
    # Like journald, read as entries come: a unix datagram queue holds only a few
    # (net.unix.max_dgram_qlen), and the daemon drops rather than waits.
    entries: list[dict[str, str]] = []
    stop = threading.Event()

    def read():
        sink.settimeout(0.1)
        while not stop.is_set():
            try:
                entries.append(decode(sink.recv(65536)))
            except TimeoutError:
                pass

    reader = threading.Thread(target=read)
    reader.start()
    try:
        d = daemon_factory(journal="on", journal_socket=str(path)).start()
        script = textwrap.dedent("""
            import sys
            print("out line", flush=True)
            print("err line", file=sys.stderr, flush=True)
        """)
        d.submit(write_job(short_tmp, "j1", [PY, "-c", script]))
        d.submit(write_job(short_tmp, "j2", ["echo", "other job"]))
        d.wait_state("j1", "succeeded")
        d.wait_state("j2", "succeeded")
        time.sleep(0.3)
    finally:
        stop.set()
        reader.join()
        sink.close()
    j1 = [e for e in entries if e.get("JOB_NAME") == "j1" and "STREAM" in e]
    assert [(e["MESSAGE"], e["PRIORITY"]) for e in j1 if "line" in e["MESSAGE"]] in (
        [("out line", "6"), ("err line", "4")], [("err line", "4"), ("out line", "6")])
    assert all(e["JOB_ID"] == "1" for e in j1)
    assert [e["MESSAGE"] for e in entries if e.get("JOB_NAME") == "j2"
            and e["MESSAGE"] == "other job"] == ["other job"]
    own = [e for e in entries if e.get("LOGGER") == "fluxgymd"]
    assert any("serving" in e["MESSAGE"] for e in own)
    assert any(e["MESSAGE"].startswith("job 1 (j1): succeeded") and e.get("JOB_ID") == "1"
               and e.get("JOB_NAME") == "j1"
               for e in own)
