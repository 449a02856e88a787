"""Start a LoRA from the browser, end to end in real Chromium on the tiny models (every model
fetched from the Hub stand-in): open the page with the token, fill the form, add 4 PNGs and
1 .txt, caption with (tiny) Florence-2, edit one caption, start, watch the chain succeed
with no reload, download the LoRA through its link (the bytes on disk), publish it from the
job's panel. Screenshots of the new page and of the job at 1400 and 390 px are kept under
the test's temp dir (FLUXGYMD_DOCS_IMG=DIR also copies the new page's to DIR)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fluxgymd.testing import wait_until
from test_new import florence_files, start_flow_daemon  # noqa: F401  (a fixture)
from test_web_browser import _get, browser, screenshot  # noqa: F401  (a fixture)

ENV = dict(os.environ, HF_HUB_OFFLINE="1")


@pytest.fixture
def flow_web(daemon_factory, tiny_single, florence_files, tmp_path):  # noqa: F811
    d = start_flow_daemon(daemon_factory, tiny_single, florence_files, tmp_path,
                          web__listen="127.0.0.1:0")
    yield d
    d.hub.stop()


def test_a_lora_from_the_browser(browser, flow_web, tmp_path):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    d = flow_web
    photos = tmp_path / "photos"
    subprocess.run([sys.executable, "-m", "trainer.tiny", "--dataset", str(photos),
                    "--images", "4"], check=True, env=ENV, capture_output=True)
    for txt in sorted(photos.glob("*.txt"))[1:]:
        txt.unlink()
    given = sorted(photos.glob("*.txt"))[0]
    given.write_text("fgx, in my own words")
    url = d.ctl("web-url", check=True).stdout.strip()
    token = url.split("/?token=")[1]
    browser.set_window_size(1400, 1000)
    browser.get(url)
    js = browser.execute_script

    browser.find_element(By.ID, "new-open").click()
    wait_until(lambda: js("return [...document.querySelectorAll('#new-base option')]"
                          ".some(o => o.value === 'tiny-flux')"), 30,
               what="the catalog's models in the form")
    form = browser.find_element(By.ID, "new-form")

    def fill(name, value):
        field = form.find_element(By.NAME, name)
        field.clear()
        field.send_keys(value)
    fill("name", "webby")
    fill("trigger", "fgx")
    Select(browser.find_element(By.ID, "new-base")).select_by_value("tiny-flux")
    fill("resolution", "64")
    fill("steps", "8")
    fill("samples", "fgx, a red disc")
    fill("sample_every", "8")
    fill("publish", "alice/webby")
    js("document.getElementById('advanced').open = true")
    fill("set", "t5xxl_max_token_length = 32\ntrain_batch_size = 2\nsample_steps = 2")

    files = sorted(str(p) for p in photos.iterdir())
    browser.find_element(By.ID, "new-pick").send_keys("\n".join(files))
    wait_until(lambda: len(browser.find_elements(By.CSS_SELECTOR, "#thumbs figure")) == 4,
               30, what="four photos in the draft")
    assert "8 steps" in browser.find_element(By.ID, "new-steps").text
    captions = lambda: js("return [...document.querySelectorAll('#thumbs textarea')]"  # noqa: E731
                          ".map(t => t.value)")
    assert captions().count("fgx, in my own words") == 1

    browser.find_element(By.ID, "caption-btn").click()
    wait_until(lambda: "succeeded" in browser.find_element(By.ID, "caption-state").text,
               180, 0.2, "the caption job to succeed")
    filled = captions()
    assert all(filled) and filled.count("fgx, in my own words") == 1, filled
    assert all(c.startswith("fgx") for c in filled)
    # edit one of Florence-2's: saved at once
    figure = next(f for f in browser.find_elements(By.CSS_SELECTOR, "#thumbs figure")
                  if f.find_element(By.TAG_NAME, "textarea").get_attribute("value") !=
                  "fgx, in my own words")
    box = figure.find_element(By.TAG_NAME, "textarea")
    box.clear()
    box.send_keys("fgx, edited by hand")
    js("arguments[0].dispatchEvent(new Event('change', {bubbles: true}))", box)
    first = figure.get_attribute("data-name")
    drafts = next(d.root.rglob("drafts"))
    wait_until(lambda: any((p / Path(first).with_suffix(".txt")).is_file() and
                           (p / Path(first).with_suffix(".txt")).read_text() ==
                           "fgx, edited by hand" for p in drafts.iterdir()), 10,
               what="the edited caption on disk")
    job_file = lambda: js("return document.getElementById('new-job-file').value")  # noqa: E731
    preview = wait_until(lambda: 'repo = "alice/webby"' in job_file() and job_file(), 10,
                         what="the job file in the advanced view")
    assert 'base_model = "tiny-flux"' in preview and "t5xxl_max_token_length = 32" in preview
    # edited by hand: submitted as it stands
    js("const t = document.getElementById('new-job-file');"
       "t.value = t.value.replace('network_dim = 4', 'network_dim = 8');"
       "t.dispatchEvent(new Event('input', {bubbles: true}))")
    screenshot(browser, tmp_path / "new-lora.png", 1400)
    if os.environ.get("FLUXGYMD_DOCS_IMG"):
        shutil.copy(tmp_path / "new-lora.png", Path(os.environ["FLUXGYMD_DOCS_IMG"]) /
                    "new-lora.png")
    browser.set_window_size(390, 844)
    wait_until(lambda: js("return innerWidth") <= 390, 10, what="the narrow window")
    screenshot(browser, tmp_path / "new-lora-phone.png", js("return innerWidth * "
                                                             "devicePixelRatio"))
    browser.set_window_size(1400, 1000)

    browser.find_element(By.ID, "start-btn").click()
    wait_until(lambda: "queued:" in browser.find_element(By.ID, "message").text, 60,
               what="the chain to be queued")
    end = d.wait_state("webby-publish", ("succeeded", "failed", "cancelled"), timeout=600)
    states = {j["name"]: j["state"] for j in d.call("list")["jobs"]}
    assert end["state"] == "succeeded", (end["reason"], states)
    row = lambda name: js(  # noqa: E731
        "const r = [...document.querySelectorAll('#jobs tbody tr')].find(tr => "
        "tr.children[1].textContent === arguments[0]); return r && r.children[3].textContent",
        name)
    wait_until(lambda: row("webby-publish") == "succeeded", 30, what="the page to show it")
    assert js("return performance.getEntriesByType('navigation').length") == 1  # no reload

    assert d.call("show", job="webby")["spec"]["train"]["network_dim"] == 8  # as edited
    dataset = Path(d.job("webby")["output_dir"]) / "dataset"
    texts = sorted(p.read_text() for p in dataset.glob("*.txt"))
    assert "fgx, edited by hand" in texts and "fgx, in my own words" in texts
    js("document.querySelector(`#jobs tbody tr[data-id='${arguments[0]}']`).click()",
       d.job("webby")["id"])
    link = wait_until(lambda: browser.find_elements(By.ID, "download-lora"), 20,
                      what="the download link")[0]
    status, body, _ = _get(link.get_attribute("href"), token)
    lora = Path(d.job("webby")["output_dir"]) / "webby.safetensors"
    assert status == 200 and body == lora.read_bytes()
    assert d.hub.repo_files("alice/webby")["webby.safetensors"] == body
    screenshot(browser, tmp_path / "job.png", 1400)

    # publish again from the job's panel, to another repo
    browser.find_element(By.ID, "publish-repo").send_keys("alice/webby-again")
    browser.find_element(By.CSS_SELECTOR, "#actions button[data-act='publish']").click()
    wait_until(lambda: "publish: job" in browser.find_element(By.ID, "message").text, 20,
               what="the publish job to be queued")
    again = d.wait_state("webby-publish-2", ("succeeded", "failed"), timeout=120)
    assert again["state"] == "succeeded", again["reason"]
    assert d.hub.repo_files("alice/webby-again")["webby.safetensors"] == body
    browser.set_window_size(390, 844)
    wait_until(lambda: js("return innerWidth") <= 390, 10, what="the narrow window")
    screenshot(browser, tmp_path / "job-phone.png", js("return innerWidth * devicePixelRatio"))
    print(f"screenshots in {tmp_path}")
