"""The control socket's operations: one method per op in protocol.OPS.

Mixed into the Daemon, which provides the store, the runs, the logs, the queue (`schedule`)
and state changes (`_transition`); these methods only validate what a request asks against
the job's state, change it through those, and shape the answer.
"""
from __future__ import annotations

import asyncio

import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import tomli_w

from . import __version__, jobspec, ownership
from .joblog import count_lines, lines_after, read_tail
from .kinds import Policy, kind_of
from .protocol import PROTOCOL_VERSION, RUNTIME_SETTINGS, TOPIC_STATE, ErrorCode, FluxgymError
from .states import ACTIVE, FINISHED, JobState, check_removal

log = logging.getLogger("fluxgymd")
S = JobState


class Operations:
    def _handlers(self) -> dict[str, Any]:
        return {
            "ping": self.op_ping, "version": self.op_ping, "submit": self.op_submit,
            "list": self.op_list, "show": self.op_show, "cancel": self.op_cancel,
            "retry": self.op_retry, "logs": self.op_logs, "metrics": self.op_metrics,
            "remove": self.op_remove, "clean": self.op_clean, "pause": self.op_pause,
            "resume": self.op_resume, "move": self.op_move, "config": self.op_config,
            "notify_test": self.op_notify_test, "gpus": self.op_gpus,
            "web_url": self.op_web_url, "models": self.op_models, "pull": self.op_pull,
            "models_rm": self.op_models_rm, "publish": self.op_publish, "new": self.op_new,
            "control": self.op_control, "plan": self.op_plan,
        }

    def _find(self, ref: str) -> dict[str, Any]:
        self._flush()  # answers show the latest step, not the last flush
        return self.store.find(ref)

    def op_ping(self, args) -> dict[str, Any]:
        return {"pong": True, "version": __version__, "protocol": PROTOCOL_VERSION,
                "pid": os.getpid(), "uptime_s": time.monotonic() - self.started_mono,
                "runtime_dir": str(self.cfg.runtime_dir), "state_dir": str(self.cfg.state_dir),
                "outputs_dir": str(self.cfg.outputs_dir),
                "max_concurrent_jobs": self.max_concurrent,
                "allow_command_jobs": self.cfg.allow_command_jobs, "paused": self.paused,
                "kohya_checkouts": [c for c, _ in self.cfg.kohya_checkouts],
                "restoring": sorted(self.restoring),
                "summary": self._summary(), "stopping": self.stopping,
                "alerts": self.alerts.status(), "executor": self.cfg.executor,
                "slurm": self.slurm.status()}

    async def op_notify_test(self, args) -> dict[str, Any]:
        """Send one test alert through the configured webhook and say how it went."""
        fut = self.alerts.webhook.submit("test", None, wait=True)
        if fut is None:
            raise FluxgymError(ErrorCode.INVALID_STATE, "no webhook is configured: set url (or "
                               "url_file) under [notify] in fluxgymd.toml, or "
                               "FLUXGYM_NOTIFY_URL, and restart fluxgymd")
        n = self.cfg.notify
        patience = n.timeout_s * (n.retries + 1) + sum(
            min(n.backoff_s * 2 ** i, 300.0) for i in range(n.retries)) + 5
        try:
            return await asyncio.wait_for(asyncio.shield(fut), patience)
        except asyncio.TimeoutError:
            return {"ok": False, "error": f"no outcome within {patience:.0f}s (still queued "
                    "behind other alerts?)", "target": self.alerts.webhook.where}

    def _policy(self) -> Policy:
        """What jobs may do here, from the config as it stands (a reload changes it)."""
        cfg = self.cfg
        return Policy(allow_command_jobs=cfg.allow_command_jobs,
                      kohya_checkouts=cfg.kohya_checkouts,
                      kohya_save_every_n_steps=cfg.kohya_save_every_n_steps,
                      config_file=str(cfg.config_file or ""), models=cfg.models,
                      models_dir=str(cfg.models_dir), caption_model=cfg.caption_model)

    def _refused(self, spec: dict[str, Any]) -> str | None:
        """Why this fluxgymd may not run the job (now), or None."""
        why = kind_of(spec).refusals(spec, self._policy())
        return "; ".join(why) if why else None

    def _check_allowed(self, spec: dict[str, Any]) -> None:
        if (why := self._refused(spec)) is not None:
            raise FluxgymError(ErrorCode.FORBIDDEN, why)

    async def op_submit(self, args) -> dict[str, Any]:
        if self.stopping:
            raise FluxgymError(ErrorCode.INVALID_STATE, "fluxgymd is stopping; submit again "
                               "once it has restarted")
        # in a thread: a kohya job's check runs sd-scripts' parser (seconds), and the loop
        # keeps supervising the running jobs meanwhile
        spec = await asyncio.to_thread(
            jobspec.parse, args["text"], args["source"], args["name"], self.cfg.outputs_dir,
            self._policy())
        if self.stopping:
            raise FluxgymError(ErrorCode.INVALID_STATE, "fluxgymd is stopping; submit again "
                               "once it has restarted")
        out = jobspec.output_dir(self.cfg.outputs_dir, spec["name"])
        await self._plan_for_submit(spec)  # refused here if it can never fit a GPU
        if self.stopping:
            raise FluxgymError(ErrorCode.INVALID_STATE, "fluxgymd is stopping; submit again "
                               "once it has restarted")
        more = list(args["after"] or [])
        # what it names of other jobs (a publish job's LoRA job): found now, waited for
        more += [str(j["id"]) for j in kind_of(spec).bind(spec, self.store.find, kind_of,
                                                          self._policy())]
        publish = spec.get("publish") if spec["kind"] != "publish" else None
        if publish and not self._free(f"{spec['name']}-publish"):
            raise FluxgymError(ErrorCode.CONFLICT, f"[publish] chains a job named "
                               f"{spec['name']}-publish after this one, and a job or an output "
                               "folder has that name; remove it, or submit this one under "
                               "another name")
        needed = kind_of(spec).models_needed(spec, self._policy())
        if needed:
            # its model is fetched first, by one download job it waits for (shared with any
            # other job that needs the same files)
            download = await self._pull(needed)
            more.append(str(download["id"]))
            spec["warnings"].append(f"{', '.join(needed)} not on disk yet: fetched first by "
                                    f"job {download['id']} ({download['name']})")
        after = self._dependencies(spec, more)
        try:
            # claimed inside the store's transaction: no job without its folder, and no
            # folder taken over from another job or another fluxgymd's database
            job = self.store.add_job(spec, out, args["priority"], prepare=lambda job_id:
                                     ownership.claim(out, self.store.id, job_id, spec),
                                     after=[a["id"] for a in after])
        except OSError as e:
            raise FluxgymError(ErrorCode.INVALID_JOB, f"cannot create the output folder {out}: "
                               f"{e.strerror or e}") from None
        log.info("job %s (%s): queued from %s", job["id"], job["name"], args["source"] or "-")
        for w in spec["warnings"]:
            log.warning("job %s (%s): %s", job["id"], job["name"], w,
                        extra={"job_id": job["id"], "job_name": job["name"]})
        self._announce(job)
        for dep in after:  # one that already failed fails this one at once
            if dep["state"] in (S.FAILED.value, S.CANCELLED.value):
                self._fail_dependents(dep)
                break
        chained = None
        if publish:  # [publish] on a lora or kohya job: its publish job, waiting for it
            text = tomli_w.dumps({"job": {"name": f"{job['name']}-publish", "kind": "publish",
                                          "description": f"publishes {job['name']}"},
                                  "publish": {**publish, "job": str(job["id"])}})
            chained = await self.op_submit({"text": text, "source": "", "name": "",
                                            "priority": args["priority"], "after": None})
        self.schedule()
        view = self._view(self.store.get(job["id"]))
        view["warnings"] = spec["warnings"]
        if chained:
            view["chained"] = [chained]
        return view

    def _dependencies(self, spec: dict[str, Any], more: list[str]) -> list[dict[str, Any]]:
        """The jobs a new job waits for ([job] after and submit --after), which must exist:
        a job can only wait for older ones, so no cycle can form. The spec keeps their
        names."""
        found = []
        for ref in dict.fromkeys([*spec.get("after", []), *more]):
            try:
                found.append(self.store.find(ref))
            except FluxgymError:
                raise FluxgymError(ErrorCode.INVALID_JOB, f"job.after: no job named or numbered "
                                   f"{ref!r} to wait for; submit that one first "
                                   "(`fluxgymctl status` lists them)") from None
        found = list({j["id"]: j for j in found}.values())
        if found:
            spec["after"] = [j["name"] for j in found]
        return found

    # --- models ---------------------------------------------------------------------
    def op_models(self, args) -> dict[str, Any]:
        root = self.cfg.models_dir
        out = []
        for m in sorted(self.cfg.models.values(), key=lambda m: m.name):
            out.append({"name": m.name, "repo": m.repo, "files": list(m.files),
                        "optional": list(m.optional),
                        "part": m.part, "needs": list(m.needs), "size": m.size,
                        "gated": m.gated, "license": m.license, "base": m.base,
                        "description": m.description, "present": m.present(root),
                        "on_disk": m.bytes_on_disk(root), "path": str(m.folder(root)),
                        "from": m.origin or "fluxgymd.toml"})
        return {"models_dir": str(root), "models": out}

    async def op_pull(self, args) -> dict[str, Any]:
        return self._view(await self._pull(args["models"]))

    async def _pull(self, names: list[str]) -> dict[str, Any]:
        """The download job that fetches these catalog models (and what they need): a
        queued or running one that already fetches every one of their files, else a new
        one. One at a time: two jobs that need the same model share one download."""
        async with self._pulling:
            return await self._pull_locked(names)

    async def _pull_locked(self, names: list[str]) -> dict[str, Any]:
        from .catalog import with_needs

        unknown = [n for n in names if n not in self.cfg.models]
        if unknown:
            raise FluxgymError(ErrorCode.NOT_FOUND, f"{', '.join(unknown)}: not in the model "
                               f"catalog (`fluxgymctl models list`; add one as [models.NAME] "
                               "in fluxgymd.toml)")
        wanted = {(m.repo, f, str(m.folder(self.cfg.models_dir)))
                  for m in with_needs(self.cfg.models, names) for f in m.files}
        for job in self.store.list_jobs([S.QUEUED.value, *(s.value for s in ACTIVE)]):
            if job["kind"] == "download":
                has = {(f["repo"], f["file"], f["dir"]) for f in job["spec"]["download"]["files"]}
                if wanted <= has:
                    return job
        name = self._free_name(f"pull-{'-'.join(sorted(names))}"[:40].rstrip("-._") +
                               time.strftime("-%Y%m%d-%H%M%S"))  # pulled twice in a second
        text = tomli_w.dumps({"job": {"name": name, "kind": "download",
                                      "description": f"fluxgymctl models pull {' '.join(names)}"},
                              "download": {"models": list(names)}})
        job = await self.op_submit({"text": text, "source": "", "name": "", "priority": 0,
                                    "after": None})
        return self.store.get(job["id"])

    def _taken(self, name: str) -> bool:
        try:
            self.store.find(name)
            return True
        except FluxgymError:
            return False

    def op_models_rm(self, args) -> dict[str, Any]:
        m = self.cfg.models.get(args["model"])
        if m is None:
            raise FluxgymError(ErrorCode.NOT_FOUND, f"{args['model']}: not in the model catalog")
        folder = m.folder(self.cfg.models_dir)
        users = [j["name"] for j in self.store.list_jobs([S.QUEUED.value, S.INTERRUPTED.value,
                                                          *(s.value for s in ACTIVE)])
                 if str(folder) in json.dumps(j["spec"])]
        if users:
            raise FluxgymError(ErrorCode.INVALID_STATE, f"{m.name} is used by {', '.join(users)}"
                               " (queued or running); cancel them first")
        existed = folder.exists()
        freed = m.bytes_on_disk(self.cfg.models_dir)
        shutil.rmtree(folder, ignore_errors=True)
        log.info("model %s removed from %s (%d bytes)", m.name, folder, freed)
        return {"model": m.name, "path": str(folder), "removed": existed, "freed": freed}

    def op_list(self, args) -> dict[str, Any]:
        self._flush()
        now = time.time()
        states = args["states"] or []
        bad = [s for s in states if s not in {x.value for x in JobState}]
        if bad:
            raise FluxgymError(ErrorCode.BAD_ARGS, f"unknown state(s) {', '.join(map(str, bad))}; "
                               f"states are: {', '.join(s.value for s in JobState)}")
        jobs = self.store.list_jobs(states)
        return {"jobs": [self._view(j, now) for j in jobs], "counts": self.store.counts(),
                "paused": self.paused, "max_concurrent_jobs": self.max_concurrent}

    def op_show(self, args) -> dict[str, Any]:
        job = self._find(args["job"])
        view = self._view(job)
        view["dependents"] = [{"id": d["id"], "name": d["name"], "state": d["state"]}
                              for d in self.store.dependents(job["id"])]
        view["spec"] = job["spec"]
        view["events"] = self.store.events(job["id"], max(0, args["events"]))
        view["log_file"] = str(Path(job["output_dir"]) / "train.log")
        limits = self._limits_for(job)
        run = self.runs.get(job["id"])
        view["watchdog"] = {
            "gpu": self.gpu.describe() if job["executor"] == "local" else
            "the trainer on the node reports its GPUs (NVML) in its events"
            + ("" if run is None or run.watch is None else
               ("; it does" if run.watch.gpu_available else "; none reported so far")),
            "restarts": f"{job['restarts']}/{limits.max_restarts}",
            "no_progress": f"{job['no_progress']}/{limits.no_progress_restarts}",
            "step_limit_s": run.watch.step_limit() if run and run.watch else limits.stall_floor_s,
            "limits": dataclasses.asdict(limits),
        }
        view["gpus"] = [g for g in self._gpu_stats() if any(
            j["id"] == job["id"] for j in g["jobs"])] if run is not None else []
        return view

    def _gpu_stats(self) -> list[dict[str, Any]]:
        """Every GPU's figures, with the jobs running on it and the memory they planned
        there (a job fluxgymd did not place, without CUDA_VISIBLE_DEVICES, counts as on all
        of them), and the queued job it is held for, if one is."""
        stats = self.gpu.stats()
        for g in stats:
            g["jobs"], g["planned"] = [], 0
        for job_id, run in self.runs.items():
            if run.executor != "local":
                continue  # its GPUs are a node's, not this machine's
            job = self.store.get(job_id)
            place = run.placement or {}
            for g in stats:
                if place.get("gpus"):
                    if (g.get("uuid") or str(g["index"])) not in place["gpus"]:
                        continue
                elif run.gpus is not None and g["index"] not in run.gpus:
                    continue
                g["jobs"].append({"id": job_id, "name": job["name"],
                                  "planned": place.get("bytes"), "tier": place.get("tier")})
                if place.get("bytes") is not None:
                    g["planned"] += place["bytes"]
                elif place.get("gpus"):
                    g["planned"] = g.get("memory_total") or g["planned"]  # a whole GPU
        return stats

    def op_web_url(self, args) -> dict[str, Any]:
        """The dashboard's login URL, token included: whoever reaches the control socket may
        drive the daemon anyway, so may open its page."""
        if self.web is None:
            raise FluxgymError(ErrorCode.INVALID_STATE, "the dashboard is off: set listen = "
                               "\"127.0.0.1:8377\" under [web] in fluxgymd.toml (or start "
                               "fluxgymd with --web 127.0.0.1:8377) and restart it")
        return {"url": self.web.url(), "listen": f"{self.web.host}:{self.web.port}",
                "trust_loopback": self.cfg.web.trust_loopback,
                "token_file": self.cfg.web.token_file}

    def op_gpus(self, args) -> dict[str, Any]:
        stats = self._gpu_stats()
        why = "" if stats else (self.gpu.describe() if not self.gpu.available else
                                f"{self.gpu.describe()}, but it gave no figures")
        return {"available": bool(stats), "source": self.gpu.describe(), "why": why,
                "gpus": stats, "reserve_mib": self.cfg.gpu_reserve_mib,
                "exclusive": self.cfg.gpus_exclusive, "use": list(self.cfg.gpus_use) or "all",
                "waiting": [{"id": i, "name": self.store.get(i)["name"], "why": w}
                            for i, w in sorted(self.gpu_waits.items())]}

    def op_cancel(self, args) -> dict[str, Any]:
        job = self._find(args["job"])
        state = S(job["state"])
        run = self.runs.get(job["id"])
        if run is not None:
            if not run.cancel:
                run.cancel = True
                self.store.update(job["id"], cancel_requested=1)
                how = (f"SIGTERM to the job's process group, SIGKILL after "
                       f"{self.cfg.kill_grace_s:g}s" if run.executor == "local" else
                       f"SIGTERM through Slurm (scancel at once while it waits in the queue), "
                       f"scancel after {self.cfg.kill_grace_s:g}s")
                run.log.write([f"=== fluxgymd: cancel requested; {how} ==="])
                self._spawn(run.child.terminate(self.cfg.kill_grace_s))
            return self._view(self.store.get(job["id"]))
        if job["id"] in self.restoring:
            # restore is stopping what a previous daemon left of it; it ends cancelled
            self.store.update(job["id"], cancel_requested=1)
            return self._view(self.store.get(job["id"]))
        if state in FINISHED:
            raise FluxgymError(ErrorCode.INVALID_STATE,
                               f"job {job['id']} ({job['name']}) is already {state.value}")
        timer = self.recovering.pop(job["id"], None)
        if timer is not None:
            timer.cancel()
        job = self._transition(job["id"], S.CANCELLED, "cancelled by user")
        self.schedule()
        return self._view(job)

    def op_retry(self, args) -> dict[str, Any]:
        job = self._find(args["job"])
        state = S(job["state"])
        if state is S.SUCCEEDED:
            raise FluxgymError(
                ErrorCode.INVALID_STATE,
                f"job {job['id']} ({job['name']}) succeeded; a finished job is never run again. "
                "Submit the file again under a new name (submit --name NEW)",
            )
        if state not in (S.FAILED, S.CANCELLED, S.INTERRUPTED):
            raise FluxgymError(ErrorCode.INVALID_STATE,
                               f"job {job['id']} ({job['name']}) is {state.value}; only failed, "
                               "cancelled or interrupted jobs can be retried")
        self._check_allowed(job["spec"])
        blocked = [d for d in self.store.after(job["id"])
                   if d["state"] in (S.FAILED.value, S.CANCELLED.value)]
        if blocked:
            names = ", ".join(d["name"] for d in blocked)
            raise FluxgymError(ErrorCode.INVALID_STATE, f"job {job['id']} ({job['name']}) waits "
                               f"for {names}, which did not succeed; retry that one with "
                               f"--dependents (fluxgymctl retry {blocked[0]['name']} "
                               "--dependents)")
        job = self._transition(job["id"], S.QUEUED, "retry requested by user",
                               cancel_requested=0, restarts=0, no_progress=0)
        requeued = self._retry_dependents(job) if args["dependents"] else []
        self.schedule()
        view = self._view(self.store.get(job["id"]))
        view["dependents_requeued"] = [d["name"] for d in requeued]
        return view

    def _retry_dependents(self, job: dict[str, Any]) -> list[dict[str, Any]]:
        """Queue again every job that failed because `job` (or one of these) did."""
        requeued, todo = [], [job]
        while todo:
            for d in self.store.dependents(todo.pop()["id"]):
                if d["state"] == S.FAILED.value and not any(
                        a["state"] in (S.FAILED.value, S.CANCELLED.value)
                        for a in self.store.after(d["id"])):
                    d = self._transition(d["id"], S.QUEUED, f"retry of {job['name']} "
                                         "(--dependents)", cancel_requested=0, restarts=0,
                                         no_progress=0)
                    requeued.append(d)
                    todo.append(d)
        return requeued

    def op_logs(self, args) -> dict[str, Any]:
        job = self._find(args["job"])
        jl = self.logs.get(job["id"])
        folder = Path(job["output_dir"])
        live = jl.seq if jl is not None else count_lines(folder, self.cfg.log_backups)
        base = {"job": job["id"], "name": job["name"], "state": job["state"], "seq": live,
                "epoch": self.epoch}
        if args["after"] is not None:
            limit = max(1, args["lines"])
            items, gap = jl.since(args["after"], limit) if jl is not None else ([], True)
            if gap:  # older than the ring holds (or no ring): read them from train.log
                first, lines = lines_after(folder, args["after"], limit, self.cfg.log_backups,
                                           live)
                out = dict(base, lines=lines, first=first, gap=first is not None
                           and first > args["after"] + 1)
                if args["timestamps"]:
                    out["times"] = [jl.time_of(first + i) if jl else None
                                    for i in range(len(lines))]
                return out
            out = dict(base, lines=[l for _, l in items],
                       first=items[0][0] if items else None, gap=False)
            if args["timestamps"]:
                out["times"] = [jl.time_of(n) for n, _ in items]
            return out
        lines = read_tail(Path(job["output_dir"]), args["lines"], self.cfg.log_backups)
        out = dict(base, lines=lines, first=None, gap=False)
        if args["timestamps"]:
            # the ring knows when its lines came; older lines (from train.log) do not
            times: list[float | None] = [None] * len(lines)
            if jl is not None and lines:
                for i in range(len(lines)):
                    times[i] = jl.time_of(jl.seq - len(lines) + 1 + i)
            out["times"] = times
        return out

    def op_metrics(self, args) -> dict[str, Any]:
        job = self._find(args["job"])
        return {"job": job["id"], "metrics": self.store.metrics(job["id"], args["limit"])}

    # --- queue control -----------------------------------------------------------------
    def _remove(self, job: dict[str, Any], delete_outputs: bool) -> dict[str, Any]:
        removed = self.store.remove(job["id"])  # refuses active jobs (states.REMOVABLE)
        old_log = self.logs.pop(job["id"], None)
        if old_log is not None:
            old_log.close()
        out = Path(job["output_dir"])
        deleted = False
        if delete_outputs and out.is_dir():
            owner = ownership.read_owner(out) or {}
            if owner.get("store") == self.store.id and owner.get("job") == job["id"]:
                shutil.rmtree(out, ignore_errors=True)
                deleted = True
            else:
                log.warning("job %s: kept %s: it is not marked as this job's", job["id"], out)
        log.info("job %s (%s): removed (%s)", job["id"], job["name"],
                 "outputs deleted" if deleted else f"outputs kept in {out}")
        self._publish(TOPIC_STATE, dict(self._view(removed), state="removed"))
        return {"id": job["id"], "name": job["name"], "state": removed["state"],
                "output_dir": str(out), "outputs_deleted": deleted}

    def op_remove(self, args) -> dict[str, Any]:
        jobs = [self._find(ref) for ref in dict.fromkeys(args["jobs"])]
        going = {j["id"] for j in jobs}
        for job in jobs:  # all or nothing: check every one before removing any
            check_removal(job["state"])  # jobs being restored are still active: refused
            waiting = [d["name"] for d in self.store.dependents(job["id"])
                       if d["id"] not in going and d["state"] not in
                       {st.value for st in FINISHED} and job["state"] != S.SUCCEEDED.value]
            if waiting:
                raise FluxgymError(ErrorCode.INVALID_STATE, f"job {job['id']} ({job['name']}) "
                                   f"is waited for by {', '.join(waiting)}; cancel or remove "
                                   "them first (or remove them together)")
        removed = [self._remove(j, args["delete_outputs"]) for j in jobs]
        self.notifier.status(self._summary())
        return {"removed": removed}

    def op_clean(self, args) -> dict[str, Any]:
        states = args["states"] or [S.SUCCEEDED.value, S.FAILED.value, S.CANCELLED.value]
        bad = [x for x in states if x not in {st.value for st in FINISHED}]
        if bad:
            raise FluxgymError(ErrorCode.BAD_ARGS, f"clean removes finished jobs only; "
                               f"{', '.join(bad)} is not one of: "
                               f"{', '.join(sorted(st.value for st in FINISHED))}")
        removed = [self._remove(j, args["delete_outputs"]) for j in self.store.list_jobs(states)]
        self.notifier.status(self._summary())
        return {"removed": removed}

    def _set_paused(self, paused: bool) -> dict[str, Any]:
        self.store.set_setting("paused", "1" if paused else None)
        self.paused = paused
        log.info("queue %s", "paused: running jobs go on, queued ones wait" if paused
                 else "resumed")
        self.notifier.status(self._summary())
        self.schedule()
        return {"paused": paused, "summary": self._summary()}

    def op_pause(self, args) -> dict[str, Any]:
        return self._set_paused(True)

    def op_resume(self, args) -> dict[str, Any]:
        return self._set_paused(False)

    def op_move(self, args) -> dict[str, Any]:
        if args["to"] is None and args["priority"] is None:
            raise FluxgymError(ErrorCode.BAD_ARGS, "move: give `to` (first or last) or "
                               "`priority`")
        job = self._find(args["job"])
        moved = self.store.move(job["id"], args["to"], args["priority"])
        self._announce(moved)
        return self._view(moved)

    def op_config(self, args) -> dict[str, Any]:
        key, value = args["key"], args["value"]
        if key is None and (value is not None or args["reset"]):
            raise FluxgymError(ErrorCode.BAD_ARGS, "config: name the setting to change "
                               f"(one of: {', '.join(RUNTIME_SETTINGS)})")
        if key is not None and args["reset"]:
            self.store.set_setting(key, None)
            self.max_concurrent = self.cfg.max_concurrent_jobs
            log.info("%s back to the config's %s", key, self.max_concurrent)
            self.schedule()
        elif key is not None and value is not None:
            lo, hi = RUNTIME_SETTINGS[key]
            if not lo <= value <= hi:
                raise FluxgymError(ErrorCode.BAD_ARGS, f"config: {key} must be between {lo} "
                                   f"and {hi}, got {value}")
            self.store.set_setting(key, str(value))
            self.max_concurrent = value
            log.info("%s = %s (set at run time; kept across restarts)", key, value)
            self.schedule()
        return {"settings": {"max_concurrent_jobs": self.max_concurrent},
                "paused": self.paused,
                "from_config_file": {"max_concurrent_jobs": self.cfg.max_concurrent_jobs}}
