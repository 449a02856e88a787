"""The real kohya sd-scripts for tests: its own virtualenv, made once and reused between runs
(make_venv.sh), the tiny-model shim (tiny_shim.py) put into that venv, and the tiny model
files written with it. Skipped, with the reason, when the checkout is absent."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).parent
REPO = HERE.parent.parent
SD_SCRIPTS = Path(os.environ.get("FLUXGYMD_TEST_SD_SCRIPTS",
                                 REPO.parent / "shared" / "peers" / "sd-scripts")).resolve()
CACHE = Path(os.environ.get("FLUXGYMD_TEST_CACHE",
                            Path.home() / ".cache" / "fluxgymd-tests")).resolve()
# the shim's environment: tiny widths, the CLIP vocabulary the fixtures' tokenizer has
SHIM_ENV = {"FLUXGYMD_TEST_TINY_KOHYA": "1", "FLUXGYMD_TEST_CLIP_VOCAB": "514",
            "HF_HUB_OFFLINE": "1", "TQDM_MININTERVAL": "0"}


def _digest(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()[:12]


def require_sd_scripts() -> Path:
    if not (SD_SCRIPTS / "flux_train_network.py").is_file():
        pytest.skip(f"kohya sd-scripts not found at {SD_SCRIPTS} (set FLUXGYMD_TEST_SD_SCRIPTS "
                    "to a checkout to run these tests)")
    return SD_SCRIPTS


def venv_python() -> Path:
    """sd-scripts' venv (made once per requirements.txt), with the shim installed."""
    sd = require_sd_scripts()
    venv = CACHE / f"sd-scripts-venv-{_digest(sd / 'requirements.txt', HERE / 'make_venv.sh')}"
    if not (venv / ".complete").is_file():
        r = subprocess.run(["sh", str(HERE / "make_venv.sh"), str(sd), str(venv)],
                           capture_output=True, text=True, timeout=1800)
        if r.returncode != 0:
            pytest.fail(f"could not make sd-scripts' test venv:\n{r.stdout[-3000:]}\n"
                        f"{r.stderr[-3000:]}")
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], capture_output=True, text=True, check=True)
    purelib = Path(site.stdout.strip())
    shim = purelib / "fluxgymd_tiny_shim.py"
    if not shim.is_file() or shim.read_bytes() != (HERE / "tiny_shim.py").read_bytes():
        shutil.copyfile(HERE / "tiny_shim.py", shim)
        (purelib / "fluxgymd_tiny_shim.pth").write_text(
            "import fluxgymd_tiny_shim; fluxgymd_tiny_shim.install()\n")
    return py


def tiny_files() -> Path:
    """flux1-tiny.safetensors, ae, clip_l, t5xxl, tokenizers/ and dataset/ (4 images)."""
    py = venv_python()
    out = CACHE / f"kohya-tiny-{_digest(HERE / 'tiny_shim.py')}"
    if not (out / ".complete").is_file():
        shutil.rmtree(out, ignore_errors=True)
        subprocess.run([str(py), str(HERE / "tiny_shim.py"), "--fixtures", str(out),
                        "--sd-scripts", str(SD_SCRIPTS)], check=True, capture_output=True,
                       timeout=300, env=dict(os.environ, **SHIM_ENV))
        (out / ".complete").touch()
    return out
