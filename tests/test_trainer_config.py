"""The [train] section's validation (stdlib only: the daemon runs it at submit)."""
import pytest

from trainer.config import TrainConfigError, parse


@pytest.fixture
def paths(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text("{}")
    data = tmp_path / "data"
    data.mkdir()
    return {"pretrained_model": str(model), "dataset_dir": str(data)}


def problems(section, base=""):
    with pytest.raises(TrainConfigError) as e:
        parse(section, base)
    return "\n".join(e.value.problems)


def test_defaults_and_relative_paths(tmp_path, paths):
    cfg = parse({"pretrained_model": "model", "dataset_dir": "data"}, str(tmp_path))
    assert cfg.pretrained_model == paths["pretrained_model"]
    assert cfg.network_dim == 4 and cfg.save_last_n_checkpoints == 2
    assert cfg.mixed_precision == "auto" and cfg.timestep_sampling == "shift"


@pytest.mark.parametrize("key,value,message", [
    ("netwrok_dim", 4, "unknown key train.netwrok_dim (did you mean 'network_dim'?)"),
    ("network_dim", "4", "train.network_dim must be an integer"),
    ("network_dim", 0, "train.network_dim must be between 1 and 4096"),
    ("learning_rate", float("nan"), "train.learning_rate must be a number"),
    ("lr_scheduler", "cosine_with_restarts", "train.lr_scheduler 'cosine_with_restarts' is not one of"),
    ("mixed_precision", "fp16", "fp16 is not supported for Flux; use bf16"),
    ("save_last_n_checkpoints", 1, "train.save_last_n_checkpoints must be at least 2"),
    ("gradient_checkpointing", 1, "train.gradient_checkpointing must be true or false"),
    ("sample_prompts", ["ok", 3], "train.sample_prompts must be a list of strings"),
    ("sample_every_n_steps", 10, "sample_prompts is empty"),
    ("network_target_modules", [], "the LoRA would train nothing"),
])
def test_each_mistake_is_named(paths, key, value, message):
    assert message in problems(dict(paths, **{key: value}))


def test_missing_and_wrong_paths(tmp_path):
    text = problems({})
    assert "train.pretrained_model is required" in text and "train.dataset_dir is required" in text
    f = tmp_path / "flux1-dev.safetensors"
    f.write_bytes(b"x")
    text = problems({"pretrained_model": str(f), "dataset_dir": str(tmp_path / "nope")})
    assert "flux1-dev" not in text  # a single file is a model source; preflight reads it
    from trainer.config import TrainConfig
    from trainer.preflight import check_model
    assert "too short to be a safetensors file" in check_model(
        TrainConfig(pretrained_model=str(f)))[0]
    assert f"train.dataset_dir: {tmp_path / 'nope'} does not exist" in text
    text = problems({"pretrained_model": str(tmp_path), "dataset_dir": str(tmp_path)})
    assert "has no model_index.json" in text


def test_steps_or_epochs(paths):
    assert "set train.max_train_steps or train.max_train_epochs" in problems(
        dict(paths, max_train_steps=0, max_train_epochs=0))


def test_the_example_job_documents_and_accepts_every_key(paths):
    import tomllib
    from dataclasses import fields
    from pathlib import Path

    from trainer.config import TrainConfig

    example = Path(__file__).resolve().parents[1] / "etc" / "jobs" / "lora.toml"
    train = tomllib.loads(example.read_text())["train"]
    assert set(train) == {f.name for f in fields(TrainConfig) if f.name != "levers_set"}
    cfg = parse(dict(train, **paths))  # only its paths are placeholders
    defaults = TrainConfig()
    for f in fields(TrainConfig):  # the documented values are the defaults
        if f.name not in paths and f.name != "levers_set":
            assert getattr(cfg, f.name) == getattr(defaults, f.name), f.name
