"""Readings for the watchdog and the views: GPU utilization and stats, process state, OOM
kills.

The GPU comes through a small interface so tests can script it: NVML on a machine with
NVIDIA GPUs (nvidia-ml-py), a file for tests and unusual setups, or nothing — in which case
the GPU rule is off and `fluxgymctl show` says why.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import psutil

log = logging.getLogger("fluxgymd.probes")


class GpuProbe:
    available = False

    def read(self, gpus: list[int] | None) -> float | None:
        """The busiest of the given GPUs (all when None), in percent; None if unknown."""
        return None

    def describe(self) -> str:
        return "off"

    def stats(self) -> list[dict[str, Any]]:
        """Per GPU: index, name, uuid, utilization and memory utilization (%), memory used
        and total (bytes), temperature (°C), power and its limit (W); None where unknown."""
        return []


def gpu_record(index: int, **known: Any) -> dict[str, Any]:
    rec = {k: None for k in GPU_FIELDS}
    rec.update({k: v for k, v in known.items() if k in GPU_FIELDS})
    rec["index"] = index
    return rec


GPU_FIELDS = ("index", "name", "uuid", "utilization", "memory_utilization", "memory_used",
              "memory_total", "temperature", "power_w", "power_limit_w")


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

    def stats(self) -> list[dict[str, Any]]:
        nv = self.nvml
        out = []
        for i, h in enumerate(self.handles):
            def get(fn, *a):
                try:
                    return fn(h, *a)
                except nv.NVMLError as e:
                    log.debug("NVML %s of GPU %s failed: %s", fn.__name__, i, e)
                    return None
            util, mem = get(nv.nvmlDeviceGetUtilizationRates), get(nv.nvmlDeviceGetMemoryInfo)
            power, limit = get(nv.nvmlDeviceGetPowerUsage), get(nv.nvmlDeviceGetEnforcedPowerLimit)
            name = get(nv.nvmlDeviceGetName)
            uuid = get(nv.nvmlDeviceGetUUID)
            out.append(gpu_record(
                i, name=name.decode() if isinstance(name, bytes) else name,
                uuid=uuid.decode() if isinstance(uuid, bytes) else uuid,
                utilization=util.gpu if util else None,
                memory_utilization=util.memory if util else None,
                memory_used=mem.used if mem else None, memory_total=mem.total if mem else None,
                temperature=get(nv.nvmlDeviceGetTemperature, nv.NVML_TEMPERATURE_GPU),
                power_w=power / 1000 if power is not None else None,
                power_limit_w=limit / 1000 if limit is not None else None))
        return out


class FileProbe(GpuProbe):
    """Readings from a file, re-read at every poll (the tests' scripted GPU): a number, the
    utilization in percent of every GPU, or a JSON list of per-GPU records (GPU_FIELDS)."""
    available = True

    def __init__(self, path: str):
        self.path = path

    def _load(self) -> Any:
        try:
            with open(self.path) as fh:
                return json.loads(fh.read())
        except (OSError, ValueError):
            return None

    def read(self, gpus: list[int] | None) -> float | None:
        data = self._load()
        if isinstance(data, (int, float)) and not isinstance(data, bool):
            return float(data)
        values = [g.get("utilization") for g in self.stats()
                  if gpus is None or g["index"] in gpus]
        values = [v for v in values if isinstance(v, (int, float))]
        return float(max(values)) if values else None

    def stats(self) -> list[dict[str, Any]]:
        data = self._load()
        if isinstance(data, (int, float)) and not isinstance(data, bool):
            return [gpu_record(0, utilization=float(data))]
        if not isinstance(data, list):
            return []
        return [gpu_record(int(g.get("index", i)),
                           **{k: v for k, v in g.items() if k != "index"})
                for i, g in enumerate(data) if isinstance(g, dict)]

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
