"""save-now and sample-now on a running tiny lora job, through the real daemon and CLI: the
checkpoint is a normal complete one at the step it was asked at, training goes on, and the
final LoRA is bit-identical to the uninterrupted run's; a sample appears with its step.
What cannot take a request is refused with the reason."""
from __future__ import annotations

import re
from pathlib import Path

from conftest import FAST
from fluxgymd.testing import wait_until
from tinylora import assert_identical, job_file, lora


def _running_at(d, name, step):
    return wait_until(lambda: (j := d.job(name))["state"] == "running"
                      and j["phase"] == "training" and (j["step"] or 0) >= step and j,
                      120, 0.02, f"{name} training at step {step}")


def test_save_now_checkpoints_and_changes_nothing(daemon_factory, tiny, straight):
    d = daemon_factory("ctl", **FAST).start()
    d.submit(job_file(tiny, "ctl", save_every_n_steps=0, save_every_n_epochs=0))
    _running_at(d, "ctl", 3)
    r = d.ctl("save-now", "ctl", check=True)
    assert "a checkpoint at its next step" in r.stdout
    job = d.wait_state("ctl", ("succeeded", "failed"), timeout=300)
    assert job["state"] == "succeeded", job["reason"]
    log = d.ctl("logs", "ctl", "-n", "2000").stdout
    asked = re.search(r"save now \(asked by fluxgymd\) at step (\d+)", log)
    assert asked, log[-3000:]
    at = int(asked.group(1))
    assert 3 < at < 40
    # a complete checkpoint at that step (kept: the only other is the final one)
    ckpts = sorted(p.name for p in (Path(job["output_dir"]) / "checkpoints").iterdir()
                   if p.is_dir())
    assert f"step-{at:08d}" in ckpts, ckpts
    assert_identical(lora(Path(job["output_dir"]), "ctl"), straight)
    assert not (Path(job["output_dir"]) / ".control" / "save").exists()  # taken

    # refused: not running any more
    again = d.ctl("save-now", "ctl")
    assert again.returncode == 4 and "reaches a running job" in again.stderr


def test_sample_now_draws_at_the_current_step(daemon_factory, tiny):
    d = daemon_factory("smp", **FAST).start()
    d.submit(job_file(tiny, "smp", max_train_steps=400, sample_prompts=["fgx, a red disc"],
                      sample_every_n_steps=0, sample_steps=2, save_every_n_steps=0,
                      save_every_n_epochs=0))
    d.submit(job_file(tiny, "nosamples", max_train_steps=400))
    _running_at(d, "smp", 2)
    d.ctl("sample-now", "smp", check=True)
    folder = Path(d.job("smp")["output_dir"]) / "samples"
    found = wait_until(lambda: folder.is_dir() and sorted(folder.glob("step-*-00.png")), 120,
                       0.1, "a sample")
    step = int(found[0].name.split("-")[1])
    assert step >= 2
    gallery = d.call("show", job="smp")
    assert gallery["state"] == "running"  # training goes on
    refused = d.ctl("sample-now", "nosamples")
    assert refused.returncode == 4 and ("no sample_prompts" in refused.stderr or
                                        "reaches a running job" in refused.stderr)
    d.ctl("cancel", "smp", check=True)
    d.ctl("cancel", "nosamples", check=True)
