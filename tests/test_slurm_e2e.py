"""lora jobs through a real single-node Slurm (tests/slurm_cluster.py), with the watchdog and
exact resume: every job that succeeds must end with a LoRA bit-identical to the uninterrupted
local run (the session's `straight` fixture).

The node's processes live in the cluster's pid namespace: a test signals the trainer there
by the pid its batch script wrote (`Cluster.node_pid`), never by name.
"""
from __future__ import annotations

import re
import signal
import time

import pytest

from conftest import FAST
from fluxgymd.testing import wait_until
from slurm_cluster import slurm_config
from tinylora import assert_identical, history, job_file, lora, wait_checkpoint


def slurm_daemon(daemon_factory, cluster, sub="d", **more):
    return daemon_factory(sub, **FAST, **slurm_config(cluster), **more)


@pytest.fixture
def sd(daemon_factory, cluster):
    d = slurm_daemon(daemon_factory, cluster).start()
    yield d
    cluster.cancel_all()  # by Slurm job id, before the daemon is stopped


def training_after_checkpoint(d, name):
    return wait_checkpoint(d, name, timeout=180)  # the first attempt waits for Slurm too


def test_a_lora_job_runs_through_slurm_to_succeeded(sd, cluster, tiny, straight):
    sd.submit(job_file(tiny, "viaslurm"))
    j = sd.wait_state("viaslurm", "running", 60)
    assert j["executor"] == "slurm" and j["external_id"].isdigit(), j
    assert j["node"] == "slurmnode" and j["pid"] is None
    assert re.fullmatch(r"attempt 1: Slurm job \d+ on slurmnode", j["reason"])
    j = sd.wait_state("viaslurm", "succeeded", 300)
    assert (j["attempts"], j["restarts"], j["step"], j["total_steps"]) == (1, 0, 40, 40)
    assert j["checkpoint_step"] == 40 and j["loss"] is not None  # events, through the file
    assert cluster.state(j["external_id"]) == "COMPLETED"
    out = sd.outputs_dir / "viaslurm"
    assert_identical(straight, lora(out, "viaslurm"))
    log = (out / "train.log").read_text()
    assert "attempt 1 at" in log and "through Slurm" in log
    assert "trainer: finished" in log or "finished:" in log  # the node's output, followed
    assert f"attempt 1 (Slurm job {j['external_id']}) exited with code 0" in log
    shown = sd.ctl("show", "viaslurm").stdout
    assert f"slurm: job {j['external_id']} on slurmnode" in shown, shown
    metrics = sd.call("metrics", job="viaslurm")["metrics"]
    assert [m["step"] for m in metrics][-1] == 40
    events = out / ".slurm" / "attempt-1.events"
    assert events.stat().st_mode & 0o077 == 0 and (out / ".slurm").stat().st_mode & 0o077 == 0
    assert sd.call("ping")["slurm"]["probe"].startswith("outputs dir shared with the nodes")
    assert "executor      slurm: outputs dir shared with the nodes (probe job" in \
        sd.ctl("ping").stdout


def test_a_trainer_killed_on_its_node_is_resumed_as_a_new_slurm_job(sd, cluster, tiny,
                                                                      straight):
    sd.submit(job_file(tiny, "nodekill"))
    j = training_after_checkpoint(sd, "nodekill")
    first = j["external_id"]
    cluster.exec("kill", "-KILL", cluster.node_pid(sd.outputs_dir / "nodekill", 1))
    j = sd.wait_state("nodekill", "succeeded", 300)
    assert (j["attempts"], j["restarts"]) == (2, 1)
    assert j["external_id"] != first
    assert ("recovering", "crashed: killed by SIGKILL; restart 1/5 in 0.2s") \
        in history(sd, "nodekill")
    assert_identical(straight, lora(sd.outputs_dir / "nodekill", "nodekill"))


