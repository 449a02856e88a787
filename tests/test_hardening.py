"""What a new user and a hostile tester found (issue 12): one test per finding, each failing
on the code before the fix."""
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import zmq

from fluxgymd.protocol import PROTOCOL_VERSION
from fluxgymd.store import Store
from fluxgymd.testing import PY, pid_alive, wait_until, write_job

FAST = {"watchdog__kill_grace_s": 3.0, "watchdog__backoff_s": 0.2, "watchdog__backoff_max_s": 1.0}


# --- 1. one output folder, one job of one store ---------------------------------------------
def test_a_second_store_cannot_take_over_an_output_folder(daemon_factory, short_tmp):
    a = daemon_factory("a", **FAST).start()
    b = daemon_factory("b", **FAST)
    b.outputs_dir = a.outputs_dir  # its own database, the same outputs
    b.start()
    script = "import os; open(os.environ['FLUXGYM_OUTPUT_DIR'] + '/lora.bin', 'w').write('A')"
    a.submit(write_job(short_tmp, "mine", [PY, "-c", script]))
    a.wait_state("mine", "succeeded")
    r = b.ctl("submit", str(write_job(short_tmp / "b", "mine", [PY, "-c", "print(1)"])))
    assert r.returncode == 4, r.stdout + r.stderr
    assert "belongs to job 1 (mine) of another fluxgymd database" in r.stderr
    assert (a.outputs_dir / "mine" / "lora.bin").read_text() == "A"
    assert b.call("list")["jobs"] == []  # refused whole: no job without its folder


def test_a_recreated_store_does_not_adopt_old_folders(daemon_factory, short_tmp):
    d = daemon_factory(**FAST).start()
    d.submit(write_job(short_tmp, "old", [PY, "-c", "print('old')"]))
    d.wait_state("old", "succeeded")
    d.stop()
    for f in d.state_dir.glob("fluxgymd.sqlite3*"):  # "move the database aside"
        f.rename(str(f) + ".aside")
    d.start()
    r = d.ctl("submit", str(short_tmp / "old.toml"))
    assert r.returncode == 4 and "another fluxgymd database" in r.stderr, r.stderr
    # a folder with files and no marker is not taken either; an empty one is
    (d.outputs_dir / "handmade").mkdir()
    (d.outputs_dir / "handmade" / "notes.txt").write_text("mine")
    r = d.ctl("submit", str(write_job(short_tmp, "handmade", [PY, "-c", "print(1)"])))
    assert r.returncode == 4 and "no owner marker" in r.stderr, r.stderr
    (d.outputs_dir / "empty").mkdir()
    d.submit(write_job(short_tmp, "empty", [PY, "-c", "print(1)"]))
    d.wait_state("empty", "succeeded")


def test_an_attempt_refuses_a_folder_taken_over_meanwhile(daemon, short_tmp):
    daemon.call("pause")
    daemon.submit(write_job(short_tmp, "queued", [PY, "-c", "print(1)"]))
    marker = daemon.outputs_dir / "queued" / ".fluxgymd-owner.json"
    owner = json.loads(marker.read_text())
    marker.write_text(json.dumps(dict(owner, store="someone-else", job=9)))
    daemon.call("resume")
    j = daemon.wait_state("queued", "failed")
    assert "job 9" in j["reason"] and "will not write there" in j["reason"]


# --- 2. every error reaches its caller -------------------------------------------------------
@pytest.mark.parametrize("args", [{"job": "x", "lines": -5}, {"job": "x", "after": "3"},
                                  {"job": ["x"]}, {"job": "x", "bogus": 1}])
def test_refusals_carry_the_request_id(daemon, args):
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(f"ipc://{daemon.runtime_dir}/control.sock")
    try:
        s.send(json.dumps({"v": PROTOCOL_VERSION, "id": "req-77", "op": "logs",
                           "args": args}).encode())
        assert s.poll(2000)
        reply = json.loads(s.recv())
    finally:
        s.close()
    assert reply["id"] == "req-77" and reply["error"]["code"] == "bad_args"


@pytest.mark.parametrize("argv", [["logs", "-n", "-5", "x"], ["metrics", "-n", "0", "x"],
                                  ["submit", "/dev/zero"]])
