"""The trainer on the tiny Flux, each run in its own process: exact resume after SIGKILL,
SIGTERM and a torn checkpoint write; the LoRA loads into a pipeline; bad inputs are named.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path


from fluxgymd.testing import wait_until
from tinylora import STEPS, assert_identical, job_file, lora

PY = sys.executable
SEED = int(os.environ.get("FLUXGYM_TEST_SEED", time.time_ns() % 10_000))
ENV = {k: v for k, v in os.environ.items() if not k.startswith("FLUXGYM_")}
ENV["HF_HUB_OFFLINE"] = "1"
# the `tiny` fixture (a tiny Flux and a dataset, made once per session) is in conftest.py


def start(root: Path, name: str, env_extra=None, **train) -> tuple[subprocess.Popen, Path]:
    out = root / "out" / name
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "stderr.log", "ab")
    p = subprocess.Popen([PY, "-m", "trainer", str(job_file(root, name, **train)),
                          "--output-dir", str(out)], stdout=log, stderr=subprocess.STDOUT,
                         env=dict(ENV, **(env_extra or {})))
    log.close()
    return p, out


def finish(p: subprocess.Popen, timeout: float = 240) -> int:
    try:
        return p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        raise


def train(root: Path, name: str, **kw) -> Path:
    p, out = start(root, name, **kw)
    rc = finish(p)
    assert rc == 0, (out / "stderr.log").read_text()[-3000:]
    return out


def signal_after_first_checkpoint(root: Path, name: str, sig: int, seed: int):
    """Start a run, wait for its first checkpoint, then signal it at a random later moment
    (up to ~15 steps on); return its exit status and output dir."""
    p, out = start(root, name)
    try:
        wait_until(lambda: (out / "checkpoints" / "step-00000010" / "manifest.json").exists()
                   or p.poll() is not None, 120, what="the first checkpoint")
        time.sleep(random.Random(seed).uniform(0, 0.5))
        p.send_signal(sig)
    finally:
        rc = finish(p)
    return rc, out


def test_sigkill_at_a_random_step_then_resume_is_bit_identical(tiny, straight):
    rc, out = signal_after_first_checkpoint(tiny, "killed", signal.SIGKILL, SEED)
    assert rc == -signal.SIGKILL, f"the run ended by itself (seed {SEED})"
    out = train(tiny, "killed")
    assert "resuming from" in (out / "stderr.log").read_text()
    assert_identical(straight, lora(out, "killed"))


def test_sigterm_checkpoints_exits_75_and_resumes_bit_identical(tiny, straight):
    rc, out = signal_after_first_checkpoint(tiny, "termed", signal.SIGTERM, SEED + 1)
    log = (out / "stderr.log").read_text()
    assert rc == 75, log[-2000:]
    assert "stopped by SIGTERM at step" in log
    stopped_at = int(log.split("stopped by SIGTERM at step ")[1].split(";")[0])
    assert (out / "checkpoints" / f"step-{stopped_at:08d}" / "manifest.json").exists()
    assert "cache: encoded with VAE, then CLIP-L, then T5 (each freed before the next)" in log
    size_before = (out / "stderr.log").stat().st_size
    out = train(tiny, "termed")
    resumed = (out / "stderr.log").read_text()[size_before:]
    assert f"(step {stopped_at})" in resumed  # no step lost
    # the cache is complete: the resume loads the transformer only
    assert "cache: complete; text encoders and VAE not loaded" in resumed
    assert_identical(straight, lora(out, "termed"))


def test_sigabrt_with_its_reader_gone_still_checkpoints_and_exits_75(tiny):
    # systemd's watchdog SIGABRTs the whole cgroup when the daemon wedges: the daemon dies,
    # closing the trainer's output pipe, and the trainer must still save its step
    out = tiny / "out" / "orphan"
    p = subprocess.Popen([PY, "-m", "trainer", str(job_file(tiny, "orphan")),
                          "--output-dir", str(out)], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, env=ENV)
    try:
        seen, last = [], 0
        for raw in p.stdout:
            seen.append(line := raw.decode(errors="replace"))
            if line.startswith("trainer: step "):
                last = int(line.split()[2].split("/")[0])
            if last > 10 and any("checkpoint step 10" in x for x in seen):
                break
        assert last > 10, "".join(seen)[-3000:]
        p.stdout.close()  # the reader is gone; the next print hits a broken pipe
        p.send_signal(signal.SIGABRT)
    finally:
        rc = finish(p)
    assert rc == 75, "".join(seen)[-3000:]
    steps = sorted(int(c.name[5:]) for c in (out / "checkpoints").iterdir()
                   if c.name.startswith("step-") and (c / "manifest.json").exists())
    assert steps[-1] >= last, steps  # the step it was on when the signal came, saved


def test_a_torn_checkpoint_write_is_never_resumed_from(tiny, straight):
    p, out = start(tiny, "torn", env_extra={"TRAINER_FAULT": "kill-in-checkpoint:20"})
    assert finish(p) == -signal.SIGKILL
    ck = out / "checkpoints"
    assert sorted(x.name for x in ck.iterdir() if x.name.startswith("step-")) == ["step-00000010"]
    assert any(x.name.startswith(".tmp-step-00000020") for x in ck.iterdir())
    out = train(tiny, "torn")
    assert "resuming from" in (log := (out / "stderr.log").read_text())
    assert "step-00000010 (step 10)" in log
    assert not any(x.name.startswith(".tmp-") for x in ck.iterdir())  # cleaned up
    assert_identical(straight, lora(out, "torn"))


def test_a_finished_run_does_not_train_again(tiny, straight):
    out = tiny / "out" / "straight"
    before = (out / "straight.safetensors").stat().st_mtime_ns
    p, _ = start(tiny, "straight")
    assert finish(p) == 0
    log = (out / "stderr.log").read_text().split("resuming from")[-1]
    assert f"(step {STEPS})" in log and "step 1/" not in log
    assert_identical(straight, lora(out, "straight"))
    assert (out / "straight.safetensors").stat().st_mtime_ns >= before


def test_checkpoints_hold_only_lora_and_optimizer_and_are_pruned(tiny, straight):
    import torch
    from safetensors.torch import load_file

    ck = tiny / "out" / "straight" / "checkpoints"
    kept = sorted(x.name for x in ck.iterdir())
    assert kept == ["step-00000030", "step-00000040"]  # save_last_n_checkpoints = 2
    weights = load_file(str(ck / "step-00000040" / "lora.safetensors"))
    assert weights and all(".lora_A." in k or ".lora_B." in k for k in weights)
    opt = torch.load(ck / "step-00000040" / "optimizer.pt", weights_only=True)
    assert len(opt["state"]) == len(weights)
    base = (tiny / "model" / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_size
    lora_bytes = sum(v.numel() * 4 for v in weights.values())
    size = sum(f.stat().st_size for f in (ck / "step-00000040").iterdir())
    assert size < 4 * lora_bytes + 64 * 1024 and size < base


LOAD_CHECK = textwrap.dedent("""
    import json, sys, torch
    from diffusers import FluxPipeline
    from safetensors import safe_open
    model, lora = sys.argv[1], sys.argv[2]
    def image(pipe):
        return pipe("fgx a red disc", height=64, width=64, num_inference_steps=2,
                    max_sequence_length=32, generator=torch.Generator().manual_seed(0),
                    output_type="pt").images
    pipe = FluxPipeline.from_pretrained(model, local_files_only=True)
    plain = image(pipe)
    pipe.load_lora_weights(lora, adapter_name="x")
    with_lora = image(pipe)
    pipe2 = FluxPipeline.from_pretrained(model, local_files_only=True)
    pipe2.load_lora_weights(lora, adapter_name="x")
    again = image(pipe2)
    alpha = pipe2.transformer.peft_config["x"].lora_alpha
    with safe_open(lora, "pt") as f:
        meta = f.metadata()
    print(json.dumps({"changed": not torch.equal(plain, with_lora),
                      "reproduced": torch.equal(with_lora, again), "alpha": alpha,
                      "rank": pipe2.transformer.peft_config["x"].r,
                      "steps": meta.get("fluxgym_steps"), "trigger": meta.get("fluxgym_trigger_word"),
                      "dataset": meta.get("fluxgym_dataset_sha256"),
                      "base": meta.get("fluxgym_base_model")}))