def test_a_frozen_trainer_on_a_node_is_detected_dumped_and_resumed(sd, cluster, tiny,
                                                                    straight):
    sd.submit(job_file(tiny, "nodefrozen", watchdog={"stall_floor_s": 3.0}))
    j = training_after_checkpoint(sd, "nodefrozen")
    first = j["external_id"]
    cluster.exec("kill", "-STOP", cluster.node_pid(sd.outputs_dir / "nodefrozen", 1))
    frozen_at = time.monotonic()
    stalled = sd.wait_state("nodefrozen", ["stalled", "recovering"], timeout=60)
    detected = time.monotonic() - frozen_at
    m = re.search(r"no step for (\d+)s since step \d+ \(limit (\d+)s\)", stalled["reason"])
    assert m, stalled["reason"]
    limit = float(m.group(2))
    # the events file is read every follow_s (0.1 s): detection lags the limit by little
    assert detected < limit * 1.1 + 1.5, f"took {detected:.1f}s, limit {limit}"
    j = sd.wait_state("nodefrozen", "succeeded", 300)
    assert j["restarts"] == 1 and j["attempts"] == 2 and j["external_id"] != first
    log = (sd.outputs_dir / "nodefrozen" / "train.log").read_text()
    dump = log[log.index("capturing diagnostics"):]
    assert "SIGTERM through Slurm" in dump
    assert re.search(r"^(Current thread|Thread) 0x[0-9a-f]+ \(most recent call first\):$",
                     dump, re.M), dump[:3000]
    assert "fluxgymd-slurm: SIGUSR1 passed on" in dump and "in _run" in dump
    assert_identical(straight, lora(sd.outputs_dir / "nodefrozen", "nodefrozen"))


def test_a_restarted_daemon_takes_up_its_running_slurm_job(daemon_factory, cluster, tiny,
                                                           straight):
    d = slurm_daemon(daemon_factory, cluster).start()
    try:
        d.submit(job_file(tiny, "adopted"))
        j = training_after_checkpoint(d, "adopted")
        first = j["external_id"]
        d.stop(signal.SIGKILL)
        assert cluster.state(first) == "RUNNING"  # the daemon's death is not the job's
        d.start()
        j = d.job("adopted")
        assert j["external_id"] == first and j["attempts"] == 1
        j = d.wait_state("adopted", "succeeded", 300)
        assert (j["attempts"], j["restarts"], j["external_id"]) == (1, 0, first)
        assert [s for s, _ in history(d, "adopted")].count("running") == 1
        out = d.outputs_dir / "adopted"
        log = (out / "train.log").read_text()
        assert f"following attempt 1 (Slurm job {first}) again" in log
        assert log.count("trainer: finished") <= 1
        assert not (out / ".slurm" / "attempt-2.sh").exists()  # no second Slurm job
        assert_identical(straight, lora(out, "adopted"))
    finally:
        cluster.cancel_all()


def test_cancel_removes_the_slurm_job(sd, cluster, tiny):
    sd.submit(job_file(tiny, "slurmcancel"))
    j = sd.wait_state("slurmcancel", "running", 60)
    r = sd.ctl("cancel", "slurmcancel")
    assert r.returncode == 0, r.stderr
    j = sd.wait_state("slurmcancel", "cancelled", 60)
    wait_until(lambda: cluster.state(j["external_id"]) not in ("PENDING", "RUNNING",
                                                               "COMPLETING"),
               30, 0.2, "the Slurm job to be gone")


def test_the_pre_end_signal_of_a_time_limit_checkpoints_and_resumes(sd, cluster, tiny,
                                                                    straight):
    # a 2-hour limit with the signal an hour before the end; once it trains, the limit is
    # cut to 1 hour, so Slurm's next time-limit pass (every 30 s) sends it at once. The
    # trainer is held (SIGSTOP) meanwhile so the signal surely finds it training.
    path = job_file(tiny, "timelimit", watchdog={"stall_floor_s": 600.0})
    path.write_text(path.read_text() + '\n[slurm]\ntime_limit = "2:00:00"\n'
                    'signal_before_end_s = 3600\n')
    sd.submit(path)
    j = training_after_checkpoint(sd, "timelimit")
    first, out = j["external_id"], sd.outputs_dir / "timelimit"
    pid = cluster.node_pid(out, 1)
    cluster.exec("kill", "-STOP", pid)
    cluster.exec("scontrol", "update", f"JobId={first}", "TimeLimit=60")
    woken = []  # seen running again before the signal came (see the closing note of #13)

    def signalled():
        if "fluxgymd-slurm: SIGTERM passed on" in (out / "train.log").read_text():
            return True
        stat = cluster.exec("ps", "-o", "stat=", "-p", pid, check=False).stdout.strip()
        if stat and not stat.startswith("T"):
            woken.append(stat)
            cluster.exec("kill", "-STOP", pid, check=False)
        return False

    try:
        wait_until(signalled, 150, 0.1, "Slurm's pre-end SIGTERM")
    except AssertionError:
        ctld = (cluster.base / "log" / "slurmctld.log").read_text()[-1500:]
        node_out = (out / ".slurm" / "attempt-1.out").read_text()[-1500:]
        raise AssertionError(f"no pre-end signal in train.log; woken {woken}; "
                             f"{history(sd, 'timelimit')}\n"
                             f"attempt-1.out ends:\n{node_out}\nslurmctld says:\n{ctld}\n"
                             f"the daemon says:\n{sd.logs()[-4000:]}") from None
    print(f"the frozen trainer was found running again {len(woken)} time(s) before the signal")
    cluster.exec("kill", "-CONT", pid)
    j = sd.wait_state("timelimit", "succeeded", 300)
    assert (j["attempts"], j["restarts"]) == (2, 0) and j["external_id"] != first
    assert ("interrupted", "exited 75 (interrupted with a checkpoint); resuming") \
        in history(sd, "timelimit")
    assert_identical(straight, lora(out, "timelimit"))


