"""A lora job through the daemon: the trainer speaks the contract, the store hears it."""
import tomli_w

from fluxgymd.testing import wait_until


def test_lora_job_trains_to_a_finished_lora_with_progress_in_the_store(daemon, tiny, short_tmp):
    job = short_tmp / "tiny-lora.toml"
    job.write_text(tomli_w.dumps({
        "job": {"name": "tiny-lora", "kind": "lora"},
        "train": {"pretrained_model": str(tiny / "model"), "dataset_dir": str(tiny / "data"),
                  "resolution": 64, "max_train_steps": 30, "train_batch_size": 2,
                  "save_every_n_steps": 10, "save_every_n_epochs": 0,
                  "t5xxl_max_token_length": 32, "trigger_word": "fgx",
                  "sample_prompts": ["fgx a red disc", "fgx a blue square"],
                  "sample_every_n_steps": 15, "sample_steps": 2},
    }))
    r = daemon.ctl("submit", str(job), "--wait", "--wait-timeout", "240", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr + daemon.logs()[-3000:]
    j = daemon.job("tiny-lora")
    assert (j["state"], j["step"], j["total_steps"]) == ("succeeded", 30, 30)
    assert j["checkpoint"].endswith("tiny-lora/checkpoints/step-00000030")
    assert j["checkpoint_step"] == 30 and j["loss"] is not None
    assert j["phase"] is None  # no stale phase once finished
    out = daemon.outputs_dir / "tiny-lora"
    assert j["lora"] == str(out / "tiny-lora.safetensors")
    assert (out / "tiny-lora.safetensors").exists() and (out / "job.toml").exists()
    metrics = daemon.call("metrics", job="tiny-lora")["metrics"]
    assert [m["step"] for m in metrics][-1] == 30 and len(metrics) >= 20  # a few may drop
    samples = sorted(p.name for p in (out / "samples").iterdir())
    assert samples == [f"step-{s:08d}-{i:02d}.png" for s in (15, 30) for i in (0, 1)]
    from PIL import Image
    with Image.open(out / "samples" / samples[0]) as img:
        assert img.size == (64, 64)
    log = daemon.call("logs", job="tiny-lora", lines=1000)["lines"]
    assert any("finished:" in line for line in log)
    plan = j["memory_plan"]  # the trainer's plan, reported through the contract
    assert plan["tier"] == "none" and plan["free_bytes"] is None  # a CPU
    assert plan["peak_bytes"] == sum(plan["parts"].values()) > 0
    assert plan["levers"]["optimizer_type"] == "AdamW"
    shown = daemon.ctl("show", "tiny-lora").stdout
    assert "memory" in shown and "tier none, planned peak" in shown, shown


def test_an_invalid_train_section_is_refused_at_submit(daemon, tiny, short_tmp):
    job = short_tmp / "bad.toml"
    job.write_text(tomli_w.dumps({
        "job": {"name": "bad", "kind": "lora"},
        "train": {"pretrained_model": str(tiny / "model"), "dataset_dir": str(tiny / "nope"),
                  "network_dimm": 8},
    }))
    r = daemon.ctl("submit", str(job))
    assert r.returncode == 4
    assert "did you mean 'network_dim'" in r.stderr and "does not exist" in r.stderr
    wait_until(lambda: daemon.call("list")["jobs"] == [], 2)
