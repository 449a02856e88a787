"""Job kinds: each answers for itself how it starts, how its progress is read and what it
leaves behind; the daemon only asks."""
import tomllib

import pytest

from fluxgymd.kinds import KINDS, kind_of


def test_a_command_job_runs_its_argv_and_reads_tqdm_only_when_asked(tmp_path):
    spec = {"kind": "command", "name": "c", "command": {"argv": ["echo", "hi"], "env": {"A": "1"},
                                                         "cwd": None, "progress": "tqdm"}}
    job = {"kind": "command", "spec": spec, "output_dir": str(tmp_path), "name": "c"}
    kind = kind_of(job)
    assert kind.command(job) == (["echo", "hi"], {"A": "1"}, None)
    assert not kind.speaks_contract and kind.runs_any_program
    parse = kind.output_parser(spec)
    assert parse(["epoch 1", " 10%|#  | 1/10 [00:01<00:09,  1.00it/s]"], " 20%|## | 2/10 [00:02<00"
                 ":08,  1.00it/s]")[0]["step"] == 2  # the newest bar, even half drawn
    assert parse(["no bar here"], "") == []
    spec["command"]["progress"] = "none"
    assert kind.output_parser(spec) is None and kind.result(job) is None


def test_a_lora_job_runs_the_trainer_on_the_validated_job_file(tmp_path):
    spec = {"kind": "lora", "name": "l", "train": {"network_dim": 8},
            "watchdog": {"step_timeout_s": 60}}
    job = {"kind": "lora", "spec": spec, "output_dir": str(tmp_path), "name": "l"}
    kind = kind_of(job)
    argv, env, cwd = kind.command(job)
    assert argv[1:4] == ["-m", "trainer", str(tmp_path / "job.toml")] and argv[-1] == str(tmp_path)
    doc = tomllib.loads((tmp_path / "job.toml").read_text())
    assert doc == {"job": {"name": "l", "kind": "lora"}, "train": {"network_dim": 8},
                   "watchdog": {"step_timeout_s": 60}}
    assert kind.speaks_contract and not kind.runs_any_program
    assert kind.result(job) is None
    (tmp_path / "l.safetensors").write_bytes(b"x")
    assert kind.result(job) == str(tmp_path / "l.safetensors")


def test_every_kind_the_job_files_accept_has_a_home():
    from fluxgymd import jobspec
    assert set(jobspec.KINDS) == set(KINDS) == {"command", "lora", "kohya", "download",
                                                "caption", "publish"}
    with pytest.raises(KeyError):
        kind_of({"kind": "slurm-magic"})


def test_a_download_job_resolves_catalog_names_and_what_they_need(tmp_path):
    from fluxgymd import catalog
    from fluxgymd.kinds import Policy

    models = catalog.load()
    policy = Policy(models=models, models_dir=str(tmp_path / "models"))
    errors: list[str] = []
    out = KINDS["download"].validate({"models": ["flux-schnell"]}, tmp_path, errors, policy)
    assert errors == []
    got = [(f["model"], f["file"]) for f in out["files"]]
    assert got[0] == ("flux-schnell", "flux1-schnell.safetensors")
    assert {m for m, _ in got} == {"flux-schnell", "ae", "clip_l", "t5xxl_fp16",
                                   "flux-tokenizers"}
    assert all(f["dir"] == str(tmp_path / "models" / f["model"]) for f in out["files"])
    kind = KINDS["download"]
    assert not kind.uses_gpu and kind.hub_token and kind.local_only
    job = {"kind": "download", "name": "d", "output_dir": str(tmp_path / "d"),
           "spec": {"kind": "download", "name": "d", "download": out}}
    (tmp_path / "d").mkdir()
    argv, env, _ = kind.command(job)
    assert argv[1:3] == ["-m", "fluxgymd.fetch"] and env["HF_HUB_OFFLINE"] == "0"
    assert not kind.finished(job)
    for f in out["files"]:
        (tmp_path / "models" / f["model"] / f["file"]).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "models" / f["model"] / f["file"]).write_bytes(b"x")
    assert kind.finished(job)  # every file there: never fetched again
    for section, why in (({"models": ["nope"]}, "nope not in the catalog"),
                         ({"repo": "a/b"}, "file (or files) must name files"),
                         ({}, "names models"), ({"modles": []}, "unknown key download.modles")):
        errors = []
        KINDS["download"].validate(section, tmp_path, errors, policy)
        assert any(why in e for e in errors), (section, errors)


def test_publish_tables_are_checked_and_chain_only_after_a_lora(tmp_path):
    from fluxgymd import jobspec
    from fluxgymd.protocol import FluxgymError

    ok = jobspec.parse('[job]\nname = "p"\nkind = "publish"\n[publish]\njob = "x"\n'
                       'repo = "alice/my-lora"\nprivate = true\n')
    assert ok["publish"] == {"job": "x", "repo": "alice/my-lora", "private": True}
    with pytest.raises(FluxgymError) as e:
        jobspec.parse('[job]\nname = "p"\nkind = "publish"\n[publish]\nrepo = "a/../b"\n'
                      'privat = 1\n')
    for words in ("missing publish.job", "is not a Hub repo id", "unknown key publish.privat"):
        assert words in e.value.message, e.value.message
    with pytest.raises(FluxgymError) as e:  # a download makes no LoRA to publish
        jobspec.parse('[job]\nname = "d"\nkind = "download"\n[download]\nrepo = "a/b"\n'
                      'files = ["x"]\n[publish]\nrepo = "alice/b"\n')
    assert '[publish] is only for kind = "publish" jobs' in e.value.message


def test_optional_catalog_files_are_fetched_when_there_and_never_waited_for(tmp_path):
    from fluxgymd import catalog
    from fluxgymd.kinds import Policy

    models = catalog.load({"cap": {"repo": "a/cap", "files": ["config.json"],
                                   "optional": ["vocab.json"]}})
    assert models["florence-2-large"].optional  # the shipped captioner has some
    policy = Policy(models=models, models_dir=str(tmp_path))
    errors: list[str] = []
    spec = KINDS["download"].validate({"models": ["cap"]}, tmp_path, errors, policy)
    assert errors == [] and [(f["file"], f.get("optional", False)) for f in spec["files"]] == \
        [("config.json", False), ("vocab.json", True)]
    job = {"spec": {"download": spec}}
    assert not KINDS["download"].finished(job)
    (tmp_path / "cap").mkdir()
    (tmp_path / "cap" / "config.json").write_text("{}")
    assert KINDS["download"].finished(job) and models["cap"].present(tmp_path)
    with pytest.raises(catalog.CatalogError, match="optional must name files"):
        catalog.load({"bad": {"repo": "a/b", "file": "x", "optional": ["../y"]}})