def test_two_jobs_run_at_once_and_a_third_waits_in_slurm(sd, cluster, tiny, straight):
    # one CPU each on the node's two (the CI machine's size): room for two
    names = ["pair-a", "pair-b", "pair-c"]
    for name in names:
        sd.submit(job_file(tiny, name))

    def two_running_one_pending():
        jobs = {n: sd.job(n) for n in names}
        running = [n for n, j in jobs.items() if j["state"] == "running"]
        waiting = [j for j in jobs.values() if j["state"] == "starting"
                   and (j["external_state"] or "").startswith("PENDING")]
        return len(running) == 2 and len(waiting) == 1 and waiting[0]

    waiting = wait_until(two_running_one_pending, 120, 0.2, "two running, one pending")
    # Slurm says why: no room (Resources), or behind a job that waits for room (Priority)
    why = waiting["external_state"]
    assert why in ("PENDING (Resources)", "PENDING (Priority)"), why
    shown = sd.ctl("show", waiting["name"]).stdout
    assert f"slurm: job {waiting['external_id']}, {why}" in shown, shown
    status = sd.ctl("status").stdout
    assert "starting" in status and "Slurm: PEND" in status, status  # cut to 80 columns
    for name in names:
        j = sd.wait_state(name, "succeeded", 400)
        assert j["attempts"] == 1
        assert_identical(straight, lora(sd.outputs_dir / name, name))


def test_a_node_failure_resumes_the_job_from_its_checkpoint(sd, cluster, tiny, straight):
    sd.submit(job_file(tiny, "nodefail"))
    j = training_after_checkpoint(sd, "nodefail")
    first = j["external_id"]
    cluster.exec("scontrol", "update", "NodeName=slurmnode", "State=DOWN",
                 "Reason=fluxgymd-test")
    try:
        wait_until(lambda: any(s == "interrupted" and "its node failed" in r
                               for s, r in history(sd, "nodefail")), 60, 0.2,
                   "the node failure to be seen")
    except AssertionError:
        raise AssertionError(f"{history(sd, 'nodefail')}\n{cluster.jobs()}\n"
                             f"{(sd.outputs_dir / 'nodefail' / 'train.log').read_text()[-1500:]}")
    finally:
        cluster.exec("scontrol", "update", "NodeName=slurmnode", "State=RESUME", check=False)
    j = sd.wait_state("nodefail", "succeeded", 300)
    assert (j["attempts"], j["restarts"]) == (2, 0) and j["external_id"] != first
    reason = [r for s, r in history(sd, "nodefail") if s == "interrupted"][0]
    # Slurm's SIGTERM to the node's processes let the trainer checkpoint on the way out
    assert reason.startswith(f"its node failed (exited with code 75; Slurm job {first} ended "
                             "NODE_FAIL); resuming from its newest checkpoint"), reason
    assert_identical(straight, lora(sd.outputs_dir / "nodefail", "nodefail"))


