"""The real kohya sd-scripts (../shared/peers/sd-scripts) under a real fluxgymd, on a tiny
single-file Flux (tests/kohya/tiny_shim.py shrinks only sd-scripts' hard-coded widths), with
cached latents and text encoder outputs: a straight run, a run SIGKILLed after its second
state save and resumed by the daemon, a run stopped by the daemon's SIGTERM and resumed.

Steps are counted from train.log: TQDM_MININTERVAL=0 makes sd-scripts' bar print every step,
and the launcher starts a resumed attempt's bar at the resumed step.

Each run gets its own copy of the images (see dataset_toml). The runs use FluxGym's
--persistent_data_loader_workers with 2 workers. 4 images, batch 1: an epoch is 4 steps, so a
state every 4 steps sits at an epoch's end and a stop lands anywhere. Every resumed run's final
LoRA must be bit-identical to the straight run's: the launcher keys each epoch's data order to
(seed, epoch) and replays sd-scripts' own order of bucket shuffles for fresh workers (see
kohya_launcher.py); without it a resume inside an epoch, or with persistent workers at all,
ended 0.002-0.02 apart (measured on this model).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import tomli_w

from fluxgymd.kinds.kohya import LAUNCHER
from fluxgymd.testing import wait_until
from tests.kohya import env as kenv

MAX_STEPS = 40
EVERY = 3  # states at 3, 6, 9...: inside epochs of 4 steps
PAST_STEP_12 = r"steps:\s+\d+%\|[^|]*\|\s*(1[3-9]|2\d)/"  # a bar at steps 13-29 of 40
BAR = re.compile(r"steps:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)")


@pytest.fixture(scope="module")
def kohya():
    py = kenv.venv_python()
    return {"python": py, "files": kenv.tiny_files(), "sd": kenv.SD_SCRIPTS}


def allowing(k: dict) -> dict:
    """A daemon as installed (command jobs off) that allows this checkout with its venv."""
    return {"allow_command_jobs": False,
            "kohya__checkouts": [{"path": str(k["sd"]), "python": str(k["python"])}]}


def policy(k: dict):
    from fluxgymd.kinds import Policy
    return Policy(kohya_checkouts=((str(k["sd"]), str(k["python"])),))


@pytest.fixture
def daemon(daemon_factory, kohya):
    from tests.conftest import FAST
    return daemon_factory(**FAST, **allowing(kohya)).start()


def sd_args(files: Path, dataset_toml: Path) -> list[str]:
    prompts = dataset_toml.parent / "prompts.txt"
    prompts.write_text("tinylora, a red square --w 64 --h 64 --s 4 --d 7\n")
    return ["--sample_prompts", str(prompts), "--sample_every_n_steps", "20",
            "--pretrained_model_name_or_path", str(files / "flux1-tiny.safetensors"),
            "--clip_l", str(files / "clip_l.safetensors"), "--t5xxl",
            str(files / "t5xxl.safetensors"), "--ae", str(files / "ae.safetensors"),
            "--tokenizer_cache_dir", str(files / "tokenizers"), "--cache_latents_to_disk",
            "--save_model_as", "safetensors", "--sdpa", "--seed", "42",
            "--mixed_precision", "no", "--save_precision", "float",
            "--network_module", "networks.lora_flux", "--network_dim", "4",
            "--optimizer_type", "adamw", "--lr_scheduler", "constant_with_warmup",
            "--max_grad_norm", "0.0", "--learning_rate", "8e-4",
            "--cache_text_encoder_outputs", "--cache_text_encoder_outputs_to_disk",
            "--max_train_steps", str(MAX_STEPS), "--dataset_config", str(dataset_toml),
            "--timestep_sampling", "shift", "--discrete_flow_shift", "3.1582",
            "--model_prediction_type", "raw", "--guidance_scale", "1", "--loss_type", "l2",
            "--t5xxl_max_token_length", "32", "--persistent_data_loader_workers",
            "--max_data_loader_n_workers", "2"]


def dataset_toml(where: Path, files: Path) -> Path:
    """A fresh copy of the images for each run: sd-scripts caches latents and text encoder
    outputs beside them, and a run that computes its caches draws from the RNG while one
    that finds them does not, so runs that share a cache start training apart."""
    images = where / "dataset"
    shutil.copytree(files / "dataset", images)
    path = where / "dataset.toml"
    path.write_text(tomli_w.dumps({
        "general": {"shuffle_caption": False, "caption_extension": ".txt", "keep_tokens": 1},
        "datasets": [{"resolution": 64, "batch_size": 1, "subsets": [
            {"image_dir": str(images), "class_tokens": "tinylora",
             "num_repeats": 1}]}]}))
    return path


def kohya_job(where: Path, name: str, k: dict, **extra) -> Path:
    doc = {"job": {"name": name, "kind": "kohya"},
           "kohya": {"sd_scripts": str(k["sd"]), "python": str(k["python"]),
                     "args": sd_args(k["files"], dataset_toml(where, k["files"])),
                     "env": kenv.SHIM_ENV, "save_every_n_steps": EVERY, **extra}}
    path = where / f"{name}.toml"
    path.write_text(tomli_w.dumps(doc))
    return path


@pytest.fixture(scope="module")
def straight(kohya, tmp_path_factory):
    """The reference: the same arguments run straight through, by the launcher alone."""
    out = tmp_path_factory.mktemp("kohya-straight")
    args = sd_args(kohya["files"], dataset_toml(out, kohya["files"]))
    args += ["--output_dir", str(out), "--output_name", "ref", "--console_log_simple",
             "--save_state", "--save_every_n_steps", str(EVERY), "--save_last_n_steps_state", "99"]
    run_launcher(kohya, args)
    return out / "ref.safetensors"


def run_launcher(kohya: dict, args: list[str]) -> subprocess.CompletedProcess:
    """sd-scripts under the launcher alone, as the daemon would start it, to its end."""
    r = subprocess.run([str(kohya["python"]), LAUNCHER, str(kohya["sd"] / "flux_train_network.py"),
                        *args], cwd=kohya["sd"], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, **kenv.SHIM_ENV))
    assert r.returncode == 0, r.stderr[-4000:]
    return r


def lora_diff(a: Path, b: Path) -> float:
    from safetensors.numpy import load_file
    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys()
    return max(float(abs(x[k].astype("float64") - y[k]).max()) for k in x)


def attempts(log: str) -> list[list[int]]:
    """The bar's step numbers each attempt printed, in order."""
    out: list[list[int]] = []
    for line in log.replace("\r", "\n").splitlines():
        if line.startswith("=== fluxgymd: attempt ") and " at " in line:
            out.append([])
        elif out and (m := BAR.search(line)):
            assert int(m.group(2)) == MAX_STEPS, line  # the bar counts the whole run
            out[-1].append(int(m.group(1)))
    return out


