"""Fixtures that run the real daemon and the real CLI in throwaway directories.

Everything a test starts is stopped by pid in teardown, even when the test fails: the
daemon (SIGTERM, then SIGKILL), and any job process group a test left behind.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from fluxgymd.testing import Daemon

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def short_tmp():
    # ipc socket paths must stay under 107 bytes; pytest's tmp_path can be longer.
    d = Path(tempfile.mkdtemp(prefix="fg", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def daemon_factory(short_tmp):
    made: list[Daemon] = []
    pgids: list[int] = []

    def make(sub: str = "d", **config) -> Daemon:
        d = Daemon(short_tmp / sub, **config)
        d.root.mkdir(parents=True, exist_ok=True)
        made.append(d)
        return d

    make.track_pgid = pgids.append  # tests register job groups that may outlive a daemon
    yield make
    for d in made:
        # jobs the daemon knows: remember their groups before stopping it
        try:
            if d.proc and d.proc.poll() is None:
                for j in d.call("list")["jobs"]:
                    if j["pid"]:
                        pgids.append(j["pid"])
        except Exception:
            pass
        d.stop(signal.SIGTERM, timeout=20)
    for pgid in pgids:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            pass


@pytest.fixture
def daemon(daemon_factory):
    return daemon_factory(**FAST).start()


# Short watchdog times so restarts and give-ups happen within a test's patience.
FAST = {"watchdog__kill_grace_s": 3.0, "watchdog__backoff_s": 0.2, "watchdog__backoff_max_s": 1.0}


@pytest.fixture(scope="session")
def cluster():
    """A single-node Slurm in namespaces (slurm_cluster.py), shared by the session's tests;
    skipped with the reason where it cannot run (not root)."""
    from slurm_cluster import Cluster, unavailable

    why = unavailable()
    if why:
        pytest.skip(why)
    c = Cluster(Path("/var/lib/fluxgymd-tests") / f"slurm-{os.getpid()}").start()
    yield c
    c.stop()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A tiny random Flux pipeline (root/model) and a small dataset (root/data), written by
    the trainer's own `python -m trainer.tiny` in a subprocess."""
    root = tmp_path_factory.mktemp("tiny")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    subprocess.run([sys.executable, "-m", "trainer.tiny", str(root / "model")], check=True,
                   env=env, capture_output=True, timeout=180)
    subprocess.run([sys.executable, "-m", "trainer.tiny", "--dataset", str(root / "data")],
                   check=True, env=env, capture_output=True, timeout=60)
    return root


@pytest.fixture(scope="session")
def straight(tiny):
    """The LoRA of an uninterrupted run of the shared tiny job: what every interrupted,
    killed or recovered run must reproduce bit for bit."""
    from tinylora import job_file, lora

    out = tiny / "out" / "straight"
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "stderr.log", "wb") as log:
        rc = subprocess.run([sys.executable, "-m", "trainer", str(job_file(tiny, "straight")),
                             "--output-dir", str(out)], stdout=log, stderr=subprocess.STDOUT,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=300).returncode
    assert rc == 0, (out / "stderr.log").read_text()[-3000:]
    return lora(out, "straight")
