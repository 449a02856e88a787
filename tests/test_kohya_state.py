"""sd-scripts' state folders judged from outside: a half-written one is never taken, a
finished run is never resumed, the newest complete state is resumed with the step count
continued. The files are made the way accelerate makes them (torch.save, safetensors)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from fluxgymd.kohya_state import finished, resume_args, state_folders, why_incomplete


def write_state(folder: Path, step: int, epoch: int = 1, torn: str = "") -> Path:
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "train_state.json").write_text(json.dumps({"current_epoch": epoch,
                                                          "current_step": step}))
    save_file({"lora_unet_x.lora_down.weight": torch.ones(4, 8) * step},
              str(folder / "model.safetensors"))
    torch.save({"state": {0: {"exp_avg": torch.zeros(4)}}}, folder / "optimizer.bin")
    torch.save({"last_epoch": step}, folder / "scheduler.bin")
    torch.save({"cpu": torch.get_rng_state()}, folder / "random_states_0.pkl")
    if torn:  # cut the file short, as a SIGKILL in the middle of writing it leaves it
        data = (folder / torn).read_bytes()
        (folder / torn).write_bytes(data[:len(data) // 2])
    return folder


def test_the_newest_complete_state_is_resumed_and_torn_ones_are_skipped(tmp_path):
    write_state(tmp_path / "mylora-step00000010-state", 10)
    write_state(tmp_path / "mylora-step00000020-state", 20)
    for i, torn in enumerate(("random_states_0.pkl", "optimizer.bin", "model.safetensors")):
        # a newer state cut short: never taken over the complete step-20 one
        write_state(tmp_path / f"mylora-step0000003{i}-state", 30 + i, torn=torn)
        assert state_folders(str(tmp_path), "mylora")[0].current_step == 20, torn
    assert resume_args(str(tmp_path), "mylora") == [
        "--resume", str(tmp_path / "mylora-step00000020-state"), "--skip_until_initial_step"]


@pytest.mark.parametrize("damage,why", [
    (lambda d: (d / "random_states_0.pkl").unlink(), "no random_states file"),
    (lambda d: (d / "train_state.json").write_text("{"), "train_state.json is not readable"),
    (lambda d: (d / "train_state.json").unlink(), "no train_state.json"),
    (lambda d: (d / "scheduler.bin").write_bytes(b""), "scheduler.bin is torn"),
    (lambda d: (d / "model.safetensors").unlink(), "no network weights"),
])
def test_each_kind_of_half_written_folder_is_named(tmp_path, damage, why):
    d = write_state(tmp_path / "mylora-000002-state", 8)
    assert why_incomplete(str(d)) is None
    damage(d)
    assert why in why_incomplete(str(d))
    assert state_folders(str(tmp_path), "mylora") == []


def test_a_finished_run_is_not_resumed_and_names_do_not_mix(tmp_path):
    write_state(tmp_path / "mylora-state", 40)  # the end state: looks resumable
    write_state(tmp_path / "other-step00000050-state", 50)
    found = state_folders(str(tmp_path), "mylora")
    assert [(s.kind, s.current_step) for s in found] == [("end", 40)]
    assert not finished(str(tmp_path), "mylora")
    from safetensors.torch import save_file
    import torch
    save_file({"w": torch.ones(2)}, str(tmp_path / "mylora.safetensors"))
    assert finished(str(tmp_path), "mylora")
    (tmp_path / "mylora.safetensors").write_bytes(b"\x10\x00")  # torn final model
    assert not finished(str(tmp_path), "mylora")


def test_epoch_and_step_states_order_by_the_step_they_hold(tmp_path):
    write_state(tmp_path / "mylora-000001-state", 25, epoch=1)
    write_state(tmp_path / "mylora-step00000020-state", 20)
    assert [s.kind for s in state_folders(str(tmp_path), "mylora")] == ["epoch", "step"]


def test_the_end_state_is_never_resumed_the_newest_step_state_is(tmp_path):
    """`<name>-state` is saved after the last step; sd-scripts refuses to resume at
    max_train_steps, so a run that died before writing its final model would crash forever."""
    write_state(tmp_path / "mylora-state", 40)
    assert resume_args(str(tmp_path), "mylora") == []  # nothing else: start over
    write_state(tmp_path / "mylora-step00000030-state", 30)
    assert resume_args(str(tmp_path), "mylora")[:2] == [
        "--resume", str(tmp_path / "mylora-step00000030-state")]
