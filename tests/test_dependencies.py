"""Jobs that wait for each other ([job] after, submit --after): a job starts only once every
job it waits for succeeded, fails at once with the reason when one fails or is cancelled,
comes back with `retry --dependents`, survives a daemon restart, and keeps what it waits for
from being removed."""
from __future__ import annotations

import signal
import textwrap
import time

from fluxgymd.testing import PY, wait_until, write_job

# Waits for a file to appear (the test's go-ahead), then exits with the code in it.
GATE = textwrap.dedent("""
    import os, sys, time
    gate = sys.argv[1]
    for i in range(1, 101):
        print(f"{i}/100 [00:00<00:00]", flush=True)
        if i == 41:
            while not os.path.exists(gate):
                time.sleep(0.05)
    sys.exit(int(open(gate).read() or 0))
""")


def gated(d, root, name, **kw):
    gate = root / f"{name}.gate"
    d.submit(write_job(root, name, [PY, "-c", GATE, str(gate)]), **kw)
    return gate


def test_a_job_waits_for_its_dependency_and_says_what_it_waits_for(daemon, short_tmp):
    d = daemon
    gate = gated(d, short_tmp, "download")
    job = write_job(short_tmp, "train", ["true"],
                    job={"name": "train", "kind": "command", "after": ["download"]})
    r = d.ctl("submit", str(job))
    assert r.returncode == 0 and "queued, after download" in r.stdout, r.stdout + r.stderr
    wait_until(lambda: d.job("download")["step"] == 41, 20)
    time.sleep(0.5)
    t = d.job("train")
    assert t["state"] == "queued" and t["after"][0]["name"] == "download"
    assert t["waiting"] == "after download (running, 41 %)", t["waiting"]
    status = d.ctl("status", check=True).stdout  # the REASON column (cut to the width)
    assert " after do" in status.splitlines()[2], status
    shown = d.ctl("show", "train", check=True).stdout
    assert "download (running)" in shown
    assert "train (queued)" in d.ctl("show", "download", check=True).stdout
    gate.write_text("0")
    assert d.wait_state("train", "succeeded")["attempts"] == 1
    hist = [e["to_state"] for e in d.job("train")["events"]]
    assert hist == ["queued", "starting", "running", "succeeded"]


def test_a_failed_dependency_fails_its_dependents_and_retry_brings_them_back(daemon,
                                                                            short_tmp):
    d = daemon
    gate = gated(d, short_tmp, "dl")
    d.submit(write_job(short_tmp, "a", ["true"]), after=["dl"])
    d.submit(write_job(short_tmp, "b", ["true"],  # a chain
                       job={"name": "b", "kind": "command", "after": ["a"]}))
    d.wait_state("dl", "running")
    gate.write_text("3")
    d.wait_state("dl", "failed")
    a, b = d.wait_state("a", "failed"), d.wait_state("b", "failed")
    assert a["reason"].startswith("dependency dl failed: ") and a["attempts"] == 0
    assert b["reason"].startswith("dependency a failed: dependency dl failed")
    # a dependent cannot go before what it waits for
    r = d.ctl("retry", "a")
    assert r.returncode == 4 and "retry dl --dependents" in r.stderr.replace(
        "fluxgymctl retry ", "retry "), r.stderr
    # a new job that waits for a failed one fails at once
    late = d.submit(write_job(short_tmp, "late", ["true"]), after=["dl"])
    assert d.job(late["id"])["state"] == "failed"
    gate.write_text("0")
    r = d.ctl("retry", "dl", "--dependents", check=True)
    assert "job a queued again" in r.stdout and "job b queued again" in r.stdout
    d.wait_state("dl", "succeeded")
    for name in ("a", "b", "late"):  # each ran once, after dl succeeded
        assert d.wait_state(name, "succeeded")["attempts"] == 1


def test_a_cancelled_dependency_fails_its_dependents(daemon, short_tmp):
    d = daemon
    gated(d, short_tmp, "slow")
    d.submit(write_job(short_tmp, "next", ["true"]), after=["slow"])
    d.wait_state("slow", "running")
    d.ctl("cancel", "slow", check=True)
    nxt = d.wait_state("next", "failed")
    assert nxt["reason"].startswith("dependency slow was cancelled")


def test_dependencies_must_exist_and_what_others_wait_for_cannot_be_removed(daemon,
                                                                           short_tmp):
    d = daemon
    r = d.ctl("submit", str(write_job(short_tmp, "orphan", ["true"])), "--after", "nope")
    assert r.returncode == 4 and "job.after: no job named or numbered 'nope'" in r.stderr
    d.call("pause")
    d.submit(write_job(short_tmp, "first", ["true"]))
    d.submit(write_job(short_tmp, "second", ["true"]), after=["first"])
    r = d.ctl("remove", "first")
    assert r.returncode == 4 and "is waited for by second" in r.stderr, r.stderr
    assert d.ctl("remove", "first", "second").returncode == 0  # together they may go
    assert [j["name"] for j in d.call("list")["jobs"]] == []


def test_a_chain_survives_a_daemon_restart(daemon_factory, short_tmp):
    from tests.conftest import FAST
    d = daemon_factory("chain", **FAST).start()
    gate = gated(d, short_tmp, "fetch")
    d.submit(write_job(short_tmp, "use", ["true"]), after=["fetch"])
    wait_until(lambda: d.job("fetch")["step"] == 41, 20)
    daemon_factory.track_pgid(d.job("fetch")["pid"])
    d.stop(signal.SIGKILL)
    d.start()
    assert d.job("use")["state"] == "queued" and d.job("use")["after"][0]["name"] == "fetch"
    d.wait_state("fetch", "running")  # requeued, started again: 2nd attempt
    time.sleep(0.5)
    assert d.job("use")["state"] == "queued"
    gate.write_text("0")
    assert d.wait_state("use", "succeeded")["attempts"] == 1
    assert d.job("fetch")["attempts"] == 2


def test_the_queue_goes_on_past_a_job_that_waits(daemon_factory, short_tmp):
    """One slot: a waiting job at the head of the queue does not hold up the ones behind it."""
    d = daemon_factory("heads", max_concurrent_jobs=2).start()
    gate = gated(d, short_tmp, "base")
    d.submit(write_job(short_tmp, "waits", ["true"]), after=["base"], priority=10)
    d.submit(write_job(short_tmp, "free", ["true"]))
    assert d.wait_state("free", "succeeded")
    assert d.job("waits")["state"] == "queued"
    gate.write_text("0")
    d.wait_state("waits", "succeeded")

