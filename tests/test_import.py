"""`fluxgymctl import`: FluxGym's own train.sh files (the 20, 16 and 12 GB presets in
../shared/peers/fluxgym/examples/mylora), read as a shell would, mapped to a job that
validates; the 16 GB preset trains with our trainer."""
from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from fluxgymd.fluxgym import read_script

EXAMPLES = Path(__file__).resolve().parents[2] / "shared" / "peers" / "fluxgym" / "examples" \
    / "mylora"
FLUXGYM = "/home/fangg/other/tts/fluxgym"
pytestmark = pytest.mark.skipif(not EXAMPLES.is_dir(),
                                reason=f"FluxGym's example outputs are not at {EXAMPLES}")
ENV = dict({k: v for k, v in os.environ.items() if not k.startswith("FLUXGYM_")},
           HF_HUB_OFFLINE="1")


@pytest.fixture(scope="module")
def fixtures(tiny, tiny_single, tmp_path_factory):
    """The FluxGym machine's paths, made here: the model as single files (the session's,
    as clip/), the dataset."""
    root = tmp_path_factory.mktemp("fluxgym")
    (root / "clip").symlink_to(Path(tiny_single["pretrained_model"]).parent)
    return root


def maps(root: Path, tiny: Path) -> list[str]:
    return [f"{FLUXGYM}/models/unet/mymodel={root}/clip/flux1-tiny.safetensors",
            f"{FLUXGYM}/models/clip/t5xxl_fp16.safetensors={root}/clip/t5xxl.safetensors",
            f"{FLUXGYM}/models/clip={root}/clip",
            f"{FLUXGYM}/models/vae/ae.sft={root}/clip/ae.safetensors",
            f"{FLUXGYM}/outputs/mylora={EXAMPLES}",
            f"{FLUXGYM}/datasets/mylora={tiny}/data"]


def run_import(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fluxgymctl", "import", *args], env=ENV,
                          capture_output=True, text=True, timeout=60)


def test_each_preset_reads_as_a_shell_would():
    for preset in (12, 16, 20):
        s = read_script(str(EXAMPLES / f"train_{preset}.sh"))
        assert s.script == "sd-scripts/flux_train_network.py"
        assert s.launcher == {"mixed_precision": ["bf16"], "num_cpu_threads_per_process": ["1"]}
        assert s.args["pretrained_model_name_or_path"] == [f"{FLUXGYM}/models/unet/mymodel"]
        assert s.args["sdpa"] == [] and s.args["persistent_data_loader_workers"] == []
        assert s.args["loss_type"] == ["l2"]  # the last line, with its trailing backslash
    s = read_script(str(EXAMPLES / "train_16.sh"))
    assert s.args["optimizer_args"] == ["relative_step=False", "scale_parameter=False",
                                        "warmup_init=False"]


def test_the_windows_batch_form_reads_the_same(tmp_path):
    sh = (EXAMPLES / "train_16.sh").read_text()
    bat = sh.replace(" \\\n", " ^\r\n").replace(FLUXGYM, "C:\\Users\\me\\fluxgym")
    bat = bat.replace("/models/", "\\models\\").replace("/outputs/", "\\outputs\\")
    (tmp_path / "train.bat").write_text(bat)
    a, b = read_script(str(EXAMPLES / "train_16.sh")), read_script(str(tmp_path / "train.bat"))
    assert a.args.keys() == b.args.keys()
    assert b.args["optimizer_args"] == a.args["optimizer_args"]
    assert b.args["ae"] == ["C:\\Users\\me\\fluxgym\\models\\vae/ae.sft"]


def test_missing_paths_are_named_with_their_flags_and_unmatched_settings_listed():
    r = run_import(str(EXAMPLES / "train_12.sh"), "--as-lora")
    assert r.returncode == 0, r.stderr
    assert "not found here: --pretrained_model_name_or_path" in r.stderr
    assert "not found here: --ae" in r.stderr
    assert "no counterpart: --split_mode" in r.stderr
    assert "no counterpart: --network_args train_blocks=single" in r.stderr
    doc = tomllib.loads(r.stdout)
    assert doc["train"]["optimizer_type"] == "Adafactor" and doc["train"]["fp8_base"] is True
    r = run_import(str(EXAMPLES / "train_20.sh"))  # a kohya job: the same arguments
    assert r.returncode == 0, r.stderr
    doc = tomllib.loads(r.stdout)
    args = doc["kohya"]["args"]
    assert doc["job"]["kind"] == "kohya" and doc["kohya"]["script"] == "flux_train_network.py"
    assert args[args.index("--optimizer_type") + 1] == "adamw8bit" and "--output_dir" not in args
    assert "not found here: --clip_l" in r.stderr and "fluxgymd writes to the job's" in r.stderr