def executed(steps: list[int]) -> tuple[int, int, int]:
    """(first step shown, last, steps trained): the first draw is the resumed step itself."""
    return steps[0], steps[-1], len(set(steps)) - 1


def final_metadata(path: Path) -> dict:
    from safetensors import safe_open
    with safe_open(str(path), "np") as f:
        return f.metadata()


def wait_log(path: Path, pattern: str, timeout: float = 300) -> re.Match:
    rx = re.compile(pattern)

    def seen():
        return rx.search(path.read_text(errors="replace")) if path.exists() else None
    return wait_until(seen, timeout, 0.02, f"{pattern!r} in {path}")


def test_a_straight_kohya_run_under_fluxgymd(daemon, kohya, straight, short_tmp):
    """One attempt to the end, the same LoRA as the launcher alone, with a save-now and a
    sample-now on the way (through the launcher: they move nothing of the training)."""
    job = daemon.submit(kohya_job(short_tmp, "ky-straight", kohya))
    assert job["kind"] == "kohya" and job["state"] in ("queued", "starting", "running")
    out = Path(daemon.outputs_dir) / "ky-straight"
    wait_log(out / "train.log", PAST_STEP_12)
    daemon.ctl("save-now", "ky-straight", check=True)
    daemon.ctl("sample-now", "ky-straight", check=True)
    done = daemon.wait_state(job["id"], "succeeded", timeout=600, interval=0.5)
    lora = out / "ky-straight.safetensors"
    assert done["lora"] == str(lora) and lora_diff(lora, straight) == 0.0
    assert done["step"] == done["total_steps"] == MAX_STEPS and done["loss"] is not None
    assert done["checkpoint_step"] == MAX_STEPS, (out / "train.log").read_text()[-6000:]
    log = (out / "train.log").read_text()
    [steps] = attempts(log)
    assert executed(steps) == (0, MAX_STEPS, MAX_STEPS)
    saved = int(re.search(r"fluxgymd-kohya: save now \(asked by fluxgymd\) at step (\d+)",
                          log).group(1))
    drawn = int(re.search(r"fluxgymd-kohya: sample now \(asked by fluxgymd\) at step (\d+)",
                          log).group(1))
    assert f"state saved {out / f'ky-straight-step{saved:08d}-state'}" in log, log[-3000:]
    assert 12 < saved < MAX_STEPS and 12 < drawn < MAX_STEPS
    samples = sorted(p.name for p in (out / "sample").iterdir())
    assert [n.split("_")[1] for n in samples] == sorted({"000020", "000040", f"{drawn:06d}"})
    assert all(f"fluxgymd-kohya: sample {out / 'sample' / n}" in log for n in samples)
    refused = daemon.ctl("save-now", "ky-straight")
    assert refused.returncode == 4 and "reaches a running job" in refused.stderr
    # status, show and metrics show it like a lora job
    show = daemon.ctl("show", "ky-straight", check=True).stdout
    assert "kohya" in show and f"{MAX_STEPS}/{MAX_STEPS}" in show.replace(" ", ""), show
    rc, metrics = daemon.ctl_json("metrics", "ky-straight")
    assert rc == 0 and len(metrics["metrics"]) >= 5


