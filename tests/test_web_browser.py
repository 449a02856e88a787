"""The dashboard in a real headless browser (Debian's chromium, driven by selenium; nothing is
downloaded: the driver is Debian's chromedriver). A real fluxgymd runs a tiny lora job with
samples while the page is open: the job goes from queued to succeeded without a reload, the
loss chart gets points, the gallery shows the sample PNGs; cancel works from the page; a
browser without the token is refused. Screenshots are saved under the test's temp dir and
checked (the right size, not blank)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import tomli_w

from conftest import FAST
from fluxgymd.testing import wait_until, write_job

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SIZE = (1280, 1000)


def _browser_installed() -> bool:
    if os.path.exists(CHROMIUM) and os.path.exists(DRIVER):
        return True
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return False
    # as root (CI): install Debian's chromium once; later runs reuse it
    r = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "chromium",
                        "chromium-driver"], capture_output=True, text=True, timeout=1200,
                       env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    return r.returncode == 0 and os.path.exists(CHROMIUM) and os.path.exists(DRIVER)


@pytest.fixture
def browser(tmp_path):
    if not _browser_installed():
        pytest.skip(f"no headless browser: {CHROMIUM} and {DRIVER} (Debian's chromium and "
                    "chromium-driver) are not installed, and this is not root to install them")
    selenium = pytest.importorskip("selenium", reason="selenium is in the dev extras")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    del selenium
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={SIZE[0]},{SIZE[1]}", f"--user-data-dir={tmp_path / 'prof'}"):
        opts.add_argument(arg)
    os.environ["SE_OFFLINE"] = "true"  # selenium manager must not fetch anything
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def screenshot(driver, path: Path, width: int = SIZE[0]) -> None:
    from PIL import Image, ImageStat
    want = tuple(driver.execute_script(
        "return [innerWidth * devicePixelRatio, innerHeight * devicePixelRatio]"))
    driver.save_screenshot(str(path))
    with Image.open(path) as img:
        assert img.size == want and img.size[0] == width, (img.size, want)
        spread = ImageStat.Stat(img.convert("L")).stddev[0]
        assert spread > 5, f"{path} looks blank (stddev {spread:.1f})"


def _get(url: str, token: str):
    import urllib.request
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status, r.read(), dict(r.headers)


def lora_job(where: Path, tiny: Path) -> Path:
    path = where / "web-lora.toml"
    path.write_text(tomli_w.dumps({"job": {"name": "web-lora", "kind": "lora"}, "train": {
        "pretrained_model": str(tiny / "model"), "dataset_dir": str(tiny / "data"),
        "resolution": 64, "max_train_steps": 30, "train_batch_size": 2,
        "save_every_n_steps": 10, "save_every_n_epochs": 0, "t5xxl_max_token_length": 32,
        "trigger_word": "fgx", "sample_prompts": ["fgx a red disc", "fgx a blue square"],
        "sample_every_n_steps": 15, "sample_steps": 2, "log_every_n_steps": 1}}))
    return path


def test_the_page_follows_a_lora_job_live_and_cancels_from_a_button(
        browser, daemon_factory, tiny, short_tmp, tmp_path):
    from selenium.webdriver.common.by import By
    probe = short_tmp / "gpus.json"  # two scripted GPUs: jobs are placed on them
    probe.write_text(json.dumps([{"index": i, "uuid": f"GPU-{i}", "name": f"card{i}",
                                  "memory_total": 24 * 2**30, "memory_used": 0,
                                  "utilization": 50} for i in range(2)]))
    d = daemon_factory(**FAST, web__listen="127.0.0.1:0",
                       watchdog__gpu_probe=f"file:{probe}").start()
    url = d.ctl("web-url", check=True).stdout.strip()
    base, token = url.split("/?token=")

    # no token: refused, and the page says how to get in
    browser.get(base + "/")
    assert "fluxgymctl web-url" in browser.find_element(By.TAG_NAME, "body").text
    browser.get(url)
    wait_until(lambda: browser.execute_script(
        "return document.getElementById('live').classList.contains('on')"), 20,
        what="the events stream to connect")

    d.submit(lora_job(short_tmp, tiny))

    def row_state():  # read in the page: rows are redrawn as events arrive
        return browser.execute_script(
            "const c = document.querySelector('#jobs tbody tr td.state');"
            "return c && c.textContent")
    states = set()
    wait_until(lambda: states.add(row_state()) or row_state() == "running", 60, 0.05,
               "the row to show running")
    browser.execute_script("document.querySelector('#jobs tbody tr').click()")  # open it
    # "save now" from its panel: a checkpoint at the step it reached, and it goes on
    wait_until(lambda: browser.execute_script(
        "const b = document.querySelector(\"#actions button[data-act='save-now']\");"
        "if (b) b.click(); return !!b"), 20, what="a save-now button to click")
    wait_until(lambda: "save-now: asked at step" in browser.find_element(By.ID, "message").text,
               10, what="the page to say the request went")
    wait_until(lambda: row_state() == "succeeded", 300, 0.2, "the row to show succeeded")
    assert {"queued", "starting", "running"} & states  # seen on the way, no reload
    assert browser.execute_script("return performance.getEntriesByType('navigation')"
                                  ".length") == 1

    points = wait_until(lambda: browser.execute_script(
        "const c = document.getElementById('chart'); return c.data && c.data[0].x.length"),
        30, what="loss points on the chart")
    assert points >= 10
    wait_until(lambda: len(browser.find_elements(By.CSS_SELECTOR, "#gallery img")) == 4, 30,
               what="the four samples in the gallery")
    loaded = browser.execute_script(
        "return [...document.querySelectorAll('#gallery img')].map(i => i.naturalWidth)")
    assert loaded == [64, 64, 64, 64]
    steps = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#gallery .step b")]
    assert steps == ["step 30", "step 15"]  # newest first
    assert "finished" in browser.find_element(By.ID, "log").text
    text = browser.find_element(By.ID, "log").text  # taken (at a scheduled save: said so)
    assert "save now (asked by fluxgymd) at step" in text or "save now: the checkpoint" in text
    # a constant learning rate: its axis starts at 0, never below
    lr_range = browser.execute_script(
        "return document.getElementById('chart').layout.yaxis2.range")
    assert lr_range[0] == 0 and lr_range[1] > 8e-4, lr_range  # the lr (8e-4) is on it
    # the finished LoRA is a download, by job only, bit for bit the file on disk
    link = wait_until(lambda: browser.find_elements(By.ID, "download-lora"), 10,
                      what="the download link")[0]
    status, body, headers = _get(link.get_attribute("href"), token)
    lora_file = Path(d.job("web-lora")["output_dir"]) / "web-lora.safetensors"
    assert status == 200 and body == lora_file.read_bytes()
    assert headers["Content-Disposition"] == 'attachment; filename="web-lora.safetensors"'
    # and its newest checkpoint, as one tar of its folder
    import io
    import tarfile
    link = browser.find_element(By.ID, "download-checkpoint")
    status, body, headers = _get(link.get_attribute("href"), token)
    ckpt = Path(d.job("web-lora")["checkpoint"])
    assert status == 200 and headers["Content-Disposition"] == \
        f'attachment; filename="web-lora-{ckpt.name}.tar"'
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        got = {m.name.split("/", 1)[1]: tar.extractfile(m).read() for m in tar.getmembers()}
    assert got == {str(p.relative_to(ckpt)): p.read_bytes() for p in ckpt.rglob("*")
                   if p.is_file()} and "lora.safetensors" in got
    screenshot(browser, tmp_path / "dashboard.png")
    browser.find_element(By.CSS_SELECTOR, "#gallery img").click()  # the full-size view
    assert browser.find_element(By.ID, "viewer").is_displayed()
    screenshot(browser, tmp_path / "sample.png")
    browser.find_element(By.ID, "viewer").click()

    # cancel from the page; meanwhile the GPU panel shows the job on its GPU and its plan
    path = write_job(short_tmp, "web-sleep", [sys.executable, "-c", "import time; "
                                              "time.sleep(120)"])
    doc = tomllib.loads(path.read_text())
    doc["job"].update(gpus=1, gpu_memory_gib=3)
    path.write_text(tomli_w.dumps(doc))
    d.submit(path)
    d.wait_state("web-sleep", "running")
    wait_until(lambda: "web-sleep (3.0 GiB)" in browser.find_element(By.ID, "gpu-list").text,
               15, what="the GPU panel to show the job and its planned memory")
    assert "planned GiB" in browser.find_element(By.ID, "gpu-list").text
    wait_until(lambda: browser.execute_script(
        "const b = document.querySelector(\"#jobs tbody tr button[data-act='cancel']\");"
        "if (b) b.click(); return !!b"), 10, what="a cancel button to click")
    d.wait_state("web-sleep", "cancelled", timeout=30)
    wait_until(lambda: row_state() == "cancelled", 10, what="the page to show cancelled")
    time.sleep(0.2)
    screenshot(browser, tmp_path / "cancelled.png")

    # a phone (390 px): the table keeps name, state and progress
    browser.set_window_size(390, 844)
    wait_until(lambda: browser.execute_script("return innerWidth") <= 390, 10,
               what="the narrow window")
    shown = browser.execute_script(
        "return [...document.querySelectorAll('#jobs thead th')]"
        ".filter(th => getComputedStyle(th).display !== 'none').map(th => th.textContent)")
    assert shown == ["name", "state", "progress"], shown
    width = browser.execute_script("return innerWidth * devicePixelRatio")
    screenshot(browser, tmp_path / "phone.png", width)
    print(f"screenshots in {tmp_path}")
