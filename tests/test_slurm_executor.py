"""The Slurm executor's parts that need no cluster: the batch script run by a plain bash (it
is what Slurm runs), the file follower, squeue's and the exit file's readers, the settings,
the policy for an end that was the cluster's doing, the job file's [slurm] table, and the
trainer's events file. The cluster itself is in test_slurm_e2e.py."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from fluxgymd import jobspec
from fluxgymd.kinds import Policy
from fluxgymd.config import ConfigError, load
from fluxgymd.executors.slurm_job import (Files, Follower, SlurmSettings, batch_script,
                                          parse_exit_file, parse_squeue)
from fluxgymd.progress import parse_child_event
from fluxgymd.protocol import FluxgymError
from fluxgymd.testing import wait_until
from fluxgymd.watchdog import Budget, Ending, Limits, Stall, after_exit


def run_script(tmp_path, program: str, attempt: int = 1):
    """The batch script of `python -c program`, started as Slurm would start it."""
    files = Files(tmp_path, attempt)
    files.script.parent.mkdir(exist_ok=True)
    files.script.write_text(batch_script([sys.executable, "-c", program], None, files, "t"))
    proc = subprocess.Popen(["bash", str(files.script)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env=dict(os.environ, SLURM_JOB_ID="42"))
    return proc, files


def test_the_batch_script_records_the_exit_code_and_leaves_75_to_fluxgymd(tmp_path):
    proc, files = run_script(tmp_path, "import sys; print('hi'); sys.exit(3)")
    assert proc.wait(30) == 3 and "hi" in proc.stdout.read()
    assert files.exit.read_text().strip() == "3"
    job, host, pid = files.node.read_text().split()
    assert job == "42" and pid.isdigit()
    proc, files = run_script(tmp_path, "import sys; sys.exit(75)", attempt=2)
    assert proc.wait(30) == 0  # Slurm's RequeueExit must not requeue it behind our back
    assert files.exit.read_text().strip() == "75"


HANDLER = textwrap.dedent("""
    import os, signal, sys, time
    def usr1(*a): print("usr1 in", os.getpid(), flush=True)
    def term(*a): print("term", flush=True); sys.exit(75)
    signal.signal(signal.SIGUSR1, usr1); signal.signal(signal.SIGTERM, term)
    if os.fork() == 0:  # a worker in the same group: it gets the SIGTERM, not the SIGUSR1
        signal.signal(signal.SIGTERM, lambda *a: (print("worker term", flush=True), os._exit(0)))
        while True: time.sleep(0.05)
    print("ready", flush=True)
    while True: time.sleep(0.05)
