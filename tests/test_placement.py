"""The placement policy (placement.py) and its daemon-side inputs (gpus.py): pure functions,
each rule with its own test."""
from __future__ import annotations

import random

import pytest

from fluxgymd import gpus as G
from fluxgymd.placement import GiB, Gpu, Need, Placed, Waiting, decide, never_fits
from fluxgymd.watchdog import Budget, Ending, Limits, after_exit
from trainer import tiers

TIERS = {"none": 40 * GiB, "24G": 20 * GiB, "16G": 14 * GiB, "12G": 10 * GiB, "8G": 7 * GiB}


def pod(*free_gib, used=None):
    """GPUs of these sizes, all free unless `used` says (GiB used per GPU)."""
    used = used or {}
    return [Gpu(i, f"GPU-{i}", int(g * GiB), int((g - used.get(i, 0)) * GiB), f"card{i}")
            for i, g in enumerate(free_gib)]


def w(job_id, count=1, gib=None, **kw):
    return Waiting(job_id, Need(count, None if gib is None else int(gib * GiB), **kw))


def placed_from(p):
    return [Placed(d.job_id, d.gpus, d.bytes, False) for d in p.start]


def committed(gpus, placed):
    """Planned bytes per GPU, and whole-GPU jobs per GPU."""
    plan = {g.uuid: 0 for g in gpus}
    whole = {g.uuid: 0 for g in gpus}
    jobs = {g.uuid: 0 for g in gpus}
    for p in placed:
        for u in p.gpus:
            jobs[u] += 1
            if p.bytes is None:
                whole[u] += 1
            else:
                plan[u] += p.bytes
    return plan, whole, jobs


def assert_not_overcommitted(gpus, placed, reserve=0):
    plan, whole, jobs = committed(gpus, placed)
    for g in gpus:
        assert plan[g.uuid] <= g.total - reserve, f"{g.uuid} over-committed"
        assert whole[g.uuid] == 0 or jobs[g.uuid] == 1, f"{g.uuid} shared by a whole-GPU job"


def test_the_issues_mix_on_four_gpus():
    gpus = pod(80, 24, 24, 12)
    queue = [w(1, gib=20), w(2, gib=20), w(3, gib=10),
             w(4, gib=8, pinned=("GPU-2",)), w(5, count=2), w(6, gib=9)]
    p = decide(gpus, [], queue, slots=10, reserve=GiB)
    where = {d.job_id: d.gpus for d in p.start}
    # best fit: the 24 GB cards take the 20 GiB jobs, the 12 GB card the 10 GiB one
    assert where[1] == ("GPU-1",) and where[2] == ("GPU-2",) and where[3] == ("GPU-3",)
    assert 4 not in where and "GPU 2" in p.waits[4]  # its GPU has 3 GiB left
    assert p.held == {4: ("GPU-2",)}  # and it holds it
    assert 5 not in where  # two whole GPUs: none is empty but the 80 GB one
    assert where[6] == ("GPU-0",)
    assert_not_overcommitted(gpus, placed_from(p), GiB)


def test_a_job_that_can_never_fit_says_the_largest_gpu_and_the_tier_that_would():
    gpus = pod(24, 24)
    why = never_fits(gpus, Need(1, 40 * GiB, tiers=TIERS), reserve=GiB)
    assert "24.0 GiB" in why and "23.0 GiB after the 1024 MiB reserve" in why
    assert 'tier 24G (20.0 GiB) would fit: set train.vram = "24G"' in why
    assert never_fits(gpus, Need(1, 20 * GiB)) is None
    assert "3 GPUs and fluxgymd hands out 2" in never_fits(gpus, Need(3, GiB))
    assert never_fits(gpus, Need(1, 2 * GiB, pinned=("GPU-9",))) is not None
    assert "no tier fits" in never_fits(pod(6), Need(1, None, tiers=TIERS, auto=True))
    assert never_fits(pod(12), Need(1, None, tiers=TIERS, auto=True)) is None
    assert "hands out none" in never_fits([], Need(1))


def test_free_memory_read_low_places_nothing_there():
    gpus = pod(80, 24, used={0: 75})  # someone else took 75 GB of GPU 0
    p = decide(gpus, [], [w(1, gib=15), w(2, gib=15)], slots=5)
    assert [d.gpus for d in p.start] == [("GPU-1",)]
    assert 2 in p.waits


