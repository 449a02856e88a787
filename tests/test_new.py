"""`fluxgymctl new` end to end on the tiny models, every model fetched from the Hub stand-in
by the real huggingface_hub: a folder of photos becomes download → caption → train →
publish, all succeeded, and the published LoRA is the trained one. Also: --dry-run submits
nothing, and what `new` refuses."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FAST
from hubstandin import Hub, serve_tiny_flux

ENV = dict(os.environ, HF_HUB_OFFLINE="1")
TOKEN = "hf_newFlowWriteToken"


@pytest.fixture(scope="module")
def florence_files(tmp_path_factory):
    path = tmp_path_factory.mktemp("florence-new") / "model"
    subprocess.run([sys.executable, "-m", "trainer.tiny", "--florence", str(path)], check=True,
                   env=ENV, capture_output=True, timeout=180)
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    subprocess.run([sys.executable, "-m", "trainer.tiny", "--dataset", str(folder),
                    "--images", "4"], check=True, env=ENV, capture_output=True)
    txts = sorted(folder.glob("*.txt"))
    for txt in txts[1:]:
        txt.unlink()  # one photo comes with its caption; the others get Florence-2's
    txts[0].write_text("fgx, my own words")
    (folder / "notes.md").write_text("not a photo")
    return folder


def start_flow_daemon(daemon_factory, tiny_single, florence_files, tmp_path, **config):
    """A daemon whose catalog's tiny Flux and tiny Florence-2 are on a Hub stand-in (d.hub,
    which the caller stops), with a write token for alice."""
    hub = Hub(writers={TOKEN: "alice"})
    entries = serve_tiny_flux(hub, tiny_single)
    for name, data in florence_files.items():
        hub.add("acme/tiny-florence", name, data)
    # the required files, and optional ones: one the repo lacks is skipped
    files = sorted(florence_files)
    entries["tiny-florence"] = {"repo": "acme/tiny-florence", "files": files[:2],
                                "optional": files[2:] + ["vocab.json"]}
    hub.start()
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    os.chmod(token_file, 0o600)
    d = daemon_factory("new", **FAST, hub__token_file=str(token_file),
                       caption__model="tiny-florence",
                       **{f"models__{n}": e for n, e in entries.items()}, **config)
    d.config["models__dir"] = str(d.root / "models")
    d.extra_env = {"HF_ENDPOINT": hub.url}
    d.hub = hub
    return d.start()


@pytest.fixture
def flow_daemon(daemon_factory, tiny_single, florence_files, tmp_path):
    d = start_flow_daemon(daemon_factory, tiny_single, florence_files, tmp_path)
    yield d
    d.hub.stop()


ARGS = ["--trigger", "fgx", "--base", "tiny-flux", "--steps", "8", "--resolution", "64",
        "--set", "t5xxl_max_token_length=32", "--set", "train_batch_size=2",
        "--set", "save_every_n_steps=4", "--sample", "fgx, a red disc", "--sample-every", "8",
        "--set", "sample_steps=2"]


def test_new_from_photos_to_a_published_lora(flow_daemon, photos):
    d = flow_daemon
    dry = d.ctl("new", "mine", "--images", str(photos), "--caption", "--publish",
                "alice/mine", "--dry-run", *ARGS, check=True)
    assert "# --- mine-caption.toml ---" in dry.stdout and "# --- mine.toml ---" in dry.stdout
    assert 'repo = "alice/mine"' in dry.stdout and "nothing was copied" in dry.stdout
    assert d.call("list")["jobs"] == []

    r = d.ctl("new", "mine", "--images", str(photos), "--caption", "--publish", "alice/mine",
              *ARGS, check=True)
    assert "notes.md is not a PNG, JPEG or WebP image" in r.stderr
    jobs = {j["name"]: j for j in d.call("list")["jobs"]}
    kinds = sorted(j["kind"] for j in jobs.values())
    assert kinds == ["caption", "download", "download", "lora", "publish"], jobs.keys()
    listed = [line.split("(")[1].split(",")[0] for line in r.stdout.splitlines()
              if line.startswith("job ")]
    assert len(listed) == 5 and [n for n in listed if not n.startswith("pull-")] == [
        "mine-caption", "mine", "mine-publish"]
    assert listed[0].startswith("pull-tiny-florence")  # each download before its job
    end = d.wait_state("mine-publish", ("succeeded", "failed", "cancelled"), timeout=600)
    states = {j["name"]: (j["state"], j["reason"]) for j in d.call("list")["jobs"]}
    assert end["state"] == "succeeded", states
    assert all(s == "succeeded" for s, _ in states.values()), states

    dataset = Path(d.job("mine")["output_dir"]) / "dataset"
    captions = {p.name: p.read_text() for p in dataset.glob("*.txt")}
    assert len(captions) == 4 and not (dataset / "notes.md").exists()
    assert list(captions.values()).count("fgx, my own words") == 1  # kept as given
    assert all(c.startswith("fgx ") for c in captions.values() if c != "fgx, my own words")
    lora = Path(d.job("mine")["output_dir"]) / "mine.safetensors"
    published = d.hub.repo_files("alice/mine")
    assert hashlib.sha256(published["mine.safetensors"]).hexdigest() == \
        hashlib.sha256(lora.read_bytes()).hexdigest()
    assert d.job("mine")["step"] == 8
    assert not (d.root / "models" / "tiny-florence" / "vocab.json").exists()

    # the name is now taken; and a folder with one photo is not enough
    again = d.ctl("new", "mine", "--images", str(photos), *ARGS)
    assert again.returncode != 0 and "mine: a job or an output folder has that name" in \
        again.stderr
    one = photos.parent / "one"
    one.mkdir()
    (one / "a.png").write_bytes(next(photos.glob("*.png")).read_bytes())
    few = d.ctl("new", "other", "--images", str(one), *ARGS)
    assert few.returncode != 0 and "holds 1 usable image(s)" in few.stderr
    bad = d.ctl("new", "other2", "--images", str(photos), *ARGS, "--set", "nonsense")
    assert bad.returncode != 0 and "write KEY=VALUE" in bad.stderr
    wrong = d.ctl("new", "other3", "--images", str(photos), *ARGS, "--set", "resolutoin=64")
    assert wrong.returncode != 0 and "resolutoin" in wrong.stderr
    outputs = Path(d.job("mine")["output_dir"]).parent
    assert not (outputs / "other3").exists()  # its copy was taken back
