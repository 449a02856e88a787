"""GPU placement end to end: a real daemon, real children, GPUs scripted through the file
probe (no GPU on these machines). Each command job prints the CUDA_VISIBLE_DEVICES it got
and runs until the test lets it end."""
from __future__ import annotations

import json
import signal
import sys
import threading
import time
from pathlib import Path

import tomli_w

from conftest import FAST
from fluxgymd.protocol import TOPIC_STATE
from fluxgymd.testing import wait_until

GiB = 1 << 30
WAIT = ("import os, sys, time\n"
        "print('CVD=' + os.environ.get('CUDA_VISIBLE_DEVICES', '-'), flush=True)\n"
        "while not os.path.exists(sys.argv[1]): time.sleep(0.05)\n")


def gpus(path: Path, sizes_gib, used_gib=None, util=None) -> None:
    used_gib, util = used_gib or {}, util or {}
    path.write_text(json.dumps([
        {"index": i, "uuid": f"GPU-{i}aaaaaaa-0000", "name": f"card{i}",
         "memory_total": int(s * GiB), "memory_used": int(used_gib.get(i, 0) * GiB),
         "utilization": util.get(i, 50)} for i, s in enumerate(sizes_gib)]))


def uuid(i: int) -> str:
    return f"GPU-{i}aaaaaaa-0000"


def job(root: Path, name: str, argv=None, **job_keys) -> tuple[Path, Path]:
    """A command job that waits for its release file; (job file, release file)."""
    release = root / f"release-{name}"
    doc = {"job": {"name": name, "kind": "command", **job_keys},
           "command": {"argv": argv or [sys.executable, "-c", WAIT, str(release)]}}
    path = root / f"{name}.toml"
    path.write_text(tomli_w.dumps(doc))
    return path, release


def cvd(d, name: str) -> str | None:
    log = d.outputs_dir / name / "train.log"
    if not log.exists():
        return None
    seen = [line.split("=", 1)[1] for line in log.read_text().splitlines()
            if line.startswith("CVD=")]
    return seen[-1] if seen else None


def placement_daemon(daemon_factory, short_tmp, sizes, **config):
    probe = short_tmp / "gpus.json"
    gpus(probe, sizes)
    d = daemon_factory(**FAST, max_concurrent_jobs=8, watchdog__gpu_probe=f"file:{probe}",
                       watchdog__gpu_poll_s=0.2, gpus__reserve_mib=1024, **config).start()
    return d, probe


class Audit:
    """Follows every state change on the events socket (each carries the job's view, its
    placement included) and checks after each one that no GPU holds more planned memory
    than it has less the reserve, nor a whole-GPU job beside another."""

    def __init__(self, d, sizes):
        self.d, self.sizes, self.problems, self.seen = d, sizes, [], 0
        self.client = d.client()
        self.sub = self.client.subscribe(TOPIC_STATE)
        time.sleep(0.3)  # a SUB socket joins late: subscribe before the first submit
        self.jobs = {j["id"]: j for j in d.call("list")["jobs"]}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop.is_set():
            for _, view in self.sub.events(0.1):
                self.jobs[view["id"]] = view
                self.check()
                self.seen += 1

    def check(self):
        plan, count, whole = {}, {}, {}
        for j in self.jobs.values():
            p = j.get("placement") or {}
            if not p.get("active"):
                continue
            for u in p["gpus"]:
                count[u] = count.get(u, 0) + 1
                if p["bytes"] is None:
                    whole[u] = True
                else:
                    plan[u] = plan.get(u, 0) + p["bytes"]
        for i, size in enumerate(self.sizes):
            u = uuid(i)
            if plan.get(u, 0) > size * GiB - GiB:
                self.problems.append(f"{u}: {plan[u] / GiB:.1f} GiB planned")
            if whole.get(u) and count[u] > 1:
                self.problems.append(f"{u}: a whole-GPU job beside {count[u] - 1} other(s)")

    def close(self, at_least: int = 10):
        self.stop.set()
        self.thread.join(5)
        self.sub.close()
        self.client.close()
        assert self.seen >= at_least, self.seen
        assert not self.problems, self.problems[:5]


