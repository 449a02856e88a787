"""A real fluxgymd in throwaway directories, driven through the real client and CLI.

Used by the tests and the benchmarks, from the checkout: it is not installed with the
package (pyproject.toml excludes it from the wheel; tests/test_systemd_e2e.py checks).
Imports nothing heavy and no test framework.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import tomli_w

from .client import Client, DaemonUnavailable

FINISHED = ("succeeded", "failed", "cancelled")

PY = sys.executable


def wait_until(pred, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class Daemon:
    """One fluxgymd process with its own dirs. Use .ctl(...) for the real CLI."""

    def __init__(self, root: Path, **config):
        self.root = root
        self.state_dir = root / "state"
        self.runtime_dir = root / "run"
        self.outputs_dir = root / "out"
        # the tests and benchmarks run their own programs as command jobs
        self.config = {"allow_command_jobs": True, **config}
        self.proc: subprocess.Popen | None = None
        self.log_path = root / "daemon.log"
        self.extra_env: dict[str, str] = {}
        self.wrap: list[str] = []  # a command fluxgymd runs under (e.g. unshare)

    def write_config(self) -> Path:
        """self.config as the daemon's config file (SIGHUP makes a running one read it)."""
        cfg = self.root / "fluxgymd.toml"
        sections: dict = {}
        for key, value in self.config.items():
            section, name = key.split("__") if "__" in key else ("daemon", key)
            sections.setdefault(section, {})[name] = value
        cfg.write_text(tomli_w.dumps(sections))
        return cfg

    def start(self, wait: bool = True, env: dict[str, str] | None = None) -> "Daemon":
        cfg = self.write_config()
        full_env = dict(os.environ, **self.extra_env, **(env or {}))
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [*self.wrap, PY, "-m", "fluxgymd", "--config", str(cfg), "--state-dir", str(self.state_dir),
             "--runtime-dir", str(self.runtime_dir), "--outputs-dir", str(self.outputs_dir),
             "--log-level", "debug"],
            stdout=self.log, stderr=subprocess.STDOUT, env=full_env,
        )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 15.0) -> None:
        def up():
            if self.proc.poll() is not None:
                raise AssertionError(f"fluxgymd exited {self.proc.returncode}:\n{self.logs()}")
            try:
                with self.client(timeout=1) as c:
                    return c.call("ping")
            except DaemonUnavailable:
                return None

        wait_until(up, timeout, 0.05, "fluxgymd to answer ping")

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def client(self, timeout: float = 10.0) -> Client:
        return Client(self.runtime_dir, timeout=timeout)

    def call(self, op: str, **args):
        with self.client() as c:
            return c.call(op, **args)

    def ctl(self, *args: str, timeout: float = 60.0, check: bool = False):
        r = subprocess.run(
            [PY, "-m", "fluxgymctl", "--runtime-dir", str(self.runtime_dir), *args],
            capture_output=True, text=True, timeout=timeout,
        )
        if check and r.returncode != 0:
            raise AssertionError(f"fluxgymctl {' '.join(args)} -> {r.returncode}\n"
                                 f"{r.stdout}\n{r.stderr}")
        return r

    def ctl_json(self, *args: str, **kw):
        r = self.ctl(*args, "--json", **kw)
        return r.returncode, json.loads(r.stdout)

    def job(self, ref) -> dict:
        return self.call("show", job=str(ref))

    def wait_state(self, ref, states, timeout: float = 20.0, interval: float = 0.05) -> dict:
        states = {states} if isinstance(states, str) else set(states)

        def reached():
            j = self.job(ref)
            if j["state"] in states:
                return j
            if j["state"] in FINISHED:
                raise AssertionError(f"job {ref} ended {j['state']}: {j['reason']}")
            return None

        return wait_until(reached, timeout, interval, f"job {ref} to reach {states}")

    def submit(self, path: Path, **kw) -> dict:
        # a kohya job's submit runs sd-scripts' own argument parser: seconds
        with self.client(timeout=330) as c:
            return c.call("submit", text=Path(path).read_text(), source=str(path), **kw)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        code, self.proc = self.proc.returncode, None
        return code


def write_job(directory: Path, name: str, argv: list[str], **sections) -> Path:
    doc = {"job": {"name": name, "kind": "command"}, "command": {"argv": argv}}
    for key, value in sections.items():
        if key == "command":
            doc["command"].update(value)
        else:
            doc[key] = value
    path = directory / f"{name}.toml"
    path.write_text(tomli_w.dumps(doc))
    return path


