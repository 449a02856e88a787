"""The Prometheus text endpoint (prometheus_client), rendered from the figures the daemon
hands over when scraped (plain data, see `render`): jobs by state, each running job's step,
total and steps per second, checkpoint age, restarts and stalls by reason since the daemon
started, and each GPU's utilization and memory."""
from __future__ import annotations

import os
import time
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .states import JobState


class _Collector:
    def __init__(self, figures: dict[str, Any]):
        self.f = figures

    def collect(self):
        f = self.f
        counts = f["counts"]
        jobs = GaugeMetricFamily("fluxgymd_jobs", "Jobs by state.", labels=["state"])
        for state in JobState:
            jobs.add_metric([state.value], counts.get(state.value, 0))
        yield jobs
        step = GaugeMetricFamily("fluxgymd_job_step", "Steps done by each active job.",
                                 labels=["job", "name"])
        total = GaugeMetricFamily("fluxgymd_job_total_steps", "Each active job's total steps.",
                                  labels=["job", "name"])
        rate = GaugeMetricFamily("fluxgymd_job_steps_per_second",
                                 "Each running job's training speed.", labels=["job", "name"])
        age = GaugeMetricFamily("fluxgymd_job_checkpoint_age_seconds",
                                "Seconds since each active job's newest checkpoint was written.",
                                labels=["job", "name"])
        now = time.time()
        for job in f["running"]:
            labels = [str(job["id"]), job["name"]]
            if job["step"] is not None:
                step.add_metric(labels, job["step"])
            if job["total_steps"]:
                total.add_metric(labels, job["total_steps"])
            if job["seconds_per_step"]:
                rate.add_metric(labels, 1.0 / job["seconds_per_step"])
            if job["checkpoint"]:
                try:
                    age.add_metric(labels, max(0.0, now - os.path.getmtime(job["checkpoint"])))
                except OSError:
                    pass
        yield from (step, total, rate, age)
        restarts = CounterMetricFamily("fluxgymd_restarts", "Restarts since the daemon "
                                       "started, by reason.", labels=["reason"])
        stalls = CounterMetricFamily("fluxgymd_stalls", "Stalls since the daemon started, by "
                                     "the watchdog's rule.", labels=["rule"])
        for (what, why), n in sorted(f["counters"].items()):
            (restarts if what == "restart" else stalls).add_metric([why], n)
        yield from (restarts, stalls)
        util = GaugeMetricFamily("fluxgymd_gpu_utilization_percent", "GPU utilization.",
                                 labels=["gpu", "name"])
        used = GaugeMetricFamily("fluxgymd_gpu_memory_used_bytes", "GPU memory used.",
                                 labels=["gpu", "name"])
        mem_total = GaugeMetricFamily("fluxgymd_gpu_memory_total_bytes", "GPU memory.",
                                      labels=["gpu", "name"])
        jobs = GaugeMetricFamily("fluxgymd_gpu_jobs", "Jobs running on the GPU.",
                                 labels=["gpu", "name"])
        planned = GaugeMetricFamily("fluxgymd_gpu_planned_bytes", "GPU memory the jobs "
                                    "placed on it planned.", labels=["gpu", "name"])
        for g in f["gpus"]:
            labels = [str(g["index"]), g.get("name") or ""]
            for fam, key in ((util, "utilization"), (used, "memory_used"),
                             (mem_total, "memory_total"), (planned, "planned")):
                if g.get(key) is not None:
                    fam.add_metric(labels, g[key])
            jobs.add_metric(labels, len(g.get("jobs") or []))
        yield from (util, used, mem_total, jobs, planned)


def render(figures: dict[str, Any]) -> tuple[bytes, str]:
    """figures: `counts` (jobs by state), `running` (the store rows of the jobs running now),
    `counters` ({("restart" | "stall", why): n}) and `gpus` (the probe's stats, each with its
    `jobs` and the memory they `planned`)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(figures))
    return generate_latest(registry), "text/plain; version=0.0.4; charset=utf-8"