def test_a_placed_job_that_has_not_allocated_yet_counts_against_the_reading():
    gpus = pod(24)  # reads all free: the placed job has not allocated yet
    placed = [Placed(9, ("GPU-0",), 15 * GiB, allocated=False)]
    assert decide(gpus, placed, [w(1, gib=10)], slots=5).start == []
    # once it has, the reading shows it and the plan is not counted twice
    gpus = pod(24, used={0: 15})
    placed = [Placed(9, ("GPU-0",), 15 * GiB, allocated=True)]
    assert [d.job_id for d in decide(gpus, placed, [w(1, gib=8)], slots=5).start] == [1]
    # a job that uses more than it planned shows in the reading
    gpus = pod(24, used={0: 20})
    assert decide(gpus, placed, [w(1, gib=8)], slots=5).start == []


def test_small_jobs_share_a_large_gpu_unless_exclusive():
    gpus = pod(80)
    shared = decide(gpus, [], [w(1, gib=11), w(2, gib=11)], slots=5)
    assert [d.gpus for d in shared.start] == [("GPU-0",), ("GPU-0",)]
    alone = decide(gpus, [], [w(1, gib=11), w(2, gib=11)], slots=5, exclusive=True)
    assert [d.job_id for d in alone.start] == [1]
    # a job that must be alone after an out-of-memory failure gets an empty GPU
    placed = [Placed(9, ("GPU-0",), 11 * GiB, True)]
    lone = decide(pod(80, 80, used={0: 11}), placed, [w(1, gib=11, alone=True)], slots=5)
    assert [d.gpus for d in lone.start] == [("GPU-1",)]


def test_a_whole_gpu_job_needs_an_empty_gpu_and_then_blocks_it():
    gpus = pod(24, 24)
    placed = [Placed(9, ("GPU-0",), 2 * GiB, True)]
    p = decide(pod(24, 24, used={0: 2}), placed, [w(1), w(2, gib=1)], slots=5)
    assert [(d.job_id, d.gpus, d.bytes) for d in p.start] == [(1, ("GPU-1",), None),
                                                               (2, ("GPU-0",), GiB)]
    placed += [Placed(1, ("GPU-1",), None, True)]
    p = decide(gpus, placed, [w(3, gib=1, pinned=("GPU-1",))], slots=5)
    assert p.start == [] and "GPU 1" in p.waits[3]


def test_auto_takes_the_fastest_tier_that_fits_the_gpu_it_is_placed_on():
    auto = Need(1, None, tiers=TIERS, auto=True)
    p = decide(pod(24, 80), [], [Waiting(1, auto)], slots=5, choose=tiers.choose)
    d = p.start[0]
    assert (d.gpus, d.tier, d.bytes) == (("GPU-1",), "none", 40 * GiB) and d.room == 80 * GiB
    # the 80 GB card half taken by another job's plan: 24G on it, not "none"
    placed = [Placed(9, ("GPU-0",), 50 * GiB, False)]
    d = decide(pod(80), placed, [Waiting(1, auto)], slots=5, choose=tiers.choose).start[0]
    assert d.tier == "24G" and d.room == 30 * GiB
    # a multi-GPU job: the tier must fit each of its GPUs
    two = Need(2, None, tiers=TIERS, auto=True)
    d = decide(pod(80, 16), [], [Waiting(1, two)], slots=5, choose=tiers.choose).start[0]
    assert d.tier == "16G" and d.gpus == ("GPU-0", "GPU-1")


def test_priority_order_and_slots():
    gpus = pod(24, 24)
    p = decide(gpus, [], [w(1, gib=5), w(2, gib=5), w(3, gib=5)], slots=2)
    assert [d.job_id for d in p.start] == [1, 2]
    # jobs without GPUs take a slot and nothing else
    p = decide(gpus, [], [w(1, count=0), w(2, gib=5)], slots=1)
    assert [d.job_id for d in p.start] == [1]