def test_a_kohya_run_sigkilled_after_its_second_state_save_resumes_exactly(
        daemon, kohya, straight, short_tmp):
    job = daemon.submit(kohya_job(short_tmp, "ky-kill", kohya))
    out = Path(daemon.outputs_dir) / "ky-kill"
    wait_log(out / "train.log", rf"state saved \S+ky-kill-step{2 * EVERY:08d}-state")
    pid = daemon.job(job["id"])["pid"]
    os.kill(pid, signal.SIGKILL)
    done = daemon.wait_state(job["id"], "succeeded", timeout=600, interval=0.5)
    assert done["attempts"] == 2, done["reason"]
    first, second = attempts((out / "train.log").read_text())
    start, end, trained = executed(second)
    lost = first[-1] - start
    print(f"SIGKILL after the state at step {2 * EVERY}: killed at step {first[-1]}, resumed "
          f"at {start}, steps lost {lost}")
    assert start % EVERY == 0 and start >= 2 * EVERY and 0 <= lost < EVERY + 8
    # exactly max_train_steps in the run: the resumed attempt trains only what was left,
    # across epochs (sd-scripts alone would train `start % epoch`... too many, see launcher)
    assert (end, trained) == (MAX_STEPS, MAX_STEPS - start)
    assert final_metadata(out / "ky-kill.safetensors")["ss_steps"] == str(MAX_STEPS)
    state = json.loads((out / "ky-kill-state" / "train_state.json").read_text())
    assert state["current_step"] == MAX_STEPS
    assert lora_diff(out / "ky-kill.safetensors", straight) == 0.0


def test_a_kohya_run_stopped_by_the_daemon_saves_at_the_step_and_resumes(
        daemon_factory, kohya, straight, short_tmp):
    from tests.conftest import FAST
    d = daemon_factory(**FAST, **allowing(kohya)).start()
    job = d.submit(kohya_job(short_tmp, "ky-stop", kohya))
    out = Path(d.outputs_dir) / "ky-stop"
    wait_log(out / "train.log", PAST_STEP_12)
    assert d.stop() == 0
    log = (out / "train.log").read_text()
    m = re.search(r"fluxgymd-kohya: stopping after step (\d+)", log)
    assert m, log[-3000:]
    saved = int(m.group(1))
    [first] = attempts(log)
    lost = first[-1] - saved
    print(f"SIGTERM (daemon stop): last step {first[-1]}, state saved at {saved}, steps lost "
          f"{lost}")
    assert lost == 0 and (out / f"ky-stop-step{saved:08d}-state").is_dir()
    d.start()
    done = d.wait_state(job["id"], "succeeded", timeout=600, interval=0.5)
    *_, last = attempts((out / "train.log").read_text())
    assert executed(last) == (saved, MAX_STEPS, MAX_STEPS - saved)
    assert final_metadata(out / "ky-stop.safetensors")["ss_steps"] == str(MAX_STEPS)
    # stopped inside an epoch (or at its end), resumed: the same LoRA as the straight run
    assert lora_diff(out / "ky-stop.safetensors", straight) == 0.0
    assert done["attempts"] == 2


