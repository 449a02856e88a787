"""A lora job that names its model by catalog name (`base_model`): on a fresh models dir the
daemon submits one download job for what is missing, the lora job waits for it and then
trains to the same LoRA as with the files given by path; a failed download fails it with
the reason; two jobs share one download; a daemon SIGKILLed during the download resumes the
chain. The Hub is the stand-in (tests/hubstandin.py) serving the tiny model's single files."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fluxgymd.testing import wait_until
from hubstandin import Hub, serve_tiny_flux
from tests.conftest import FAST
from tinylora import assert_identical, job_file, lora


@pytest.fixture
def hub(tiny_single):
    """The tiny model's single files as catalog entries on the Hub stand-in."""
    h = Hub()
    h.entries = serve_tiny_flux(h, tiny_single)
    yield h.start()
    h.stop()


def chain_daemon(daemon_factory, hub, sub: str):
    d = daemon_factory(sub, **FAST, **{f"models__{n}": e for n, e in hub.entries.items()})
    d.config["models__dir"] = str(d.root / "models")  # fresh: nothing on disk
    d.extra_env = {"HF_ENDPOINT": hub.url}
    return d.start()


def by_name(tiny: Path, name: str, **more) -> Path:
    """The tiny LoRA job, its model named by catalog name only."""
    return job_file(tiny, name, pretrained_model=None, base_model="tiny-flux", **more)


@pytest.fixture(scope="module")
def by_path(tiny, tiny_single):
    """The reference: the same job with the files given by path, trained alone."""
    out = tiny / "out" / "chain-ref"
    out.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([sys.executable, "-m", "trainer", str(job_file(tiny, "chain-ref",
                                                                      **tiny_single)),
                        "--output-dir", str(out)], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    return lora(out, "chain-ref")


def test_jobs_that_name_a_missing_model_share_one_download_and_train_as_by_path(
        daemon_factory, hub, tiny, by_path):
    hub.rate = 150_000  # bytes/s: the download lasts long enough to SIGKILL the daemon in it
    d = chain_daemon(daemon_factory, hub, "chain")
    first = d.submit(by_name(tiny, "chain-a"))
    second = d.submit(by_name(tiny, "chain-b"))
    assert any("not on disk yet: fetched first by job" in w for w in first["warnings"])
    (dl,) = {a["id"] for a in first["after"]} | {a["id"] for a in second["after"]}
    downloads = [j for j in d.call("list")["jobs"] if j["kind"] == "download"]
    assert [j["id"] for j in downloads] == [dl]  # one download, shared
    assert d.job("chain-a")["waiting"].startswith(f"after {downloads[0]['name']} (")
    d.wait_state(dl, "running")
    wait_until(lambda: (d.job(dl)["step"] or 0) > 200_000, 60, 0.05, "some bytes in")
    daemon_factory.track_pgid(d.job(dl)["pid"])
    d.stop(signal.SIGKILL)  # mid-download: the chain must go on after a restart
    d.start()
    for name in ("chain-a", "chain-b"):
        done = d.wait_state(name, "succeeded", timeout=300, interval=0.5)
        assert done["attempts"] == 1
        assert_identical(lora(Path(done["output_dir"]), name), by_path)
    assert d.job(dl)["state"] == "succeeded" and d.job(dl)["attempts"] == 2
    served = sum(hub.served.values())
    total = sum(len(v) for v in hub.files.values())
    assert served < 1.5 * total, (served, total)  # resumed, not fetched from the start
    # once on disk, a new job names it and runs at once: no download, no wait
    third = d.submit(by_name(tiny, "chain-c"))
    assert third["after"] == [] and not third.get("waiting")


def test_a_failed_download_fails_the_job_that_waits_for_it(daemon_factory, hub, tiny):
    del hub.files[("acme/tiny-t5", Path(hub.entries["tiny-t5"]["file"]).name)]
    hub.files[("acme/tiny-t5", "other.bin")] = b"x"  # the repo is there, the file is not
    d = chain_daemon(daemon_factory, hub, "chain-fail")
    job = d.submit(by_name(tiny, "chain-x"))
    failed = d.wait_state(job["id"], "failed", timeout=60)
    dl = job["after"][0]["name"]
    assert failed["reason"].startswith(f"dependency {dl} failed: ")
    assert "acme/tiny-t5 has no file" in failed["reason"] and failed["attempts"] == 0


def test_base_model_mistakes_are_named_at_submit(daemon_factory, hub, tiny):
    d = chain_daemon(daemon_factory, hub, "chain-bad")
    r = d.ctl("submit", str(job_file(tiny, "bad", pretrained_model=None, base_model="nope")))
    assert r.returncode == 4 and "train.base_model 'nope' is not in the model catalog" in \
        r.stderr and "tiny-flux" in r.stderr, r.stderr
    r = d.ctl("submit", str(job_file(tiny, "bad2", pretrained_model=None, base_model="tiny-ae")))
    assert r.returncode == 4 and "a ae is not a base model" in r.stderr, r.stderr
