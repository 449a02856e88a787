"""The SQLite store: the only writer of job state.

Every state change goes through `transition`, which checks it against `states` and writes
the new state and its history row in one transaction, so the database never holds a state
without the event that explains it. Schema changes are numbered migrations (PRAGMA
user_version), applied in order when the store opens.
"""
from __future__ import annotations

import contextlib
import json
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any, Iterable

from .protocol import ErrorCode, FluxgymError
from .states import JobState, check_removal, check_transition

MIGRATIONS: list[str] = [
    # 1: jobs, their transition history and their loss curves
    """
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT NOT NULL UNIQUE,
        kind TEXT NOT NULL,
        spec TEXT NOT NULL,
        output_dir TEXT NOT NULL,
        state TEXT NOT NULL,
        reason TEXT NOT NULL DEFAULT '',
        attempts INTEGER NOT NULL DEFAULT 0,
        restarts INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        queued_at REAL,
        started_at REAL,
        finished_at REAL,
        updated_at REAL NOT NULL,
        pid INTEGER,
        pid_started REAL,
        phase TEXT,
        step INTEGER,
        total_steps INTEGER,
        loss REAL,
        lr REAL,
        seconds_per_step REAL,
        checkpoint TEXT,
        checkpoint_step INTEGER,
        exit_code INTEGER,
        cancel_requested INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX jobs_state ON jobs(state, queued_at, id);
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id INTEGER NOT NULL REFERENCES jobs(id),
        at REAL NOT NULL,
        from_state TEXT,
        to_state TEXT NOT NULL,
        reason TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX events_job ON events(job_id, id);
    CREATE TABLE metrics (
        job_id INTEGER NOT NULL REFERENCES jobs(id),
        at REAL NOT NULL,
        attempt INTEGER NOT NULL,
        step INTEGER NOT NULL,
        loss REAL,
        lr REAL
    );
    CREATE INDEX metrics_job ON metrics(job_id, step);
    """,
    # 2: the watchdog's no-progress breaker survives a daemon restart
    """
    ALTER TABLE jobs ADD COLUMN no_progress INTEGER NOT NULL DEFAULT 0;
    """,
    # 3: queue priorities; the store's own identity and run-time settings (queue paused,
    # max_concurrent_jobs) that outlive a restart
    """
    ALTER TABLE jobs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
    DROP INDEX jobs_state;
    CREATE INDEX jobs_queue ON jobs(state, priority DESC, queued_at, id);
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
    # 4: a lora job's memory plan, as its trainer reported it (JSON)
    """
    ALTER TABLE jobs ADD COLUMN memory_plan TEXT;
    """,
    # 5: where an attempt runs (executors/): its executor, the Slurm job id, node and state,
    # and how far its output and event files were read (a restarted daemon reads on)
    """
    ALTER TABLE jobs ADD COLUMN executor TEXT NOT NULL DEFAULT 'local';
    ALTER TABLE jobs ADD COLUMN external_id TEXT;
    ALTER TABLE jobs ADD COLUMN node TEXT;
    ALTER TABLE jobs ADD COLUMN external_state TEXT;
    ALTER TABLE jobs ADD COLUMN output_offset INTEGER;
    ALTER TABLE jobs ADD COLUMN events_offset INTEGER;
    """,
    # 6: job dependencies: job_id starts only once every after_id has succeeded
    """
    CREATE TABLE deps (
        job_id INTEGER NOT NULL REFERENCES jobs(id),
        after_id INTEGER NOT NULL REFERENCES jobs(id),
        PRIMARY KEY (job_id, after_id)
    );
    CREATE INDEX deps_after ON deps(after_id);
    """,
    # 7: where a job runs on this machine's GPUs (placement.py), JSON; kept after it ends
    """
    ALTER TABLE jobs ADD COLUMN placement TEXT;
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)

# Columns a caller may set outside a transition (progress, pid bookkeeping).
UPDATABLE = frozenset(
    {
        "pid", "pid_started", "phase", "step", "total_steps", "loss", "lr",
        "seconds_per_step", "checkpoint", "checkpoint_step", "exit_code",
        "cancel_requested", "attempts", "restarts", "no_progress", "started_at", "memory_plan",
        "executor", "external_id", "node", "external_state", "output_offset", "events_offset",
        "placement",
    }
)
RECOVER_HINT = (
    "stop fluxgymd and run `fluxgymd --recover-db` (with the same --state-dir or --config): "
    "it keeps the damaged file beside the new one and copies every row that can still be read"
)


