"""The new-LoRA page's uploads against a real daemon over real HTTP: good photos and captions
land in the draft; hostile ones are each refused with a message and nothing is written
outside the draft (or left inside it): a path for a name, NUL, a leading dot, a text file
named .png, a decompression bomb, a file over the limit (the server stops reading: the
bytes it took are measured), a zip; no token, or a token without the header."""
from __future__ import annotations

import http.client
import io
import json
import struct
import urllib.parse
import zlib
from pathlib import Path

import pytest

from conftest import FAST
from test_web import get


def png(width=64, height=48, color=(200, 30, 30)) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, "PNG")
    return buf.getvalue()


def bomb() -> bytes:
    """A valid small PNG that declares 50000 x 50000 pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + \
            struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", 50000, 50000, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) +
            chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + chunk(b"IEND", b""))


@pytest.fixture
def page(daemon_factory):
    d = daemon_factory(**FAST, web__listen="127.0.0.1:0", web__max_upload_mb=1).start()
    base, token = d.ctl("web-url", check=True).stdout.strip().split("/?token=")
    return d, base, token


def upload(base, token, draft, name, data, header=True):
    headers = {"Authorization": f"Bearer {token}"}
    if header:
        headers["X-Fluxgymd-Token"] = token
    q = urllib.parse.quote(name, safe="")
    status, body, _ = get(f"{base}/api/drafts/{draft}/files?name={q}", headers, data=data,
                          method="POST")
    return status, json.loads(body or b"{}")


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_uploads_are_checked_and_stay_in_their_draft(page):
    d, base, token = page
    auth = {"Authorization": f"Bearer {token}", "X-Fluxgymd-Token": token}
    status, body, _ = get(base + "/api/drafts", auth, data=b"", method="POST")
    assert status == 200
    draft = json.loads(body)["id"]
    folder = d.root / "state" / "drafts" / draft
    if not folder.is_dir():
        folder = next(d.root.rglob(f"drafts/{draft}"))
    before = files_under(d.root)

    for i, color in enumerate([(200, 0, 0), (0, 200, 0), (0, 0, 200), (90, 90, 90)]):
        assert upload(base, token, draft, f"photo {i}.png", png(color=color))[0] == 200
    status, stored = upload(base, token, draft, "photo 0.txt", b"fgx, a red card")
    assert status == 200 and stored == {"name": "photo 0.txt", "kind": "caption", "bytes": 15}
    status, stored = upload(base, token, draft, "photo 0.png", png(color=(1, 2, 3)))
    assert status == 200 and stored["name"] == "photo 0-2.png"  # a clash gets a suffix

    hostile = {
        "../../etc/x.png": (png(), 400, "a file name, not a path"),
        "a\x00b.png": (png(), 400, "control characters"),
        ".hidden.png": (png(), 400, "hidden file"),
        "notes.png": (b"just some text, not an image", 415, "not a PNG, JPEG or WebP"),
        "bomb.png": (bomb(), 413, "decompression-bomb limit"),
        "photos.zip": (b"PK\x03\x04" + b"\x00" * 100, 400, "only photos"),
        "real.jpg": (png(), 415, "its bytes are a PNG image"),
    }
    for name, (data, want, words) in hostile.items():
        status, body = upload(base, token, draft, name, data)
        assert status == want and words in body["error"], (name, status, body)

    # over the limit, declared: refused before the body is read (the answer comes before it)
    status, body = _declared(base, token, draft, "big.png", 2 << 20)
    assert status == 413 and "max_upload_mb" in body["error"], (status, body)
    # over the limit, streamed (no length): the server stops at the limit
    sent = _stream(base, token, draft, "huge.png", total=64 << 20)
    assert sent["status"] == 413 or sent["reset"], sent
    assert sent["bytes"] < 24 << 20, sent  # it stopped reading at 1 MiB (socket buffers aside)

    # no token; the token but no header on a POST
    assert get(f"{base}/api/drafts/{draft}/files?name=x.png", data=png(), method="POST")[0] \
        in (401, 403)
    assert upload(base, token, draft, "x.png", png(), header=False)[0] == 403

    listing = json.loads(get(f"{base}/api/drafts/{draft}", auth)[1])
    assert [f["name"] for f in listing["files"]] == ["photo 0-2.png", "photo 0.png",
                                                     "photo 1.png", "photo 2.png",
                                                     "photo 3.png"]
    assert listing["files"][1]["caption"] == "fgx, a red card"
    # every new file is in the draft, and only what was taken
    added = files_under(d.root) - before
    in_draft = {a for a in added if a.startswith(str(folder.relative_to(d.root)))}
    outside = {a for a in added - in_draft if "log" not in a and "sqlite" not in a}
    assert outside == set(), outside
    assert sorted(Path(a).name for a in in_draft) == sorted(
        ["photo 0.png", "photo 1.png", "photo 2.png", "photo 3.png", "photo 0.txt",
         "photo 0-2.png"])
    assert not Path("/etc/x.png").exists()

    # a caption is edited in place, for a photo of the draft only
    r = get(f"{base}/api/drafts/{draft}/captions/photo%201.png", auth, data=b"fgx, green",
            method="PUT")
    assert r[0] == 200 and (folder / "photo 1.txt").read_text() == "fgx, green"
    assert get(f"{base}/api/drafts/{draft}/captions/..%2Fx.png", auth, data=b"x",
               method="PUT")[0] in (400, 404)
    assert get(f"{base}/api/drafts/0123456789abcdef", auth)[0] == 404
    assert get(f"{base}/api/drafts/..%2F..", auth)[0] in (400, 404)


def _declared(base, token, draft, name, length):
    """Headers declaring `length` bytes, then the answer, read before any body is sent."""
    url = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    try:
        conn.putrequest("POST", f"{url.path}/api/drafts/{draft}/files?name="
                        f"{urllib.parse.quote(name)}")
        for k, v in {"Authorization": f"Bearer {token}", "X-Fluxgymd-Token": token,
                     "Content-Length": str(length)}.items():
            conn.putheader(k, v)
        conn.endheaders()
        r = conn.getresponse()
        return r.status, json.loads(r.read() or b"{}")
    finally:
        conn.close()


def _stream(base, token, draft, name, total):
    """POST `total` bytes chunked (no Content-Length); how many went out before the server
    answered or cut the connection."""
    url = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    sent = {"bytes": 0, "status": None, "reset": False}
    chunk = b"\x89PNG\r\n\x1a\n" + b"\x00" * (256 * 1024 - 8)

    def body():
        while sent["bytes"] < total:
            sent["bytes"] += len(chunk)
            yield chunk
    path = f"{url.path}/api/drafts/{draft}/files?name={urllib.parse.quote(name)}"
    try:
        conn.request("POST", path, body=body(), encode_chunked=True,
                     headers={"Authorization": f"Bearer {token}", "X-Fluxgymd-Token": token})
        sent["status"] = conn.getresponse().status
    except (BrokenPipeError, ConnectionResetError, http.client.HTTPException, OSError):
        sent["reset"] = True
    finally:
        conn.close()
    return sent