def test_a_two_gpu_job_is_not_starved_by_a_stream_of_one_gpu_jobs():
    """Simulated: one-GPU jobs of 10 s keep arriving behind a two-GPU job; it starts once
    the jobs already on the GPUs end, and never later."""
    gpus = pod(24, 24)
    rng = random.Random(3)
    running: dict[int, tuple[float, Placed]] = {}
    queue = [w(0, count=2, gib=20)]
    next_id, now, started = 1, 0.0, None
    for _ in range(3):
        queue.append(w(next_id, gib=8))
        next_id += 1
    queue.insert(0, queue.pop(0))
    # two small jobs already run when the big one arrives
    running[100] = (5.0, Placed(100, ("GPU-0",), 8 * GiB, True))
    running[101] = (7.0, Placed(101, ("GPU-1",), 8 * GiB, True))
    while now < 200 and started is None:
        p = decide(gpus, [r for _, r in running.values()], queue, slots=8)
        for d in p.start:
            running[d.job_id] = (now + rng.uniform(5, 15), Placed(d.job_id, d.gpus, d.bytes,
                                                                  True))
            queue = [q for q in queue if q.job_id != d.job_id]
            if d.job_id == 0:
                started = now
        assert_not_overcommitted(gpus, [r for _, r in running.values()])
        if 0 in {q.job_id for q in queue}:
            assert p.held == {0: ("GPU-0", "GPU-1")}
        now += 1.0
        running = {k: v for k, v in running.items() if v[0] > now}
        queue.append(w(next_id, gib=8))  # one more small job every second
        next_id += 1
    assert started is not None and started <= 8.0


def test_a_pass_over_a_thousand_jobs_never_overcommits():
    rng = random.Random(11)
    gpus = pod(80, 80, 48, 48, 24, 24, 24, 12)
    queue = [w(i, count=rng.choice([1, 1, 1, 2]), gib=rng.choice([6, 10, 14, 20, 30]))
             for i in range(1000)]
    p = decide(gpus, [], queue, slots=1000)
    assert len(p.start) > 8
    assert_not_overcommitted(gpus, placed_from(p))


# --- gpus.py: the daemon's inputs ------------------------------------------------------------
def test_the_inventory_from_probe_stats():
    stats = [{"index": 0, "uuid": "GPU-a", "name": "A", "memory_total": 10 * GiB,
              "memory_used": 4 * GiB},
             {"index": 1, "uuid": "GPU-b", "memory_total": 20 * GiB, "memory_used": None},
             {"index": 2, "uuid": "GPU-c", "memory_total": None}]  # no figures: left out
    inv = G.inventory(stats, ())
    assert [(g.index, g.free) for g in inv] == [(0, 6 * GiB), (1, 20 * GiB)]
    assert [g.index for g in G.inventory(stats, ("GPU-b",))] == [1]
    assert [g.index for g in G.inventory(stats, ("0",))] == [0]


def test_what_a_job_asks_for():
    inv = pod(24, 24, 24)
    lora = {"kind": "lora", "train": {"vram": "auto"}, "gpu_plan": dict(TIERS)}
    need = G.need_of(lora, 1, inv)
    assert need.auto and need.count == 1 and need.tiers["24G"] == 20 * GiB
    need = G.need_of({**lora, "train": {"vram": "12G"}}, 1, inv)
    assert need.bytes == 10 * GiB and not need.auto
    # resumed from a checkpoint made at 16G: that tier's need, not auto's
    assert G.need_of(lora, 1, inv, {"levers_tier": "16G"}).bytes == 14 * GiB
    # pinned by index, by UUID, by its own CUDA_VISIBLE_DEVICES; unknown GPUs refused
    assert G.need_of({"kind": "command", "gpus": [2]}, 0, inv).pinned == ("GPU-2",)
    assert G.need_of({"kind": "command", "gpus": ["GPU-1"]}, 0, inv).pinned == ("GPU-1",)
    own = {"kind": "command", "command": {"env": {"CUDA_VISIBLE_DEVICES": "0,2"}}}
    need = G.need_of(own, 0, inv)
    assert need.count == 2 and need.pinned == ("GPU-0", "GPU-2") and need.bytes is None
    with pytest.raises(ValueError, match="GPU '7'"):
        G.need_of({"kind": "command", "gpus": [7]}, 0, inv)
    # back to its GPUs after a restart, unless it must now be alone
    assert G.need_of(lora, 1, inv, {"gpus": ["GPU-1"]}).pinned == ("GPU-1",)
    assert G.need_of(lora, 1, inv, {"gpus": ["GPU-1"], "alone": True}).pinned == ()
    assert G.need_of({"kind": "command", "gpu_memory_gib": 3}, 0, inv).count == 0
    assert G.need_of({"kind": "command", "gpus": 1, "gpu_memory_gib": 3}, 0,
                     inv).bytes == 3 * GiB


