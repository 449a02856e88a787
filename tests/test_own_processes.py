"""fluxgymd owns every process of its jobs: never two trainers of one job, nothing that left
its job outlives it, orphans are reaped (as a subreaper, and as PID 1 of a container), and
every signal does what it says (SIGHUP reloads; a frozen leftover is continued; a stop
during restore starts nothing)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import textwrap
import threading
import time
from pathlib import Path

import pytest

from fluxgymd import procs
from fluxgymd.client import DaemonUnavailable
from fluxgymd.testing import PY, Daemon, pid_alive, wait_until, write_job
from tests.conftest import FAST
from tinylora import assert_identical, job_file, lora


def processes_with(marker: bytes) -> list[int]:
    """Live processes whose command line holds `marker`."""
    return procs.with_cmdline(marker)


class Sampler:
    """The most processes matching `marker` alive at once, sampled every 20 ms."""

    def __init__(self, marker: bytes):
        self.marker, self.most, self.samples = marker, 0, 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.is_set():
            self.most = max(self.most, len(processes_with(self.marker)))
            self.samples += 1
            time.sleep(0.02)

    def stop(self) -> "Sampler":
        self._stop.set()
        self._t.join(5)
        return self


# --- 1. one job, one trainer -----------------------------------------------------------
def test_a_daemon_killed_between_spawn_and_pid_runs_the_job_once(daemon_factory, tiny,
                                                                  straight):
    """fluxgymd freezes (a fault hook) right after it started the trainer and before it
    stored the pid, and is SIGKILLed there: the next fluxgymd finds that trainer by its token
    and stops it before it starts another. One trainer at every moment; the same LoRA."""
    d = daemon_factory("twice", **FAST)
    d.start(env={"FLUXGYMD_FAULT": "stop-after-spawn"})
    name = "once"
    marker = f"{d.outputs_dir}/{name}/job.toml".encode()
    sampler = Sampler(marker)
    try:
        with d.client(timeout=5) as c, pytest.raises(DaemonUnavailable):
            # the daemon freezes inside the submit (it starts the job at once): no answer
            c.call("submit", text=job_file(tiny, name).read_text(),
                   source=str(tiny / f"{name}.toml"))
        wait_until(lambda: open(f"/proc/{d.proc.pid}/stat").read().rsplit(")", 1)[1].split()[0]
                   == "T", 20, 0.01, "the daemon to freeze after the spawn")
        first = wait_until(lambda: processes_with(marker), 10, 0.01, "the first trainer")
        daemon_factory.track_pgid(first[0])
        d.stop(signal.SIGKILL)
        assert pid_alive(first[0])  # the window: a trainer whose pid no store holds
        d.start()
        done = d.wait_state(name, "succeeded", timeout=300, interval=0.2)
    finally:
        sampler.stop()
    assert sampler.samples > 50 and sampler.most == 1, sampler.most
    assert not pid_alive(first[0])
    assert done["attempts"] == 2
    restarted = [e["reason"] for e in d.job(name)["events"] if e["to_state"] == "interrupted"]
    assert "stopped 1 process(es) it left running" in restarted[0], restarted
    assert_identical(lora(Path(d.outputs_dir) / name, name), straight)


def test_a_second_trainer_of_the_same_folder_refuses_to_run(tiny, tmp_path):
    """The trainer's own lock: started twice on one output folder (by hand, or by anything
    that lost track of the first), the second refuses instead of writing beside it."""
    job = job_file(tiny, "lock", max_train_steps=400)
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    first = subprocess.Popen([PY, "-m", "trainer", str(job), "--output-dir", str(out)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        wait_until(lambda: (out / ".trainer.lock").exists() and
                   (out / ".trainer.lock").read_text().strip() == str(first.pid), 60, 0.05)
        second = subprocess.run([PY, "-m", "trainer", str(job), "--output-dir", str(out)],
                                capture_output=True, text=True, timeout=120, env=env)
        assert second.returncode == 1, second.stderr[-2000:]
        assert f"another trainer (pid {first.pid}) is writing to {out}" in second.stderr
        assert first.poll() is None
    finally:
        first.kill()
        first.wait()


# --- 2. nothing escapes its job ----------------------------------------------------------
ESCAPER = textwrap.dedent("""
    import os, sys, time
    marker, how = sys.argv[1], sys.argv[2]
    def daemonize(keep_pipe):
        if os.fork():
            return
        os.setsid()
        if os.fork():
            os._exit(0)
        if not keep_pipe:
            fd = os.open(os.devnull, os.O_RDWR)
            for i in (0, 1, 2):
                os.dup2(fd, i)
        os.execvp("sleep", ["sleep-" + marker, "300"])  # found by its argv[0]
    daemonize(keep_pipe=False)
    daemonize(keep_pipe=True)  # holds the job's output pipe open
    print("daemonized twice", flush=True)
    if how == "exit":
        time.sleep(0.5)
        sys.exit(0)
    while True:
        print("working", flush=True)
        time.sleep(0.2 if how != "stall" else 60)