def test_a_mix_of_jobs_on_four_gpus_is_placed_by_the_rules(daemon_factory, short_tmp):
    sizes = (80, 24, 24, 12)
    d, _ = placement_daemon(daemon_factory, short_tmp, sizes)
    audit = Audit(d, sizes)
    rel = {}
    for name, keys in (("big-a", {"gpus": 1, "gpu_memory_gib": 20}),
                       ("big-b", {"gpus": 1, "gpu_memory_gib": 20}),
                       ("small", {"gpus": 1, "gpu_memory_gib": 10}),
                       ("pinned", {"gpus": [2], "gpu_memory_gib": 2}),
                       ("pair", {"gpus": 2})):
        path, rel[name] = job(short_tmp, name, **keys)
        d.submit(path)
    # cannot fit: refused at submit with the largest GPU's figure
    path, _ = job(short_tmp, "huge", gpus=1, gpu_memory_gib=100)
    r = d.ctl("submit", str(path))
    assert r.returncode != 0 and "can never run here" in r.stderr
    assert "GPU 0 (card0), has 80.0 GiB" in r.stderr, r.stderr
    for name in ("big-a", "big-b", "small", "pinned"):
        d.wait_state(name, "running")
    wait_until(lambda: all(cvd(d, n) for n in ("big-a", "big-b", "small", "pinned")), 10,
               what="every child to print its CUDA_VISIBLE_DEVICES")
    # best fit: the 24 GB cards take the 20 GiB jobs, the 12 GB card the 10 GiB one, and
    # the pinned job shares GPU 2, where 3 GiB are left
    assert cvd(d, "big-a") == uuid(1) and cvd(d, "big-b") == uuid(2)
    assert cvd(d, "small") == uuid(3) and cvd(d, "pinned") == uuid(2)
    pair = d.job("pair")
    assert pair["state"] == "queued" and "waits for 2 GPUs with a GPU to itself" in \
        pair["waiting"], pair["waiting"]
    status = d.ctl("status", check=True).stdout
    rows = {line.split()[1]: line.split() for line in status.splitlines()[1:]}
    assert status.split()[9] == "GPU" and rows["big-a"][9] == "1" and rows["pinned"][9] == "2"
    assert rows["pair"][9] == "-" and rows["pair"][10] == "waits", status
    # what holds GPUs back frees them: the pair goes onto two empty GPUs, never GPU 2
    rel["big-a"].touch()
    rel["small"].touch()
    d.wait_state("pair", "running", timeout=15)
    wait_until(lambda: cvd(d, "pair"), 10, what="the pair's CUDA_VISIBLE_DEVICES")
    got = cvd(d, "pair").split(",")
    assert len(got) == 2 and uuid(2) not in got, got
    shown = d.ctl("gpus", check=True).stdout
    assert "pinned" in shown and "big-b" in shown and "22.0" in shown, shown
    show = d.ctl("show", "big-b", check=True).stdout
    assert "GPU 2" in show and "20.0 GiB planned" in show, show
    for r_ in rel.values():
        r_.touch()
    for name in ("big-b", "pinned", "pair"):
        d.wait_state(name, "succeeded", timeout=15)
    audit.close()


def test_free_memory_that_drops_places_nothing_there(daemon_factory, short_tmp):
    d, probe = placement_daemon(daemon_factory, short_tmp, (24,))
    first, rel1 = job(short_tmp, "first", gpus=1, gpu_memory_gib=10)
    d.submit(first)
    d.wait_state("first", "running")
    gpus(probe, (24,), used_gib={0: 23})  # something else took the rest
    second, rel2 = job(short_tmp, "second", gpus=1, gpu_memory_gib=10)
    d.submit(second)
    time.sleep(1.5)  # several polls
    j = d.job("second")
    assert j["state"] == "queued" and "GPU 0: 0.0 GiB" in j["waiting"], j["waiting"]
    gpus(probe, (24,))  # it is free again: the next poll places the job
    d.wait_state("second", "running", timeout=10)
    assert cvd(d, "second") in (None, uuid(0))
    rel1.touch()
    rel2.touch()
    d.wait_state("second", "succeeded", timeout=10)


