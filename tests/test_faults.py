"""Fault injection against a real daemon, real trainers on the tiny Flux and real signals.

Each case checks the final state, the reason the user is shown, that no job record is lost
or duplicated, and, where the job succeeds, that its LoRA is bit-identical to an
uninterrupted run's (the session's `straight` fixture).
"""
from __future__ import annotations

import os
import random
import re
import signal
import textwrap
import time

from fluxgymd.testing import PY, pid_alive, wait_until, write_job
from tinylora import assert_identical, history, job_file, lora, wait_checkpoint
from conftest import FAST

SEED = int(os.environ.get("FLUXGYM_TEST_SEED", time.time_ns() % 10_000))


def one_job_only(d, name):
    jobs = d.call("list")["jobs"]
    assert [j["name"] for j in jobs] == [name], jobs  # nothing lost, nothing duplicated


def submit_lora(d, tiny, name, **watchdog):
    d.submit(job_file(tiny, name, watchdog=watchdog or None))


def test_trainer_sigkilled_at_a_random_step_is_resumed_bit_identical(daemon, tiny, straight):
    submit_lora(daemon, tiny, "sigkill")
    j = wait_checkpoint(daemon, "sigkill")
    time.sleep(random.Random(SEED).uniform(0, 0.4))
    os.kill(j["pid"], signal.SIGKILL)
    j = daemon.wait_state("sigkill", "succeeded", timeout=240)
    assert j["restarts"] == 1 and j["attempts"] == 2
    h = history(daemon, "sigkill")
    assert ("recovering", "crashed: killed by SIGKILL; restart 1/5 in 0.2s") in h
    assert_identical(straight, lora(daemon.outputs_dir / "sigkill", "sigkill"))
    one_job_only(daemon, "sigkill")


def test_a_frozen_trainer_is_detected_dumped_and_resumed(daemon, tiny, straight):
    submit_lora(daemon, tiny, "frozen", stall_floor_s=3.0)
    j = wait_checkpoint(daemon, "frozen")
    os.kill(j["pid"], signal.SIGSTOP)
    frozen_at = time.monotonic()
    stalled = daemon.wait_state("frozen", ["stalled", "recovering"], timeout=30)
    detected = time.monotonic() - frozen_at
    # the limit is max(3 s, 5 x the slowest recent step): more than 3 s on a loaded machine
    m = re.search(r"no step for (\d+)s since step \d+ \(limit (\d+)s\)", stalled["reason"])
    assert m, stalled["reason"]
    limit = float(m.group(2))
    assert limit >= 3 and detected < limit * 1.1 + 1.0, f"took {detected:.1f}s, limit {limit}"
    j = daemon.wait_state("frozen", "succeeded", timeout=240)
    assert j["restarts"] == 1
    log = (daemon.outputs_dir / "frozen" / "train.log").read_text()
    assert "capturing diagnostics" in log
    # faulthandler's dump of every thread ("Current thread" when it is the only one)
    dump = log[log.index("capturing diagnostics"):]
    assert re.search(r"^(Current thread|Thread) 0x[0-9a-f]+ \(most recent call first\):$",
                     dump, re.M)
    assert 'File "' in dump and "in _run" in dump
    assert_identical(straight, lora(daemon.outputs_dir / "frozen", "frozen"))
    one_job_only(daemon, "frozen")


SPIN = textwrap.dedent("""
    import sys, time
    for i in range(1, 6):
        sys.stdout.write(f"\\r{i}/100 [00:01<00:10, 50.00it/s]"); sys.stdout.flush()
        time.sleep(0.02)
    print("spinning", flush=True)
    while True:  # the 100 %-utilization hang: busy, no progress
        pass
""")


def test_a_child_spinning_without_progress_is_detected_and_given_up_on(daemon, short_tmp):
    daemon.submit(write_job(short_tmp, "spin", [PY, "-c", SPIN],
                            watchdog={"stall_floor_s": 1.0, "no_progress_restarts": 2}))
    j = daemon.wait_state("spin", "failed", timeout=60)
    assert j["reason"].startswith("no progress since step 5: 2 attempts in a row")
    assert "no step for 1s since step 5" in j["reason"]
    # the first attempt got from nothing to step 5; the next two got nowhere
    states = [s for s, _ in history(daemon, "spin")]
    assert states.count("stalled") == 3 and states.count("running") == 3


CRASH_AT_7 = textwrap.dedent("""
    import sys
    for i in range(1, 8):
        sys.stdout.write(f"\\r{i}/20 [00:01<00:10, 50.00it/s, loss=0.5]"); sys.stdout.flush()
    sys.exit("boom at step 7")
""")


def test_a_child_that_always_crashes_at_the_same_step_fails_no_progress(daemon, short_tmp):
    daemon.submit(write_job(short_tmp, "crashy", [PY, "-c", CRASH_AT_7]))
    j = daemon.wait_state("crashy", "failed", timeout=60)
    assert j["reason"].startswith("no progress since step 7: 3 attempts in a row")
    assert j["attempts"] == 4  # one that reached step 7, three that did not: then no more
    time.sleep(1.5)
    assert daemon.job("crashy")["attempts"] == 4


OOM = ("import sys\nprint('step 1', flush=True)\n"
       "sys.exit('torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB')")


def test_cuda_out_of_memory_fails_with_advice_and_is_not_retried(daemon, short_tmp):
    daemon.submit(write_job(short_tmp, "oom", [PY, "-c", OOM]))
    j = daemon.wait_state("oom", "failed", timeout=30)
    assert j["attempts"] == 1
    assert "out of memory" in j["reason"] and "train_batch_size" in j["reason"]
    assert "gradient_checkpointing" in j["reason"] and "resolution" in j["reason"]