def test_the_cli_refuses_at_once_what_it_can_check(daemon, argv):
    t0 = time.monotonic()
    r = daemon.ctl(*argv, timeout=20)
    assert r.returncode == 2, r.stdout + r.stderr
    assert time.monotonic() - t0 < 5 and "overloaded" not in r.stderr


def test_submit_of_a_fifo_or_a_huge_file_does_not_read_forever(daemon, short_tmp):
    fifo = short_tmp / "job.fifo"
    os.mkfifo(fifo)
    r = daemon.ctl("submit", str(fifo), timeout=20)
    assert r.returncode == 2 and "not a regular file" in r.stderr
    big = short_tmp / "big.toml"
    big.write_text("# " + "x" * (2 << 20))
    r = daemon.ctl("submit", str(big), timeout=20)
    assert r.returncode == 2 and "at most" in r.stderr


# --- 4. a database damaged in the middle ------------------------------------------------------
def _fill(path, outputs):
    from fluxgymd import ownership

    s = Store(path)
    for i in range(300):
        spec = {"name": f"job-{i}", "kind": "command", "description": "x" * 500,
                "command": {"argv": ["true"]}}
        job = s.add_job(spec, outputs / f"job-{i}")
        (outputs / f"job-{i}").mkdir(parents=True)
        ownership.write_owner(outputs / f"job-{i}", s.id, job["id"], spec)
    s.close()


