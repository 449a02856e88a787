"""kind = "kohya" without running sd-scripts: the job section, the arguments fluxgymd manages,
resume from the newest complete state, "finished", and what is read from its output."""
from __future__ import annotations

import os
import sys

import pytest

from fluxgymd.kinds import KINDS, Policy
from fluxgymd.kinds.kohya import KohyaOutput, flag
from tests.test_kohya_state import write_state

KIND = KINDS["kohya"]
DEFAULTS = Policy(kohya_save_every_n_steps=50)


@pytest.fixture
def checkout(tmp_path):
    sd = tmp_path / "sd-scripts"
    sd.mkdir()
    (sd / "flux_train_network.py").write_text("")
    venv = sd / "venv" / "bin"
    venv.mkdir(parents=True)
    os.symlink(sys.executable, venv / "python")
    return sd


def validate(section, base):
    errors: list[str] = []
    out = KIND.validate(section, base, errors, DEFAULTS)
    return out, errors


def test_the_section_names_what_is_wrong(tmp_path, checkout):
    assert "needs a [kohya] section" in validate(None, tmp_path)[1][0]
    assert "missing kohya.sd_scripts" in validate({"args": []}, tmp_path)[1][0]
    assert "unknown key kohya.argz" in validate({"sd_scripts": str(checkout), "argz": []},
                                                tmp_path)[1][0]
    _, errors = validate({"sd_scripts": str(checkout), "args": [], "train_script": "t.sh"},
                         tmp_path)
    assert errors == ["give kohya.args or kohya.train_script, not both"]
    _, errors = validate({"sd_scripts": str(checkout), "args": [],
                          "script": "sdxl_train_network.py"}, tmp_path)
    assert "kohya.script" in errors[0] and "does not exist" in errors[0]
    assert "is not a folder" in validate({"sd_scripts": str(tmp_path / "nope"), "args": []},
                                         tmp_path)[1][0]


def test_the_checkouts_own_venv_is_its_python_and_the_daemon_default_interval_applies(
        tmp_path, checkout):
    out, errors = validate({"sd_scripts": "sd-scripts", "args": ["--seed", "1"]}, tmp_path)
    assert errors == []
    assert out["python"] == str(checkout / "venv" / "bin" / "python")
    assert out["save_every_n_steps"] == 50 and out["script"] == "flux_train_network.py"


def test_a_fluxgym_train_sh_is_read_with_its_accelerate_options(tmp_path, checkout):
    sh = tmp_path / "train.sh"
    sh.write_text("accelerate launch \\\n  --mixed_precision bf16 \\\n  "
                  "--num_cpu_threads_per_process 1 \\\n  sd-scripts/flux_train_network.py \\\n"
                  "  --network_dim 4 \\\n  --optimizer_args \"relative_step=False\" "
                  "\"warmup_init=False\" \\\n  --fp8_base\n")
    out, errors = validate({"sd_scripts": str(checkout), "train_script": "train.sh"}, tmp_path)
    assert errors == []
    assert out["args"] == ["--network_dim", "4", "--optimizer_args", "relative_step=False",
                           "warmup_init=False", "--fp8_base"]
    assert out["mixed_precision"] == "bf16" and out["num_cpu_threads_per_process"] == 1
    job = {"name": "j", "output_dir": str(tmp_path / "out"),
           "spec": {"kind": "kohya", "kohya": out}}
    argv, env, cwd = KIND.command(job)
    assert env == {"ACCELERATE_MIXED_PRECISION": "bf16", "OMP_NUM_THREADS": "1"}
    assert cwd == str(checkout) and argv[2] == str(checkout / "flux_train_network.py")


def test_fluxgymd_decides_the_folder_and_the_state_saves(tmp_path):
    k = {"args": ["--output_dir", "/elsewhere", "--resume", "/old-state", "--save_every_n_steps",
                  "10", "--save_last_n_steps_state", "1", "--network_dim", "4"],
         "save_every_n_steps": 50}
    args = KIND.arguments(k, "/out/j", "j")
    assert flag(args, "--output_dir") == "/out/j" and args.count("--output_dir") == 1
    assert "--resume" not in args and "--save_state" in args
    assert flag(args, "--save_every_n_steps") == "10"  # the script's own interval is kept
    # sd-scripts counts it in steps: two intervals keep at least two states on disk
    assert flag(args, "--save_last_n_steps_state") == "20"
    assert flag(args, "--output_name") == "j" and "--console_log_simple" in args
    assert flag(KIND.arguments({"args": [], "save_every_n_steps": 7}, "/o", "j"),
                "--save_every_n_steps") == "7"


