"""GPU figures in `fluxgymctl gpus` and `show`, read through the daemon's probe (scripted
here with a file: no GPU on these machines), and the reason when there are none."""
from __future__ import annotations

import json
import sys

from conftest import FAST
from fluxgymd.probes import FileProbe, make_gpu_probe
from fluxgymd.testing import write_job

TWO = [{"index": 0, "name": "NVIDIA H200", "utilization": 97, "memory_used": 60 * 2**30,
        "memory_total": 140 * 2**30, "temperature": 64, "power_w": 512.4, "power_limit_w": 700},
       {"index": 1, "name": "NVIDIA H200", "utilization": 3, "memory_used": 2**30,
        "memory_total": 140 * 2**30, "temperature": 31, "power_w": 80, "power_limit_w": 700}]


def test_the_file_probe_reads_a_number_or_records(tmp_path):
    f = tmp_path / "gpu"
    f.write_text("42")
    p = FileProbe(str(f))
    assert p.read(None) == 42.0 and p.stats()[0]["utilization"] == 42.0
    f.write_text(json.dumps(TWO))
    assert p.read(None) == 97 and p.read([1]) == 3
    assert [g["temperature"] for g in p.stats()] == [64, 31]
    f.write_text("not json")
    assert p.read(None) is None and p.stats() == []
    assert make_gpu_probe("none").stats() == []


def test_gpus_shows_each_gpu_with_the_job_on_it(daemon_factory, short_tmp):
    f = short_tmp / "gpu.json"
    f.write_text(json.dumps(TWO))
    d = daemon_factory(**FAST, watchdog__gpu_probe=f"file:{f}").start()
    job = write_job(short_tmp, "on-gpu1", [sys.executable, "-c", "import time; time.sleep(30)"],
                    command={"env": {"CUDA_VISIBLE_DEVICES": "1"}})
    d.submit(job)
    d.wait_state("on-gpu1", "running")
    rc, r = d.ctl_json("gpus")
    # its own CUDA_VISIBLE_DEVICES pins it: placed on GPU 1, the whole of it
    assert rc == 0 and r["available"] and [g["jobs"] for g in r["gpus"]] == [
        [], [{"id": 1, "name": "on-gpu1", "planned": None, "tier": None}]]
    assert [g["planned"] for g in r["gpus"]] == [0, 140 * 2**30]
    out = d.ctl("gpus", check=True).stdout
    assert "97%" in out and "60.0/140.0" in out and "1 on-gpu1" in out, out
    show = d.ctl("show", "on-gpu1", check=True).stdout
    assert "GPU 1 NVIDIA H200: 3% busy, 1.0/140.0 GiB, 31°C, 80/700 W" in show, show
    assert "GPU 0" not in show
    d.ctl("cancel", "on-gpu1", check=True)


def test_without_nvml_each_view_says_why(daemon):
    out = daemon.ctl("gpus", check=True).stdout
    assert out.startswith("no GPU figures: off:"), out
    rc, r = daemon.ctl_json("gpus")
    assert r["available"] is False and r["why"].startswith("off:") and r["gpus"] == []