def test_a_damaged_database_fails_once_with_advice_and_can_be_recovered(daemon_factory):
    d = daemon_factory(**FAST)
    d.state_dir.mkdir(parents=True)
    db = d.state_dir / "fluxgymd.sqlite3"
    _fill(db, d.outputs_dir)
    with sqlite3.connect(db) as c:
        c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    size = db.stat().st_size
    with open(db, "r+b") as fh:  # a few pages of garbage in the middle of the file
        fh.seek(size // 2 // 4096 * 4096)
        fh.write(os.urandom(3 * 4096))
    d.start(wait=False)
    assert d.proc.wait(30) == 3
    log = d.logs()
    assert "fluxgymd --recover-db" in log and "Traceback" not in log
    d.stop()
    r = subprocess.run([PY, "-m", "fluxgymd", "--state-dir", str(d.state_dir), "--outputs-dir",
                        str(d.outputs_dir), "--runtime-dir", str(d.runtime_dir),
                        "--recover-db"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "row(s) copied" in r.stderr and list(d.state_dir.glob("fluxgymd.sqlite3.damaged-*"))
    d.start()
    jobs = d.call("list")["jobs"]
    # every job is back: read from the rows that survived, or rebuilt from its folder
    assert sorted(j["name"] for j in jobs) == sorted(f"job-{i}" for i in range(300))
    rebuilt = [j for j in jobs if "recover-db" in j["reason"]]
    assert rebuilt and all(j["state"] == "failed" for j in rebuilt), r.stderr


# --- 5. names are never ids -------------------------------------------------------------------
def test_an_all_digit_name_is_refused(daemon, short_tmp):
    r = daemon.ctl("submit", str(write_job(short_tmp, "x", [PY, "-c", "1"])), "--name", "4")
    assert r.returncode == 4 and "all digits" in r.stderr and "run-4" in r.stderr


# --- 7. stops are obeyed in every phase -------------------------------------------------------
def test_the_trainer_obeys_sigterm_while_loading(tiny, short_tmp):
    from tinylora import job_file

    out = short_tmp / "out"
    proc = subprocess.Popen([PY, "-m", "trainer", str(job_file(tiny, "stopme")),
                             "--output-dir", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    try:
        first = proc.stdout.readline().decode()
        assert "loading" in first, first
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(30)
        took = time.monotonic() - t0
        rest = proc.stdout.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 75, rest
    assert took < 10 and "before training started; nothing to save" in rest
    assert not (out / "checkpoints").exists() or not list((out / "checkpoints").glob("step-*"))


def test_a_restarted_daemon_answers_while_it_reaps_a_leftover(daemon_factory, short_tmp):
    d = daemon_factory(watchdog__kill_grace_s=6.0).start()
    script = ("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
              "print('up', flush=True)\ntime.sleep(600)")
    d.submit(write_job(short_tmp, "stubborn", [PY, "-c", script]))
    wait_until(lambda: "up" in d.call("logs", job="stubborn")["lines"])
    pid = d.job("stubborn")["pid"]
    daemon_factory.track_pgid(pid)
    d.stop(signal.SIGKILL)
    t0 = time.monotonic()
    d.start()  # waits for ping
    assert time.monotonic() - t0 < 4  # not the 6 s kill grace
    ping = d.call("ping")
    assert ping["restoring"] == [1] and pid_alive(pid)
    assert "waiting for the process group" in d.logs()
    assert d.job("stubborn")["state"] == "running"
    wait_until(lambda: not pid_alive(pid), 15, what="the leftover to be killed")
    # then requeued and started again, once the leftover is gone
    wait_until(lambda: d.job("stubborn")["attempts"] == 2, 15, what="the second attempt")
    assert d.call("ping")["restoring"] == []
    daemon_factory.track_pgid(d.job("stubborn")["pid"])


# --- 6. what cannot work is not retried -------------------------------------------------------
def _lora_job(tiny, short_tmp, name, **train):
    import tomli_w

    from tinylora import train_section

    path = short_tmp / f"{name}.toml"
    path.write_text(tomli_w.dumps({"job": {"name": name, "kind": "lora"},
                                   "train": train_section(tiny, **train)}))
    return path


def test_trainer_exit_2_fails_at_once_with_its_own_message(daemon, tiny, short_tmp):
    import shutil

    data = short_tmp / "data"
    shutil.copytree(tiny / "data", data)
    daemon.call("pause")
    daemon.submit(_lora_job(tiny, short_tmp, "breaks", dataset_dir=str(data)))
    first = sorted(data.glob("*.png"))[0]
    first.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # looks like a PNG, is not one
    daemon.call("resume")
    j = daemon.wait_state("breaks", "failed", timeout=120)
    assert j["attempts"] == 1 and j["restarts"] == 0
    assert first.name in j["reason"] and "cannot be read as an image" in j["reason"]
    assert "not retried; fix the job" in j["reason"] and "no progress" not in j["reason"]


def test_submit_checks_the_dataset_and_the_model_class(daemon, tiny, short_tmp):
    import shutil

    data = short_tmp / "data"
    shutil.copytree(tiny / "data", data)
    (data / "notes.png").write_text("not an image")
    r = daemon.ctl("submit", str(_lora_job(tiny, short_tmp, "bad-data", dataset_dir=str(data))))
    assert r.returncode == 4 and "notes.png is not a PNG, JPEG or WebP image" in r.stderr
    model = short_tmp / "sd"
    shutil.copytree(tiny / "model", model)
    index = json.loads((model / "model_index.json").read_text())
    (model / "model_index.json").write_text(json.dumps(dict(index, _class_name="StableDiffusionPipeline")))
    r = daemon.ctl("submit", str(_lora_job(tiny, short_tmp, "bad-model",
                                           pretrained_model=str(model))))
    assert r.returncode == 4 and "not a Flux pipeline" in r.stderr
    assert daemon.call("list")["jobs"] == []


def test_submit_refuses_a_job_the_disk_cannot_hold(tiny, monkeypatch):
    import shutil

    from trainer.config import TrainConfig
    from trainer.preflight import check_disk, disk_needed

    cfg = TrainConfig(pretrained_model=str(tiny / "model"), dataset_dir=str(tiny / "data"),
                      resolution=64)
    need = disk_needed(cfg, 4)
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda p: real(p)._replace(free=need // 2))
    problems = check_disk(cfg, str(tiny))
    assert problems and "MiB free" in problems[0] and "save_last_n_checkpoints" in problems[0]
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=need * 2))
    assert check_disk(cfg, str(tiny)) == []


def test_a_full_disk_and_a_checkpoint_of_other_settings_are_not_retried():
    from fluxgymd.watchdog import Budget, Ending, Limits, after_exit

    full = Ending(code=1, signal=None, description="exited with code 1",
                  output_tail="OSError: [Errno 28] No space left on device: 'x'")
    out = after_exit(full, Budget(), Limits())
    assert out.action == "failed" and "disk is full" in out.reason
    other = Ending(code=2, signal=None, description="exited with code 2", contract=True,
                   output_tail="trainer: step-10 was made with different settings "
                               "network_dim=4 (now 8); restore them, or start over with --fresh")
    out = after_exit(other, Budget(), Limits())
    assert out.action == "failed" and out.reason.startswith("step-10 was made with different")


def test_the_trainer_turns_enospc_into_exit_2():
    import errno

    from trainer.__main__ import disk_full

    assert disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert disk_full(RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter"
                                  " failed writing file data/0: file write failed"))
    assert not disk_full(OSError(errno.EACCES, "Permission denied"))


def test_a_submit_that_leaves_the_job_failed_exits_non_zero(daemon, short_tmp):
    # valid at submit (it exists and is executable), fails as it starts: its interpreter
    # does not exist
    script = short_tmp / "run.sh"
    script.write_text("#!/nonexistent/interpreter\n")
    script.chmod(0o755)
    r = daemon.ctl("submit", str(write_job(short_tmp, "doomed", [str(script)])))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "failed" in r.stdout and daemon.job("doomed")["state"] == "failed"


# --- 8. pathological inputs -------------------------------------------------------------------
def test_a_huge_caption_is_cut_and_named_and_small_images_are_warned(tmp_path):
    from PIL import Image

    from trainer.data import max_caption_chars, scan

    Image.new("RGB", (32, 32), "red").save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("word " * 2_000_000)  # 10 MB
    heard: list[str] = []
    t0 = time.monotonic()
    items = scan(str(tmp_path), "fgx", max_caption_chars(512), heard.append, 64)
    assert time.monotonic() - t0 < 5
    assert len(items[0].caption) <= max_caption_chars(512) + 10
    assert any("a.txt" in w and "longer than the text encoders" in w for w in heard)
    assert any("a.png is 32x32, smaller than the 64px" in w for w in heard)


# --- 9. logs -f and wait survive a daemon restart ---------------------------------------------
RESUMABLE = """
import os, signal, sys, time
state = os.path.join(os.environ["FLUXGYM_OUTPUT_DIR"], "counter")
n = int(open(state).read()) if os.path.exists(state) else 0
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
while n < TOTAL:
    if stop:
        open(state, "w").write(str(n)); sys.exit(75)
    n += 1
    print(f"line {n}", flush=True)
    time.sleep(0.03)
"""


def test_logs_follow_and_wait_survive_a_restart(daemon_factory, short_tmp):
    d = daemon_factory(**FAST).start()
    d.submit(write_job(short_tmp, "long", [PY, "-c", RESUMABLE.replace("TOTAL", "300")]))
    env = dict(os.environ)
    base = [PY, "-m", "fluxgymctl", "--runtime-dir", str(d.runtime_dir)]
    follow = subprocess.Popen(base + ["logs", "-f", "-n", "1000", "long"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env)
    waiter = subprocess.Popen(base + ["wait", "long"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env)
    try:
        def reached(n):
            lines = d.call("logs", job="long", lines=20)["lines"]
            return any(l.startswith("line ") and int(l.split()[1]) >= n for l in lines)

        wait_until(lambda: reached(60), 20, what="line 60")
        d.stop(signal.SIGTERM)
        time.sleep(1.5)
        d.start()
        out, err = follow.communicate(timeout=60)
        w_out, w_err = waiter.communicate(timeout=30)
    finally:
        for p in (follow, waiter):
            if p.poll() is None:
                p.kill()
                p.wait()
    assert waiter.returncode == 0, w_out + w_err
    assert "succeeded" in w_out and "lost fluxgymd" in w_err and "reconnected" in w_err
    assert follow.returncode == 0, err
    assert "fluxgymd restarted; following on from line" in err  # announced, never silent
    log = (d.outputs_dir / "long" / "train.log").read_text().splitlines()
    assert out.splitlines() == log  # every line, in order, once
    assert [l for l in log if l.startswith("line ")] == [f"line {i}" for i in range(1, 301)]


# --- 10. the status table ---------------------------------------------------------------------
def test_status_keeps_id_state_and_progress_at_80_columns(daemon, short_tmp):
    name = "a" * 64
    daemon.submit(write_job(short_tmp, "x", [PY, "-c", "print(1)"]), name=name)
    daemon.wait_state(name, "succeeded")
    r = subprocess.run([PY, "-m", "fluxgymctl", "--runtime-dir", str(daemon.runtime_dir),
                        "status"], capture_output=True, text=True,
                       env=dict(os.environ, COLUMNS="80"), timeout=30)
    head, row = r.stdout.splitlines()[:2]
    assert all(h in head for h in ("ID", "NAME", "STATE", "PROGRESS")), r.stdout
    assert max(len(l) for l in r.stdout.splitlines()) <= 80
    assert row.split()[0] == "1" and "succeeded" in row and "…" in row


def test_progress_shows_the_phase_and_the_eta_is_smoothed():
    from collections import deque

    from fluxgymctl.render import progress
    from fluxgymd.views import pace_eta

    assert progress({"state": "running", "phase": "caching", "progress": None}) == "caching"
    assert progress({"state": "succeeded", "phase": None, "progress": 1.0}) == "100%"
    # 1 step/s for 100 s, with a 30 s checkpoint in the middle: the ETA follows wall time
    pace, t = deque(), 1000.0
    for step in range(1, 101):
        t += 1.0 + (30.0 if step == 50 else 0.0)
        pace.append((t, step))
    eta = pace_eta(pace, 100, 200, t)
    assert 100 * 1.2 < eta < 100 * 1.4  # 130 s of wall time per 100 steps
    assert pace_eta(deque([(0.0, 1)]), 1, 10, 0.0) is None  # too early to tell


# --- 11. queue control ------------------------------------------------------------------------
def test_queue_control(daemon_factory, short_tmp):
    d = daemon_factory(**FAST).start()
    assert d.ctl("--version").stdout.startswith("fluxgymctl ")
    d.ctl("pause", check=True)
    for name in ("a", "b", "c"):
        d.submit(write_job(short_tmp, name, [PY, "-c", f"print('{name}')"]))
    d.ctl("submit", str(write_job(short_tmp, "urgent", [PY, "-c", "1"])), "--priority", "5",
          check=True)
    d.ctl("move", "c", "--first", check=True)
    assert d.call("ping")["paused"]
    # pause survives a restart
    d.stop()
    d.start()
    assert d.call("ping")["paused"] and all(j["state"] == "queued" for j in d.call("list")["jobs"])
    d.ctl("config", "set", "max_concurrent_jobs", "1", check=True)
    d.ctl("resume", check=True)
    for name in ("a", "b", "c", "urgent"):
        d.wait_state(name, "succeeded")
    order = sorted(d.call("list")["jobs"], key=lambda j: j["started_at"])
    assert [j["name"] for j in order] == ["c", "urgent", "a", "b"]  # --first: next of all
    # config at run time, kept across a restart, and reset
    d.ctl("config", "set", "max_concurrent_jobs", "3", check=True)
    d.stop()
    d.start()
    assert d.call("ping")["max_concurrent_jobs"] == 3
    d.ctl("config", "reset", "max_concurrent_jobs", check=True)
    assert d.call("ping")["max_concurrent_jobs"] == 1
    # logs with timestamps: lines from before this daemon's start have none
    r = d.ctl("logs", "-t", "a", check=True)
    assert all(line.startswith("-  ") for line in r.stdout.splitlines())
    d.submit(write_job(short_tmp, "stamped", [PY, "-c", "print('hello')"]))
    d.wait_state("stamped", "succeeded")
    r = d.ctl("logs", "-t", "stamped", check=True)
    assert "hello" in r.stdout and all(line[:4].isdigit() for line in r.stdout.splitlines())
    d.ctl("remove", "stamped", "--delete-outputs", check=True)
    # remove one, clean the rest; outputs kept unless asked
    r = d.ctl("remove", "a", check=True)
    assert "outputs kept" in r.stdout and (d.outputs_dir / "a").is_dir()
    r = d.ctl("clean", "--delete-outputs", check=True)
    assert r.stdout.count("removed job") == 3 and not (d.outputs_dir / "b").exists()
    assert d.call("list")["jobs"] == []
    # a running job cannot be removed
    d.submit(write_job(short_tmp, "busy", [PY, "-c", "import time; time.sleep(30)"]))
    d.wait_state("busy", "running")
    r = d.ctl("remove", "busy")
    assert r.returncode == 4 and "cancel it first" in r.stderr
    # the removed job's kept folder is still its own: the name cannot take it over
    r = d.ctl("submit", str(short_tmp / "a.toml"))
    assert r.returncode == 4 and "belongs to job 1 (a)" in r.stderr


def test_status_watch_redraws(daemon):
    proc = subprocess.Popen([PY, "-m", "fluxgymctl", "--runtime-dir", str(daemon.runtime_dir),
                             "status", "--watch", "0.3"], stdout=subprocess.PIPE, text=True)
    time.sleep(2.0)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=10)
    assert out.count("every 0.3s") >= 3 and proc.returncode == 130


# --- 12. one checkpoint interval means only that one ------------------------------------------
def test_only_the_interval_a_job_sets_is_used(tiny):
    from trainer.config import parse

    paths = {"pretrained_model": str(tiny / "model"), "dataset_dir": str(tiny / "data")}
    only_steps = parse(dict(paths, save_every_n_steps=40))
    assert (only_steps.save_every_n_steps, only_steps.save_every_n_epochs) == (40, 0)
    both = parse(dict(paths, save_every_n_steps=40, save_every_n_epochs=2))
    assert (both.save_every_n_steps, both.save_every_n_epochs) == (40, 2)
    assert parse(dict(paths)).save_every_n_epochs == 1


# --- 13. help texts ---------------------------------------------------------------------------
def test_help_texts(daemon):
    top = subprocess.run([PY, "-m", "fluxgymctl", "--help"], capture_output=True, text=True,
                         env=dict(os.environ, COLUMNS="80")).stdout
    commands = top.split("Commands:")[1]
    assert "..." not in commands and "remove" in commands and "pause" in commands
    logs = subprocess.run([PY, "-m", "fluxgymctl", "logs", "--help"], capture_output=True,
                          text=True).stdout
    assert "a table" not in logs and "JSON" in logs
    d_help = subprocess.run([PY, "-m", "fluxgymd", "--help"], capture_output=True,
                            text=True, env=dict(os.environ, COLUMNS="200")).stdout
    assert "detail (default info)" in d_help and d_help.count("(default:") >= 3
    ping = daemon.ctl("ping", check=True).stdout
    assert "command jobs" in ping and "allowed" in ping
    from trainer.config import TrainConfigError, parse

    with pytest.raises(TrainConfigError, match="did you mean 'network_dim'"):
        parse({"pretrained_model": "model", "dataset_dir": "data", "rank": 8})


def test_the_trainer_refuses_a_model_that_is_not_flux_with_exit_2(tiny, short_tmp):
    import shutil

    model = short_tmp / "sd"
    shutil.copytree(tiny / "model", model)
    index = json.loads((model / "model_index.json").read_text())
    (model / "model_index.json").write_text(json.dumps(dict(index, _class_name="SDXLPipeline")))
    job = _lora_job(tiny, short_tmp, "notflux", pretrained_model=str(model))
    r = subprocess.run([PY, "-m", "trainer", str(job), "--output-dir", str(short_tmp / "o")],
                       capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert r.returncode == 2 and "not a Flux pipeline" in r.stderr, r.stderr


@pytest.mark.parametrize("text", [
    "a = " + "[" * 50_000 + "]" * 50_000,
    '[job]\nname = "x"\nkind = "command"\n[command]\nargv = ["/bin/tr\\u0000ue"]\n',
    '[job]\nname = "x"\nkind = "command"\n[command]\nargv = ["true"]\ncwd = "a\\u0000"\n',
    '[job]\nname = "x"\nkind = "command"\n[command]\nargv = ["true"]\nenv = {"A\\u0000" = "b"}\n',
    '[job]\nname = "x"\nkind = "command"\n[command]\nargv = ["true"]\nenv = {"A" = "\\u0000"}\n',
])
def test_job_files_the_os_cannot_take_are_refused_not_internal(daemon, text):
    with pytest.raises(Exception) as err:
        daemon.call("submit", text=text)
    assert getattr(err.value, "code", None) == "invalid_job", err.value
    assert daemon.call("list")["jobs"] == [] and daemon.call("ping")["pong"]