""")


def test_the_lora_loads_into_a_pipeline_changes_it_and_reloads_exactly(tiny, straight):
    import json

    lora_path = tiny / "out" / "straight" / "straight.safetensors"
    r = subprocess.run([PY, "-c", LOAD_CHECK, str(tiny / "model"), str(lora_path)],
                       capture_output=True, text=True, env=ENV, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["changed"] and got["reproduced"]
    assert (got["alpha"], got["rank"]) == (4.0, 4)  # alpha / rank is folded into lora_B
    assert got["steps"] == str(STEPS) and got["trigger"] == "fgx"
    assert len(got["dataset"]) == 64 and got["base"] == "model"  # a name, not our path


MERGE_CHECK = textwrap.dedent("""
    import json, sys, torch
    from diffusers import FluxPipeline
    from safetensors.torch import load_file
    model, lora, trained, alpha = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    base = FluxPipeline.from_pretrained(model, local_files_only=True).transformer
    W = {k: v.clone() for k, v in base.state_dict().items()}
    raw = load_file(trained)  # the adapter as trained: lora_A/lora_B, scale alpha / rank
    file = load_file(lora)
    pipe = FluxPipeline.from_pretrained(model, local_files_only=True)
    pipe.load_lora_weights(lora)
    pipe.fuse_lora()
    merged = {k.replace(".base_layer", ""): v for k, v in pipe.transformer.state_dict().items()}
    out = {"diffusers": 0.0, "comfyui": 0.0, "modules": 0}
    for key in raw:
        if ".lora_A." not in key:
            continue
        mod = key.split(".lora_A.")[0]
        A, B = raw[key], raw[mod + ".lora_B.weight"]
        rank = A.shape[0]
        want = W[mod + ".weight"] + (alpha / rank) * (B @ A)
        out["diffusers"] = max(out["diffusers"], (merged[mod + ".weight"] - want).abs().max().item())
        # ComfyUI's rule: alpha / rank when the file has `<module>.alpha`, else 1.0
        fa, fb = file["transformer." + mod + ".lora_A.weight"], file["transformer." + mod + ".lora_B.weight"]
        s = file[f"transformer.{mod}.alpha"].item() / rank if f"transformer.{mod}.alpha" in file else 1.0
        comfy = W[mod + ".weight"] + s * (fb @ fa)
        out["comfyui"] = max(out["comfyui"], (comfy - want).abs().max().item())
        out["modules"] += 1
    print(json.dumps(out))
