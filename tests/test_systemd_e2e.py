"""fluxgymd as users run it: `make install`, a real systemd (PID 1 of private namespaces, see
systemd_ns.py), `systemctl`, `fluxgymctl` and `journalctl`, a real journald, the installed
unit and config unchanged but for a drop-in with a shorter watchdog.

The tests run in file order on one booted systemd: start, refuse, train, stop/start, freeze.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w

from fluxgymd.client import Client, DaemonUnavailable
from fluxgymd.testing import wait_until
from systemd_ns import SystemdNamespace, unavailable
from tinylora import assert_identical, lora, train_section

REPO = Path(__file__).resolve().parents[1]
HOST = Path("/run/host")  # the test's files, as the namespace sees them
OUTPUTS = "/var/lib/fluxgymd/outputs"
# systemd's 30 s would make the freeze test wait 30 s; the rest of the unit is as installed.
DROP_IN = "[Service]\nWatchdogSec=5s\nRestartSec=1s\n"

why_not = unavailable()
pytestmark = pytest.mark.skipif(why_not is not None, reason=f"no systemd to boot: {why_not}")


def reachable_python() -> str | None:
    """A Python >= 3.11 with venv that the service user can run (pyenv under /root is not)."""
    probe = ("import os, sys, venv, ensurepip; assert sys.version_info >= (3, 11); "
             "print(os.path.realpath(sys.executable)); print(os.path.realpath(os.__file__))")
    for cand in (getattr(sys, "_base_executable", ""), "/usr/bin/python3"):
        if not cand or not os.access(cand, os.X_OK):
            continue
        r = subprocess.run([cand, "-c", probe], capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            continue
        if all(os.stat(d).st_mode & 0o001 for p in r.stdout.split()
               for d in Path(p).parents):
            return cand
    return None


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    """`make install DESTDIR=stage`: what a package would hold."""
    python = reachable_python()
    if python is None:
        pytest.skip("no Python >= 3.11 with venv that a service user can run "
                    "(e.g. /usr/bin/python3)")
    root = tmp_path_factory.mktemp("install")
    r = subprocess.run(["make", "-C", str(REPO), "install", f"DESTDIR={root}",
                        f"PYTHON={python}"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    yield root
    shutil.rmtree(root, ignore_errors=True)  # 1.3 GB of venv


@pytest.fixture(scope="module")
def machine(stage, tmp_path_factory, tiny):
    host = tmp_path_factory.mktemp("host")
    for part in ("model", "data"):
        shutil.copytree(tiny / part, host / part)
    shutil.copy(REPO / "etc" / "jobs" / "hello.toml", host / "hello.toml")
    for dirpath, dirnames, filenames in os.walk(host):
        os.chmod(dirpath, 0o755)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o644)
    # the machine's /tmp must come through untouched (brief section 7's danger)
    sentinel = Path(f"/tmp/fluxgymd-e2e-sentinel-{os.getpid()}")
    sentinel.write_text("still here")
    ns = SystemdNamespace(host, etc_extra=stage / "etc", usr_local=stage / "usr" / "local")
    try:
        ns.boot()
        ns.sh("systemd-sysusers")
        ns.sh("mkdir -p /run/systemd/system/fluxgymd.service.d && "
              f"printf '{DROP_IN}' > /run/systemd/system/fluxgymd.service.d/e2e.conf && "
              "systemctl daemon-reload")
        yield ns
    finally:
        ns.kill()
        assert sentinel.read_text() == "still here", "the namespace's systemd reached /tmp"
        sentinel.unlink()
        assert not ns.leftover_cgroups, ns.leftover_cgroups


def show(ns, *props) -> dict[str, str]:
    out = ns.sh("systemctl show fluxgymd " + " ".join(f"-p {p}" for p in props)).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def ctl(ns, *args, check=True):
    return ns.sh("fluxgymctl " + " ".join(args), check=check)


def call(ns, op, **args):
    with Client(ns.path("/run/fluxgymd"), timeout=10) as c:
        return c.call(op, **args)


def job(ns, ref):
    return call(ns, "show", job=str(ref))


def wait_job(ns, ref, state, timeout=240):
    def reached():
        try:
            j = job(ns, ref)
        except DaemonUnavailable:
            return None  # between a stop and a start
        if j["state"] in ("failed", "cancelled") and state != j["state"]:
            raise AssertionError(f"{ref} ended {j['state']}: {j['reason']}")
        return j if j["state"] == state else None
    return wait_until(reached, timeout, 0.1, f"{ref} {state}")


def lora_job(ns, name) -> None:
    doc = {"job": {"name": name, "kind": "lora"}, "train": train_section(HOST)}
    (ns.host_dir / f"{name}.toml").write_text(tomli_w.dumps(doc))
    (ns.host_dir / f"{name}.toml").chmod(0o644)
    ctl(ns, "submit", f"{HOST}/{name}.toml")


def freeze_after_checkpoint(ns, name) -> tuple[dict, int]:
    """Once the job has a checkpoint and has trained past it, SIGSTOP its trainer (so the
    job can neither finish nor checkpoint before what the test does next)."""
    j = wait_until(lambda: (j := job(ns, name))["checkpoint_step"] is not None
                   and j["phase"] == "training" and j["step"] > j["checkpoint_step"] and j,
                   240, 0.02, f"{name} training past a checkpoint")
    trainer = ns.host_pid(j["pid"])
    os.kill(trainer, signal.SIGSTOP)
    return job(ns, name), trainer


def journal(ns, *match) -> list[dict]:
    out = ns.sh("journalctl --no-pager -o json -u fluxgymd " + " ".join(match)).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def the_lora(ns, name):
    return lora(ns.path(f"{OUTPUTS}/{name}"), name)


def test_make_install_lays_out_units_config_and_a_relocated_venv(stage):
    venv = stage / "usr/local/lib/fluxgymd"
    for exe in ("fluxgymd", "fluxgymctl"):
        link = stage / "usr/local/bin" / exe
        assert os.readlink(link) == f"../lib/fluxgymd/bin/{exe}"
        assert (venv / "bin" / exe).read_text().splitlines()[0] == \
            "#!/usr/local/lib/fluxgymd/bin/python"
    unit = (stage / "usr/local/lib/systemd/system/fluxgymd.service").read_text()
    assert "ExecStart=/usr/local/bin/fluxgymd --config /etc/fluxgymd/fluxgymd.toml" in unit
    assert "ExecReload=/bin/kill -HUP $MAINPID" in unit
    assert (stage / "usr/local/lib/sysusers.d/fluxgymd.conf").exists()
    assert (stage / "usr/local/lib/tmpfiles.d/fluxgymd.conf").exists()
    assert (stage / "etc/fluxgymd/fluxgymd.toml").read_text() == \
        (REPO / "etc/fluxgymd.toml").read_text()
    # the tests' harness is not installed with the package
    site = next((venv / "lib").glob("python3*/site-packages"))
    assert (site / "fluxgymd" / "daemon.py").is_file()
    assert not (site / "fluxgymd" / "testing.py").exists()
    assert (site / "fluxgymd" / "models.toml").read_text() == \
        (REPO / "etc" / "models.toml").read_text()  # the model catalog ships
    # nothing in the venv's scripts, config or bytecode still points into the stage
    stage_path = str(stage).encode()
    for f in [*(venv / "bin").iterdir(), venv / "pyvenv.cfg",
              *(venv / "lib").glob("python3*/site-packages/fluxgymd/__pycache__/*.pyc")]:
        if f.is_file() and not f.is_symlink():
            assert stage_path not in f.read_bytes(), f


def test_the_installed_unit_verifies_clean_and_rates_ok(machine):
    r = machine.sh("systemd-analyze verify fluxgymd.service")
    assert r.stderr.strip() == "", r.stderr
    r = machine.sh("systemd-analyze security --no-pager fluxgymd.service")
    m = re.search(r"Overall exposure level for fluxgymd\.service: ([\d.]+) (\w+)", r.stdout)
    assert m, r.stdout[-500:]
    assert float(m.group(1)) <= 3.5 and m.group(2) in ("SAFE", "OK"), m.group(0)


def test_systemctl_start_reaches_active_with_a_status_line(machine):
    machine.sh("systemctl start fluxgymd")  # Type=notify: returns after READY=1
    p = show(machine, "ActiveState", "SubState", "StatusText", "MainPID", "User")
    assert (p["ActiveState"], p["SubState"], p["User"]) == ("active", "running", "fluxgymd"), p
    assert p["StatusText"] == "idle", p
    # the socket directory: root and the service group only
    run = machine.path("/run/fluxgymd")
    st = run.stat()
    assert stat.S_IMODE(st.st_mode) == 0o750
    assert stat.S_IMODE((run / "control.sock").stat().st_mode) == 0o660
    # the daemon's own log reached journald through the native protocol
    entries = journal(machine, "SYSLOG_IDENTIFIER=fluxgymd")
    serving = [e for e in entries if e["MESSAGE"].startswith("fluxgymd ")
               and "serving ipc:///run/fluxgymd/control.sock" in e["MESSAGE"]]
    assert serving and serving[-1]["PRIORITY"] == "6" and serving[-1]["_PID"] == p["MainPID"]
    assert ctl(machine, "ping").returncode == 0


def test_the_installed_config_refuses_command_jobs(machine):
    r = ctl(machine, "submit", f"{HOST}/hello.toml", check=False)
    assert r.returncode == 4, r
    assert "command jobs are turned off" in r.stderr
    assert "/etc/fluxgymd/fluxgymd.toml" in r.stderr
    assert "no jobs" in ctl(machine, "status").stdout


CHATTER = ("for i in 1 2 3; do echo chatter-out-$i; echo chatter-err-$i >&2; done; "
           "printf 'bar 1/3\\rbar 2/3\\rbar 3/3\\n'")


def test_a_lora_job_trains_and_journalctl_shows_its_lines_and_only_its_lines(machine, straight):
    # command jobs on, as an admin would: a drop-in with the environment variable
    machine.sh("printf '[Service]\\nEnvironment=FLUXGYM_ALLOW_COMMAND_JOBS=true\\n' "
               "> /run/systemd/system/fluxgymd.service.d/commands.conf && "
               "systemctl daemon-reload && systemctl restart fluxgymd")
    lora_job(machine, "e2e-lora")
    (machine.host_dir / "chatter.toml").write_text(tomli_w.dumps(
        {"job": {"name": "e2e-chatter", "kind": "command"},
         "command": {"argv": ["/bin/sh", "-c", CHATTER], "progress": "none"}}))
    (machine.host_dir / "chatter.toml").chmod(0o644)
    ctl(machine, "submit", f"{HOST}/chatter.toml")
    a = wait_job(machine, "e2e-lora", "succeeded")
    b = wait_job(machine, "e2e-chatter", "succeeded")
    assert_identical(straight, the_lora(machine, "e2e-lora"))

    la, lb = (journal(machine, f"JOB_ID={j['id']}") for j in (a, b))
    assert {e["JOB_ID"] for e in la} == {str(a["id"])}
    assert {e["JOB_NAME"] for e in la} == {"e2e-lora"}
    # its output lines (STREAM=) are lines of its train.log; the rest is what the daemon
    # said about it (its state changes)
    output = [e for e in la if "STREAM" in e]
    said = [e["MESSAGE"] for e in la if "STREAM" not in e]
    assert len(output) > 20 and {e["JOB_ATTEMPT"] for e in output} == {"1"}
    # the trainer's news is info, not warnings: `journalctl -p warning` stays meaningful
    steps = [e for e in output if e["MESSAGE"].startswith("trainer: step ")]
    assert steps and {(e["PRIORITY"], e["STREAM"]) for e in steps} == {("6", "stdout")}
    train_log = set(machine.path(f"{OUTPUTS}/e2e-lora/train.log").read_text().splitlines())
    assert {e["MESSAGE"] for e in output} <= train_log
    assert said and all(m.startswith(f"job {a['id']} (e2e-lora): ") for m in said), said
    assert said[-1] == f"job {a['id']} (e2e-lora): succeeded: exited with code 0"
    assert not any("chatter" in e["MESSAGE"] for e in la)
    got = [(e["MESSAGE"], e["PRIORITY"], e["STREAM"]) for e in lb if "STREAM" in e]
    for i in (1, 2, 3):
        assert (f"chatter-out-{i}", "6", "stdout") in got and \
            (f"chatter-err-{i}", "4", "stderr") in got
    assert {m for m, _, _ in got} <= {*(f"chatter-{s}-{i}" for s in ("out", "err")
                                        for i in (1, 2, 3)), "bar 1/3", "bar 2/3", "bar 3/3"}
    assert "bar 3/3" in {m for m, _, _ in got}  # the finishing redraw always reaches it
    names = set(machine.sh("journalctl --no-pager -u fluxgymd -F JOB_NAME").stdout.split())
    assert {"e2e-lora", "e2e-chatter"} <= names


def test_systemctl_stop_checkpoints_and_start_resumes_bit_identical(machine, straight):
    lora_job(machine, "e2e-stop")
    frozen, _ = freeze_after_checkpoint(machine, "e2e-stop")
    at = frozen["step"]
    # systemd SIGTERMs the whole cgroup (and SIGCONTs it): the trainer finishes its step,
    # checkpoints and exits 75 while the daemon waits for it
    machine.sh("systemctl stop fluxgymd", timeout=180)
    assert show(machine, "ActiveState")["ActiveState"] == "inactive"
    said = [e["MESSAGE"] for e in journal(machine, "SYSLOG_IDENTIFIER=fluxgymd")]
    interrupted = [m for m in said if m.startswith(f"job {frozen['id']} (e2e-stop): interrupted")]
    assert interrupted and "75" in interrupted[-1], said[-10:]
    ckpts = sorted(machine.path(f"{OUTPUTS}/e2e-stop/checkpoints").iterdir())
    newest = int(ckpts[-1].name.split("-")[-1])
    assert newest >= at > frozen["checkpoint_step"], (ckpts, frozen)

    machine.sh("systemctl start fluxgymd")
    j = wait_job(machine, "e2e-stop", "succeeded")
    states = [e["to_state"] for e in j["events"]]
    assert states.count("interrupted") == 1 and states.count("running") == 2, states
    assert j["restarts"] == 0  # an interruption with a checkpoint spends no restart
    assert_identical(straight, the_lora(machine, "e2e-stop"))


def test_a_frozen_daemon_is_restarted_by_the_systemd_watchdog_and_the_job_finishes(
        machine, straight):
    machine.sh("systemctl is-active fluxgymd")
    lora_job(machine, "e2e-frozen")
    frozen, _ = freeze_after_checkpoint(machine, "e2e-frozen")
    before = show(machine, "MainPID", "NRestarts")
    os.kill(machine.host_pid(int(before["MainPID"])), signal.SIGSTOP)
    # WatchdogSec=5s: no ping for 5 s, SIGABRT, then Restart=on-failure after RestartSec
    wait_until(lambda: (p := show(machine, "MainPID", "NRestarts", "ActiveState"))
               ["ActiveState"] == "active" and p["MainPID"] not in ("0", before["MainPID"]),
               60, 0.25, "systemd to restart fluxgymd")
    p = show(machine, "NRestarts", "Result")
    assert int(p["NRestarts"]) == int(before["NRestarts"]) + 1
    said = machine.sh("journalctl --no-pager -u fluxgymd -o cat").stdout
    assert "Watchdog timeout" in said
    # the watchdog's SIGABRT reached the trainer too: it checkpointed the step it was on
    ckpts = sorted(machine.path(f"{OUTPUTS}/e2e-frozen/checkpoints").iterdir())
    assert int(ckpts[-1].name.split("-")[-1]) >= frozen["step"] > frozen["checkpoint_step"]
    j = wait_job(machine, "e2e-frozen", "succeeded")
    reasons = [e["reason"] for e in j["events"]]
    assert any(r.startswith("fluxgymd restarted while attempt 1 was running") for r in reasons)
    assert_identical(straight, the_lora(machine, "e2e-frozen"))