def test_each_attempt_resumes_from_the_newest_complete_state_never_the_end_one(tmp_path):
    out = tmp_path / "out"
    job = {"name": "j", "output_dir": str(out), "spec": {"kind": "kohya", "kohya": {
        "args": ["--output_name", "mine"], "sd_scripts": "/sd", "script": "f.py",
        "python": "/py", "env": {}, "save_every_n_steps": 5}}}
    assert "--resume" not in KIND.command(job)[0]
    write_state(out / "mine-step00000005-state", 5)
    write_state(out / "mine-step00000010-state", 10, torn="optimizer.bin")
    write_state(out / "mine-state", 20)
    argv = KIND.command(job)[0]
    assert argv[-3:] == ["--resume", str(out / "mine-step00000005-state"),
                         "--skip_until_initial_step"]
    assert not KIND.finished(job) and KIND.result(job) is None
    from safetensors.torch import save_file
    import torch
    save_file({"w": torch.ones(1)}, str(out / "mine.safetensors"))
    assert KIND.finished(job) and KIND.result(job) == str(out / "mine.safetensors")


LOG = """\
2026-11-30 03:10:01 INFO     Loading dataset config from /x/dataset.toml
2026-11-30 03:10:02 INFO     Building Flux model dev from BFL checkpoint
2026-11-30 03:10:03 INFO     caching latents with caching strategy.
2026-11-30 03:10:04 INFO     caching Text Encoder outputs...
prepare optimizer, data loader etc.
steps:   0%|          | 0/40 [00:00<?, ?it/s]
epoch 1/10
steps:   2%|▎         | 1/40 [00:00<00:05,  7.1it/s, avr_loss=1.47]\r\
steps:   5%|▌         | 2/40 [00:00<00:04,  8.0it/s, avr_loss=1.45]
saving checkpoint: /out/j-step00000002.safetensors
2026-11-30 03:10:06 INFO     generating sample images at step / サンプル画像生成 ステップ: 2
"""


def test_phases_steps_checkpoints_and_samples_come_from_the_output(tmp_path):
    lines = LOG.split("\n")  # tqdm redraws with \r: those stay inside a line
    state = write_state(tmp_path / "j-step00000002-state", 2)
    torn = write_state(tmp_path / "j-step00000004-state", 4, torn="model.safetensors")
    # the marker printed right after a bar lands on the bar's line
    lines += [f"fluxgymd-kohya: state saved {torn}", "steps:   5%|▌         | 2/40 [00:00<00:04, "
              f" 8.0it/s, avr_loss=1.45]fluxgymd-kohya: state saved {state}",
              f"fluxgymd-kohya: sample {tmp_path}/sample/j_000002_00.png"]
    events = KohyaOutput()(lines, "steps:   7%|▊         | 3/40 [00:00<0")
    phases = [e["phase"] for e in events if e["event"] == "phase"]
    assert phases == ["loading", "loading", "caching", "caching", "loading", "training",
                      "saving", "sampling"]
    steps = [e for e in events if e["event"] == "step"]
    assert len(steps) == 1 and (steps[0]["step"], steps[0]["total"]) == (2, 40)
    assert steps[0]["loss"] == 1.45  # the newest complete bar; a half-drawn one has no figures
    # the checkpoint comes after the step and the saving phase, in printed order
    kinds = [e["event"] for e in events]
    assert kinds.index("step") < kinds.index("checkpoint")
    assert [e for e in events if e["event"] == "checkpoint"] == [
        {"event": "checkpoint", "path": str(state), "step": 2}]  # the torn one is not taken
    assert events[-1] == {"event": "sample", "path": f"{tmp_path}/sample/j_000002_00.png"}


# --- who may run what: [kohya] checkouts -------------------------------------------------
def allowed(checkout, **more) -> Policy:
    return Policy(kohya_checkouts=((str(checkout), ""),), config_file="/etc/fluxgymd/x.toml",
                  **more)


def refusals(section, base, policy):
    out, errors = validate(section, base)
    assert errors == [], errors
    return KIND.refusals({"kohya": out}, policy)