def test_a_stopping_daemon_leaves_its_slurm_job_running(daemon_factory, cluster, short_tmp):
    from fluxgymd.testing import PY, write_job
    ticks = ("import time\nfor i in range(1, 41):\n"
             "    print(f'{i}/40 [00:01<00:10, 10.00it/s]', flush=True); time.sleep(0.1)\n")
    d = slurm_daemon(daemon_factory, cluster, "stopping").start()
    try:
        d.submit(write_job(short_tmp, "ticks", [PY, "-c", ticks]))
        j = wait_until(lambda: (j := d.job("ticks"))["step"] and j, 60, 0.1, "a first step")
        assert d.stop(signal.SIGTERM) == 0
        assert cluster.state(j["external_id"]) == "RUNNING"
        log = (d.outputs_dir / "ticks" / "train.log").read_text()
        assert f"Slurm job {j['external_id']} keeps running" in log
        d.start()
        j2 = d.wait_state("ticks", "succeeded", 120)
        assert (j2["attempts"], j2["external_id"]) == (1, j["external_id"])
        log = (d.outputs_dir / "ticks" / "train.log").read_text()
        steps = [int(m) for m in re.findall(r"^(\d+)/40 \[", log, re.M)]
        assert steps == list(range(1, 41)), steps  # every line once: read on from its offset
    finally:
        cluster.cancel_all()


def test_outputs_the_nodes_do_not_share_are_refused_with_the_reason(daemon_factory, cluster,
                                                                    tiny):
    d = slurm_daemon(daemon_factory, cluster, "unshared")
    d.outputs_dir.mkdir(parents=True)
    # inside the cluster's mount namespace only: what a node writes there, we never see
    cluster.exec("mount", "-t", "tmpfs", "tmpfs", str(d.outputs_dir))
    try:
        d.start()
        problem = wait_until(lambda: d.call("ping")["slurm"]["problem"], 60, 0.2,
                             "the probe's verdict")
        assert f"the outputs dir {d.outputs_dir} is not shared with the Slurm nodes" in problem
        d.submit(job_file(tiny, "unshared"))
        j = wait_until(lambda: (j := d.job("unshared"))["state"] == "failed" and j, 30, 0.1,
                       "the job to fail")
        assert "is not shared with the Slurm nodes" in j["reason"]
        assert "not retried" in j["reason"]
        assert "not shared with the Slurm nodes" in d.logs()
    finally:
        cluster.exec("umount", str(d.outputs_dir), check=False)


def test_a_job_sbatch_refuses_fails_at_once_with_slurms_words(sd, tiny):
    path = job_file(tiny, "badpart")
    path.write_text(path.read_text() + '\n[slurm]\npartition = "nope"\n')
    sd.submit(path)
    j = wait_until(lambda: (j := sd.job("badpart"))["state"] == "failed" and j, 60, 0.1,
                   "the refusal")
    assert j["reason"].startswith("sbatch failed: invalid partition specified: nope")
    assert "not retried" in j["reason"] and j["restarts"] == 0


GPU_IDLE = """
import json, os, time
def send(**ev):
    ev.update(job=os.environ["FLUXGYM_JOB_ID"], attempt=int(os.environ["FLUXGYM_ATTEMPT"]))
    with open(os.environ["FLUXGYM_PROGRESS_ENDPOINT"][len("file://"):], "a") as fh:
        fh.write(json.dumps(ev) + "\\n")
assert float(os.environ["FLUXGYM_GPU_REPORT_S"]) > 0
step = 0
while True:  # steps keep coming, but the node's GPU says it is idle
    step += 1
    send(event="step", step=step, total=10**6)
    send(event="gpu", utilization=0.0)
    time.sleep(0.2)
"""


def test_the_gpu_rule_judges_a_node_by_the_readings_its_trainer_sends(sd, short_tmp):
    from fluxgymd.testing import PY, write_job
    sd.submit(write_job(short_tmp, "idlegpu", [PY, "-c", GPU_IDLE],
                        watchdog={"gpu_idle_window_s": 2.0, "max_restarts": 0}))
    j = sd.wait_state("idlegpu", ["stalled", "failed"], 60)
    assert j["reason"].startswith("GPU below 5% for"), j["reason"]
    assert "reports its GPUs (NVML) in its events; it does" in sd.job("idlegpu")["watchdog"]["gpu"]
    j = sd.wait_state("idlegpu", "failed", 60)
