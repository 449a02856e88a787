"""Uploads through the new-LoRA page's endpoint: 50 PNGs of about 1 MB each, one request per
file as the page sends them (`POST api/drafts/ID/files`, checked by magic bytes and decoded
once with PIL), against copying the same files on the same disk (shutil.copyfile), in the
same run; and the daemon's RSS growth while they stream in (its peak VmRSS, sampled every
10 ms, minus its VmRSS before). Medians of --rounds rounds, a fresh draft each.
Targets: the RSS growth at most 20 MB (streamed to disk, never buffered whole).

    .venv/bin/python bench/web_upload.py [--files 50] [--rounds 3]
"""
from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from fluxgymd.testing import Daemon  # noqa: E402


def noise_png(seed: int, side: int = 580) -> bytes:
    """About 1 MB: random pixels do not compress."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def upload_all(base: str, token: str, files: list[Path]) -> float:
    url = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    auth = {"Authorization": f"Bearer {token}", "X-Fluxgymd-Token": token}
    conn.request("POST", f"{url.path}/api/drafts", body=b"", headers=auth)
    draft = json.loads(conn.getresponse().read())["id"]
    t0 = time.perf_counter()
    for f in files:
        with open(f, "rb") as fh:
            conn.request("POST", f"{url.path}/api/drafts/{draft}/files?name={f.name}",
                         body=fh, headers={**auth, "Content-Length": str(f.stat().st_size)})
            r = conn.getresponse()
            body = r.read()
            assert r.status == 200, body
    took = time.perf_counter() - t0
    conn.close()
    return took


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fgu", dir="/tmp"))
    src = root / "photos"
    src.mkdir()
    files = []
    for i in range(args.files):
        (src / f"p{i:03d}.png").write_bytes(noise_png(i))
        files.append(src / f"p{i:03d}.png")
    size = sum(f.stat().st_size for f in files)
    d = Daemon(root / "d", web__listen="127.0.0.1:0", web__max_upload_mb=8)
    d.root.mkdir(parents=True)
    try:
        d.start()
        base, token = d.ctl("web-url", check=True).stdout.strip().split("/?token=")
        ups, copies, growth = [], [], []
        for r in range(args.rounds):
            before = rss_kib(d.proc.pid)
            peak = [before]
            done = threading.Event()

            def sample():
                while not done.is_set():
                    peak[0] = max(peak[0], rss_kib(d.proc.pid))
                    time.sleep(0.01)
            t = threading.Thread(target=sample)
            t.start()
            ups.append(upload_all(base, token, files))
            done.set()
            t.join()
            growth.append((peak[0] - before) / 1024)
            dest = root / f"copy{r}"
            dest.mkdir()
            t0 = time.perf_counter()
            for f in files:
                shutil.copyfile(f, dest / f.name)
            os.sync()
            copies.append(time.perf_counter() - t0)
        up, cp, grow = (statistics.median(x) for x in (ups, copies, growth))
        print(f"{args.files} PNGs, {size / 1e6:.1f} MB: upload {up:.2f} s "
              f"({size / 1e6 / up:.0f} MB/s), copy {cp:.3f} s; upload/copy ratio "
              f"{up / cp:.1f} (medians of {args.rounds})")
        print(f"daemon RSS growth during the upload: median {grow:.1f} MB, max "
              f"{max(growth):.1f} MB (target <= 20 MB: ratio {grow / 20:.2f} of the target)")
    finally:
        d.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