""")


def test_the_batch_script_passes_signals_on_a_dump_to_the_main_process_the_rest_to_all(
        tmp_path):
    proc, files = run_script(tmp_path, HANDLER)
    try:
        wait_until(lambda: files.node.exists() and files.node.read_text(), 10)
        time.sleep(0.5)  # the handlers are installed
        main = files.node.read_text().split()[2]
        os.kill(proc.pid, signal.SIGUSR1)
        time.sleep(0.3)
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(30) == 0
        out = proc.stdout.read()
        assert f"usr1 in {main}" in out and out.count("usr1 in") == 1, out
        assert "fluxgymd-slurm: SIGUSR1 passed on" in out and "worker term" in out
        assert "term" in out and files.exit.read_text().strip() == "75"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_a_death_by_signal_is_read_back_as_that_signal():
    assert parse_exit_file("137\n") == (None, 9)
    assert parse_exit_file("0") == (0, None) and parse_exit_file("75") == (75, None)
    assert parse_exit_file("") is None and parse_exit_file("x") is None


def test_squeue_lines_become_state_reason_and_node():
    out = "12|RUNNING|None|slurmnode\n13|PENDING|Resources|\n14|NODE_FAIL|NodeDown|n2\nbad\n"
    assert parse_squeue(out) == {"12": ("RUNNING", "", "slurmnode"),
                                 "13": ("PENDING", "Resources", ""),
                                 "14": ("NODE_FAIL", "NodeDown", "n2")}


def test_the_follower_reads_what_was_appended_and_resumes_before_a_half_line(tmp_path):
    path = tmp_path / "out"
    f = Follower(path)
    assert f.read() == ([], "")  # not there yet
    path.write_bytes(b"one\ntw")
    assert f.read() == (["one"], "tw") and f.resume_offset == 4
    with open(path, "ab") as fh:
        fh.write(b"o\nthree\n")
    assert f.read() == (["two", "three"], "")
    again = Follower(path, offset=4)  # a restarted daemon
    assert again.read()[0] == ["two", "three"]


def test_an_events_file_others_could_write_is_refused(tmp_path):
    path = tmp_path / "events"
    path.write_text('{"event": "done", "job": 1}\n')
    path.chmod(0o622)
    f = Follower(path, private=True)
    assert f.read() == ([], "") and "not this service's own private file" in f.refused
    path.chmod(0o600)
    assert Follower(path, private=True).read()[0] == ['{"event": "done", "job": 1}']


def test_settings_make_the_sbatch_options_and_a_job_overrides_them():
    base = SlurmSettings(partition="gpu", gres="gpu:1", time_limit="4:00:00",
                         signal_before_end_s=120, sbatch_args=("--qos=high",))
    assert base.options() == ["--partition=gpu", "--gres=gpu:1", "--time=4:00:00",
                              "--signal=B:TERM@120", "--qos=high"]
    job = base.with_overrides({"gres": "gpu:2", "sbatch_args": ["--account=lab"], "mem": "64G",
                               "time_limit": ""})
    assert job.options() == ["--partition=gpu", "--gres=gpu:2", "--mem=64G", "--account=lab"]


def test_a_loss_by_the_cluster_resumes_without_spending_a_restart():
    e = Ending(code=None, signal=None, description="Slurm job 9 ended NODE_FAIL",
               lost="its node failed", progress=20)
    out = after_exit(e, Budget(restarts=2, progress_at_start=10), Limits())
    assert out.action == "resume" and out.budget.restarts == 2
    assert out.reason == ("its node failed (Slurm job 9 ended NODE_FAIL); resuming from its "
                          "newest checkpoint")
    # the breaker still counts: a cluster that keeps losing it without progress gives up
    stuck = after_exit(e, Budget(no_progress=2, progress_at_start=20), Limits())
    assert stuck.action == "failed" and stuck.reason.startswith("no progress since step 20")
    # a stall we stopped is ours, not the cluster's
    stalled = after_exit(Ending(code=None, signal=9, description="x", lost="preempted",
                                stall=Stall("progress", "no step")), Budget(), Limits())
    assert stalled.action == "restart"
    assert after_exit(Ending(None, None, "x", lost="y", cancelled=True), Budget(),
                      Limits()).action == "cancelled"


def job(text: str):
    return jobspec.parse(textwrap.dedent(text), policy=Policy(allow_command_jobs=True))


CMD = '[job]\nname = "j"\nkind = "command"\n{more}\n[command]\nargv = ["true"]\n'


def test_a_job_file_chooses_its_executor_and_its_sbatch_settings():
    spec = job(CMD.format(more='executor = "slurm"\n[slurm]\npartition = "a100"\n'
                          'time_limit = "1:00:00"\nsbatch_args = ["--qos=high"]'))
    assert spec["executor"] == "slurm"
    assert spec["slurm"] == {"partition": "a100", "time_limit": "1:00:00",
                             "sbatch_args": ["--qos=high"]}
    assert "executor" not in job(CMD.format(more=""))


def test_a_wrong_executor_or_slurm_key_is_refused_by_name():
    with pytest.raises(FluxgymError) as e:
        job(CMD.format(more='executor = "k8s"\n[slurm]\npartitoin = "x"\nsbatch_args = [1]\n'
                       'cpus_per_task = -1'))
    msg = e.value.message
    assert "job.executor 'k8s' is unknown; use one of: local, slurm" in msg
    assert "unknown key slurm.partitoin (did you mean 'partition'?)" in msg
    assert "slurm.sbatch_args must be a list of strings" in msg
    assert "slurm.cpus_per_task must be 0 or more" in msg
    with pytest.raises(FluxgymError) as e:
        job(CMD.format(more='[slurm]\nsbatch_args = ["--qos=x", "--uid=0", "-o", "/x", '
                       '"--output=/y", "--requeue"]'))
    msg = e.value.message
    assert "slurm.sbatch_args may not hold --uid=0: jobs run as the service user" in msg
    assert "-o: fluxgymd sets it" in msg and "--output=/y: fluxgymd sets it" in msg
    assert "--requeue: resuming is fluxgymd's" in msg and "--qos" not in msg


def test_the_daemon_executor_is_checked_and_sbatch_args_split_like_a_shell():
    cfg = load(flags={"executor": "slurm"}, env={"FLUXGYM_SLURM_SBATCH_ARGS": "--qos='a b' -A x"})
    assert cfg.executor == "slurm" and cfg.slurm.sbatch_args == ("--qos=a b", "-A", "x")
    with pytest.raises(ConfigError, match="daemon.executor must be one of local, slurm"):
        load(flags={"executor": "pbs"}, env={})
    with pytest.raises(ConfigError, match="may not hold --signal=B:USR1@60: set signal_befo"):
        load(env={"FLUXGYM_SLURM_SBATCH_ARGS": "--signal=B:USR1@60"})


def test_a_gpu_reading_is_a_contract_event_within_0_to_100():
    ev = parse_child_event(json.dumps({"event": "gpu", "job": "3", "utilization": 87.5}).encode())
    assert ev == {"event": "gpu", "job": 3, "utilization": 87.5}
    for bad in (-1, 101, "high", None):
        assert parse_child_event(json.dumps({"event": "gpu", "job": 3,
                                             "utilization": bad}).encode()) is None


def test_the_trainer_appends_its_events_to_a_file_endpoint(tmp_path):
    path = tmp_path / "attempt-1.events"
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    code = ("from trainer.contract import Reporter\n"
            "r = Reporter(); r.phase('loading'); r.total = 5\n"
            "r.step(1, 0.5, 1e-3, 0.1, 1); r.checkpoint('/x/step-1', 1); r.done(); r.close()\n")
    env = dict(os.environ, FLUXGYM_PROGRESS_ENDPOINT=f"file://{path}", FLUXGYM_JOB_ID="7",
               FLUXGYM_ATTEMPT="2", FLUXGYM_GPU_REPORT_S="0.1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    events = [parse_child_event(line.encode()) for line in path.read_text().splitlines()]
    # no NVML on this machine: no gpu events, and nothing else is lost
    assert [e["event"] for e in events] == ["phase", "step", "checkpoint", "done"]
    assert all(e["job"] == 7 and e["attempt"] == 2 for e in events)
    assert events[1]["step"] == 1 and events[1]["loss"] == 0.5
    assert path.stat().st_mode & 0o777 == 0o600
