"""The dashboard's latency: from a state change in the daemon to the open page showing it.

A real fluxgymd with the dashboard on, Debian's headless chromium on the page. The queue is
paused, so each submitted job stays queued; the page's rows are watched by a MutationObserver
that notes (in the browser, Date.now()) when each job's row first appears. The latency is
that moment minus the moment the submit was sent (the same machine's clock), median of N.
Target: at most 0.5 s, median.

    .venv/bin/python bench/web_latency.py [--n 20]
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from fluxgymd.testing import Daemon, wait_until, write_job  # noqa: E402
from test_web_browser import CHROMIUM, DRIVER  # noqa: E402

WATCH = """
window.__seen = {};
new MutationObserver(() => {
  for (const tr of document.querySelectorAll('#jobs tbody tr')) {
    if (!(tr.dataset.id in window.__seen)) window.__seen[tr.dataset.id] = Date.now();
  }
}).observe(document.querySelector('#jobs tbody'), {childList: true, subtree: true});
"""


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(DRIVER), options=opts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fgw", dir="/tmp"))
    d = Daemon(root, web__listen="127.0.0.1:0")
    driver = None
    try:
        d.start()
        d.call("pause")
        url = d.ctl("web-url", check=True).stdout.strip()
        driver = browser()
        driver.get(url)
        wait_until(lambda: driver.execute_script(
            "return document.getElementById('live').classList.contains('on')"), 20)
        driver.execute_script(WATCH)
        lat = []
        for i in range(args.n):
            path = write_job(root, f"w{i}", ["true"])
            t0 = time.time()
            job = d.submit(path)
            seen = wait_until(lambda: driver.execute_script(
                f"return window.__seen['{job['id']}']"), 10, 0.01)
            lat.append(seen / 1000 - t0)
            time.sleep(0.1)
        med = statistics.median(lat)
        print(f"state change -> page: median {med * 1000:.0f} ms, max {max(lat) * 1000:.0f} ms "
              f"over {args.n} (target <= 500 ms: ratio {med / 0.5:.3f} of the target)")
    finally:
        if driver is not None:
            driver.quit()
        d.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