@pytest.mark.parametrize("args,tier", [
    (["--optimizer_type", "adamw8bit"], "20G"), (["--optimizer_type=adafactor"], "16G"),
    (["--optimizer_type", "adafactor", "--split_mode"], "12G"), ([], "20G")])
def test_a_kohya_jobs_need_is_its_fluxgym_preset(args, tier):
    assert G.kohya_preset(args)[0] == tier


def test_out_of_memory_beside_another_job_is_resumed_once_alone():
    tail = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    shared = Ending(code=1, signal=None, description="exited with code 1", output_tail=tail,
                    shared_gpu=True)
    out = after_exit(shared, Budget(), Limits())
    assert out.action == "resume" and out.alone and "GPU of its own" in out.reason
    alone = after_exit(Ending(code=1, signal=None, description="exited with code 1",
                              output_tail=tail), Budget(), Limits())
    assert alone.action == "failed" and "out of memory" in alone.reason


def test_with_slurm_gpus_become_a_gres_unless_one_is_set():
    from fluxgymd.executors.slurm_job import SlurmSettings

    assert "--gres=gpu:2" in G.with_gres(SlurmSettings(), {"gpus": 2}).options()
    assert "--gres=gpu:1" in G.with_gres(SlurmSettings(), {"gpus": ["GPU-x"]}).options()
    assert G.with_gres(SlurmSettings(gres="gpu:a100:1"), {"gpus": 2}).gres == "gpu:a100:1"
    assert not any(o.startswith("--gres") for o in G.with_gres(SlurmSettings(), {}).options())


def test_job_gpus_keys_are_checked_for_their_form():
    from fluxgymd import jobspec
    from fluxgymd.kinds import Policy
    from fluxgymd.protocol import FluxgymError

    base = '[job]\nname = "g"\nkind = "command"\n{}\n[command]\nargv = ["true"]\n'
    ok = jobspec.parse(base.format('gpus = [1, "GPU-ab"]\ngpu_memory_gib = 7.5'),
                       policy=Policy(allow_command_jobs=True))
    assert ok["gpus"] == [1, "GPU-ab"] and ok["gpu_memory_gib"] == 7.5
    for line, words in (("gpus = -1", "job.gpus must be 0 to 64"),
                        ("gpus = [0, 0]", "names a GPU twice"),
                        ("gpus = []", "a number of GPUs (gpus = 1) or a list"),
                        ("gpus = true", "job.gpus must be a number of GPUs"),
                        ("gpus = \"two\"", "job.gpus must be a number of GPUs"),
                        ("gpu_memory_gib = 0", "gpu_memory_gib must be more than 0")):
        with pytest.raises(FluxgymError) as e:
            jobspec.parse(base.format(line), policy=Policy(allow_command_jobs=True))
        assert words in e.value.message, (line, e.value.message)


def test_the_gpus_config_keys(tmp_path):
    from fluxgymd import config

    f = tmp_path / "c.toml"
    f.write_text('[gpus]\nuse = [0, "GPU-x"]\nreserve_mib = 0\nexclusive = true\n')
    c = config.load(f, env={})
    assert (c.gpus_use, c.gpu_reserve_mib, c.gpus_exclusive) == (("0", "GPU-x"), 0, True)
    assert config.load(None, env={"FLUXGYM_GPUS_USE": "all"}).gpus_use == ()
    assert config.load(None, env={}).gpu_reserve_mib == 1024
    f.write_text('[gpus]\nuse = "some"\n')
    with pytest.raises(config.ConfigError, match='gpus.use must be "all" or a list'):
        config.load(f, env={})
    f.write_text('[gpus]\nreserve = 5\n')
    with pytest.raises(config.ConfigError, match="reserve_mib"):
        config.load(f, env={})


def test_metrics_count_the_jobs_and_planned_memory_per_gpu():
    from fluxgymd import promexport

    body, _ = promexport.render({"counts": {}, "running": [], "counters": {}, "gpus": [
        {"index": 0, "name": "A", "planned": 20 * GiB, "memory_total": 80 * GiB,
         "jobs": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]},
        {"index": 1, "name": "B", "planned": 0, "jobs": []}]})
    text = body.decode()
    assert 'fluxgymd_gpu_jobs{gpu="0",name="A"} 2.0' in text
    assert 'fluxgymd_gpu_jobs{gpu="1",name="B"} 0.0' in text
    assert 'fluxgymd_gpu_planned_bytes{gpu="0",name="A"} 2.147483648e+10' in text
