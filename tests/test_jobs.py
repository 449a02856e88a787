"""Jobs end to end: a real daemon, real children, the real CLI."""
import json
import os
import subprocess
import textwrap
import time

from fluxgymd.testing import PY, pid_alive, wait_until, write_job

BAR = textwrap.dedent("""
    import sys, time
    print("starting", flush=True)
    for i in range(1, 6):
        sys.stdout.write(f"\\rsteps: {i*20}%|{'#'*i}| {i}/5 [00:01<00:02, 4.00it/s, loss=0.{i}]")
        sys.stdout.flush()
        time.sleep(0.02)
    print()
    print("warning on stderr", file=sys.stderr, flush=True)
    print("done", flush=True)
""")


def test_command_job_succeeds_with_every_line_in_logs(daemon, short_tmp):
    f = write_job(short_tmp, "bar", [PY, "-c", BAR])
    r = daemon.ctl("submit", str(f), "--wait", check=True)
    assert "succeeded" in r.stdout
    out = daemon.ctl("logs", "bar", "-n", "100", check=True).stdout.splitlines()
    body = [l for l in out if not l.startswith("=== fluxgymd")]
    # stdout in its own order; the stderr line may land anywhere after the bars
    stdout = [l for l in body if l != "warning on stderr"]
    assert stdout == ["starting"] + [
        f"steps: {i*20}%|{'#'*i}| {i}/5 [00:01<00:02, 4.00it/s, loss=0.{i}]"
        for i in range(1, 6)] + ["done"]
    assert body.count("warning on stderr") == 1
    code, job = daemon.ctl_json("show", "bar")
    assert code == 0
    assert (job["state"], job["step"], job["total_steps"], job["loss"]) == ("succeeded", 5, 5, 0.5)
    assert job["exit_code"] == 0 and job["attempts"] == 1
    log_file = daemon.outputs_dir / "bar" / "train.log"
    assert log_file.exists() and "done" in log_file.read_text()


def test_stable_json_fields(daemon, short_tmp):
    daemon.ctl("submit", str(write_job(short_tmp, "fields", ["true"])), "--wait", check=True)
    code, listing = daemon.ctl_json("status")
    job = listing["jobs"][0]
    for field in ("id", "name", "state", "attempts", "step", "total_steps", "pid",
                  "checkpoint", "reason", "progress", "elapsed_s", "eta_s", "loss"):
        assert field in job, field
    assert listing["counts"] == {"succeeded": 1}


def test_failed_job_says_why(daemon, short_tmp):
    f = write_job(short_tmp, "boom", [PY, "-c", "import sys; print('bad things'); sys.exit(3)"],
                  watchdog={"max_restarts": 0})
    r = daemon.ctl("submit", str(f), "--wait")
    assert r.returncode == 1
    job = daemon.job("boom")
    assert job["state"] == "failed" and job["exit_code"] == 3
    assert job["reason"] == "exited with code 3: bad things (not restarted: max_restarts = 0)"


