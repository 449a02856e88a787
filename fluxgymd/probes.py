"""Readings for the watchdog: GPU utilization, process state, OOM kills.

The GPU comes through a small interface so tests can script it: NVML on a machine with
NVIDIA GPUs (nvidia-ml-py), a file for tests and unusual setups, or nothing — in which case
the GPU rule is off and `fluxgymctl show` says why.
"""
from __future__ import annotations

import logging
import os

import psutil

log = logging.getLogger("fluxgymd.probes")


class GpuProbe:
    available = False

    def read(self, gpus: list[int] | None) -> float | None:
        """The busiest of the given GPUs (all when None), in percent; None if unknown."""
        return None

    def describe(self) -> str:
        return "off"


class NoGpu(GpuProbe):
    def __init__(self, why: str):
        self.why = why

    def describe(self) -> str:
        return f"off: {self.why}"


class NvmlProbe(GpuProbe):
    available = True

    def __init__(self) -> None:
        import pynvml  # from nvidia-ml-py

        pynvml.nvmlInit()
        self.nvml = pynvml
        self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i)
                        for i in range(pynvml.nvmlDeviceGetCount())]

    def read(self, gpus: list[int] | None) -> float | None:
        idx = range(len(self.handles)) if gpus is None else [i for i in gpus
                                                              if 0 <= i < len(self.handles)]
        values = []
        for i in idx:
            try:
                values.append(self.nvml.nvmlDeviceGetUtilizationRates(self.handles[i]).gpu)
            except self.nvml.NVMLError as e:
                log.debug("NVML reading of GPU %s failed: %s", i, e)
        return float(max(values)) if values else None

    def describe(self) -> str:
        return f"on: NVML, {len(self.handles)} GPU(s)"


class FileProbe(GpuProbe):
    """Utilization in percent, as the number in a file (re-read at every poll)."""
    available = True

    def __init__(self, path: str):
        self.path = path

    def read(self, gpus: list[int] | None) -> float | None:
        try:
            with open(self.path) as fh:
                return float(fh.read().strip())
        except (OSError, ValueError):
            return None

    def describe(self) -> str:
        return f"on: readings from {self.path}"


def make_gpu_probe(spec: str) -> GpuProbe:
    """spec: auto | nvml | none | file:PATH"""
    if spec == "none":
        return NoGpu("gpu_probe = \"none\"")
    if spec.startswith("file:"):
        return FileProbe(spec[5:])
    try:
        probe = NvmlProbe()
    except Exception as e:  # NVMLError_LibraryNotFound without a driver, and kin
        if spec == "nvml":
            log.error("gpu_probe = \"nvml\" but NVML is unavailable: %s", e)
        return NoGpu(f"NVML is not available ({type(e).__name__}: {e or 'no driver'})")
    if not probe.handles:
        return NoGpu("NVML found no GPU")
    return probe


def job_gpus(env: dict[str, str]) -> list[int] | None:
    """The GPU indices a job may use, from its CUDA_VISIBLE_DEVICES; None means all."""
    value = env.get("CUDA_VISIBLE_DEVICES")
    if value is None or not value.strip():
        return None
    try:
        return [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        return None  # GPU UUIDs: judge by all GPUs


def process_reading(pid: int) -> tuple[str, float] | None:
    """(status, RSS in MB) of a process, or None when it is gone."""
    try:
        p = psutil.Process(pid)
        with p.oneshot():
            return p.status(), p.memory_info().rss / 2**20
    except psutil.Error:
        return None


def oom_kills() -> int | None:
    """How many times the kernel's OOM killer acted in our cgroup (children included)."""
    try:
        with open("/proc/self/cgroup") as fh:
            rel = fh.read().strip().split("\n")[-1].split(":", 2)[2]
        with open(os.path.join("/sys/fs/cgroup", rel.lstrip("/"), "memory.events")) as fh:
            for line in fh:
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
    except (OSError, IndexError, ValueError):
        return None
    return None