@pytest.mark.parametrize("preset", [12, 16, 20])
def test_each_preset_imports_to_a_job_that_validates(preset, tiny, fixtures, tmp_path):
    from fluxgymd import jobspec

    out = tmp_path / "job.toml"
    args = [str(EXAMPLES / f"train_{preset}.sh"), "--as-lora", "-o", str(out),
            "--name", f"mylora-{preset}", "--tokenizers", str(fixtures / "clip" / "tokenizers")]
    for m in maps(fixtures, tiny):
        args += ["--map", m]
    r = run_import(*args)
    assert r.returncode == 0, r.stderr
    assert "not found here" not in r.stderr, r.stderr
    spec = jobspec.parse(out.read_text(), str(out))
    train = spec["train"]
    assert (train["trigger_word"], train["num_repeats"], train["resolution"]) == (
        "mylora", 10, 512)
    assert train["optimizer_type"] == {12: "Adafactor", 16: "Adafactor", 20: "AdamW8bit"}[preset]
    assert train["fp8_base"] and train["gradient_checkpointing"]


def test_the_16gb_preset_trains_with_our_trainer(tiny, fixtures, tmp_path):
    out = tmp_path / "job.toml"
    args = [str(EXAMPLES / "train_16.sh"), "--as-lora", "-o", str(out), "--tokenizers",
            str(fixtures / "clip" / "tokenizers")]
    for m in maps(fixtures, tiny):
        args += ["--map", m]
    assert run_import(*args).returncode == 0
    doc = tomllib.loads(out.read_text())
    # the preset as imported, made small enough for a CPU: 64 px, 6 steps
    doc["train"].update(resolution=64, max_train_steps=6, t5xxl_max_token_length=32)
    import tomli_w
    out.write_text(tomli_w.dumps(doc))
    r = subprocess.run([sys.executable, "-m", "trainer", str(out), "--output-dir",
                        str(tmp_path / "run")], env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    said = r.stdout + r.stderr
    assert "optimizer_type=Adafactor" in said and "fp8_base=True" in said
    assert (tmp_path / "run" / "mylora.safetensors").is_file()


@pytest.mark.parametrize("as_lora", [True, False])
def test_a_moved_folder_uses_the_files_beside_its_script(tmp_path, as_lora):
    """FluxGym's folder copied to another machine: its train.sh still names the old machine's
    dataset.toml and sample_prompts.txt, which sit beside it here."""
    import shutil
    moved = tmp_path / "elsewhere" / "mylora"
    moved.mkdir(parents=True)
    old = f'--dataset_config "{FLUXGYM}/outputs/mylora/dataset.toml"'
    script = (EXAMPLES / "train_16.sh").read_text()
    assert old in script
    # as FluxGym writes it when sample prompts are given
    (moved / "train.sh").write_text(script.replace(old, old + " \\\n  --sample_prompts="
                                                   f'"{FLUXGYM}/outputs/mylora/sample_prompts.txt"'
                                                   ' --sample_every_n_steps="100"'))
    for name in ("dataset.toml", "sample_prompts.txt"):
        shutil.copyfile(EXAMPLES / name, moved / name)
    r = run_import(str(moved), *(["--as-lora"] if as_lora else []))
    assert r.returncode == 0, r.stderr
    for name, flag in (("dataset.toml", "dataset_config"), ("sample_prompts.txt",
                                                            "sample_prompts")):
        assert f"--{flag} {FLUXGYM}/outputs/mylora/{name} is not here; using {moved / name}" \
            in r.stderr, r.stderr
        assert f"not found here: --{flag}" not in r.stderr
    doc = tomllib.loads(r.stdout)
    if as_lora:
        train = doc["train"]
        assert (train["trigger_word"], train["num_repeats"], train["resolution"]) == (
            "mylora", 10, 512)
        assert train["sample_prompts"] and "dataset_dir" in train
    else:
        args = doc["kohya"]["args"]
        assert args[args.index("--dataset_config") + 1] == str(moved / "dataset.toml")
        assert args[args.index("--sample_prompts") + 1] == str(moved / "sample_prompts.txt")
    # nothing beside it: still reported missing, as before
    (moved / "dataset.toml").unlink()
    r = run_import(str(moved), *(["--as-lora"] if as_lora else []))
    assert f"not found here: --dataset_config: {FLUXGYM}/outputs/mylora/dataset.toml" in r.stderr


@pytest.mark.parametrize("as_lora", [True, False])
def test_import_with_a_base_model_names_the_catalog_model_instead_of_the_files(tmp_path,
                                                                              as_lora):
    r = run_import(str(EXAMPLES / "train_16.sh"), "--base-model", "flux-dev",
                   *(["--as-lora"] if as_lora else []))
    assert r.returncode == 0, r.stderr
    doc = tomllib.loads(r.stdout)
    for flag in ("--pretrained_model_name_or_path", "--clip_l", "--t5xxl", "--ae"):
        assert f"not found here: {flag}" not in r.stderr  # FluxGym's files are not needed
    if as_lora:
        assert doc["train"]["base_model"] == "flux-dev"
        assert not {"pretrained_model", "clip_l", "t5xxl", "ae"} & set(doc["train"])
    else:
        assert doc["kohya"]["base_model"] == "flux-dev"
        assert not {"--pretrained_model_name_or_path", "--clip_l", "--t5xxl", "--ae"} & \
            set(doc["kohya"]["args"])
