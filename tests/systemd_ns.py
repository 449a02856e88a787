"""A real systemd, booted as PID 1 of private pid/mount/uts/ipc/cgroup namespaces, for the
end-to-end tests (brief section 7).

Nothing it does may reach the machine: every writable place systemd or a unit could touch
(/run, /tmp, /var/tmp, /var/log, /var/lib, /var/cache, /etc) is a private tmpfs or a copy in
one, and every unit that would reach out of the namespace (tmpfiles, which would empty the
machine's /tmp; sysctl, binfmt, modules, udev, random seed ...) is masked before systemd
starts. It is killed by its pid, and the cgroup directories it made are removed afterwards.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

SYSTEMD = "/lib/systemd/systemd"

BOOT = r"""#!/bin/bash
# PID 1 of a fresh pid namespace: make a private world, then become systemd.
set -euo pipefail
host="$1"; etc_extra="$2"; usr_local="$3"
mount --make-rprivate /
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir /run/host && mount --bind "$host" /run/host
[ -n "$usr_local" ] && mount --bind "$usr_local" /usr/local
# /etc: a copy in tmpfs, so that sysusers and friends never write the machine's
mkdir /run/etc && cp -a /etc/. /run/etc/
[ -n "$etc_extra" ] && cp -a "$etc_extra"/. /run/etc/
mount --bind /run/etc /etc
# only now hide the machine's /tmp (the arguments may live there)
for d in /tmp /var/tmp; do [ -d "$d" ] && mount -t tmpfs -o mode=1777 tmpfs "$d"; done
for d in /var/log /var/lib /var/cache; do [ -d "$d" ] && mount -t tmpfs -o mode=0755 tmpfs "$d"; done
mkdir -p /var/log/journal /var/lib/systemd
mkdir -p /run/systemd/system
mask() { ln -sf /dev/null "/run/systemd/system/$1"; }
# Whatever a boot would pull in, except journald itself.
for dir in /lib/systemd/system /etc/systemd/system; do
  for w in "$dir"/*.target.wants; do
    for u in "$w"/*; do
      [ -e "$u" ] || [ -L "$u" ] || continue
      case "${u##*/}" in
        systemd-journald.socket|systemd-journald.service|systemd-journald-dev-log.socket) ;;
        *) mask "${u##*/}" ;;
      esac
    done
  done
done
for u in systemd-tmpfiles-setup.service systemd-tmpfiles-setup-dev.service \
    systemd-tmpfiles-clean.timer systemd-tmpfiles-clean.service systemd-random-seed.service \
    systemd-sysctl.service systemd-binfmt.service systemd-modules-load.service \
    systemd-udevd.service systemd-udev-trigger.service systemd-remount-fs.service \
    systemd-hwdb-update.service systemd-journal-flush.service systemd-logind.service \
    systemd-timesyncd.service dbus.service dbus.socket; do mask "$u"; done
