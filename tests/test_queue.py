"""The queue: FIFO, never more than max_concurrent_jobs at once, nothing lost."""

from fluxgymd.testing import wait_until, write_job


def test_200_jobs_two_at_a_time(daemon_factory, short_tmp):
    d = daemon_factory(max_concurrent_jobs=2).start()
    marks = short_tmp / "marks"
    # Each child stamps its own start and end (O_APPEND lines are atomic), so concurrency
    # is measured from the children, not from the daemon's own bookkeeping.
    script = (f'echo "start $FLUXGYM_JOB_ID $(date +%s%N)" >> {marks}; sleep 0.01; '
              f'echo "end $FLUXGYM_JOB_ID $(date +%s%N)" >> {marks}')
    ids = []
    with d.client() as c:
        for i in range(200):
            f = write_job(short_tmp, f"q{i:03d}", ["sh", "-c", script])
            ids.append(c.call("submit", text=f.read_text(), source=str(f))["id"])
    assert len(set(ids)) == 200

    def all_done():
        counts = d.call("list")["counts"]
        return counts.get("succeeded") == 200 and counts

    wait_until(all_done, timeout=240, interval=0.5, what="200 jobs to succeed")
    events = []
    for line in marks.read_text().splitlines():
        kind, job, ns = line.split()
        events.append((int(ns), 0 if kind == "end" else 1, int(job)))
    assert len(events) == 400
    running, peak = 0, 0
    for _, kind, _ in sorted(events):
        running += 1 if kind else -1
        peak = max(peak, running)
    assert peak == 2, f"peak concurrency {peak}"
    # FIFO: jobs started in the order they were submitted (two at a time)
    starts = [job for _, kind, job in sorted(events) if kind == 1]
    assert all(abs(pos - ids.index(j)) <= 1 for pos, j in enumerate(starts))
    jobs = d.call("list")["jobs"]
    assert sorted(j["id"] for j in jobs) == sorted(ids)
    assert all(j["attempts"] == 1 for j in jobs)