def gpu_daemon(daemon_factory, short_tmp):
    reading = short_tmp / "gpu-util"
    reading.write_text("0")
    d = daemon_factory(**FAST, watchdog__gpu_probe=f"file:{reading}", watchdog__gpu_poll_s=0.1)
    return d.start(), reading


def test_an_idle_gpu_while_training_is_a_stall_and_recovers(daemon_factory, short_tmp, tiny,
                                                           straight):
    d, reading = gpu_daemon(daemon_factory, short_tmp)
    reading.write_text("97")
    assert d.call("ping")["pong"]
    d.submit(job_file(tiny, "gpuidle", watchdog={"gpu_idle_window_s": 1.0}))
    j = wait_checkpoint(d, "gpuidle")
    # The fork's case: the trainer hangs and the GPU goes idle. Steps stop too, but the
    # step limit (120 s) is far off: the GPU rule is what notices.
    os.kill(j["pid"], signal.SIGSTOP)
    reading.write_text("0")
    j = d.wait_state("gpuidle", ["stalled", "recovering"], timeout=30)
    assert "GPU below 5% for 1s while training" in j["reason"]
    reading.write_text("97")
    j = d.wait_state("gpuidle", "succeeded", timeout=240)
    assert j["restarts"] == 1
    assert "on: readings from" in d.job("gpuidle")["watchdog"]["gpu"]
    assert_identical(straight, lora(d.outputs_dir / "gpuidle", "gpuidle"))


PHASES = textwrap.dedent("""
    import json, os, time, zmq
    s = zmq.Context().socket(zmq.PUSH)
    s.setsockopt(zmq.LINGER, 1000)
    s.connect(os.environ["FLUXGYM_PROGRESS_ENDPOINT"])
    def send(**kw):
        s.send(json.dumps(dict(kw, job=os.environ["FLUXGYM_JOB_ID"])).encode(), zmq.NOBLOCK)
    send(event="phase", phase="loading"); time.sleep(3.0)        # a long model load
    send(event="phase", phase="training")
    for i in range(1, 6):
        send(event="step", step=i, total=10); time.sleep(0.05)
    send(event="phase", phase="saving"); time.sleep(3.0)         # a long checkpoint write
    send(event="phase", phase="training")
    for i in range(6, 11):
        send(event="step", step=i, total=10); time.sleep(0.05)
    send(event="done")
""")


def test_an_idle_gpu_during_a_long_load_or_checkpoint_is_not_a_stall(daemon_factory,
                                                                     short_tmp):
    d, reading = gpu_daemon(daemon_factory, short_tmp)  # reads 0 % throughout
    d.submit(write_job(short_tmp, "phases", [PY, "-c", PHASES],
                       watchdog={"gpu_idle_window_s": 2.0, "stall_floor_s": 2.0}))
    j = d.wait_state("phases", "succeeded", timeout=60)
    assert j["attempts"] == 1 and j["step"] == 10
    assert "stalled" not in [s for s, _ in history(d, "phases")]


def test_a_succeeded_job_is_never_restarted_whatever_the_gpu_reads(daemon_factory, short_tmp):
    d, reading = gpu_daemon(daemon_factory, short_tmp)
    reading.write_text("95")
    d.submit(write_job(short_tmp, "done", ["true"], watchdog={"gpu_idle_window_s": 0.5}))
    d.wait_state("done", "succeeded")
    reading.write_text("0")
    time.sleep(2)
    j = d.job("done")
    assert j["state"] == "succeeded" and j["attempts"] == 1
    assert [s for s, _ in history(d, "done")][-1] == "succeeded"


def test_daemon_sigkilled_during_training_resumes_the_job(daemon_factory, tiny, straight):
    d = daemon_factory(**FAST).start()
    d.submit(job_file(tiny, "dkill"))
    j = wait_checkpoint(d, "dkill")
    daemon_factory.track_pgid(j["pid"])
    d.stop(signal.SIGKILL)
    d.start()
    wait_until(lambda: not pid_alive(j["pid"]), 20, what="the old trainer to be stopped")
    j = d.wait_state("dkill", "succeeded", timeout=240)
    assert j["attempts"] == 2
    assert any(s == "interrupted" and "fluxgymd restarted while attempt 1 was running" in r
               for s, r in history(d, "dkill"))
    assert_identical(straight, lora(d.outputs_dir / "dkill", "dkill"))
    one_job_only(d, "dkill")


def test_daemon_sigterm_checkpoints_the_trainer_and_resumes_with_no_lost_step(
        daemon_factory, tiny, straight):
    d = daemon_factory(**dict(FAST, watchdog__kill_grace_s=30.0)).start()
    d.submit(job_file(tiny, "dterm"))
    wait_checkpoint(d, "dterm")
    assert d.stop(signal.SIGTERM) == 0
    log = (d.outputs_dir / "dterm" / "train.log").read_text()
    assert "attempt 1 exited with code 75" in log
    stopped_at = int(log.split("stopped by SIGTERM at step ")[1].split(";")[0])
    d.start()
    j = d.wait_state("dterm", "succeeded", timeout=240)
    log = (d.outputs_dir / "dterm" / "train.log").read_text()
    assert f"step-{stopped_at:08d} (step {stopped_at})" in log  # resumed where it stopped
    assert j["restarts"] == 0  # a daemon stop spends no restart
    assert ("interrupted", "fluxgymd stopping; exited with code 75") in history(d, "dterm")
    assert_identical(straight, lora(d.outputs_dir / "dterm", "dterm"))
