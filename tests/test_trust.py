"""What a lora job can make the trainer run: nothing but the trainer. No path in [train]
leads to a pickle load (torch.load without weights_only=True, pickle, numpy's allow_pickle),
to a model's own code (trust_remote_code, auto_map, a custom pipeline), or to a download."""
from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _kw(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name:
            return k.value
    return None


def _is_const(node, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def risky_calls(tree: ast.AST) -> list[str]:
    """Calls that could run code from a file, each as 'line: what'."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
        owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) \
            else ""
        where = f"{node.lineno}: {owner + '.' if owner else ''}{name}"
        if name == "load" and owner == "torch" and not _is_const(_kw(node, "weights_only"),
                                                                  True):
            found.append(where + " without weights_only=True")
        if owner in ("pickle", "cPickle", "dill") and name in ("load", "loads"):
            found.append(where)
        if name == "load" and owner in ("np", "numpy") and _is_const(_kw(node, "allow_pickle"),
                                                                      True):
            found.append(where + " with allow_pickle=True")
        if _kw(node, "custom_pipeline") is not None:
            found.append(where + " with a custom_pipeline")
        trust = _kw(node, "trust_remote_code")
        if name == "from_pretrained" and not _is_const(trust, False):
            found.append(where + " without trust_remote_code=False")
        if name == "from_pretrained" and not _is_const(_kw(node, "local_files_only"), True):
            found.append(where + " without local_files_only=True")
    return found


def test_the_scan_sees_each_risky_call():
    code = ("torch.load(p)\ntorch.load(p, weights_only=False)\npickle.loads(b)\n"
            "np.load(p, allow_pickle=True)\nX.from_pretrained(p)\n"
            "P.from_pretrained(p, custom_pipeline='x', trust_remote_code=False, "
            "local_files_only=True)\n"
            "torch.load(p, weights_only=True)\n"
            "T.from_pretrained(p, trust_remote_code=False, local_files_only=True)\n")
    found = risky_calls(ast.parse(code))
    assert [f.split(":")[0] for f in found] == ["1", "2", "3", "4", "5", "5", "6"], found


def test_no_path_of_the_trainer_loads_a_pickle_or_a_models_own_code():
    files = sorted((ROOT / "trainer").rglob("*.py"))
    assert len(files) > 10
    found = {str(p.relative_to(ROOT)): risky
             for p in files if (risky := risky_calls(ast.parse(p.read_text())))}
    assert found == {}


def test_a_tokenizer_that_asks_to_run_its_own_code_is_refused_at_submit(tiny, tmp_path):
    from fluxgymd import jobspec
    from fluxgymd.protocol import ErrorCode, FluxgymError

    model = tmp_path / "model"
    shutil.copytree(tiny / "model", model)
    marker = tmp_path / "ran"
    tok = model / "tokenizer_2"
    conf = json.loads((tok / "tokenizer_config.json").read_text())
    conf["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    (tok / "tokenizer_config.json").write_text(json.dumps(conf))
    (tok / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    text = (f'[job]\nname = "t"\nkind = "lora"\n[train]\npretrained_model = "{model}"\n'
            f'dataset_dir = "{tiny / "data"}"\nresolution = 64\nmax_train_steps = 2\n')
    with pytest.raises(FluxgymError) as e:
        jobspec.parse(text, str(tmp_path / "t.toml"), outputs_dir=tmp_path)
    assert e.value.code is ErrorCode.INVALID_JOB
    assert f"the tokenizer in {tok} asks to run its own code" in e.value.message
    # the trainer itself refuses it too, before loading anything (exit 2)
    import subprocess
    import sys
    (tmp_path / "t.toml").write_text(text)
    r = subprocess.run([sys.executable, "-m", "trainer", str(tmp_path / "t.toml"),
                        "--output-dir", str(tmp_path / "out")], capture_output=True, text=True,
                       timeout=300, stdin=None)
    assert r.returncode == 2 and "asks to run its own code" in r.stderr, r.stderr[-2000:]
    assert not marker.exists()
