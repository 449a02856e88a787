"""kind = "download" and `fluxgymctl models`: the real huggingface_hub against a Hub stand-in
on 127.0.0.1 (tests/hubstandin.py, through HF_ENDPOINT). A pull is right to the byte,
resumes after a cut connection and after its child is SIGKILLed (it does not start over),
fails once with what to do where retrying cannot help, and never lets its token out."""
from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path

import pytest

from fluxgymd.testing import wait_until
from hubstandin import Hub
from tests.conftest import FAST

MB = 1024 * 1024
TOKEN = "hf_standin_secret_token_0123456789"


@pytest.fixture
def hub():
    h = Hub().start()
    yield h
    h.stop()


def model(repo: str, file: str, **more) -> dict:
    return {"repo": repo, "file": file, "part": "transformer", **more}


def hub_daemon(daemon_factory, hub, short_tmp, sub="dl", env=None, **config):
    d = daemon_factory(sub, **FAST, models__dir=str(short_tmp / sub / "models"), **config)
    d.extra_env = {"HF_ENDPOINT": hub.url, **(env or {})}
    return d.start()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_pull_fetches_the_model_and_what_it_needs_to_the_byte(daemon_factory, hub, short_tmp):
    big = hub.add("acme/flux-tiny", "flux1-tiny.sft", os.urandom(12 * MB))
    small = hub.add("acme/parts", "ae.sft", os.urandom(3 * MB))
    d = hub_daemon(daemon_factory, hub, short_tmp,
                   models__tiny=model("acme/flux-tiny", "flux1-tiny.sft", needs=["tiny-ae"],
                                      size=12 * MB, description="a tiny one"),
                   **{"models__tiny-ae": model("acme/parts", "ae.sft", part="ae")})
    listed = {m["name"]: m for m in d.call("models")["models"]}
    assert not listed["tiny"]["present"] and listed["flux-dev"]["repo"] == "cocktailpeanut/xulf-dev"
    r = d.ctl("models", "pull", "tiny", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "succeeded" in r.stdout and "15.7 MB/15.7 MB" in r.stdout.replace("  ", " "), r.stdout
    root = Path(d.config["models__dir"])
    assert sha(root / "tiny" / "flux1-tiny.sft") == big and sha(root / "tiny-ae" / "ae.sft") == small
    listed = {m["name"]: m for m in d.call("models")["models"]}
    assert listed["tiny"]["present"] and listed["tiny-ae"]["present"]
    # pulled again: nothing to fetch, the job finds its files and succeeds without a byte
    served = dict(hub.served)
    assert d.ctl("models", "pull", "tiny", timeout=60).returncode == 0
    assert hub.served == served
    # rm: refused while a job that would use it waits; then gone
    d.call("pause")
    waiting = d.call("pull", models=["tiny"])  # a new job: the files are there, it queues
    r = d.ctl("models", "rm", "tiny")
    assert r.returncode == 4 and f"tiny is used by {waiting['name']}" in r.stderr, r.stderr
    d.ctl("cancel", waiting["name"], check=True)
    assert d.ctl("models", "rm", "tiny", check=True).stdout.startswith("removed tiny")
    assert not (root / "tiny").exists()


def test_a_cut_connection_and_a_killed_child_resume_the_file(daemon_factory, hub, short_tmp):
    size = 120 * MB
    want = hub.add("acme/big", "big.safetensors", os.urandom(size))
    hub.rate = 40 * MB  # 3 s for the file: room to kill it in the middle
    hub.cut_after[("acme/big", "big.safetensors")] = 30 * MB  # once: huggingface_hub resumes
    d = hub_daemon(daemon_factory, hub, short_tmp, models__big=model("acme/big",
                                                                      "big.safetensors"))
    job = d.call("pull", models=["big"])
    wait_until(lambda: (d.job(job["id"])["step"] or 0) > 70 * MB, 60, 0.05, "70 MB in")
    pid = d.job(job["id"])["pid"]
    os.kill(pid, signal.SIGKILL)
    done = d.wait_state(job["id"], "succeeded", timeout=120, interval=0.2)
    assert done["attempts"] == 2, done["reason"]
    assert sha(Path(d.config["models__dir"]) / "big" / "big.safetensors") == want
    served = hub.served[("acme/big", "big.safetensors")]
    print(f"120 MB file, cut at 30 MB and SIGKILLed past 70 MB: {served / MB:.1f} MB served, "
          f"{served / size:.2f} x the file; GETs with Range: {hub.ranges}")
    assert served <= 1.2 * size, served / size
    log = "\n".join(d.call("logs", job=job["name"], lines=400)["lines"])
    assert "Trying to resume download" in log  # the cut, resumed inside the first attempt


def test_a_download_that_stops_moving_is_a_stall_and_resumes(daemon_factory, hub, short_tmp):
    """The server stops sending (the connection stays open): no bytes for the step limit is
    a stall; the attempt is stopped and the next one resumes from what it had."""
    size = 40 * MB
    want = hub.add("acme/slow", "f.sft", os.urandom(size))
    hub.hang_after[("acme/slow", "f.sft")] = 25 * MB
    d = hub_daemon(daemon_factory, hub, short_tmp, models__s=model("acme/slow", "f.sft"),
                   watchdog__stall_floor_s=2.0, watchdog__stall_factor=1.0)
    job = d.call("pull", models=["s"])
    done = d.wait_state(job["id"], "succeeded", timeout=90, interval=0.2)
    assert done["attempts"] == 2 and done["restarts"] == 1, done["reason"]
    stalled = [e["reason"] for e in d.job(job["id"])["events"] if e["to_state"] == "stalled"]
    assert stalled and stalled[0].startswith("no step for"), stalled
    assert sha(Path(d.config["models__dir"]) / "s" / "f.sft") == want
    assert hub.ranges[-1].startswith("bytes=") and hub.served[("acme/slow", "f.sft")] < 1.2 * size


@pytest.mark.parametrize("fault", ["gated", "missing", "disk"])
def test_what_retrying_cannot_fix_fails_once_with_what_to_do(daemon_factory, hub, short_tmp,
                                                             fault):
    hub.add("acme/gated", "model.sft", os.urandom(MB))
    hub.gated["acme/gated"] = TOKEN
    hub.add("acme/open", "model.sft", os.urandom(2 * MB))
    entries = {"models__g": model("acme/gated", "model.sft", gated=True),
               "models__m": model("acme/open", "nope.sft"),
               "models__o": model("acme/open", "model.sft")}
    env = {"FLUXGYMD_FREE_BYTES": "1000"} if fault == "disk" else {}
    d = hub_daemon(daemon_factory, hub, short_tmp, f"dl-{fault}", env=env, **entries)
    name = {"gated": "g", "missing": "m", "disk": "o"}[fault]
    job = d.call("pull", models=[name])
    done = d.wait_state(job["id"], "failed", timeout=60)
    assert done["attempts"] == 1 and done["restarts"] == 0, done
    why = done["reason"]
    assert "not retried" in why
    if fault == "gated":
        assert f"acme/gated is gated (licence at {hub.url}/acme/gated)" in why
        assert "no token was given" in why and "token_file under [hub]" in why
    elif fault == "missing":
        assert "acme/open has no file nope.sft" in why
    else:
        assert "not enough disk: 2.1 MB left to fetch and 1.0 kB free" in why
        assert not list((Path(d.config["models__dir"]) / "o").rglob("*.incomplete"))


def test_the_token_reaches_the_hub_and_nothing_else(daemon_factory, hub, short_tmp):
    want = hub.add("acme/gated", "model.sft", os.urandom(2 * MB))
    hub.gated["acme/gated"] = TOKEN
    token_file = short_tmp / "hf-token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o644)
    d = hub_daemon(daemon_factory, hub, short_tmp, models__g=model("acme/gated", "model.sft"),
                   hub__token_file=str(token_file))
    job = d.call("pull", models=["g"])
    failed = d.wait_state(job["id"], "failed")  # a token file others may read is refused
    assert "is readable by others (mode 644); chmod 600 it" in failed["reason"]
    token_file.chmod(0o600)
    d.ctl("retry", job["name"], check=True)
    d.wait_state(job["id"], "succeeded", timeout=60)
    assert sha(Path(d.config["models__dir"]) / "g" / "model.sft") == want
    assert any(auth == f"Bearer {TOKEN}" for _, _, auth in hub.requests)
    # and nowhere else: the job's log, the daemon's log, the store, what show and list say
    d.stop()
    places = {"train.log": (Path(d.outputs_dir) / job["name"] / "train.log").read_bytes(),
              "daemon log": d.log_path.read_bytes(),
              "job file": (Path(d.outputs_dir) / job["name"] / "job.toml").read_bytes()}
    for f in Path(d.state_dir).iterdir():
        places[f.name] = f.read_bytes()
    d.start()
    places["show --json"] = d.ctl("show", job["name"], "--json", check=True).stdout.encode()
    places["status --json"] = d.ctl("status", "--json", check=True).stdout.encode()
    for where, data in places.items():
        assert TOKEN.encode() not in data, where


def test_a_download_job_file_is_checked_at_submit(daemon_factory, hub, short_tmp):
    d = hub_daemon(daemon_factory, hub, short_tmp)
    bad = short_tmp / "bad.toml"
    bad.write_text('[job]\nname = "x"\nkind = "download"\n[download]\nmodels = ["nope"]\n')
    r = d.ctl("submit", str(bad))
    assert r.returncode == 4 and "download.models: nope not in the catalog" in r.stderr
    listed = json.loads(d.ctl("models", "list", "--json", check=True).stdout)
    assert {"flux-dev", "flux-schnell", "flux-dev2pro", "ae", "clip_l", "t5xxl_fp16",
            "t5xxl_fp8", "flux-tokenizers"} <= {m["name"] for m in listed["models"]}