class StoreError(Exception):
    pass


class Store:
    def __init__(self, path: Path, clock=time.time, check: bool = True):
        self.path = Path(path)
        self.clock = clock
        self.db = sqlite3.connect(str(self.path), isolation_level=None, timeout=10)
        self.db.row_factory = sqlite3.Row
        try:
            self.db.execute("PRAGMA journal_mode=WAL")
            # FULL: a reclaimed spot instance must not forget a job it had acknowledged.
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA foreign_keys=ON")
            if check:
                self._check_integrity()
            self._migrate()
            self.id = self._store_id()
        except sqlite3.DatabaseError as e:
            self.db.close()
            raise StoreError(f"{self.path} is damaged ({e}); {RECOVER_HINT}") from None

    def _check_integrity(self) -> None:
        """A page damaged in the middle of the file opens fine and fails later, in the
        middle of a restore: read every page now, once, and refuse with what to do."""
        rows = [r[0] for r in self.db.execute("PRAGMA quick_check(5)")]
        if rows != ["ok"]:
            raise StoreError(f"{self.path} is damaged ({'; '.join(rows)[:300]}); {RECOVER_HINT}")

    def _store_id(self) -> str:
        """A random id for this database: output folders are marked with it, so a store
        that is recreated never adopts another store's folders."""
        row = self.db.execute("SELECT value FROM meta WHERE key = 'store_id'").fetchone()
        if row:
            return row[0]
        new = uuid.uuid4().hex
        self.db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('store_id', ?)", (new,))
        return self.db.execute("SELECT value FROM meta WHERE key = 'store_id'").fetchone()[0]

    # --- run-time settings ----------------------------------------------------------
    def setting(self, key: str, default: str | None = None) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", ("setting." + key,)).fetchone()
        return row[0] if row else default

    def set_setting(self, key: str, value: str | None) -> None:
        with self._tx():
            if value is None:
                self.db.execute("DELETE FROM meta WHERE key = ?", ("setting." + key,))
            else:
                self.db.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) "
                                "DO UPDATE SET value = excluded.value", ("setting." + key, value))

    def close(self) -> None:
        self.db.close()

    def _migrate(self) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} has schema version {version}, newer than this fluxgymd "
                f"understands ({SCHEMA_VERSION}); upgrade fluxgymd"
            )
        for number in range(version, SCHEMA_VERSION):
            with self._tx():
                for stmt in MIGRATIONS[number].split(";"):
                    if stmt.strip():
                        self.db.execute(stmt)
                self.db.execute(f"PRAGMA user_version={number + 1}")

    @contextlib.contextmanager
    def _tx(self):
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # --- jobs -----------------------------------------------------------------------
    def add_job(self, spec: dict[str, Any], output_dir: Path, priority: int = 0,
                prepare=None, after: list[int] = ()) -> dict[str, Any]:
        """Queue a job, waiting for the jobs `after` (ids that exist: so no cycle can form).
        `prepare(job_id)` runs inside the transaction (the daemon claims the output folder
        there): when it raises, the job was never added."""
        now = self.clock()
        with self._tx():
            taken = self.db.execute(
                "SELECT id, state FROM jobs WHERE name = ?", (spec["name"],)
            ).fetchone()
            if taken:
                raise FluxgymError(
                    ErrorCode.CONFLICT,
                    f"the name {spec['name']!r} is taken by job {taken['id']} "
                    f"({taken['state']}); choose another name (submit --name NEW)"
                    + (", or retry that job" if taken["state"] in ("failed", "cancelled") else ""),
                )
            cur = self.db.execute(
                "INSERT INTO jobs (name, kind, spec, output_dir, state, reason, created_at,"
                " queued_at, updated_at, priority) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (spec["name"], spec["kind"], json.dumps(spec), str(output_dir),
                 JobState.QUEUED.value, "submitted", now, now, now, priority),
            )
            job_id = cur.lastrowid
            self.db.executemany("INSERT OR IGNORE INTO deps (job_id, after_id) VALUES (?, ?)",
                                [(job_id, a) for a in after])
            self._event(job_id, None, JobState.QUEUED, "submitted", now)
            if prepare is not None:
                prepare(job_id)
        return self.get(job_id)

    def _event(self, job_id: int, old, new, reason: str, now: float) -> None:
        self.db.execute(
            "INSERT INTO events (job_id, at, from_state, to_state, reason) VALUES (?,?,?,?,?)",
            (job_id, now, old.value if old else None, JobState(new).value, reason),
        )

    def transition(
        self, job_id: int, new: JobState | str, reason: str, **fields: Any
    ) -> dict[str, Any]:
        """Move a job to `new`, with its reason and any field changes, atomically."""
        now = self.clock()
        with self._tx():
            row = self.db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise FluxgymError(ErrorCode.NOT_FOUND, f"no job with id {job_id}")
            old, new = check_transition(row["state"], new)
            if new is JobState.QUEUED:
                fields.setdefault("queued_at", now)
            if new in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED):
                fields.setdefault("finished_at", now)
            elif new is JobState.QUEUED:
                fields.setdefault("finished_at", None)
            fields.update(state=new.value, reason=reason, updated_at=now)
            self._set(job_id, fields)
            self._event(job_id, old, new, reason, now)
        return self.get(job_id)

    def update(self, job_id: int, **fields: Any) -> None:
        bad = set(fields) - UPDATABLE
        if bad:
            raise StoreError(f"not updatable outside a transition: {', '.join(sorted(bad))}")
        fields["updated_at"] = self.clock()
        self._set(job_id, fields)

    def _set(self, job_id: int, fields: dict[str, Any]) -> None:
        cols = ", ".join(f"{k} = ?" for k in fields)
        self.db.execute(f"UPDATE jobs SET {cols} WHERE id = ?", (*fields.values(), job_id))

    def get(self, job_id: int) -> dict[str, Any]:
        row = self.db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise FluxgymError(ErrorCode.NOT_FOUND, f"no job with id {job_id}")
        return _job(row)

    def find(self, ref: str) -> dict[str, Any]:
        """A job by id (all digits) or by name. Names are never all digits (jobspec refuses
        them), so an id and a name cannot be confused."""
        ref = str(ref).strip()
        if ref.isdigit():
            row = self.db.execute("SELECT * FROM jobs WHERE id = ?", (int(ref),)).fetchone()
            if row is not None:
                return _job(row)
        row = self.db.execute("SELECT * FROM jobs WHERE name = ?", (ref,)).fetchone()
        if row is None:
            raise FluxgymError(
                ErrorCode.NOT_FOUND,
                f"no job named or numbered {ref!r}; `fluxgymctl status` lists them",
            )
        return _job(row)

    def list_jobs(self, states: Iterable[str] | None = None) -> list[dict[str, Any]]:
        if states:
            states = [JobState(s).value for s in states]
            marks = ",".join("?" * len(states))
            rows = self.db.execute(
                f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY id", states
            )
        else:
            rows = self.db.execute("SELECT * FROM jobs ORDER BY id")
        return [_job(r) for r in rows]

    def next_queued(self, limit: int) -> list[dict[str, Any]]:
        """The queued jobs that may start, in queue order: every job they wait for has
        succeeded (one still waiting never holds up those behind it)."""
        rows = self.db.execute(
            "SELECT * FROM jobs WHERE state = 'queued' AND NOT EXISTS (SELECT 1 FROM deps d"
            " JOIN jobs a ON a.id = d.after_id WHERE d.job_id = jobs.id AND a.state !="
            " 'succeeded') ORDER BY priority DESC, queued_at, id LIMIT ?", (limit,)
        )
        return [_job(r) for r in rows]

    def after(self, job_id: int) -> list[dict[str, Any]]:
        """The jobs `job_id` waits for (or waited for), in id order."""
        rows = self.db.execute("SELECT jobs.* FROM deps JOIN jobs ON jobs.id = deps.after_id"
                               " WHERE deps.job_id = ? ORDER BY jobs.id", (job_id,))
        return [_job(r) for r in rows]

    def dependents(self, job_id: int) -> list[dict[str, Any]]:
        """The jobs that wait for (or waited for) `job_id`, in id order."""
        rows = self.db.execute("SELECT jobs.* FROM deps JOIN jobs ON jobs.id = deps.job_id"
                               " WHERE deps.after_id = ? ORDER BY jobs.id", (job_id,))
        return [_job(r) for r in rows]

    def adopt(self, job_id: int, spec: dict[str, Any], output_dir: Path, reason: str) -> None:
        """Re-create a job whose row was lost (recovery), failed, with its history saying so."""
        now = self.clock()
        with self._tx():
            self.db.execute(
                "INSERT INTO jobs (id, name, kind, spec, output_dir, state, reason, created_at,"
                " updated_at, finished_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, spec["name"], spec.get("kind", "command"), json.dumps(spec),
                 str(output_dir), JobState.FAILED.value, reason, now, now, now))
            self._event(job_id, None, JobState.FAILED, reason, now)

    def move(self, job_id: int, to: str | None, priority: int | None) -> dict[str, Any]:
        """Reorder a queued job: a new priority, and/or to the front or back of the queued
        jobs (taking the first's or last's priority)."""
        with self._tx():
            row = self.db.execute("SELECT state, priority, queued_at FROM jobs WHERE id = ?",
                                  (job_id,)).fetchone()
            if row is None:
                raise FluxgymError(ErrorCode.NOT_FOUND, f"no job with id {job_id}")
            if row["state"] != JobState.QUEUED.value:
                raise FluxgymError(ErrorCode.INVALID_STATE, f"job {job_id} is {row['state']}; "
                                   "only queued jobs can be moved")
            fields: dict[str, Any] = {}
            if priority is not None:
                fields["priority"] = priority
            if to is not None:
                q = self.db.execute(
                    "SELECT MAX(priority) AS hi, MIN(priority) AS lo, MIN(queued_at) AS first,"
                    " MAX(queued_at) AS last FROM jobs WHERE state = 'queued' AND id != ?",
                    (job_id,)).fetchone()
                if q["first"] is not None:
                    if to == "first":
                        fields.update(priority=max(q["hi"], fields.get("priority", q["hi"])),
                                      queued_at=q["first"] - 1e-3)
                    else:
                        fields.update(priority=min(q["lo"], fields.get("priority", q["lo"])),
                                      queued_at=q["last"] + 1e-3)
            if fields:
                fields["updated_at"] = self.clock()
                self._set(job_id, fields)
        return self.get(job_id)

    def remove(self, job_id: int) -> dict[str, Any]:
        """Forget a job: its row, history and loss curve, in one transaction. Only jobs
        that nothing runs (states.REMOVABLE) can go."""
        with self._tx():
            row = self.db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise FluxgymError(ErrorCode.NOT_FOUND, f"no job with id {job_id}")
            check_removal(row["state"])
            for table in ("metrics", "events"):
                self.db.execute(f"DELETE FROM {table} WHERE job_id = ?", (job_id,))
            self.db.execute("DELETE FROM deps WHERE job_id = ? OR after_id = ?",
                            (job_id, job_id))
            self.db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        return _job(row)

    def counts(self) -> dict[str, int]:
        rows = self.db.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
        return {r["state"]: r["n"] for r in rows}

    # --- history ----------------------------------------------------------------------
    def events(self, job_id: int, limit: int = 50) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT at, from_state, to_state, reason FROM events WHERE job_id = ?"
            " ORDER BY id DESC LIMIT ?", (job_id, limit),
        ).fetchall()
        return [dict(r) for r in reversed(rows)]

    def add_metrics(self, rows: list[tuple[int, float, int, int, float | None, float | None]]):
        """rows: (job_id, at, attempt, step, loss, lr); one transaction for a batch."""
        if rows:
            with self._tx():
                self.db.executemany(
                    "INSERT INTO metrics (job_id, at, attempt, step, loss, lr)"
                    " VALUES (?,?,?,?,?,?)", rows,
                )

    def metrics(self, job_id: int, limit: int = 1000) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT at, attempt, step, loss, lr FROM metrics WHERE job_id = ?"
            " ORDER BY rowid DESC LIMIT ?", (job_id, limit),
        ).fetchall()
        return [dict(r) for r in reversed(rows)]


def _job(row: sqlite3.Row) -> dict[str, Any]:
    job = dict(row)
    job["spec"] = json.loads(job["spec"])
    job["cancel_requested"] = bool(job["cancel_requested"])
    job["memory_plan"] = json.loads(job["memory_plan"]) if job.get("memory_plan") else None
    job["placement"] = json.loads(job["placement"]) if job.get("placement") else None
    return job

