"""kind = "publish" against the Hub stand-in (tests/hubstandin.py) with the real
huggingface_hub doing the talking: a tiny LoRA trained by a real daemon, chained to its
publish job by `[publish]`, then published again (no new commit), through a dropped commit
request (retried, one commit), and refused (403, 409, 401) at once with what to do. The
token is looked for everywhere it must not be."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import tomli_w
import yaml

from conftest import FAST
from fluxgymd.kinds.publish import pick_samples
from hubstandin import Hub
from tinylora import train_section

TOKEN = "hf_tokenOfAliceThatMustNeverBeLogged"


def front_matter(readme: bytes) -> dict:
    text = readme.decode()
    assert text.startswith("---\n"), text[:200]
    return yaml.safe_load(text.split("---", 2)[1])


def test_pick_samples_takes_the_newest_of_each_prompt(tmp_path):
    for name in ("step-00000010-00.png", "step-00000020-00.png", "step-00000010-01.png",
                 "job_000030_00_20240101120000.png", "notes.txt", "step-x-00.png"):
        (tmp_path / name).write_bytes(b"x")
    assert [(i, p.name) for i, p in pick_samples(tmp_path)] == [
        (0, "job_000030_00_20240101120000.png"), (1, "step-00000010-01.png")]
    assert pick_samples(tmp_path / "none") == []


def test_card_front_matter_names_the_trigger_base_and_samples():
    pytest.importorskip("huggingface_hub")
    from fluxgymd.publish import card_text

    card = {"title": "my-lora", "trigger_word": "ohwx: person", "base_model":
            "black-forest-labs/FLUX.1-dev", "license": "other", "license_name": "flux-1-dev",
            "license_link": "https://example.org/LICENSE.md", "lora_file": "my-lora.safetensors",
            "widgets": [{"text": "ohwx: person, on a beach", "output": {"url": "samples/a.png"}}],
            "settings": {"network_dim": 4, "learning_rate": 0.0008, "base_model": "flux-dev"}}
    text = card_text(card, "alice/my-lora")
    meta = front_matter(text.encode())
    assert meta["instance_prompt"] == "ohwx: person"
    assert meta["base_model"] == "black-forest-labs/FLUX.1-dev"
    assert meta["license"] == "other" and meta["license_name"] == "flux-1-dev"
    assert {"flux", "lora", "text-to-image", "diffusers"} <= set(meta["tags"])
    assert meta["widget"] == card["widgets"]
    assert 'load_lora_weights("alice/my-lora", weight_name="my-lora.safetensors")' in text
    assert "| network_dim | 4 |" in text and "ComfyUI" in text


def _publish_job(root, name, source, repo, **keys):
    path = root / f"{name}.toml"
    path.write_text(tomli_w.dumps({"job": {"name": name, "kind": "publish"},
                                   "publish": {"job": source, "repo": repo, **keys}}))
    return path


def test_publishing_a_trained_lora(daemon_factory, tiny, tmp_path):
    hub = Hub(writers={TOKEN: "alice", "hf_bobsToken": "bob"}).start()
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    os.chmod(token_file, 0o600)
    try:
        d = daemon_factory("pub", **FAST, hub__token_file=str(token_file))
        d.extra_env = {"HF_ENDPOINT": hub.url}
        d.start()
        train = train_section(tiny, sample_prompts=["fgx, a red disc", "fgx, a blue square"],
                              sample_every_n_steps=20, sample_steps=2)
        job = tmp_path / "pub.toml"
        job.write_text(tomli_w.dumps({"job": {"name": "pub", "kind": "lora"}, "train": train,
                                      "publish": {"repo": "alice/pub-lora"}}))
        r = d.submit(job)
        assert [c["name"] for c in r["chained"]] == ["pub-publish"]
        assert d.job("pub-publish")["after"][0]["name"] == "pub"
        done = d.wait_state("pub-publish", ("succeeded", "failed"), timeout=300)
        assert done["state"] == "succeeded", (done["reason"], d.ctl("logs", "pub-publish").stdout)
        assert d.job("pub")["state"] == "succeeded"

        # the repo holds the LoRA as trained, the newest sample of each prompt, a card
        files = hub.repo_files("alice/pub-lora")
        outputs = Path(d.job("pub")["output_dir"]).parent
        lora_path = outputs / "pub" / "pub.safetensors"
        assert hashlib.sha256(files["pub.safetensors"]).hexdigest() == \
            hashlib.sha256(lora_path.read_bytes()).hexdigest()
        # its one step: the bytes published (the LoRA, the samples, the card)
        assert done["step"] == done["total_steps"] > lora_path.stat().st_size
        meta = front_matter(files["README.md"])
        assert meta["instance_prompt"] == "fgx"
        assert [w["text"] for w in meta["widget"]] == ["fgx, a red disc", "fgx, a blue square"]
        for w in meta["widget"]:
            assert w["output"]["url"] in files
        assert "step-00000040-00.png" in meta["widget"][0]["output"]["url"]
        body = files["README.md"].decode()
        assert "| network_dim | 4 |" in body and str(d.root) not in body
        published = json.loads((outputs / "pub-publish" /
                                "published.json").read_text())
        assert published["new_commit"] is True and published["repo"] == "alice/pub-lora"
        commits = [c for c in hub.commits if c["repo"] == "alice/pub-lora"]
        assert len(commits) == 2  # the repo's first, then ours

        # again: the same files, no new commit, and it says so
        out = d.ctl("publish", "pub", "--repo", "alice/pub-lora", check=True)
        assert "pub-publish-2" in out.stdout
        again = d.wait_state("pub-publish-2", ("succeeded", "failed"), timeout=60)
        assert again["state"] == "succeeded", again["reason"]
        assert len([c for c in hub.commits if c["repo"] == "alice/pub-lora"]) == 2
        assert "no new commit" in d.ctl("logs", "pub-publish-2").stdout

        # a commit request lost on its way: the attempt fails, the next one commits once
        hub.drop_commits = 1
        d.ctl("publish", "pub", "--repo", "alice/other", "--private", "--name", "dropped",
              check=True)
        dropped = d.wait_state("dropped", ("succeeded", "failed"), timeout=60)
        assert dropped["state"] == "succeeded" and dropped["attempts"] == 2, dropped["reason"]
        assert len([c for c in hub.commits if c["repo"] == "alice/other"]) == 2
        assert hub.repos["alice/other"]["private"] is True

        # refusals fail at once, each with what to do
        cases = {"to-bob": ("bob/theirs", "may not write to bob/theirs"),
                 "conflict": ("alice/third", "conflicting state (HTTP 409)")}
        d.submit(_publish_job(tmp_path, "to-bob", "pub", "bob/theirs"))
        failed = d.wait_state("to-bob", ("succeeded", "failed"), timeout=60)
        assert failed["state"] == "failed" and failed["attempts"] == 1
        assert cases["to-bob"][1] in failed["reason"], failed["reason"]
        hub.commit_status = 409
        d.submit(_publish_job(tmp_path, "conflict", "pub", "alice/third"))
        failed = d.wait_state("conflict", ("succeeded", "failed"), timeout=60)
        assert failed["state"] == "failed" and failed["attempts"] == 1
        assert cases["conflict"][1] in failed["reason"], failed["reason"]
        hub.commit_status = 0
        token_file.write_text("hf_notAToken\n")  # read again for each job
        d.submit(_publish_job(tmp_path, "bad-token", "pub", "alice/fourth"))
        failed = d.wait_state("bad-token", ("succeeded", "failed"), timeout=60)
        assert failed["state"] == "failed" and failed["attempts"] == 1
        assert "refused the token (HTTP 401)" in failed["reason"], failed["reason"]

        # mistakes refused at submit
        for source, repo, words in (("nope", "alice/x", "no job named or numbered 'nope'"),
                                    ("pub", "not a repo", "is not a Hub repo id"),
                                    ("pub-publish", "alice/x", "only a lora or kohya job")):
            r = d.ctl("submit", str(_publish_job(tmp_path, "bad", source, repo)))
            assert r.returncode == 4 and words in r.stderr, r.stderr
        r = d.ctl("submit", str(job))  # its chained name is taken
        assert r.returncode != 0 and "pub-publish" in r.stderr

        # the token: never in the daemon's log, a job's log or files, the store, show --json
        assert TOKEN not in d.logs()
        for path in outputs.rglob("*"):
            if path.is_file():
                assert TOKEN.encode() not in path.read_bytes(), path
        stores = list(d.root.rglob("fluxgymd.sqlite3*"))
        assert stores
        for path in stores:
            assert TOKEN.encode() not in path.read_bytes(), path
        assert TOKEN not in d.ctl("show", "pub-publish", "--json").stdout
        auths = {a for _, _, a in hub.requests if a}
        assert f"Bearer {TOKEN}" in auths  # it was sent: to the Hub, and only there
    finally:
        hub.stop()