cat > /run/systemd/system/e2e.target <<UNIT
[Unit]
Description=fluxgymd end-to-end tests
Requires=systemd-journald.socket
After=systemd-journald.socket
UNIT
export container=fluxgymd-e2e
exec """ + SYSTEMD + """ --system --unit=e2e.target
"""


def unavailable() -> str | None:
    """Why a systemd cannot be booted here, or None."""
    if os.geteuid() != 0:
        return "needs root (CI runs as root): namespaces and a systemd as their PID 1"
    for tool in (SYSTEMD, shutil.which("unshare"), shutil.which("nsenter")):
        if not tool or not os.access(tool, os.X_OK):
            return f"no {tool or 'unshare/nsenter'} on this machine"
    try:
        r = subprocess.run(["unshare", "--pid", "--fork", "--mount", "--cgroup", "--mount-proc",
                            "true"], capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"cannot make namespaces here: {e}"
    if r.returncode != 0:
        return f"cannot make namespaces here: {r.stderr.decode().strip()}"
    return None


def _cgroup_dirs() -> set[str]:
    dirs: set[str] = set()
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            f = line.split()
            if f[f.index("-") + 1] in ("cgroup", "cgroup2"):
                for root, names, _ in os.walk(f[4]):
                    dirs.update(os.path.join(root, n) for n in names)
    return dirs


class SystemdNamespace:
    """host_dir appears inside as /run/host; etc_extra's contents are added to the private
    /etc; usr_local, if given, is mounted on /usr/local."""

    def __init__(self, host_dir: Path, etc_extra: Path | None = None,
                 usr_local: Path | None = None):
        self.host_dir = host_dir
        self.etc_extra = etc_extra
        self.usr_local = usr_local
        self.proc: subprocess.Popen | None = None
        self.pid = 0  # systemd's, as this machine sees it
        self._cgroups_before: set[str] = set()
        self.leftover_cgroups: list[str] = []

    def boot(self, timeout: float = 60) -> "SystemdNamespace":
        script = self.host_dir / "boot.sh"
        script.write_text(BOOT)
        self._cgroups_before = _cgroup_dirs()
        self.boot_log = open(self.host_dir / "boot.log", "wb")
        self.proc = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount", "--uts", "--ipc", "--cgroup",
             "--mount-proc", "bash", str(script), str(self.host_dir),
             str(self.etc_extra or ""), str(self.usr_local or "")],
            stdout=self.boot_log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the namespace's boot script failed:\n{self.boot_text()}")
            if not self.pid:
                self.pid = self._child_of(self.proc.pid)
            if self.pid and self._comm(self.pid) == "systemd":
                r = self.sh("systemctl is-system-running", check=False)
                if r.stdout.strip() in ("running", "degraded"):
                    return self
            time.sleep(0.2)
        raise RuntimeError(f"systemd did not come up in {timeout}s:\n{self.boot_text()}")

    def boot_text(self) -> str:
        return (self.host_dir / "boot.log").read_text(errors="replace")[-4000:]

    @staticmethod
    def _child_of(ppid: int) -> int:
        try:
            kids = Path(f"/proc/{ppid}/task/{ppid}/children").read_text().split()
        except OSError:
            return 0
        return int(kids[0]) if kids else 0

    @staticmethod
    def _comm(pid: int) -> str:
        try:
            return Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            return ""

    def sh(self, command: str, check: bool = True, timeout: float = 120,
           ) -> subprocess.CompletedProcess:
        """Run a shell command inside every namespace of that systemd."""
        r = subprocess.run(["nsenter", "-t", str(self.pid), "-a", "sh", "-c", command],
                           capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"{command!r} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
        return r

    def path(self, inside: str) -> Path:
        """A path inside the namespace, as this machine reaches it."""
        return Path(f"/proc/{self.pid}/root") / inside.lstrip("/")

    def host_pid(self, ns_pid: int) -> int:
        """This machine's pid of the process the namespace calls ns_pid."""
        ours = os.readlink(f"/proc/{self.pid}/ns/pid")
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if os.readlink(entry / "ns" / "pid") != ours:
                    continue
                status = (entry / "status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("NSpid:") and int(line.split()[-1]) == ns_pid:
                    return int(entry.name)
        raise LookupError(f"no process {ns_pid} in the namespace")

    def kill(self) -> None:
        """SIGKILL systemd by pid (which ends every process of its pid namespace), then remove
        the cgroup directories it made."""
        if self.pid and self.proc and self.proc.poll() is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc:
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
            self.boot_log.close()
        self.leftover_cgroups = []
        deadline = time.monotonic() + 15  # the kernel empties a cgroup a moment after its exits
        for d in sorted(_cgroup_dirs() - self._cgroups_before, key=len, reverse=True):
            while True:
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if time.monotonic() > deadline:
                        self.leftover_cgroups.append(f"{d}: {e}")
                        break
                    time.sleep(0.05)
