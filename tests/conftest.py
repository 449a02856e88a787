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

# `make check` runs the tests that start nothing: no daemon, trainer, model, cluster, systemd
# or browser. A test is an end-to-end one (marker `e2e`, left to `make test`) when it uses a
# fixture that starts or builds one of those, or its module is end to end as a whole.
E2E_FIXTURES = {"daemon", "daemon_factory", "tiny", "straight", "cluster", "kohya", "single",
                "fixtures", "installed", "system", "browser"}
E2E_MODULES = {"test_systemd_e2e", "test_web_browser", "test_slurm_e2e", "test_kohya_e2e",
               "test_faults", "test_daemon_chaos", "test_restart", "test_own_processes"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__.rpartition(".")[2]
        if module in E2E_MODULES or E2E_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)


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
def tiny_single(tiny):
    """The tiny model as FluxGym holds its files (`trainer.tiny --single-file`, in
    tiny/single/): {train key: path}, as the command prints them."""
    out = subprocess.run([sys.executable, "-m", "trainer.tiny", str(tiny / "single"),
                          "--single-file"], env=dict(os.environ, HF_HUB_OFFLINE="1"),
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(" = ", 1) for line in out.stdout.splitlines() if " = " in line)
    return {k: v.strip('"') for k, v in lines.items()}


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
