"""A real single-node Slurm 22.05 (Debian's slurmctld, slurmd, slurm-client and munge) in
private pid/mount/uts/ipc/cgroup/net namespaces, for the Slurm executor's tests.

tests/slurm/slurm-ns.sh boots it (about 1.5 s) and tears it down by the pid of its
namespace; nothing on the host changes. Its state lives under /var/lib/fluxgymd-tests (munged
refuses a path with a group- or world-writable parent, so not /tmp). The cluster's jobs see
the host's filesystem, so a daemon's outputs dir is "shared" with the node. Needs root; as
root (CI) the packages are installed once, with a policy-rc.d that keeps them from starting
daemons on the host.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).parent / "slurm" / "slurm-ns.sh"
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
TOOLS = ("/usr/sbin/slurmctld", "/usr/sbin/slurmd", "/usr/bin/sbatch", "/usr/sbin/munged")
ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED"}


def unavailable() -> str:
    """Why no test cluster can run here ('' when it can), installing it as root if needed."""
    if os.geteuid() != 0:
        return "the single-node Slurm runs in namespaces, which needs root (CI runs as root)"
    if all(os.path.exists(t) for t in TOOLS):
        return ""
    if shutil.which("apt-get") is None:
        return f"Slurm is not installed ({', '.join(PACKAGES)}) and there is no apt-get"
    guard = Path("/usr/sbin/policy-rc.d")
    made = not guard.exists()
    if made:  # the packages would otherwise start munged and slurmd on the host
        guard.write_text("#!/bin/sh\nexit 101\n")
        guard.chmod(0o755)
    try:
        r = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES],
                           capture_output=True, text=True, timeout=900,
                           env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    finally:
        if made:
            guard.unlink()
    if r.returncode != 0 or not all(os.path.exists(t) for t in TOOLS):
        return f"installing {', '.join(PACKAGES)} failed: {r.stderr[-500:]}"
    return ""


def slurm_config(cluster: "Cluster") -> dict:
    """A test daemon's settings to run everything through this cluster: one CPU a job (two
    at once on a 2-core machine), Slurm asked every 0.5 s, files read every 0.1 s."""
    return {"executor": "slurm", "max_concurrent_jobs": 4, "slurm__bin_dir": str(cluster.bin),
            "slurm__poll_s": 0.5, "slurm__follow_s": 0.1, "slurm__cpus_per_task": 1}


class Cluster:
    def __init__(self, base: Path, cpus: int | None = None):
        self.base = base
        self.bin = base / "bin"  # sbatch & co, usable from the host
        self.env = dict(os.environ, SLURMNS_BASE=str(base))
        if cpus:
            self.env["SLURMNS_CPUS"] = str(cpus)

    def start(self) -> "Cluster":
        self.base.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(self.base.parent, 0o755)
        r = subprocess.run(["bash", str(SCRIPT), "start"], env=self.env, capture_output=True,
                           text=True, timeout=120)
        if r.returncode != 0:
            self.stop()
            raise AssertionError(f"the test Slurm did not start:\n{r.stderr[-3000:]}")
        return self

    def stop(self) -> None:
        subprocess.run(["bash", str(SCRIPT), "stop"], env=self.env, capture_output=True,
                       timeout=120)
        shutil.rmtree(self.base, ignore_errors=True)

    def exec(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        """A command inside the cluster's namespaces (its pids, its /etc/slurm)."""
        r = subprocess.run(["bash", str(SCRIPT), "exec", *argv], env=self.env,
                           capture_output=True, text=True, timeout=60)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} -> {r.returncode}: {r.stderr}")
        return r

    def jobs(self) -> dict[str, tuple[str, str]]:
        """{job id: (state, reason)} of every job Slurm remembers."""
        out = self.exec("squeue", "-h", "-t", "all", "-o", "%i|%T|%r").stdout
        return {i: (s, r) for i, s, r in (line.split("|") for line in out.splitlines() if line)}

    def state(self, job_id: str) -> str:
        return self.jobs().get(str(job_id), ("GONE", ""))[0]

    def cancel_all(self) -> None:
        ids = [i for i, (s, _) in self.jobs().items() if s in ACTIVE]
        if ids:
            self.exec("scancel", *ids, check=False)

    def node_pid(self, job_dir: Path, attempt: int) -> str:
        """The attempt's pid on the node, as its batch script wrote it (a pid of the
        cluster's namespace: signal it with exec("kill", ...))."""
        return (job_dir / ".slurm" / f"attempt-{attempt}.node").read_text().split()[2]
