import sqlite3

import pytest

from fluxgymd.protocol import ErrorCode, FluxgymError
from fluxgymd.states import InvalidTransition, JobState
from fluxgymd.store import SCHEMA_VERSION, Store, StoreError

S = JobState


def spec(name="a"):
    return {"name": name, "kind": "command", "command": {"argv": ["true"]}}


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "db.sqlite3")
    yield s
    s.close()


def test_new_job_is_queued_with_its_history(store, tmp_path):
    job = store.add_job(spec(), tmp_path / "a")
    assert job["state"] == "queued" and job["id"] == 1
    assert [e["to_state"] for e in store.events(1)] == ["queued"]


def test_transition_persists_state_fields_and_event_together(store, tmp_path):
    store.add_job(spec(), tmp_path / "a")
    store.transition(1, S.STARTING, "attempt 1", attempts=1)
    job = store.transition(1, S.RUNNING, "pid 42", pid=42)
    assert (job["state"], job["pid"], job["attempts"], job["reason"]) == ("running", 42, 1, "pid 42")
    ev = store.events(1)
    assert [(e["from_state"], e["to_state"]) for e in ev] == [
        (None, "queued"), ("queued", "starting"), ("starting", "running")]
    # a fresh connection sees it: it is on disk, not in a cache
    other = Store(store.path)
    assert other.get(1)["state"] == "running"
    other.close()


def test_invalid_transition_changes_nothing(store, tmp_path):
    store.add_job(spec(), tmp_path / "a")
    with pytest.raises(InvalidTransition):
        store.transition(1, S.SUCCEEDED, "nope", pid=9)
    job = store.get(1)
    assert job["state"] == "queued" and job["pid"] is None
    assert len(store.events(1)) == 1


def test_finished_time_is_set_and_cleared_on_requeue(store, tmp_path):
    store.add_job(spec(), tmp_path / "a")
    store.transition(1, S.CANCELLED, "by user")
    assert store.get(1)["finished_at"] is not None
    store.transition(1, S.QUEUED, "retry")
    assert store.get(1)["finished_at"] is None


def test_names_are_unique_with_a_helpful_error(store, tmp_path):
    store.add_job(spec("x"), tmp_path / "x")
    with pytest.raises(FluxgymError) as e:
        store.add_job(spec("x"), tmp_path / "x")
    assert e.value.code is ErrorCode.CONFLICT and "submit --name NEW" in e.value.message


def test_find_by_id_or_name(store, tmp_path):
    store.add_job(spec("first"), tmp_path / "first")
    store.add_job(spec("1234"), tmp_path / "1234")
    assert store.find("1")["name"] == "first"
    assert store.find("first")["id"] == 1
    assert store.find("1234")["id"] == 2  # no job 1234: falls back to the name
    with pytest.raises(FluxgymError) as e:
        store.find("nope")
    assert e.value.code is ErrorCode.NOT_FOUND


def test_queue_order_is_fifo_by_queue_time(store, tmp_path):
    for n in "abc":
        store.add_job(spec(n), tmp_path / n)
    store.transition(1, S.CANCELLED, "x")
    store.transition(1, S.QUEUED, "retry")  # back of the line
    assert [j["name"] for j in store.next_queued(10)] == ["b", "c", "a"]


def test_update_refuses_state_columns(store, tmp_path):
    store.add_job(spec(), tmp_path / "a")
    with pytest.raises(StoreError):
        store.update(1, state="running")


def test_metrics_round_trip(store, tmp_path):
    store.add_job(spec(), tmp_path / "a")
    store.add_metrics([(1, 1.0, 1, s, 1.0 / s, 1e-4) for s in range(1, 11)])
    m = store.metrics(1, limit=3)
    assert [r["step"] for r in m] == [8, 9, 10]


def test_schema_version_and_refusal_of_a_newer_database(tmp_path):
    path = tmp_path / "db.sqlite3"
    Store(path).close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(StoreError, match="newer than this fluxgymd"):
        Store(path)


def test_a_queued_job_waits_until_every_dependency_succeeded(store, tmp_path):
    a = store.add_job(spec("a"), tmp_path / "a")
    b = store.add_job(spec("b"), tmp_path / "b")
    c = store.add_job(spec("c"), tmp_path / "c", priority=5, after=[a["id"], b["id"]])
    d = store.add_job(spec("d"), tmp_path / "d")
    # c is first by priority but waits: a, b and d may start, in queue order
    assert [j["name"] for j in store.next_queued(10)] == ["a", "b", "d"]
    assert [j["name"] for j in store.after(c["id"])] == ["a", "b"]
    assert [j["name"] for j in store.dependents(a["id"])] == ["c"]
    for job in (a, b):
        store.transition(job["id"], S.STARTING, "x")
        store.transition(job["id"], S.RUNNING, "x")
        store.transition(job["id"], S.SUCCEEDED, "x")
        names = [j["name"] for j in store.next_queued(10)]
        assert names == (["c", "d"] if job is b else ["b", "d"])
    # removing a job takes its edges with it (both directions)
    store.remove(a["id"])
    assert [j["name"] for j in store.after(c["id"])] == ["b"]
    store.remove(c["id"])
    assert store.dependents(b["id"]) == [] and d["id"] == 4
    with pytest.raises(sqlite3.IntegrityError):  # only jobs that exist can be waited for
        store.add_job(spec("e"), tmp_path / "e", after=[99])