""")


@pytest.mark.parametrize("how", ["exit", "cancel", "stall", "stop"])
def test_processes_that_left_the_job_are_stopped_when_it_ends(daemon_factory, short_tmp, how):
    d = daemon_factory(f"esc-{how}", **FAST, watchdog__output_silence_s=2.0,
                       watchdog__max_restarts=0).start()
    marker = f"fluxgymd-escapee-{how}-{os.getpid()}"
    d.submit(write_job(short_tmp, f"esc-{how}", [PY, "-c", ESCAPER, marker, how]))
    sleeper = b"sleep-" + marker.encode()  # the two daemonized grandchildren
    escaped = wait_until(lambda: len(p := processes_with(sleeper)) == 2 and p, 20)
    for pid in escaped:
        daemon_factory.track_pgid(pid)  # their own sessions: killed by pid if the test fails
        assert os.getpgid(pid) != d.job(f"esc-{how}")["pid"]  # they left the job's group
    t0 = time.monotonic()
    if how == "exit":
        d.wait_state(f"esc-{how}", "succeeded")
    elif how == "cancel":
        d.ctl("cancel", f"esc-{how}", check=True)
    elif how == "stall":
        d.wait_state(f"esc-{how}", "failed", timeout=30)  # max_restarts 0: judged once
    else:
        assert d.stop() == 0
    wait_until(lambda: not processes_with(sleeper), 10, 0.05,
               "the escaped processes to be stopped")
    ended = time.monotonic() - t0
    if how != "stop":
        log = "\n".join(d.call("logs", job=f"esc-{how}", lines=200)["lines"])
        assert "stopped 2 process(es) that had left its process group" in log, log[-2000:]
        # the one that held the pipe no longer holds up the job's end (it waited 5 s)
        assert ended < 4.5 or how == "stall", ended


def test_orphans_of_a_job_are_reaped_by_the_daemon(daemon, short_tmp):
    """fluxgymd is the subreaper of its jobs: `(sleep 1 &)` is re-parented to it, and reaped
    when it exits."""
    d = daemon
    d.submit(write_job(short_tmp, "orphans", ["sh", "-c", "(sleep 0.5 &); (sleep 0.5 &); "
                                                             "sleep 4"]))
    d.wait_state("orphans", "running")
    time.sleep(0.3)
    kids = procs.children(d.proc.pid)
    time.sleep(2.0)  # the orphans exited 1.2 s ago at least
    zombies = [p for p in procs.children(d.proc.pid) if _state(p) == "Z"]
    assert zombies == [], zombies
    assert len(kids) >= 2  # the job's shell and at least one orphan were ours


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


# --- 3. fluxgymd as PID 1 ----------------------------------------------------------------
def _pid1_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root to unshare a PID namespace"
    if not shutil.which("unshare"):
        return "unshare (util-linux) is not installed"
    return None


class Pid1Daemon(Daemon):
    """fluxgymd as PID 1 of its own PID namespace, as in a container without an init."""

    def start(self, wait: bool = True, env=None):
        self.wrap = ["unshare", "--pid", "--fork", "--mount-proc"]
        return super().start(wait, env)

    @property
    def pid(self) -> int:
        """fluxgymd's pid as seen from here (the unshare process's child)."""
        return wait_until(lambda: procs.children(self.proc.pid)[:1], 10, 0.02)[0]

    def stop(self, sig=signal.SIGTERM, timeout=30.0):
        if self.proc is not None and self.proc.poll() is None:
            kids = procs.children(self.proc.pid)
            if kids:
                os.kill(kids[0], sig)
        return super().stop(sig, timeout)


@pytest.mark.skipif(_pid1_unavailable() is not None, reason=str(_pid1_unavailable()))
def test_as_pid_1_orphans_are_reaped_and_sigterm_checkpoints_and_resumes(short_tmp, tiny):
    steps = dict(max_train_steps=200, save_every_n_steps=50)
    d = Pid1Daemon(short_tmp / "pid1", **FAST)
    d.root.mkdir(parents=True)
    name = "pid1-lora"
    try:
        d.start()
        with open(f"/proc/{d.pid}/status") as fh:
            nspid = fh.read().split("NSpid:")[1].split("\n")[0].split()
        assert nspid[-1] == "1", f"fluxgymd is PID 1 of its namespace: {nspid}"
        d.submit(write_job(short_tmp, "orphans", ["sh", "-c", "(sleep 0.5 &); (sleep 0.5 &);"
                                                                 " setsid sleep 1 & sleep 4"]))
        d.wait_state("orphans", "running")
        time.sleep(3.0)  # every orphan exited a second ago at least
        zombies = [p for p in procs.children(d.pid) if _state(p) == "Z"]
        assert zombies == [], zombies
        d.wait_state("orphans", "succeeded")
        # SIGTERM to PID 1: the trainer checkpoints at the step it is on, exits 75, and the
        # next start resumes it to the LoRA of a run never stopped
        d.submit(job_file(tiny, name, **steps))
        wait_until(lambda: (j := d.job(name))["step"] and j["step"] >= 20 and j, 120, 0.02)
        assert d.stop(signal.SIGTERM) == 0
        log = (Path(d.outputs_dir) / name / "train.log").read_text()
        stopped = int(log.split("stopped by SIGTERM at step ")[1].split(";")[0])
        assert (Path(d.outputs_dir) / name / "checkpoints" / f"step-{stopped:08d}").is_dir()
        d.start()
        assert d.wait_state(name, "succeeded", timeout=300, interval=0.2)["attempts"] == 2
    finally:
        d.stop(signal.SIGKILL)
    # one trainer at a time: two torch processes on two cores slow each other down 10x
    ref_out = short_tmp / "pid1-straight"
    ref = subprocess.run([PY, "-m", "trainer", str(job_file(tiny, "pid1-straight", **steps)),
                          "--output-dir", str(ref_out)], capture_output=True, timeout=300,
                         env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert ref.returncode == 0, ref.stderr[-2000:]
    assert_identical(lora(Path(d.outputs_dir) / name, name), lora(ref_out, "pid1-straight"))


# --- 4. signals --------------------------------------------------------------------------
def test_sighup_reloads_the_config_and_jobs_go_on(daemon_factory, short_tmp):
    d = daemon_factory("hup", **FAST, max_concurrent_jobs=1).start()
    for name in ("first", "second"):
        d.submit(write_job(short_tmp, name, ["sleep", "30"]))
    d.wait_state("first", "running")
    time.sleep(0.3)
    assert d.job("second")["state"] == "queued"
    d.config["max_concurrent_jobs"] = 2
    d.config["web__listen"] = "127.0.0.1:0"  # not reloadable: logged as such
    d.write_config()
    d.proc.send_signal(signal.SIGHUP)
    d.wait_state("second", "running")  # a second slot, at once
    assert d.proc.poll() is None and d.job("first")["attempts"] == 1  # nothing restarted
    log = d.logs()
    assert "reloaded the config" in log and "max_concurrent_jobs" in log
    assert "reload: web changed and takes effect when fluxgymd restarts" in log
    # command jobs switched off in the file: a queued one is refused when its turn comes
    d.call("pause")
    d.submit(write_job(short_tmp, "third", ["true"]))
    d.config["allow_command_jobs"] = False
    d.write_config()
    d.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: d.logs().count("reloaded the config") == 2, 10)
    d.ctl("cancel", "first", check=True)  # a free slot for it
    d.call("resume")
    failed = d.wait_state("third", "failed")
    assert "command jobs are turned off" in failed["reason"]
    # a config that does not load changes nothing, and the daemon goes on
    (d.root / "fluxgymd.toml").write_text("[daemon\n")
    d.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "the config does not load, nothing changed" in d.logs(), 10)
    assert d.call("ping")["max_concurrent_jobs"] == 2 and d.proc.poll() is None


RESUMES = textwrap.dedent("""
    import os, signal, sys, time
    delay = float(sys.argv[1])
    def on_term(*_):
        time.sleep(delay)  # a checkpoint being written
        sys.exit(75)
    signal.signal(signal.SIGTERM, on_term)
    print("attempt", os.environ["FLUXGYM_ATTEMPT"], flush=True)
    if os.environ["FLUXGYM_ATTEMPT"] == "1":
        while True:
            time.sleep(0.05)
