"""`fluxgymd --recover-db`: a damaged job database becomes a new one with every row that can
still be read, plus the jobs whose rows were lost, rebuilt from their output folders' owner
markers (as failed, so a person decides; `fluxgymctl retry` resumes them from their
checkpoints). The damaged file is kept beside the new one."""
from __future__ import annotations

import fcntl
import os
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

from . import ownership
from .config import Config
from .store import Store, StoreError

# The tables a damaged database is recovered from, row by row, in this order.
RECOVERED_TABLES = ("meta", "jobs", "events", "metrics", "deps")


def _say(text: str) -> None:
    print(f"fluxgymd: {text}", file=sys.stderr)


def recover_db(cfg: Config) -> int:
    path = cfg.state_dir / "fluxgymd.sqlite3"
    if not path.exists():
        _say(f"there is no job database at {path}; nothing to recover")
        return 1
    lock = os.open(cfg.state_dir / "fluxgymd.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        _say(f"a fluxgymd is running with {cfg.state_dir}; stop it first "
             "(systemctl stop fluxgymd)")
        return 1
    try:
        try:
            Store(path).close()
            _say(f"{path} passes SQLite's integrity check; nothing to recover")
            return 0
        except StoreError:
            pass
        report = recover(path)
        for table, counts in report["tables"].items():
            _say(f"{table}: {counts['copied']} row(s) copied, {counts['unreadable']} unreadable")
        rebuilt = adopt_marked_folders(path, cfg.outputs_dir)
        if rebuilt:
            _say(f"rebuilt {len(rebuilt)} job(s) from their output folders: "
                 + ", ".join(rebuilt) + " (as failed: `fluxgymctl retry NAME` resumes them)")
        _say(f"recovered into {path}; the damaged file is {report['damaged']}")
        return 0
    except (OSError, sqlite3.Error) as e:
        _say(f"recovery failed: {e}")
        return 1
    finally:
        os.close(lock)


def adopt_marked_folders(path, outputs_dir) -> list[str]:
    """Jobs of this store whose rows were lost, from the markers in their folders."""
    store = Store(path)
    rebuilt = []
    try:
        known = {j["id"] for j in store.list_jobs()}
        names = {j["name"] for j in store.list_jobs()}
        for entry in sorted(os.scandir(outputs_dir), key=lambda e: e.name) \
                if outputs_dir.is_dir() else []:
            if not entry.is_dir():
                continue
            owner = ownership.read_owner(outputs_dir / entry.name)
            if not owner or owner.get("store") != store.id:
                continue
            job_id, spec = owner.get("job"), owner.get("spec")
            if not isinstance(job_id, int) or not isinstance(spec, dict) or job_id in known \
                    or spec.get("name") in names:
                continue
            store.adopt(job_id, spec, outputs_dir / entry.name,
                        f"rebuilt by fluxgymd --recover-db on {time.strftime('%Y-%m-%d %H:%M')} "
                        "from its output folder (its database row was unreadable); retry to "
                        "resume it from its newest checkpoint")
            rebuilt.append(f"{job_id} ({spec.get('name')})")
    finally:
        store.close()
    return rebuilt


def recover(path: Path) -> dict[str, Any]:
    """Copy every row that can still be read from a damaged database into a new one at
    `path`; the damaged file is renamed beside it. Returns what was kept and lost."""
    path = Path(path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    damaged = path.with_name(f"{path.name}.damaged-{stamp}")
    os.replace(path, damaged)
    for suffix in ("-wal", "-shm"):  # they belong to the damaged file now
        side = Path(str(path) + suffix)
        if side.exists():
            os.replace(side, Path(str(damaged) + suffix))
    old = sqlite3.connect(f"file:{damaged}?mode=ro", uri=True, isolation_level=None)
    new = Store(path, check=False)
    report: dict[str, Any] = {"damaged": str(damaged), "tables": {}}
    try:
        for table in RECOVERED_TABLES:
            report["tables"][table] = _copy_rows(old, new.db, table)
    finally:
        old.close()
        new.close()
    return report


def _copy_rows(old: sqlite3.Connection, new: sqlite3.Connection, table: str) -> dict[str, int]:
    """Rows in rowid order; a page that cannot be read is skipped and the scan goes on
    after it."""
    try:
        cols = [r[1] for r in old.execute(f"PRAGMA table_info({table})")]
        top = old.execute(f"SELECT MAX(rowid) FROM {table}").fetchone()[0] or 0
    except sqlite3.DatabaseError:
        cols, top = [], 0
    keep = [c for c in cols if c in
            {r[1] for r in new.execute(f"PRAGMA table_info({table})")}]
    copied = lost = 0
    after = 0
    if not keep:
        return {"copied": 0, "unreadable": 0}
    names = ", ".join(keep)
    marks = ", ".join("?" * len(keep))
    new.execute("BEGIN")
    while after < top:
        try:
            rows = old.execute(f"SELECT rowid, {names} FROM {table} WHERE rowid > ? "
                               "ORDER BY rowid LIMIT 500", (after,)).fetchall()
        except sqlite3.DatabaseError:
            rows = None
        if rows is None:  # read one at a time past the bad page
            after += 1
            try:
                row = old.execute(f"SELECT rowid, {names} FROM {table} WHERE rowid = ?",
                                  (after,)).fetchone()
            except sqlite3.DatabaseError:
                lost += 1
                continue
            rows = [row] if row else []
            if not rows:
                continue
        if not rows:
            break
        for row in rows:
            try:
                new.execute(f"INSERT OR REPLACE INTO {table} (rowid, {names}) VALUES (?, {marks})",
                            tuple(row))
                copied += 1
            except sqlite3.DatabaseError:
                lost += 1
            after = row[0]
    new.execute("COMMIT")
    return {"copied": copied, "unreadable": lost}
