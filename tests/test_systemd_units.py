"""The unit file is valid and keeps the GPU reachable under its hardening."""
import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "fluxgymd.service"


def unit():
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str
    # repeated keys (DeviceAllow) collapse in configparser; read them from the text too
    cp.read_string(UNIT.read_text())
    return cp


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_systemd_analyze_verify_is_clean(tmp_path):
    # verify checks ExecStart exists: point it at a binary this machine has
    copy = tmp_path / "fluxgymd.service"
    copy.write_text(UNIT.read_text().replace("/usr/local/bin/fluxgymd", "/bin/true"))
    r = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr


def test_the_gpu_survives_the_hardening():
    text = UNIT.read_text()
    s = unit()["Service"]
    assert s["Type"] == "notify" and s["WatchdogSec"] and s["KillMode"] == "control-group"
    assert "PrivateDevices" not in s  # it would hide /dev/nvidia*
    assert s["DevicePolicy"] == "closed"
    for dev in ("char-nvidiactl", "char-nvidia-frontend", "char-nvidia-uvm", "char-nvidia-caps"):
        assert f"DeviceAllow={dev} rw" in text
    assert s["RuntimeDirectoryMode"] == "0750"  # the control socket: root and the group only
    # stopping must leave time for trainers to checkpoint within kill_grace_s (30 s)
    assert int(s["TimeoutStopSec"].rstrip("s")) > 30
