"""Alerts and hooks against a real daemon: webhooks to a local HTTP server (each shape's body,
a retry after a 500, a dead endpoint that does not slow the daemon, a secret never logged),
and hook commands (their environment, a timeout, a failing hook, on_idle once)."""
from __future__ import annotations

import json
import socket
import statistics
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fluxgymd.alerts import body
from fluxgymd.testing import wait_until, write_job

from conftest import FAST

SECRET = "s3cr3t-t0ken-a1b2c3"


class Receiver:
    """A local webhook endpoint: records every request, answers with scripted statuses."""

    def __init__(self, statuses=(), delay_s: float = 0.0):
        self.requests: list[dict] = []
        self.statuses = list(statuses)
        self.delay_s = delay_s
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.requests.append({"path": self.path, "headers": dict(self.headers),
                                       "body": data})
                time.sleep(outer.delay_s)
                status = outer.statuses.pop(0) if outer.statuses else 204
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook/{SECRET}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    made = []

    def make(*a, **kw):
        r = Receiver(*a, **kw)
        made.append(r)
        return r
    yield make
    for r in made:
        r.close()


def job_that(d, short_tmp, name, code=0, sleep=0.0):
    return write_job(short_tmp, name, [sys.executable, "-c",
                                       f"import time, sys; time.sleep({sleep}); sys.exit({code})"],
                     watchdog={"max_restarts": 0})


def test_each_shape_says_what_happened():
    job = {"id": 7, "name": "mylora", "state": "failed", "reason": "exit 1: CUDA out of memory",
           "step": 120, "total_steps": 960, "lora": None, "output_dir": "/o/mylora"}
    data, headers = body("json", "failed", job, "pod1", 1.0)
    doc = json.loads(data)
    assert doc["event"] == "failed" and doc["job"]["id"] == 7 and doc["host"] == "pod1"
    assert "job 7 (mylora) failed at step 120/960: exit 1: CUDA out of memory" in doc["text"]
    assert json.loads(body("discord", "failed", job, "h", 1.0)[0])["content"].startswith(
        "fluxgymd@h: job 7")
    assert "failed" in json.loads(body("slack", "failed", job, "h", 1.0)[0])["text"]
    data, headers = body("ntfy", "failed", job, "h", 1.0)
    assert data.decode().startswith("fluxgymd@h: job 7") and headers["Priority"] == "high"
    assert headers["Title"] == "fluxgymd: failed"
    assert "queue is empty" in json.loads(body("json", "drained", None, "h", 1.0)[0])["text"]


@pytest.mark.parametrize("fmt", ["json", "discord", "slack", "ntfy"])
def test_a_failed_job_and_the_drained_queue_reach_the_webhook(
        daemon_factory, receiver, short_tmp, fmt):
    r = receiver()
    d = daemon_factory(**FAST, notify__url=r.url, notify__format=fmt,
                       notify__token=SECRET + "x").start()
    d.submit(job_that(d, short_tmp, "bad", code=3))
    wait_until(lambda: len(r.requests) >= 2, 20, what="two alerts")
    failed, drained = r.requests[:2]
    text = failed["body"].decode()
    assert "job 1 (bad) failed" in text and "exit" in text
    assert "queue is empty" in drained["body"].decode()
    assert failed["headers"]["Authorization"] == f"Bearer {SECRET}x"
    if fmt in ("json", "discord", "slack"):
        assert failed["headers"]["Content-Type"] == "application/json"
    rc, ping = d.ctl_json("ping")
    assert ping["alerts"]["webhook"]["sent"] == 2 and ping["alerts"]["webhook"]["failed"] == 0


def test_a_500_is_retried_with_backoff_and_notify_test_reports(daemon_factory, receiver):
    r = receiver(statuses=[500, 503])
    d = daemon_factory(**FAST, notify__url=r.url, notify__backoff_s=0.2).start()
    t0 = time.monotonic()
    out = d.ctl("notify", "test")
    assert out.returncode == 0 and "delivered" in out.stdout, out.stderr
    assert len(r.requests) == 3 and time.monotonic() - t0 >= 0.2 + 0.4  # 0.2 s, then 0.4 s
    r.statuses = [404]
    out = d.ctl("notify", "test")
    assert out.returncode == 1 and "HTTP 404 (not retried)" in out.stderr
    ping = d.ctl("ping", check=True).stdout
    assert "1 failed" in ping and "HTTP 404" in ping and SECRET not in ping