def test_restored_jobs_go_back_to_their_gpus(daemon_factory, short_tmp):
    sizes = (24, 24, 24)
    d, probe = placement_daemon(daemon_factory, short_tmp, sizes)
    names = ["r1", "r2", "r3"]
    for n in names:
        d.submit(job(short_tmp, n, gpus=1, gpu_memory_gib=10)[0])
    for n in names:
        d.wait_state(n, "running")
    wait_until(lambda: all(cvd(d, n) for n in names), 10, what="CUDA_VISIBLE_DEVICES")
    before = {n: cvd(d, n) for n in names}
    assert before == {"r1": uuid(0), "r2": uuid(0), "r3": uuid(1)}  # best fit packs
    pids = [d.job(n)["pid"] for n in names]
    for pid in pids:
        daemon_factory.track_pgid(pid)
    d.stop(signal.SIGKILL)
    # now GPU 1 reads 12 GiB taken: best fit alone would put r1 there
    gpus(probe, sizes, used_gib={1: 12})
    for n in names:
        (d.outputs_dir / n / "train.log").write_text("")
    d.start()
    for n in names:
        wait_until(lambda: (d.job(n)["state"], d.job(n)["attempts"]) == ("running", 2), 20,
                   what=f"{n}'s second attempt")
    wait_until(lambda: all(cvd(d, n) for n in names), 10, what="CUDA_VISIBLE_DEVICES")
    assert {n: cvd(d, n) for n in names} == before
    for n in names:
        (short_tmp / f"release-{n}").touch()


STEPS = ("import json, os, time, zmq\n"
         "s = zmq.Context().socket(zmq.PUSH)\n"
         "s.connect(os.environ['FLUXGYM_PROGRESS_ENDPOINT'])\n"
         "i = 0\n"
         "while True:\n"
         "    i += 1\n"
         "    s.send(json.dumps(dict(event='step', step=i, total=10**6,"
         " job=os.environ['FLUXGYM_JOB_ID'])).encode())\n"
         "    time.sleep(0.1)\n")


def test_the_gpu_rule_judges_a_job_by_its_own_gpu(daemon_factory, short_tmp):
    d, probe = placement_daemon(daemon_factory, short_tmp, (24, 24))
    gpus(probe, (24, 24), util={0: 0, 1: 90})
    path, _ = job(short_tmp, "on-one", argv=[sys.executable, "-c", STEPS], gpus=[1],
                  gpu_memory_gib=4)
    doc = __import__("tomllib").loads(path.read_text())
    doc["watchdog"] = {"gpu_idle_window_s": 1.0, "max_restarts": 0}
    path.write_text(tomli_w.dumps(doc))
    d.submit(path)
    d.wait_state("on-one", "running")
    time.sleep(3)  # GPU 0 idle for three windows: not this job's GPU
    assert d.job("on-one")["state"] == "running"
    gpus(probe, (24, 24), util={0: 90, 1: 0})
    j = d.wait_state("on-one", ["stalled", "failed"], timeout=15)
    assert "GPU below 5%" in j["reason"], j["reason"]