""")


def _leftover(daemon_factory, short_tmp, sub: str, delay: float):
    d = daemon_factory(sub, watchdog__kill_grace_s=10.0, watchdog__backoff_s=0.2).start()
    d.submit(write_job(short_tmp, "left", [PY, "-c", RESUMES, str(delay)]))
    wait_until(lambda: "attempt 1" in d.call("logs", job="left")["lines"], 20)
    pid = d.job("left")["pid"]
    daemon_factory.track_pgid(pid)
    d.stop(signal.SIGKILL)
    return d, pid


def test_a_frozen_leftover_is_continued_with_its_sigterm(daemon_factory, short_tmp):
    """A leftover trainer that is SIGSTOPped gets SIGCONT with the SIGTERM, so the restarted
    daemon is not held for the whole kill grace (10 s here)."""
    d, pid = _leftover(daemon_factory, short_tmp, "frozen", 0.0)
    os.kill(pid, signal.SIGSTOP)
    t0 = time.monotonic()
    d.start()
    wait_until(lambda: not d.call("ping")["restoring"], 20, 0.02, "restore to finish")
    took = time.monotonic() - t0
    assert took < 10.0 / 2, took
    assert not pid_alive(pid)
    assert d.wait_state("left", "succeeded")["attempts"] == 2


def test_a_stop_during_restore_starts_nothing(daemon_factory, short_tmp):
    """SIGTERM while the restarted daemon waits for a leftover (it takes 2 s to checkpoint):
    the daemon stops once restore is done, and no attempt was started meanwhile."""
    d, pid = _leftover(daemon_factory, short_tmp, "restoring", 2.0)
    d.start()
    assert d.call("ping")["restoring"], "restore is still waiting for the leftover"
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(30) == 0
    d.stop()
    assert not pid_alive(pid)
    log = (Path(d.outputs_dir) / "left" / "train.log").read_text()
    assert "=== fluxgymd: attempt 2 at" not in log, log[-2000:]
    assert "job 1 (left): queued: requeued after fluxgymd restart" in d.logs()
    d.start()
    assert d.wait_state("left", "succeeded")["attempts"] == 2


def test_a_fork_before_its_exec_is_not_counted_as_a_second_instance(tmp_path):
    """Between fork and exec a helper a program runs shows the program's command line (the
    trainer's ldconfig and compiler probes did, and a sampler saw "two trainers")."""
    marker = f"fork-marker-{os.getpid()}".encode()
    script = ("import os, sys, time\n"
              "if os.fork() == 0:\n"
              "    time.sleep(30); os._exit(0)\n"
              "time.sleep(30)\n")
    parent = subprocess.Popen([PY, "-c", script, marker.decode()])
    try:
        found = wait_until(lambda: len(
            [p for p in os.listdir("/proc") if p.isdigit() and _holds(p, marker)]) == 2
            and procs.with_cmdline(marker), 10, what="the parent and its fork")
        assert found == [parent.pid]
    finally:
        children = [int(p) for p in os.listdir("/proc") if p.isdigit()
                    and (st := procs._stat(int(p))) is not None and st[1] == parent.pid]
        for pid in children + [parent.pid]:
            os.kill(pid, signal.SIGKILL)
        parent.wait(10)


def _holds(pid: str, marker: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return marker in fh.read()
    except OSError:
        return False