def test_notify_test_without_a_webhook_says_how_to_set_one(daemon):
    out = daemon.ctl("notify", "test")
    assert out.returncode == 4 and "[notify]" in out.stderr


def _ping_ms(d, n=40):
    times = []
    with d.client() as c:
        for _ in range(n):
            t0 = time.perf_counter()
            c.call("list")
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def test_a_dead_endpoint_neither_slows_the_daemon_nor_leaks_its_secret(
        daemon_factory, receiver, short_tmp):
    # a black hole: accepts connections and never answers
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(64)
    url = f"http://127.0.0.1:{hole.getsockname()[1]}/hooks/{SECRET}"
    try:
        quiet = daemon_factory("quiet", **FAST).start()
        baseline = _ping_ms(quiet)
        quiet.stop()
        d = daemon_factory("dead", **FAST, notify__url=url, notify__timeout_s=2.0,
                           notify__retries=2, notify__backoff_s=0.1,
                           notify__events="failed,succeeded,drained").start()
        for i in range(5):
            d.submit(job_that(d, short_tmp, f"j{i}", code=i % 2))
        wait_until(lambda: len(d.call("list")["jobs"]) == 5 and all(
            j["state"] in ("succeeded", "failed") for j in d.call("list")["jobs"]), 30,
            what="jobs to end")
        with_dead = _ping_ms(d)
        print(f"median list latency: {baseline:.2f} ms without alerts, {with_dead:.2f} ms "
              "with a dead webhook endpoint and alerts queued")
        assert with_dead < baseline * 2 + 5
        w = d.call("ping")["alerts"]["webhook"]
        assert w["pending"] + w["failed"] >= 1 and w["sent"] == 0
        wait_until(lambda: d.call("ping")["alerts"]["webhook"]["failed"] >= 1, 30,
                   what="a failed delivery")
    finally:
        hole.close()
    d.stop()
    assert SECRET not in d.logs() and "127.0.0.1" in d.logs()  # where, never the path


def test_hooks_get_the_jobs_facts_time_out_and_fail_without_touching_jobs(
        daemon_factory, short_tmp):
    out = short_tmp / "hook.env"
    d = daemon_factory(**FAST, hooks__on_succeeded=f"env | grep ^FLUXGYM_ > {out}",
                       hooks__on_failed="echo about to fail; exit 9",
                       hooks__on_drained="sleep 30", hooks__timeout_s=1.0).start()
    d.submit(job_that(d, short_tmp, "good"))
    d.wait_state("good", "succeeded")
    wait_until(lambda: out.exists() and "FLUXGYM_JOB_STATE" in out.read_text(), 10,
               what="the hook's environment")
    env = dict(line.split("=", 1) for line in out.read_text().splitlines())
    assert env["FLUXGYM_EVENT"] == "succeeded" and env["FLUXGYM_JOB_NAME"] == "good"
    assert env["FLUXGYM_JOB_ID"] == "1" and env["FLUXGYM_JOB_STATE"] == "succeeded"
    assert env["FLUXGYM_JOB_OUTPUT_DIR"].endswith("/good")
    d.submit(job_that(d, short_tmp, "bad", code=1))
    d.wait_state("bad", "failed")
    wait_until(lambda: d.call("ping")["alerts"]["hooks"]["failed"] >= 2, 15,
               what="the failing hook and the drained hook's timeout")
    logs = d.logs()
    assert "hook on_failed for job 2 (bad): about to fail" in logs
    assert "hook on_failed for job 2 (bad): exit 9" in logs
    assert "hook on_drained: killed after 1s (timeout_s)" in logs
    assert d.job("bad")["state"] == "failed" and d.job("good")["state"] == "succeeded"


def test_on_idle_runs_once_when_nothing_is_queued_or_running(daemon_factory, short_tmp):
    marks = short_tmp / "idle.marks"
    d = daemon_factory(**FAST, hooks__on_idle=f"echo idle >> {marks}",
                       hooks__idle_after_s=3.0).start()
    d.submit(job_that(d, short_tmp, "work", sleep=1.0))  # well within the first idle 3 s
    d.wait_state("work", "succeeded", timeout=20)
    assert not marks.exists()  # the job kept it busy
    wait_until(marks.exists, 10, what="on_idle")
    time.sleep(4.0)
    assert marks.read_text().splitlines() == ["idle"]  # once, not every idle_after_s
    d.submit(job_that(d, short_tmp, "more"))
    d.wait_state("more", "succeeded")
    wait_until(lambda: len(marks.read_text().splitlines()) == 2, 10, what="on_idle again")
