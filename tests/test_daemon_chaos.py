"""Chaos over the daemon itself: fluxgymd is SIGKILLed and restarted at random moments while
two LoRA jobs train, with a `logs -f` and a `wait` running throughout."""
import json
import os
import random
import signal
import subprocess
import time

from fluxgymd.testing import PY, wait_until

KILLS = 3


def test_sigkill_the_daemon_at_random_moments(daemon_factory, tiny, straight, short_tmp):
    from tinylora import assert_identical, job_file, lora

    rng = random.Random(int(os.environ.get("FLUXGYM_TEST_SEED", "1312")))
    d = daemon_factory(max_concurrent_jobs=2, watchdog__kill_grace_s=10.0,
                       watchdog__backoff_s=0.2, watchdog__backoff_max_s=1.0).start()
    for name in ("chaos-a", "chaos-b"):
        d.submit(job_file(tiny, name))
    base = [PY, "-m", "fluxgymctl", "--runtime-dir", str(d.runtime_dir)]
    follow = subprocess.Popen(base + ["--json", "logs", "-f", "-n", "1000", "chaos-a"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    waiter = subprocess.Popen(base + ["wait", "chaos-b"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    kills = []
    try:
        for k in range(KILLS):
            if k == 1:  # one kill mid-training: as soon as a job has taken a few steps
                wait_until(lambda: any((j["step"] or 0) >= 3 for j in d.call("list")["jobs"]),
                           60, 0.02, "a job to train")
            else:
                time.sleep(rng.uniform(2.0, 9.0))
            states = {j["name"]: (j["state"], j["step"]) for j in d.call("list")["jobs"]}
            kills.append(states)
            for j in d.call("list")["jobs"]:  # the leftovers: stopped by the next daemon
                if j["pid"]:
                    daemon_factory.track_pgid(j["pid"])
            d.stop(signal.SIGKILL)
            time.sleep(rng.uniform(0.0, 1.5))
            d.start()
        for name in ("chaos-a", "chaos-b"):
            d.wait_state(name, "succeeded", timeout=240, interval=0.5)
        out, err = follow.communicate(timeout=60)
        w_out, w_err = waiter.communicate(timeout=60)
    finally:
        for p in (follow, waiter):
            if p.poll() is None:
                p.kill()
                p.wait()
    print("states at each kill:", kills)
    for name in ("chaos-a", "chaos-b"):
        assert_identical(lora(d.outputs_dir / name, name), straight)
        assert d.job(name)["attempts"] >= 2 or any(k.get(name, ("",))[0] == "queued"
                                                   for k in kills)
    assert waiter.returncode == 0, w_out + w_err
    assert "succeeded" in w_out
    assert follow.returncode == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    lines = [r for r in records if "line" in r]
    notices = [r["notice"] for r in records if "notice" in r]
    log = (d.outputs_dir / "chaos-a" / "train.log").read_text().splitlines()
    # every line of train.log, numbered 1..N, in order, once
    assert [r["seq"] for r in lines] == list(range(1, len(log) + 1))
    assert [r["line"] for r in lines] == log
    # each restart the follower saw is announced
    assert sum("restarted" in n for n in notices) >= 1, notices
    wait_until(lambda: all(not j["pid"] for j in d.call("list")["jobs"]))
