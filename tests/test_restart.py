"""Daemon crashes and stops: no job record is lost or duplicated, no job runs twice."""
import signal
import textwrap

from fluxgymd.testing import PY, pid_alive, wait_until, write_job

# Hangs on the first attempt, succeeds on the next: stands in for a resumable trainer.
RESUMABLE = textwrap.dedent("""
    import os, signal, sys, time
    attempt = int(os.environ["FLUXGYM_ATTEMPT"])
    def on_term(*_):
        print("checkpoint written at the step boundary", flush=True)
        sys.exit(75)
    signal.signal(signal.SIGTERM, on_term)
    print(f"attempt {attempt} started", flush=True)
    if attempt == 1:
        while True:
            time.sleep(0.05)
    print("finished", flush=True)
""")


def test_sigkill_of_the_daemon_loses_no_job_and_runs_none_twice(daemon_factory, short_tmp):
    d = daemon_factory(max_concurrent_jobs=1, watchdog__kill_grace_s=3.0).start()
    for i in range(3):
        d.submit(write_job(short_tmp, f"done{i}", ["true"]))
    for i in range(3):
        d.wait_state(f"done{i}", "succeeded")
    d.submit(write_job(short_tmp, "victim", [PY, "-c", RESUMABLE]))
    for i in range(3):
        d.submit(write_job(short_tmp, f"later{i}", ["true"]))
    wait_until(lambda: "attempt 1 started" in d.call("logs", job="victim")["lines"])
    orphan = d.job("victim")["pid"]
    before = {j["id"]: (j["name"], j["state"]) for j in d.call("list")["jobs"]}
    daemon_factory.track_pgid(orphan)

    d.stop(signal.SIGKILL)
    assert pid_alive(orphan), "the child outlives a SIGKILLed daemon (own session)"
    d.start()

    # the leftover process of the old attempt was stopped: it never runs twice
    wait_until(lambda: not pid_alive(orphan), 10, what="the orphaned attempt to be stopped")
    victim = d.wait_state("victim", "succeeded")
    assert victim["attempts"] == 2
    hist = [(e["to_state"], e["reason"]) for e in d.job("victim")["events"]]
    states = [s for s, _ in hist]
    assert states == ["queued", "starting", "running", "interrupted", "queued", "starting",
                      "running", "succeeded"]
    assert "fluxgymd restarted while attempt 1 was running" in hist[3][1]
    assert f"stopped its leftover process group {orphan}" in hist[3][1]
    for i in range(3):
        d.wait_state(f"later{i}", "succeeded")
    after = {j["id"]: j["name"] for j in d.call("list")["jobs"]}
    assert after == {i: name for i, (name, _) in before.items()}  # same ids, no duplicates
    assert all(before[i][1] == "succeeded" for i in (1, 2, 3))
    assert [d.job(f"done{i}")["attempts"] for i in range(3)] == [1, 1, 1]


def test_sigterm_interrupts_running_jobs_and_the_next_start_resumes_them(
        daemon_factory, short_tmp):
    d = daemon_factory(watchdog__kill_grace_s=10.0).start()
    d.submit(write_job(short_tmp, "resumable", [PY, "-c", RESUMABLE]))
    wait_until(lambda: "attempt 1 started" in d.call("logs", job="resumable")["lines"])
    assert d.stop(signal.SIGTERM) == 0
    log = (d.outputs_dir / "resumable" / "train.log").read_text()
    assert "checkpoint written at the step boundary" in log
    assert "attempt 1 exited with code 75" in log
    d.start()
    job = d.wait_state("resumable", "succeeded")
    assert job["attempts"] == 2
    ev = [(e["from_state"], e["to_state"], e["reason"]) for e in d.job("resumable")["events"]]
    assert ("running", "interrupted", "fluxgymd stopping; exited with code 75") in ev
    assert ("interrupted", "queued", "resumes when fluxgymd starts again") in ev


def test_a_child_that_ignores_sigterm_is_killed_when_the_daemon_stops(daemon_factory, short_tmp):
    d = daemon_factory(watchdog__kill_grace_s=1.0).start()
    script = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('up', flush=True)\ntime.sleep(600)"
    d.submit(write_job(short_tmp, "deaf", [PY, "-c", script]))
    wait_until(lambda: "up" in d.call("logs", job="deaf")["lines"])
    pid = d.job("deaf")["pid"]
    assert d.stop(signal.SIGTERM, timeout=20) == 0
    assert not pid_alive(pid)
    d.start()
    job = d.job("deaf")
    # requeued and running again (it will be stopped by the fixture's teardown)
    assert job["state"] in ("queued", "starting", "running")
    assert "killed by SIGKILL" in [e for e in job["events"] if e["to_state"] == "interrupted"][0]["reason"]


def test_a_cancel_in_flight_survives_a_daemon_crash(daemon_factory, short_tmp):
    d = daemon_factory(watchdog__kill_grace_s=30.0).start()
    script = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('up', flush=True)\ntime.sleep(600)"
    d.submit(write_job(short_tmp, "doomed", [PY, "-c", script]))
    wait_until(lambda: "up" in d.call("logs", job="doomed")["lines"])
    pid = d.job("doomed")["pid"]
    daemon_factory.track_pgid(pid)
    d.ctl("cancel", "doomed", "--no-wait", check=True)
    d.stop(signal.SIGKILL)
    d.config["watchdog__kill_grace_s"] = 1.0
    d.start()  # answers while it still stops the leftover group
    wait_until(lambda: d.job("doomed")["state"] == "cancelled", 15, what="restore to finish")
    job = d.job("doomed")
    assert "cancelled (fluxgymd restarted before it stopped)" in job["reason"]
    wait_until(lambda: not pid_alive(pid), 10, what="the cancelled job's process to die")
