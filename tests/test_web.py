"""The dashboard's server against a real daemon, over real HTTP: the token, loopback trust,
actions that always need the token, files by job and name only (never a path), the events
stream, the Prometheus endpoint, a path prefix, and `fluxgymctl web-url`."""
from __future__ import annotations

import json
import os
import stat
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from conftest import FAST
from fluxgymd.testing import wait_until, write_job


def get(url, headers=None, data=None, method=None):
    req = urllib.request.Request(url, headers=headers or {}, data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


@pytest.fixture
def web(daemon_factory, short_tmp):
    d = daemon_factory(**FAST, web__listen="127.0.0.1:0").start()
    url = d.ctl("web-url", check=True).stdout.strip()
    base, token = url.split("/?token=")
    return d, base, token


def test_every_request_needs_the_token_and_web_url_prints_it(web):
    d, base, token = web
    assert get(base + "/")[0] == 401 and get(base + "/api/jobs")[0] == 401
    assert get(base + "/metrics")[0] == 401 and get(base + "/static/app.js")[0] == 401
    assert get(base + "/?token=" + "x" * 43)[0] == 401
    status, page, headers = get(base + "/?token=" + token)
    assert status == 200 and b"static/plotly.min.js" in page
    cookie = headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    cookie_header = {"Cookie": cookie.split(";")[0]}
    assert get(base + "/api/jobs", cookie_header)[0] == 200  # logged in by the cookie
    assert get(base + "/api/jobs", {"Authorization": f"Bearer {token}"})[0] == 200
    status, js, _ = get(base + "/static/plotly.min.js", cookie_header)
    assert status == 200 and len(js) > 1_000_000  # shipped with plotly, not fetched
    # the token lives in a file only the service user reads
    info = json.loads(d.ctl("web-url", "--json", check=True).stdout)
    mode = os.stat(info["token_file"]).st_mode
    assert stat.S_IMODE(mode) == 0o600 and open(info["token_file"]).read().strip() == token


def test_loopback_can_be_trusted_but_actions_still_need_the_token(daemon_factory, short_tmp):
    d = daemon_factory(**FAST, web__listen="127.0.0.1:0", web__trust_loopback=True).start()
    base, token = d.ctl("web-url", check=True).stdout.strip().split("/?token=")
    assert get(base + "/api/jobs")[0] == 200 and get(base + "/")[0] == 200
    d.submit(write_job(short_tmp, "sleepy",
                       [sys.executable, "-c", "import time; time.sleep(60)"]))
    d.wait_state("sleepy", "running")
    status, body, _ = get(base + "/api/jobs/sleepy/cancel", method="POST", data=b"")
    assert status == 403 and b"X-Fluxgymd-Token" in body
    assert d.job("sleepy")["state"] == "running"
    status, body, _ = get(base + "/api/jobs/sleepy/cancel", {"X-Fluxgymd-Token": token},
                          method="POST", data=b"")
    assert status == 200
    d.wait_state("sleepy", "cancelled")


def test_files_are_served_by_job_and_name_never_by_path(web, short_tmp):
    d, base, token = web
    auth = {"Authorization": f"Bearer {token}"}
    d.submit(write_job(short_tmp, "pics", [sys.executable, "-c", "print('ok')"]))
    d.wait_state("pics", "succeeded")
    out = d.outputs_dir / "pics"
    (out / "samples").mkdir()
    (out / "samples" / "step-00000010-00.png").write_bytes(b"\x89PNG fake")
    (out / "secret.txt").write_text("not for the web")
    status, body, _ = get(base + "/api/jobs/pics/samples", auth)
    assert status == 200 and json.loads(body)["samples"] == [
        {"name": "step-00000010-00.png", "step": 10,
         "at": json.loads(body)["samples"][0]["at"]}]
    assert get(base + "/api/jobs/pics/samples/step-00000010-00.png", auth)[1] == b"\x89PNG fake"
    for bad in ("..%2Fsecret.txt", "..", "%2Fetc%2Fpasswd", "..%2F..%2F..%2Fetc%2Fpasswd",
                ".hidden", "a%00b.png"):
        status, body, _ = get(base + f"/api/jobs/pics/samples/{bad}", auth)
        assert status in (400, 404), (bad, status)
        assert b"not for the web" not in body and b"root:" not in body
    for bad in ("../etc/passwd", "/etc/passwd", "..%2F..%2Fetc%2Fpasswd"):
        status, body, _ = get(base + f"/static/{bad}", auth)
        assert status in (400, 404) and b"root:" not in body, bad
    assert get(base + "/api/jobs/nope/samples", auth)[0] == 404


def test_the_events_stream_carries_state_changes_and_the_job_log(web, short_tmp):
    d, base, token = web
    seen: list[dict] = []
    req = urllib.request.Request(base + "/api/events", headers={"Authorization":
                                                                f"Bearer {token}"})
    stream = urllib.request.urlopen(req, timeout=30)

    def read():
        try:
            for raw in stream:
                line = raw.decode().strip()
                if line.startswith("data: "):
                    seen.append(json.loads(line[6:]))
        except (OSError, ValueError, AttributeError):
            pass  # closed under it at the end of the test
    threading.Thread(target=read, daemon=True).start()
    time.sleep(0.5)  # the stream is open before the job is submitted
    d.submit(write_job(short_tmp, "talk", [sys.executable, "-c", "print('hello web')"]))
    d.wait_state("talk", "succeeded")
    wait_until(lambda: any(e["topic"] == "state" and e["data"]["state"] == "succeeded"
                           for e in seen), 10, what="the succeeded state on the stream")
    assert any(e["topic"].startswith("log.") and "hello web" in e["data"]["lines"]
               for e in seen)
    stream.close()


def test_prometheus_metrics(web, short_tmp):
    d, base, token = web
    d.submit(write_job(short_tmp, "m", [sys.executable, "-c", "print('1/4 [00:01<00:03]')"]))
    d.wait_state("m", "succeeded")
    status, body, headers = get(base + "/metrics", {"Authorization": f"Bearer {token}"})
    text = body.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert 'fluxgymd_jobs{state="succeeded"} 1.0' in text
    assert "# TYPE fluxgymd_restarts_total counter" in text
    assert "# TYPE fluxgymd_gpu_utilization_percent gauge" in text


def test_under_a_path_prefix(daemon_factory):
    d = daemon_factory(**FAST, web__listen="127.0.0.1:0", web__base_path="/fg").start()
    url = d.ctl("web-url", check=True).stdout.strip()
    assert "/fg/?token=" in url
    base, token = url.split("/?token=")
    auth = {"Authorization": f"Bearer {token}"}
    assert get(base + "/api/jobs", auth)[0] == 200
    assert get(base.rsplit("/fg", 1)[0] + "/api/jobs", auth)[0] == 404
    status, page, _ = get(base + "/", auth)
    assert status == 200 and b'src="static/app.js"' in page  # relative: works behind a proxy


def test_web_url_says_how_to_switch_it_on(daemon):
    r = daemon.ctl("web-url")
    assert r.returncode == 4 and "listen" in r.stderr and "[web]" in r.stderr


def test_a_page_far_behind_gets_a_gap_marker_and_never_breaks_the_daemon():
    import asyncio

    from fluxgymd import web as webmod

    async def go():
        w = webmod.Web.__new__(webmod.Web)
        q: asyncio.Queue = asyncio.Queue(webmod.EVENT_QUEUE)
        w.clients = {q}
        for i in range(3 * webmod.EVENT_QUEUE):
            w.publish(b"progress", {"job": 1, "event": "step", "step": i})
        items = [q.get_nowait() for _ in range(q.qsize())]
        assert '{"topic":"gap"}' in items and len(items) <= webmod.EVENT_QUEUE
        assert json.loads(items[-1])["data"]["step"] == 3 * webmod.EVENT_QUEUE - 1
    asyncio.run(go())
