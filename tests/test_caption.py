"""kind = "caption" end to end: a real daemon, the real transformers Florence-2 (a tiny random
one, `trainer.tiny --florence`), real images in a dataset folder."""
from __future__ import annotations

import functools
import os
import re
import signal
import subprocess
import sys

import pytest
import tomli_w

from conftest import FAST
from fluxgymd.testing import wait_until

ENV = dict(os.environ, HF_HUB_OFFLINE="1")


@pytest.fixture(scope="session")
def florence(tmp_path_factory):
    path = tmp_path_factory.mktemp("florence") / "model"
    subprocess.run([sys.executable, "-m", "trainer.tiny", "--florence", str(path)], check=True,
                   env=ENV, capture_output=True, timeout=180)
    return path


def dataset(root, images: int):
    subprocess.run([sys.executable, "-m", "trainer.tiny", "--dataset", str(root),
                    "--images", str(images)], check=True, env=ENV, capture_output=True)
    for txt in root.glob("*.txt"):
        txt.unlink()
    return root


def caption_job(root, name, data, model, **keys):
    path = root / f"{name}.toml"
    path.write_text(tomli_w.dumps({"job": {"name": name, "kind": "caption"},
                                   "caption": {"dataset_dir": str(data), "model": str(model),
                                               "trigger_word": "fgx", **keys}}))
    return path


@functools.lru_cache(maxsize=1)
def _loaded(model_dir):
    from transformers import AutoProcessor, Florence2ForConditionalGeneration

    return (Florence2ForConditionalGeneration.from_pretrained(model_dir).eval(),
            AutoProcessor.from_pretrained(model_dir))


def decoded(model_dir, image_path, max_new_tokens):
    """What the processor decodes from generate on this one image, FluxGym's settings."""
    import torch
    from PIL import Image

    model, proc = _loaded(str(model_dir))
    image = Image.open(image_path).convert("RGB")
    inputs = proc(text="<DETAILED_CAPTION>", images=image, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"],
                             max_new_tokens=max_new_tokens, num_beams=3, do_sample=False)
    return proc.batch_decode(out, skip_special_tokens=True)[0].strip()


def test_a_caption_job_writes_what_is_missing_and_skips_what_is_bad(
        daemon_factory, short_tmp, florence):
    from PIL import Image

    data = dataset(short_tmp / "data", 5)
    (data / "img001.txt").write_text("mine, kept")
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    Image.new("1", (20000, 10000)).save(data / "bomb.png")  # 200 Mpx in a few kB
    d = daemon_factory(**FAST).start()
    d.submit(caption_job(short_tmp, "cap", data, florence, batch_size=2, max_new_tokens=16))
    j = d.wait_state("cap", "succeeded", timeout=120)
    assert (j["step"], j["total_steps"]) == (5, 5)
    assert (data / "img001.txt").read_text() == "mine, kept"
    for i in (0, 2, 3, 4):
        text = (data / f"img{i:03d}.txt").read_text()
        assert text == "fgx " + decoded(florence, data / f"img{i:03d}.png", 16), text
    assert not (data / "broken.txt").exists() and not (data / "bomb.txt").exists()
    log = (d.outputs_dir / "cap" / "train.log").read_text()
    assert "skipped broken.png is not a readable image" in log
    assert re.search(r"skipped bomb.png is refused: Image size \(200000000 pixels\)", log), log
    assert sorted(p.name for p in data.iterdir() if p.suffix not in (".png", ".txt")) == []


def test_a_caption_job_killed_half_way_captions_each_image_once(daemon_factory, short_tmp,
                                                                 florence):
    data = dataset(short_tmp / "data", 24)
    d = daemon_factory(**FAST).start()
    d.submit(caption_job(short_tmp, "kill", data, florence, batch_size=1,
                         max_new_tokens=200))
    j = wait_until(lambda: (j := d.job("kill"))["step"] and j["step"] >= 6 and j, 120, 0.02,
                   "six images captioned")
    os.kill(j["pid"], signal.SIGKILL)
    j = d.wait_state("kill", "succeeded", timeout=180)
    assert j["attempts"] == 2 and (j["step"], j["total_steps"]) == (24, 24)
    log = (d.outputs_dir / "kill" / "train.log").read_text()
    done = re.findall(r"^caption: captioned 1: (img\d+\.png) ", log, re.M)
    assert sorted(done) == [f"img{i:03d}.png" for i in range(24)], done  # each once
    assert "0 already have a caption" in log and re.search(r"[1-9]\d* already have", log)
    texts = [(data / f"img{i:03d}.txt").read_text() for i in range(24)]
    assert all(t.startswith("fgx ") and len(t) > 4 for t in texts)
    assert not [p for p in data.iterdir() if p.name.endswith(".tmp")]


def test_caption_job_files_are_checked(tmp_path, florence):
    from fluxgymd import jobspec
    from fluxgymd.kinds import Policy
    from fluxgymd.protocol import FluxgymError

    (tmp_path / "empty").mkdir()
    text = ('[job]\nname = "c"\nkind = "caption"\n[caption]\ndataset_dir = "empty"\n'
            f'model = "{tmp_path}"\ntask = "<OD>"\nbatch_size = 0\nbeams = 2\n')
    with pytest.raises(FluxgymError) as e:
        jobspec.parse(text, str(tmp_path / "c.toml"), policy=Policy())
    msg = e.value.message
    for words in ("holds no image", "is not a model folder", "caption.task '<OD>' is not one",
                  "caption.batch_size must be 1 to 256", "unknown key caption.beams"):
        assert words in msg, msg


def test_a_catalog_captioner_not_on_disk_is_fetched_first(tmp_path):
    from fluxgymd import catalog
    from fluxgymd.kinds import KINDS, Policy

    models = catalog.load({"tiny-florence": {"repo": "acme/tiny-florence",
                                             "files": ["config.json", "model.safetensors"]}})
    policy = Policy(models=models, models_dir=str(tmp_path / "models"))
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.png").write_bytes(b"")
    errors: list[str] = []
    spec = {"caption": KINDS["caption"].validate({"dataset_dir": str(data),
                                                  "model": "tiny-florence"},
                                                 tmp_path, errors, policy)}
    assert errors == [] and spec["caption"]["model"] == str(tmp_path / "models" /
                                                             "tiny-florence")
    assert KINDS["caption"].models_needed(spec, policy) == ["tiny-florence"]
    for f in ("config.json", "model.safetensors"):
        (tmp_path / "models" / "tiny-florence").mkdir(parents=True, exist_ok=True)
        (tmp_path / "models" / "tiny-florence" / f).write_text("{}")
    assert KINDS["caption"].models_needed(spec, policy) == []