def test_kohya_jobs_are_refused_until_a_checkout_is_allowed(tmp_path, checkout):
    [why] = refusals({"sd_scripts": str(checkout), "args": []}, tmp_path, Policy())
    assert "refused until this fluxgymd allows an sd-scripts checkout" in why
    assert f'checkouts = ["{checkout}"]' in why and "[kohya]" in why
    assert refusals({"sd_scripts": str(checkout), "args": []}, tmp_path, allowed(checkout)) == []
    # command jobs allowed: anything goes, as for a command job
    assert refusals({"sd_scripts": str(checkout), "args": []}, tmp_path,
                    Policy(allow_command_jobs=True)) == []


def test_another_checkout_is_refused_with_the_line_to_add(tmp_path, checkout):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "flux_train_network.py").write_text("")
    [why] = refusals({"sd_scripts": str(other), "args": []}, tmp_path, allowed(checkout))
    assert f"kohya.sd_scripts {other} is not a checkout this fluxgymd allows ({checkout})" in why
    assert f'add "{other}" to checkouts under [kohya] in /etc/fluxgymd/x.toml' in why
    # the same folder through a symlink is the same checkout
    link = tmp_path / "link"
    os.symlink(checkout, link)
    assert refusals({"sd_scripts": str(link), "args": []}, tmp_path, allowed(checkout)) == []


def test_only_the_checkouts_own_python_runs_it(tmp_path, checkout):
    fake = tmp_path / "evil"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    [why] = refusals({"sd_scripts": str(checkout), "args": [], "python": str(fake)}, tmp_path,
                     allowed(checkout))
    assert f"kohya.python {fake} is not the Python this fluxgymd runs" in why
    assert f'python = "{fake}"' in why
    assert refusals({"sd_scripts": str(checkout), "args": [],
                     "python": str(checkout / "venv" / "bin" / "python")}, tmp_path,
                    allowed(checkout)) == []
    # an administrator may name another Python for a checkout
    policy = Policy(kohya_checkouts=((str(checkout), str(fake)),))
    assert refusals({"sd_scripts": str(checkout), "args": [], "python": str(fake)}, tmp_path,
                    policy) == []
    [why] = refusals({"sd_scripts": str(checkout), "args": []}, tmp_path, policy)
    assert "is not the Python" in why


def test_the_script_must_be_one_of_the_checkouts_own(tmp_path, checkout):
    outside = tmp_path / "payload.py"
    outside.write_text("")
    os.symlink(outside, checkout / "sneaky.py")
    (checkout / "notes.txt").write_text("")
    for script in ("sneaky.py", "notes.txt"):
        [why] = refusals({"sd_scripts": str(checkout), "args": [], "script": script}, tmp_path,
                         allowed(checkout))
        assert f"kohya.script {script!r} must be one of sd-scripts' own" in why, why


def test_env_that_loads_code_is_refused_by_name(tmp_path, checkout):
    env = {"LD_PRELOAD": "/tmp/x.so", "PYTHONPATH": "/tmp", "PATH": "/tmp", "BASH_ENV": "x",
           "PYTHONSTARTUP": "x", "HOME": "/tmp", "CUDA_INJECTION64_PATH": "x",
           "HF_HOME": "/data/hf", "CUDA_VISIBLE_DEVICES": "0", "HF_HUB_OFFLINE": "1"}
    why = refusals({"sd_scripts": str(checkout), "args": [], "env": env}, tmp_path,
                   allowed(checkout))
    named = {w.split()[0].removeprefix("kohya.env.") for w in why}
    assert named == {"LD_PRELOAD", "PYTHONPATH", "PATH", "BASH_ENV", "PYTHONSTARTUP", "HOME",
                     "CUDA_INJECTION64_PATH"}, why


def test_arguments_that_import_other_modules_are_refused(tmp_path, checkout):
    args = ["--network_module", "os", "--optimizer_type", "subprocess.Popen",
            "--config_file", "x.toml"]
    why = " | ".join(refusals({"sd_scripts": str(checkout), "args": args}, tmp_path,
                              allowed(checkout)))
    assert "--network_module 'os'" in why and "--optimizer_type 'subprocess.Popen'" in why
    assert "--config_file is refused" in why
    fine = ["--network_module", "networks.lora_flux", "--optimizer_type", "adamw8bit",
            "--optimizer_type", "bitsandbytes.optim.AdEMAMix8bit", "--lr_scheduler", "cosine"]
    assert refusals({"sd_scripts": str(checkout), "args": fine}, tmp_path,
                    allowed(checkout)) == []