""")


def test_the_lora_has_its_trained_strength_in_diffusers_and_comfyui(tiny, straight):
    import json

    out = tiny / "out" / "straight"
    trained = out / "checkpoints" / f"step-{STEPS:08d}" / "lora.safetensors"
    r = subprocess.run([PY, "-c", MERGE_CHECK, str(tiny / "model"),
                        str(out / "straight.safetensors"), str(trained), "2.0"],
                       capture_output=True, text=True, env=ENV, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    print("max abs difference from the trained adapter:", got)
    assert got["modules"] > 0
    assert got["diffusers"] < 1e-6 and got["comfyui"] < 1e-6


def test_bad_dataset_exits_2_naming_the_file(tiny, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "good.png").write_bytes((tiny / "data" / "img000.png").read_bytes())
    (data / "scan.pdf").write_bytes(b"%PDF-1.4")
    job = job_file(tiny, "baddata", dataset_dir=str(data))
    r = subprocess.run([PY, "-m", "trainer", str(job), "--output-dir", str(tmp_path / "o")],
                       capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 2
    assert f"{data / 'scan.pdf'} is not an image" in r.stderr and "Traceback" not in r.stderr


def test_bad_job_file_exits_with_every_problem(tiny, tmp_path):
    job = tmp_path / "j.toml"
    job.write_text('[job]\nname = "j"\n[train]\nnetwork_dim = 0\nlearning_rte = 1\n')
    r = subprocess.run([PY, "-m", "trainer", str(job)], capture_output=True, text=True,
                       env=ENV, timeout=60)
    assert r.returncode != 0
    for text in ("network_dim must be between 1 and 4096", "did you mean 'learning_rate'",
                 "train.pretrained_model is required"):
        assert text in r.stderr


def test_default_targets_cover_every_linear_of_the_blocks_as_kohya_does(tiny):
    import torch
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    from trainer.config import ATTENTION_TARGETS, DEFAULT_TARGETS, lora_targets

    def adapted(names):
        tr = FluxTransformer2DModel.from_pretrained(str(tiny / "model"), subfolder="transformer")
        tr.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=lora_targets(names)))
        return {n.rsplit(".lora_A", 1)[0] for n, _ in tr.named_modules() if n.endswith(".lora_A")}

    tr = FluxTransformer2DModel.from_pretrained(str(tiny / "model"), subfolder="transformer")
    in_blocks = {n for n, m in tr.named_modules() if isinstance(m, torch.nn.Linear)
                 and n.split(".")[0] in ("transformer_blocks", "single_transformer_blocks")}
    assert adapted(DEFAULT_TARGETS) == in_blocks  # every Linear of the blocks, nothing else
    small = adapted(ATTENTION_TARGETS)
    assert small < in_blocks and all(n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "0")
                                     for n in small)


def test_text_encoders_one_at_a_time_give_what_encode_prompt_gives(tiny, tmp_path):
    import torch

    from diffusers import FluxPipeline

    from trainer import flux, sources

    src = sources.resolve(str(tiny / "model"))
    cache = flux.Cache(str(tmp_path), src, 32)
    captions = ["fgx, a red disc", "fgx, a blue square"]
    texts, loaded = flux.cache_text(src, torch.float32, cache, captions, "cpu", 32, lambda: None)
    assert loaded == ["CLIP-L", "T5"]
    pipe = FluxPipeline.from_pretrained(str(tiny / "model"), torch_dtype=torch.float32,
                                        local_files_only=True)
    for c in captions:
        with torch.no_grad():  # as the trainer's cache always ran
            embeds, pooled, _ = pipe.encode_prompt(prompt=[c], prompt_2=None, device="cpu",
                                                   max_sequence_length=32)
        assert torch.equal(texts[c]["prompt_embeds"], embeds[0].float())
        assert torch.equal(texts[c]["pooled"], pooled[0].float())
    again, loaded = flux.cache_text(src, torch.float32, cache, captions, "cpu", 32,
                                    lambda: None)
    assert loaded == [] and all(torch.equal(again[c]["pooled"], texts[c]["pooled"])
                                for c in captions)