FLUXGYM = Path(kenv.REPO.parent / "shared" / "peers" / "fluxgym" / "examples" / "mylora")
THEIRS = "/home/fangg/other/tts/fluxgym"


@pytest.mark.parametrize("preset", ["train_12.sh", "train_16.sh", "train_20.sh"])
def test_fluxgymctl_import_gives_a_kohya_job_that_sd_scripts_accepts(
        kohya, tmp_path, preset):
    """Each FluxGym preset, its paths remapped to the tiny fixtures, validates against
    sd-scripts' own parser in its own venv; FluxGym's paths that do not exist are named."""
    if not FLUXGYM.is_dir():
        pytest.skip(f"FluxGym's example files not found at {FLUXGYM}")
    from fluxgymd import jobspec
    folder = tmp_path / "outputs" / "mylora"
    folder.mkdir(parents=True)
    shutil.copyfile(FLUXGYM / preset, folder / "train.sh")
    for name in ("dataset.toml", "sample_prompts.txt"):
        shutil.copyfile(FLUXGYM / name, folder / name)
    files = kohya["files"]
    ctl = [str(Path(os.sys.executable)), "-m", "fluxgymctl", "import", str(folder)]
    r = subprocess.run(ctl, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for flag in ("--pretrained_model_name_or_path", "--clip_l", "--t5xxl", "--ae",
                 "sd-scripts checkout"):
        assert f"not found here: {flag}" in r.stderr, (flag, r.stderr)
    # FluxGym's folder moved here: its dataset.toml is the one beside the script
    assert f"--dataset_config {THEIRS}/outputs/mylora/dataset.toml is not here; using " \
        f"{folder / 'dataset.toml'}" in r.stderr, r.stderr
    maps = {f"{THEIRS}/models/unet/mymodel": files / "flux1-tiny.safetensors",
            f"{THEIRS}/models/clip/clip_l.safetensors": files / "clip_l.safetensors",
            f"{THEIRS}/models/clip/t5xxl_fp16.safetensors": files / "t5xxl.safetensors",
            f"{THEIRS}/models/vae/ae.sft": files / "ae.safetensors",
            f"{THEIRS}/outputs/mylora": folder,
            f"{THEIRS}/datasets/mylora": files / "dataset"}
    job_file = tmp_path / "mylora.toml"
    r = subprocess.run(ctl + ["-o", str(job_file), "--sd-scripts", str(kohya["sd"])]
                       + [f"--map={old}={new}" for old, new in maps.items()],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "not found here" not in r.stderr, r.stderr
    import tomllib
    doc = tomllib.loads(job_file.read_text())
    k = doc["kohya"]
    assert doc["job"] == {"name": "mylora", "kind": "kohya",
                          "description": f"imported from {folder / 'train.sh'}"}
    assert k["mixed_precision"] == "bf16" and "--output_dir" not in k["args"]
    assert k["args"][k["args"].index("--dataset_config") + 1] == str(
        tmp_path / "mylora.dataset.toml")  # its image_dir remapped too
    k["python"] = str(kohya["python"])  # this venv, not FluxGym's env/
    job_file.write_text(tomli_w.dumps(doc))
    spec = jobspec.parse(job_file.read_text(), str(job_file), outputs_dir=tmp_path,
                  policy=policy(kohya))
    assert spec["kohya"]["script"] == "flux_train_network.py"
    # and a wrong flag is refused at submit, by name
    k["args"] = k["args"] + ["--no_such_flag"]
    job_file.write_text(tomli_w.dumps(doc))
    from fluxgymd.protocol import FluxgymError
    with pytest.raises(FluxgymError, match="unrecognized arguments: --no_such_flag"):
        jobspec.parse(job_file.read_text(), str(job_file), outputs_dir=tmp_path,
                  policy=policy(kohya))


def test_a_state_without_accelerates_step_resumes(kohya, straight, tmp_path):
    """The `KeyError: 'step'` trap: accelerate 0.32-0.33 read `step` from random_states_0.pkl,
    which older versions did not write. The launcher supplies it; the run resumes exactly."""
    import torch
    state = tmp_path / "ref-step00000006-state"
    shutil.copytree(straight.parent / state.name, state)
    rng = torch.load(state / "random_states_0.pkl", weights_only=False)
    del rng["step"]
    torch.save(rng, state / "random_states_0.pkl")
    args = sd_args(kohya["files"], dataset_toml(tmp_path, kohya["files"]))
    args += ["--output_dir", str(tmp_path), "--output_name", "ref", "--console_log_simple",
             "--resume", str(state), "--skip_until_initial_step"]
    r = run_launcher(kohya, args)
    assert "this state has no accelerate 'step'" in r.stderr
    assert lora_diff(tmp_path / "ref.safetensors", straight) == 0.0


def test_a_stalled_kohya_run_dumps_its_stacks_saves_at_the_step_and_resumes_exactly(
        daemon_factory, kohya, straight, short_tmp):
    """The watchdog's path: the trainer is frozen (SIGSTOP), judged stalled, asked for its
    stacks (SIGUSR1: a dump, not its death), SIGTERMed and continued: it finishes the step in
    hand, saves there, exits 75 and is resumed."""
    from tests.conftest import FAST
    d = daemon_factory(**FAST, **allowing(kohya), watchdog__stall_floor_s=2.0,
                       watchdog__stall_factor=1.0).start()
    job = d.submit(kohya_job(short_tmp, "ky-stall", kohya))
    out = Path(d.outputs_dir) / "ky-stall"
    wait_log(out / "train.log", PAST_STEP_12)
    pid = d.job(job["id"])["pid"]
    os.kill(pid, signal.SIGSTOP)
    done = d.wait_state(job["id"], "succeeded", timeout=600, interval=0.5)
    log = (out / "train.log").read_text()
    assert "stalled: no step for" in log and "Thread 0x" in log  # faulthandler's dump
    saved = int(re.search(r"fluxgymd-kohya: stopping after step (\d+)", log).group(1))
    first, second = attempts(log)
    print(f"stall (SIGSTOP at step {first[-1]}): state saved at {saved}, steps lost "
          f"{first[-1] - saved}")
    assert first[-1] == saved and executed(second) == (saved, MAX_STEPS, MAX_STEPS - saved)
    assert done["attempts"] == 2 and done["restarts"] == 1  # a stall spends one
    assert lora_diff(out / "ky-stall.safetensors", straight) == 0.0


def test_a_cancelled_kohya_run_keeps_a_state_at_the_step_it_reached(
        daemon, kohya, short_tmp):
    job = daemon.submit(kohya_job(short_tmp, "ky-cancel", kohya))
    out = Path(daemon.outputs_dir) / "ky-cancel"
    wait_log(out / "train.log", PAST_STEP_12)
    daemon.ctl("cancel", "ky-cancel", check=True)
    done = daemon.wait_state(job["id"], "cancelled", timeout=120, interval=0.2)
    log = (out / "train.log").read_text()
    saved = int(re.search(r"fluxgymd-kohya: stopping after step (\d+)", log).group(1))
    [first] = attempts(log)
    print(f"cancel: last step {first[-1]}, state saved at {saved}, steps lost "
          f"{first[-1] - saved}")
    assert first[-1] == saved and done["checkpoint_step"] == saved
    assert (out / f"ky-cancel-step{saved:08d}-state").is_dir()


def test_a_kohya_run_through_slurm_sigkilled_on_its_node_resumes_exactly(
        daemon_factory, cluster, kohya, straight, short_tmp):
    """Any kind on any executor: sd-scripts in its own Python, in a Slurm batch job."""
    from tests.conftest import FAST
    from tests.slurm_cluster import slurm_config
    d = daemon_factory("ky-slurm", **FAST, **slurm_config(cluster), **allowing(kohya)).start()
    try:
        job = d.submit(kohya_job(short_tmp, "ky-slurm", kohya))
        out = Path(d.outputs_dir) / "ky-slurm"
        wait_log(out / "train.log", rf"state saved \S+ky-slurm-step{2 * EVERY:08d}-state")
        first = d.job(job["id"])["external_id"]
        assert d.job(job["id"])["executor"] == "slurm" and first
        cluster.exec("kill", "-KILL", cluster.node_pid(out, 1))
        done = d.wait_state(job["id"], "succeeded", timeout=600, interval=0.5)
        assert done["attempts"] == 2 and done["external_id"] != first, done["reason"]
        _, second = attempts((out / "train.log").read_text())
        start, end, _ = executed(second)
        assert start % EVERY == 0 and start >= 2 * EVERY and end == MAX_STEPS
        assert lora_diff(out / "ky-slurm.safetensors", straight) == 0.0
    finally:
        cluster.cancel_all()