def test_job_killed_by_a_signal_is_failed_with_the_signal_name(daemon, short_tmp):
    f = write_job(short_tmp, "segv", [PY, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"],
                  watchdog={"max_restarts": 0})
    daemon.submit(f)
    job = daemon.wait_state("segv", "failed")
    assert job["reason"].startswith("killed by SIGSEGV")


def test_cancel_kills_the_grandchild_and_nothing_else(daemon, short_tmp):
    gc_pid = short_tmp / "grandchild.pid"
    script = textwrap.dedent(f"""
        import subprocess, time
        p = subprocess.Popen(["sleep", "600"])
        open({str(gc_pid)!r}, "w").write(str(p.pid))
        print("spawned", p.pid, flush=True)
        time.sleep(600)
    """)
    bystander = subprocess.Popen(["sleep", "600"])
    try:
        daemon.submit(write_job(short_tmp, "tree", [PY, "-c", script]))
        wait_until(lambda: gc_pid.exists() and gc_pid.read_text(), what="grandchild pid")
        grandchild = int(gc_pid.read_text())
        job = daemon.job("tree")
        assert pid_alive(job["pid"]) and pid_alive(grandchild)
        r = daemon.ctl("cancel", "tree", check=True)
        assert "cancelled" in r.stdout
        job = daemon.job("tree")
        assert job["state"] == "cancelled"
        assert job["reason"].startswith("cancelled by user")
        wait_until(lambda: not pid_alive(grandchild), 5, what="grandchild to die")
        assert bystander.poll() is None, "an unrelated process was killed"
        assert daemon.proc.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_cancel_escalates_to_sigkill_after_the_grace(daemon, short_tmp):
    script = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('stubborn', flush=True)\ntime.sleep(600)"
    daemon.submit(write_job(short_tmp, "stubborn", [PY, "-c", script]))
    wait_until(lambda: "stubborn" in daemon.call("logs", job="stubborn")["lines"])
    t0 = time.monotonic()
    daemon.ctl("cancel", "stubborn", check=True)
    elapsed = time.monotonic() - t0
    job = daemon.job("stubborn")
    assert job["state"] == "cancelled" and "SIGKILL" in job["reason"]
    assert 2.5 < elapsed < 15  # kill_grace_s is 3 in these tests


def test_cancel_a_queued_job_and_retry_it(daemon, short_tmp):
    daemon.submit(write_job(short_tmp, "long", ["sleep", "600"]))
    daemon.submit(write_job(short_tmp, "waiting", ["true"]))
    assert daemon.job("waiting")["state"] == "queued"  # max_concurrent_jobs = 1
    assert "cancelled" in daemon.ctl("cancel", "waiting", check=True).stdout
    daemon.ctl("cancel", "long", check=True)
    r = daemon.ctl("retry", "waiting", check=True)
    assert "queued" in r.stdout or "running" in r.stdout
    assert daemon.wait_state("waiting", "succeeded")["attempts"] == 1
    hist = [e["to_state"] for e in daemon.job("waiting")["events"]]
    assert hist == ["queued", "cancelled", "queued", "starting", "running", "succeeded"]


def test_a_succeeded_job_is_never_rerun(daemon, short_tmp):
    daemon.ctl("submit", str(write_job(short_tmp, "once", ["true"])), "--wait", check=True)
    r = daemon.ctl("retry", "once")
    assert r.returncode == 4 and "never run again" in r.stderr
    r = daemon.ctl("cancel", "once")
    assert r.returncode == 4 and "already succeeded" in r.stderr


# A child that speaks the contract: send(event=..., ...) to the daemon's progress socket.
SENDS_EVENTS = textwrap.dedent("""
    import json, os, sys, time, zmq
    s = zmq.Context().socket(zmq.PUSH)
    s.setsockopt(zmq.LINGER, 2000)
    s.connect(os.environ["FLUXGYM_PROGRESS_ENDPOINT"])
    job, attempt = os.environ["FLUXGYM_JOB_ID"], int(os.environ["FLUXGYM_ATTEMPT"])
    def send(**kw):
        s.send(json.dumps(dict(kw, job=job, attempt=attempt)).encode(), zmq.NOBLOCK)
""")


def test_contract_progress_events_reach_the_store(daemon, short_tmp):
    script = SENDS_EVENTS + textwrap.dedent("""
        send(event="phase", phase="training")
        for step in range(1, 21):
            send(event="step", step=step, total=20, loss=1.0 / step, lr=1e-4, seconds_per_step=0.01)
            time.sleep(0.01)
        ckpt = os.path.join(os.environ["FLUXGYM_OUTPUT_DIR"], "checkpoint-20")
        send(event="checkpoint", path=ckpt, step=20)
        s.send(b"this is not json")  # a child cannot hurt the daemon
        send(event="done")
        time.sleep(0.2)
    """)
    daemon.submit(write_job(short_tmp, "contract", [PY, "-c", script]))
    job = daemon.wait_state("contract", "succeeded")
    # a finished job shows no stale phase
    assert (job["step"], job["total_steps"], job["phase"]) == (20, 20, None)
    assert job["loss"] == 1.0 / 20
    assert job["checkpoint"].endswith("contract/checkpoint-20") and job["checkpoint_step"] == 20
    m = daemon.call("metrics", job="contract")["metrics"]
    assert [p["step"] for p in m] == list(range(1, 21))


def test_children_get_the_contract_environment_and_not_the_daemons_notify_socket(
        daemon_factory, short_tmp):
    d = daemon_factory()
    d.extra_env = {"NOTIFY_SOCKET": str(short_tmp / "nonexistent.sock")}
    d.start()
    out = short_tmp / "env.json"
    script = f"import json, os; json.dump(dict(os.environ), open({str(out)!r}, 'w'))"
    d.submit(write_job(short_tmp, "env", [PY, "-c", script], command={"env": {"MY_VAR": "x"}}))
    d.wait_state("env", "succeeded")
    env = json.loads(out.read_text())
    job = d.job("env")
    assert env["FLUXGYM_JOB_ID"] == str(job["id"]) and env["FLUXGYM_ATTEMPT"] == "1"
    assert env["FLUXGYM_OUTPUT_DIR"] == job["output_dir"]
    assert env["FLUXGYM_PROGRESS_ENDPOINT"] == f"ipc://{d.runtime_dir}/progress.sock"
    assert env["MY_VAR"] == "x" and "NOTIFY_SOCKET" not in env


def test_invalid_job_file_is_rejected_with_every_problem(daemon, short_tmp):
    bad = short_tmp / "bad.toml"
    bad.write_text('[job]\nname = "Bad/Name"\nkind = "command"\n[command]\nargv = []\n')
    r = daemon.ctl("submit", str(bad))
    assert r.returncode == 4
    assert "2 problem(s)" in r.stderr and "not allowed" in r.stderr and "argv is empty" in r.stderr
    assert daemon.call("list")["jobs"] == []


def test_a_name_in_use_is_a_conflict(daemon, short_tmp):
    f = write_job(short_tmp, "dup", ["true"])
    daemon.ctl("submit", str(f), check=True)
    r = daemon.ctl("submit", str(f))
    assert r.returncode == 4 and "is taken by job 1" in r.stderr
    r = daemon.ctl("submit", str(f), "--name", "dup-2", check=True)
    assert "dup-2" in r.stdout


def test_program_that_cannot_start_fails_with_the_reason(daemon, short_tmp):
    script = short_tmp / "gone.sh"
    script.write_text("#!/bin/sh\ntrue\n")
    os.chmod(script, 0o755)
    f = write_job(short_tmp, "gone", [str(script)])
    daemon.ctl("submit", str(f), check=True)  # may already have run; make the next one fail
    daemon.wait_state("gone", "succeeded")
    script.unlink()
    f2 = write_job(short_tmp, "gone2", ["sleep", "0"])
    daemon.submit(f2)
    daemon.wait_state("gone2", "succeeded")
    # a job whose program vanished between submit and start
    blocker = write_job(short_tmp, "blocker", ["sleep", "600"])
    daemon.submit(blocker)
    script.write_text("#!/bin/sh\ntrue\n")
    os.chmod(script, 0o755)
    daemon.submit(write_job(short_tmp, "vanish", [str(script)]))
    script.unlink()
    daemon.ctl("cancel", "blocker", check=True)
    job = daemon.wait_state("vanish", "failed")
    assert job["reason"].startswith("could not start") and "No such file" in job["reason"]


def test_command_jobs_switched_off_are_refused_and_never_start(daemon_factory, short_tmp):
    on = daemon_factory("on", allow_command_jobs=True, watchdog__kill_grace_s=3.0).start()
    on.submit(write_job(short_tmp, "long", ["sleep", "600"]))
    on.submit(write_job(short_tmp, "waiting", ["true"]))
    on.wait_state("long", "running")
    on.stop()  # long: interrupted, both queued again at the next start
    off = daemon_factory("on", allow_command_jobs=False).start()
    r = off.ctl("submit", str(write_job(short_tmp, "new", ["true"])))
    assert r.returncode == 4, r
    assert "command jobs are turned off" in r.stderr
    assert "allow_command_jobs = true" in r.stderr and "--allow-command-jobs" in r.stderr
    for name in ("long", "waiting"):  # queued while allowed: failed, not run
        j = off.wait_state(name, "failed")
        assert j["reason"].startswith("command jobs are turned off"), j
        assert j["pid"] is None
    r = off.ctl("--json", "retry", "waiting")
    assert r.returncode == 4 and json.loads(r.stdout)["error"]["code"] == "forbidden"
    assert off.ctl("ping").returncode == 0


def test_show_gives_the_attempts_own_step_or_says_it_is_the_checkpoints(daemon, short_tmp):
    """Attempt 1 reaches step 22 (checkpoint at 20) and crashes; while attempt 2 has reported
    nothing, the step shown is 20, from the checkpoint, never the earlier attempt's 22."""
    script = SENDS_EVENTS + textwrap.dedent("""
        if attempt == 1:
            for step in range(1, 23):
                send(event="step", step=step, total=40, loss=0.5)
                if step == 20:
                    send(event="checkpoint", path="ckpt-20", step=20)
            time.sleep(0.3)
            sys.exit(1)
        time.sleep(4)
        send(event="step", step=21, total=40, loss=0.4)
        time.sleep(0.5)
    """)
    daemon.submit(write_job(short_tmp, "steps", [PY, "-c", script]))
    from fluxgymd.testing import wait_until
    job = wait_until(lambda: (j := daemon.job("steps"))["attempts"] == 2
                     and j["state"] == "running" and j, 20, 0.05, "attempt 2")
    assert (job["step"], job["step_from"], job["loss"]) == (20, "checkpoint", None), job
    shown = daemon.ctl("show", "steps", check=True).stdout
    assert "20/40" in shown and "22/40" not in shown
    assert "attempt 2 resumes from its newest checkpoint and has reported no step" in shown
    job = wait_until(lambda: (j := daemon.job("steps"))["step_from"] == "attempt" and j, 20,
                     0.05, "attempt 2's own step")
    assert job["step"] == 21
    assert daemon.wait_state("steps", "succeeded")["step"] == 21