def test_a_refused_kohya_job_runs_nothing_at_submit(tmp_path, checkout):
    """The refusal comes before sd-scripts' argument check, which runs the job's Python."""
    from fluxgymd import jobspec
    from fluxgymd.protocol import FluxgymError

    marker = tmp_path / "ran"
    evil = tmp_path / "py"
    evil.write_text(f"#!/bin/sh\ntouch {marker}\n")
    evil.chmod(0o755)
    text = (f'[job]\nname = "k"\nkind = "kohya"\n[kohya]\nsd_scripts = "{checkout}"\n'
            f'python = "{evil}"\nargs = []\n')
    for policy in (None, allowed(checkout)):
        with pytest.raises(FluxgymError) as e:
            jobspec.parse(text, str(tmp_path / "k.toml"), outputs_dir=tmp_path, policy=policy)
        assert e.value.code.value == "forbidden", e.value.message
    assert not marker.exists()
    with pytest.raises(FluxgymError) as e:  # where command jobs are allowed, it runs
        jobspec.parse(text, str(tmp_path / "k.toml"), outputs_dir=tmp_path,
                      policy=Policy(allow_command_jobs=True))
    assert marker.exists() and e.value.code.value == "invalid_job"


def test_the_daemon_refuses_a_kohya_job_until_its_checkout_is_allowed(daemon_factory,
                                                                      tmp_path, checkout):
    """Through the real socket and CLI: refused with the line to add (exit 4), then, with
    the checkout allowed and the daemon reloaded, accepted (its argument check runs)."""
    import signal as sig

    from fluxgymd.testing import wait_until
    d = daemon_factory("ky-allow", allow_command_jobs=False).start()
    job = tmp_path / "k.toml"
    job.write_text(f'[job]\nname = "k"\nkind = "kohya"\n[kohya]\nsd_scripts = "{checkout}"\n'
                   'args = ["--seed", "1"]\n')
    r = d.ctl("submit", str(job))
    assert r.returncode == 4, r.stderr
    assert "kohya jobs are refused until this fluxgymd allows an sd-scripts checkout" in \
        r.stderr and f'checkouts = ["{checkout}"]' in r.stderr
    d.config["kohya__checkouts"] = [str(checkout)]
    d.write_config()
    d.proc.send_signal(sig.SIGHUP)
    wait_until(lambda: "reloaded the config" in d.logs(), 10)
    r = d.ctl("submit", str(job))
    # allowed now: what refuses it is sd-scripts' own check (this checkout's script is empty)
    assert "refused until" not in r.stderr and "has no setup_parser()" in r.stderr, r.stderr


def test_a_base_model_by_catalog_name_fills_the_model_flags(tmp_path, checkout):
    from fluxgymd import catalog

    policy = Policy(models=catalog.load(), models_dir=str(tmp_path / "models"),
                    kohya_save_every_n_steps=50)
    errors: list[str] = []
    own_t5 = str(tmp_path / "t5xxl_fp8.safetensors")
    out = KIND.validate({"sd_scripts": str(checkout), "base_model": "flux-dev",
                         "args": ["--t5xxl", own_t5]}, tmp_path, errors, policy)
    assert errors == []
    m = tmp_path / "models"
    assert flag(out["args"], "--pretrained_model_name_or_path") == str(m / "flux-dev" /
                                                                       "flux1-dev.sft")
    assert flag(out["args"], "--ae") == str(m / "ae" / "ae.sft")
    assert flag(out["args"], "--clip_l") == str(m / "clip_l" / "clip_l.safetensors")
    assert flag(out["args"], "--t5xxl") == own_t5  # the job's own file wins
    spec = {"kohya": out}
    assert KIND.models_needed(spec, policy) == ["flux-dev", "ae", "clip_l"]
    (m / "ae").mkdir(parents=True)
    (m / "ae" / "ae.sft").write_bytes(b"x")
    assert KIND.models_needed(spec, policy) == ["flux-dev", "clip_l"]
    errors = []
    KIND.validate({"sd_scripts": str(checkout), "base_model": "ae", "args": []}, tmp_path,
                  errors, policy)
    assert "kohya.base_model 'ae' is not a base model of the catalog" in errors[0]
