"""GPU placement: decision time per scheduling pass, and packing efficiency against
first-fit in GPU order, both on the same simulated pod in the same run.

The pod: 8 GPUs (2×80, 2×48, 3×24, 1×12 GB). The queue: --jobs (1000) jobs of mixed sizes
(the tiers' budgets and FluxGym's presets: 7.5, 11.5, 15, 20, 22, 40 GiB; one in five asks
for 2 GPUs), durations drawn from a fixed seed (30 s to 30 min), all queued at once.

- Decision time: one `placement.decide` pass over the full queue, with the pod nearly full
  (7 GiB of room per GPU: every job is judged, none ends the pass early), median of
  --passes passes. Target: <= 5 ms.
- Packing efficiency: each policy runs the whole queue to the end (an event simulation:
  at every job's end, one pass places what fits). Efficiency = planned GiB-seconds of the
  jobs ÷ (the pod's GiB × the time until the last job ends). Printed as fluxgymd's
  efficiency ÷ first-fit's (first GPUs in index order that fit, the same queue order, no
  GPUs held for the head). Target: >= 1.0. Medians over --seeds seeds.

    .venv/bin/python bench/placement.py [--jobs 1000] [--seeds 5] [--passes 50]
"""
from __future__ import annotations

import argparse
import heapq
import random
import statistics
import time

from fluxgymd.placement import GiB, Gpu, Need, Placed, Waiting, decide

POD = (80, 80, 48, 48, 24, 24, 24, 12)
SIZES = (7.5, 11.5, 15, 20, 22, 40)
RESERVE = GiB


def pod() -> list[Gpu]:
    return [Gpu(i, f"GPU-{i}", int(g * GiB), int(g * GiB)) for i, g in enumerate(POD)]


def workload(n: int, seed: int) -> list[tuple[Waiting, float]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        count = 2 if rng.random() < 0.2 else 1
        out.append((Waiting(i, Need(count, int(rng.choice(SIZES) * GiB))),
                    rng.uniform(30, 1800)))
    return out


def first_fit(gpus, placed, queue, slots):
    """The baseline: each job on the first GPUs in index order with room by plan."""
    planned = {g.uuid: 0 for g in gpus}
    for p in placed:
        for u in p.gpus:
            planned[u] += p.bytes
    start = []
    for w in queue:
        if len(start) >= slots:
            break
        fit = [g.uuid for g in gpus if g.total - RESERVE - planned[g.uuid] >= w.need.bytes]
        if len(fit) >= w.need.count:
            chosen = tuple(fit[:w.need.count])
            for u in chosen:
                planned[u] += w.need.bytes
            start.append((w.job_id, chosen, w.need.bytes))
    return start


def ours(gpus, placed, queue, slots):
    return [(d.job_id, d.gpus, d.bytes)
            for d in decide(gpus, placed, queue, slots, reserve=RESERVE).start]


def simulate(policy, jobs: list[tuple[Waiting, float]]) -> float:
    """Packing efficiency of a policy over the whole queue."""
    base = pod()
    duration = {w.job_id: d for w, d in jobs}
    queue = [w for w, _ in jobs]
    running: dict[int, Placed] = {}
    ends: list[tuple[float, int]] = []
    now = 0.0
    work = sum(w.need.bytes * w.need.count * duration[w.job_id] for w in queue)
    while queue or running:
        # readings: every running job has allocated what it planned
        used = {g.uuid: 0 for g in base}
        for p in running.values():
            for u in p.gpus:
                used[u] += p.bytes
        gpus = [Gpu(g.index, g.uuid, g.total, g.total - used[g.uuid]) for g in base]
        started = policy(gpus, list(running.values()), queue, len(queue))
        for job_id, where, amount in started:
            running[job_id] = Placed(job_id, where, amount, True)
            heapq.heappush(ends, (now + duration[job_id], job_id))
        taken = {s[0] for s in started}
        queue = [w for w in queue if w.job_id not in taken]
        if not ends:
            raise SystemExit("a job can never be placed: the workload is wrong")
        now, done = heapq.heappop(ends)
        del running[done]
    capacity = sum(g.total for g in base)
    return work / (capacity * now)


def pass_time(jobs, passes: int) -> float:
    """Median seconds of one decide() over the whole queue with the pod nearly full, so
    that almost every job is judged (the slow case: nothing stops the pass early)."""
    gpus = pod()
    placed = [Placed(10_000 + i, (g.uuid,), g.total - 8 * GiB, True)
              for i, g in enumerate(gpus)]
    gpus = [Gpu(g.index, g.uuid, g.total, 8 * GiB) for g in gpus]
    queue = [w for w, _ in jobs]
    times = []
    for _ in range(passes):
        t = time.perf_counter()
        decide(gpus, placed, queue, slots=8, reserve=RESERVE)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--passes", type=int, default=50)
    args = ap.parse_args()
    ratios, mine, theirs, passes = [], [], [], []
    for seed in range(args.seeds):
        jobs = workload(args.jobs, seed)
        a, b = simulate(ours, jobs), simulate(first_fit, jobs)
        mine.append(a)
        theirs.append(b)
        ratios.append(a / b)
        passes.append(pass_time(jobs, args.passes))
        print(f"seed {seed}: efficiency {a:.3f} vs first-fit {b:.3f} = {a / b:.3f}; "
              f"a pass over {args.jobs} jobs {passes[-1] * 1000:.2f} ms")
    print(f"decision time per pass: {statistics.median(passes) * 1000:.2f} ms median "
          "(target <= 5 ms)")
    print(f"packing efficiency: {statistics.median(mine):.3f} vs first-fit "
          f"{statistics.median(theirs):.3f}: ratio {statistics.median(ratios):.3f} median "
          f"of {args.seeds} seeds (target >= 1.0)")


if __name__ == "__main__":
    main()