def test_a_lora_job_is_placed_by_the_planners_figures(daemon_factory, short_tmp, tiny):
    from tinylora import job_file

    path = job_file(tiny, "placed-lora", max_train_steps=4, save_every_n_steps=0)
    plan = json.loads(__import__("subprocess").run(
        [sys.executable, "-m", "trainer.plan", str(path), "--json"], check=True,
        capture_output=True, text=True).stdout)["tiers"]
    peaks = {t: p["peak_bytes"] for t, p in plan.items()}
    small, large = min(peaks.values()) * 0.8 / GiB, max(peaks.values()) * 3 / GiB
    probe = short_tmp / "gpus.json"
    gpus(probe, (small,))
    d = daemon_factory(**FAST, watchdog__gpu_probe=f"file:{probe}",
                       gpus__reserve_mib=0).start()
    r = d.ctl("submit", str(path))
    assert r.returncode != 0 and "can never run here" in r.stderr, r.stderr
    assert "no tier fits: lower resolution" in r.stderr, r.stderr
    gpus(probe, (small, large))
    d.submit(path)
    j = d.wait_state("placed-lora", "succeeded", timeout=120)
    p = j["placement"]
    # auto resolved on the GPU it went to, for its room there: the fastest tier, "none"
    assert p["gpus"] == [uuid(1)] and p["tier"] == "none" and p["bytes"] == peaks["none"]
    assert p["room"] == int(large * GiB) and not p["active"]
    assert j["spec"]["gpu_plan"] == peaks
    assert "CUDA_VISIBLE_DEVICES" not in (d.outputs_dir / "placed-lora" / "job.toml").read_text()


OOM = ("import os, sys, time\n"
       "print('CVD=' + os.environ['CUDA_VISIBLE_DEVICES'], flush=True)\n"
       "time.sleep(0.5)\n"
       "print('torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB',"
       " flush=True)\n"
       "sys.exit(1)\n")


def test_out_of_memory_beside_another_job_is_resumed_once_on_a_gpu_of_its_own(
        daemon_factory, short_tmp):
    d, _ = placement_daemon(daemon_factory, short_tmp, (24, 24))
    path, rel = job(short_tmp, "neighbour", gpus=1, gpu_memory_gib=8)
    d.submit(path)
    d.wait_state("neighbour", "running")
    oom, _ = job(short_tmp, "oom", argv=[sys.executable, "-c", OOM], gpus=1, gpu_memory_gib=8)
    d.submit(oom)
    j = d.wait_state("oom", "failed", timeout=30)
    seen = [line.split("=", 1)[1] for line in
            (d.outputs_dir / "oom" / "train.log").read_text().splitlines()
            if line.startswith("CVD=")]
    # first beside its neighbour (best fit), then alone on the other GPU; the second
    # out-of-memory failure is judged as one
    assert seen == [uuid(0), uuid(1)], seen
    assert j["attempts"] == 2 and "out of memory: lower train_batch_size" in j["reason"]
    reasons = [e["reason"] for e in j["events"]]
    assert any("resumed once on a GPU of its own" in r for r in reasons), reasons
    assert j["placement"]["alone"] and j["restarts"] == 0
    rel.touch()
    d.wait_state("neighbour", "succeeded")


def test_a_two_gpu_job_is_not_starved_by_a_stream_of_one_gpu_jobs(daemon_factory, short_tmp):
    """One-GPU jobs of 1 s keep arriving (two fit on a GPU); a two-GPU job that needs both
    GPUs empty, queued behind them, holds the GPUs as they free up and starts within the
    time the jobs already there take to end."""
    sizes = (24, 24)
    d, _ = placement_daemon(daemon_factory, short_tmp, sizes)
    audit = Audit(d, sizes)
    stop = threading.Event()
    short = [sys.executable, "-c", "import time; time.sleep(1)"]

    def stream():
        n = 0
        while not stop.is_set():
            n += 1
            d.submit(job(short_tmp, f"small-{n}", argv=short, gpus=1, gpu_memory_gib=8)[0])
            time.sleep(0.25)

    feeder = threading.Thread(target=stream, daemon=True)
    feeder.start()
    try:
        wait_until(lambda: sum(j["state"] == "running" for j in d.call("list")["jobs"]) >= 3,
                   10, what="the stream to fill the GPUs")
        path, _ = job(short_tmp, "pair", argv=short, gpus=2, gpu_memory_gib=20)
        queued_at = time.monotonic()
        d.submit(path)
        d.wait_state("pair", ["running", "succeeded"], timeout=10)
        waited = time.monotonic() - queued_at
    finally:
        stop.set()
        feeder.join(5)
    assert waited < 4.0, waited  # the small jobs last 1 s: bounded, not starved
    d.wait_state("pair", "succeeded", timeout=10)
    audit.close(at_least=20)
