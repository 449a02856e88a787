"""kind = "kohya": kohya sd-scripts (what FluxGym runs), in its own Python, supervised like a
lora job.

fluxgymd owns the run's folder and its checkpoints: it makes sd-scripts save state often
enough, resumes every attempt from the newest complete state folder (never a torn one, never
the end state), and never runs again a run whose final model exists. sd-scripts runs under
kohya_launcher.py, which fixes from outside what sd-scripts lacks for supervision (a save on
SIGTERM, the step count on resume; see that file). Progress, phases, checkpoints and samples
are read from what sd-scripts prints and the launcher adds.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from .. import kohya_state
from ..fluxgym import FluxGymImportError, flag, read_script, without
from ..progress import parse_tqdm
from .base import JobKind

LAUNCHER = str(Path(__file__).with_name("kohya_launcher.py"))
KEYS = {"sd_scripts": str, "python": str, "script": str, "args": list, "train_script": str,
        "base_model": str,
        "env": dict, "save_every_n_steps": int, "mixed_precision": str,
        "num_cpu_threads_per_process": int}
TYPE_NAMES = {str: "a string", list: "a list", dict: "a table", int: "an integer"}
DEFAULT_SCRIPT = "flux_train_network.py"
CHECK_TIMEOUT_S = 300.0
# The venvs FluxGym and sd-scripts' own instructions make, in the order they are tried
VENVS = ("venv/bin/python", ".venv/bin/python", "../env/bin/python", "../venv/bin/python")
# What fluxgymd decides for every attempt: a value given in the job is replaced
MANAGED = {"--output_dir": 1, "--resume": 1, "--skip_until_initial_step": 0,
           "--initial_step": 1, "--initial_epoch": 1}
TAG = "fluxgymd-kohya:"
_BAR_END = re.compile(r"\|\s*\d+/\d+ \[[^\]]*\]")
PHASES = [  # sd-scripts' log lines (with --console_log_simple, one line each)
    ("caching", re.compile(r"caching latents|caching text encoder outputs", re.I)),
    ("saving", re.compile(r"saving checkpoint:|saving state at|saving last state|"
                          r"save train state to", re.I)),
    ("sampling", re.compile(r"generating sample images", re.I)),
    ("loading", re.compile(r"loading dataset config|prepare images|building (flux|clip|t5|"
                           r"autoencoder)|loading state dict|prepare optimizer|"
                           r"import network module|resume training from", re.I)),
    ("training", re.compile(r"^epoch \d+/\d+")),
]


def output_name(job: dict[str, Any]) -> str:
    return flag(job["spec"]["kohya"]["args"], "--output_name") or job["name"]


def model_ext(args: list[str]) -> str:
    return "." + (flag(args, "--save_model_as") or "safetensors")


def found_python(sd_scripts: Path | str) -> str:
    """The Python that runs a checkout when nothing names one: its venv (FluxGym's and
    sd-scripts' own layouts), else python3 on the daemon's PATH; "" when there is none."""
    for rel in VENVS:
        cand = os.path.normpath(os.path.join(sd_scripts, rel))
        if os.access(cand, os.X_OK):
            return cand
    for name in ("python3", "python"):
        if (found := shutil.which(name)):
            return found
    return ""


def _python(sd_scripts: Path, given: str | None, base: Path, errors: list[str]) -> str:
    if given:
        path = given if "/" not in given else os.path.normpath(base / given)
        found = shutil.which(path) if "/" not in path else path
        if not found or not os.access(found, os.X_OK):
            errors.append(f"kohya.python: {path} is not an executable Python")
        return found or path
    if (found := found_python(sd_scripts)):
        return found
    errors.append(f"kohya.python: no venv in {sd_scripts} ({', '.join(VENVS)}) and no python "
                  "on the daemon's PATH; set kohya.python to sd-scripts' Python")
    return ""


def _same_file_path(a: str, b: str) -> bool:
    """One path, however it is spelt: folders resolved (a checkout reached through a
    symlink), the last name kept (a venv's bin/python is a symlink that must stay one)."""
    def canon(p: str) -> str:
        p = os.path.abspath(p)
        return os.path.join(os.path.realpath(os.path.dirname(p)), os.path.basename(p))
    return canon(a) == canon(b)


# Environment variables through which a process loads code it was not asked to run: the
# dynamic linker's, Python's own, interpreters' and shells' start-up files, plugins that CUDA,
# OpenMP and NCCL load by path, compiled-kernel caches that are loaded without a check, and
# the places a Python finds its user site-packages (.pth files run code).
CODE_LOADING_PREFIXES = ("LD_", "DYLD_", "PYTHON", "BASH_FUNC_", "TORCHINDUCTOR_", "TRITON_",
                         "PERL", "RUBY", "NODE_")
CODE_LOADING_NAMES = frozenset({
    "PATH", "BASH_ENV", "ENV", "SHELLOPTS", "BASHOPTS", "PS4", "IFS", "GCONV_PATH",
    "GLIBC_TUNABLES", "HOME", "TMPDIR", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME",
    "OMP_TOOL_LIBRARIES", "OMP_TOOL", "KMP_TOOL_LIBRARIES", "CUDA_INJECTION64_PATH",
    "NCCL_NET_PLUGIN", "NCCL_TUNER_PLUGIN", "NCCL_PROFILER_PLUGIN", "TORCH_EXTENSIONS_DIR",
    "PYTORCH_KERNEL_CACHE_PATH", "HF_MODULES_CACHE", "ACCELERATE_CONFIG_FILE", "JAVA_TOOL_OPTIONS",
})
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def code_loading(name: str) -> bool:
    upper = name.upper()
    return upper in CODE_LOADING_NAMES or upper.startswith(CODE_LOADING_PREFIXES)


# sd-scripts' arguments that name Python modules it imports: only sd-scripts' own networks,
# and optimizers and schedulers from the packages its instructions name. --config_file would
# set any of them from a file fluxgymd does not read.
MODULE_FLAGS = {
    "--network_module": ("networks.",),
    "--optimizer_type": ("torch.optim.", "bitsandbytes.", "transformers.", "prodigyopt.",
                         "schedulefree.", "lion_pytorch.", "dadaptation.", "pytorch_optimizer.",
                         "came_pytorch.", "library."),
    "--lr_scheduler_type": ("torch.optim.lr_scheduler.", "transformers.", "diffusers.",
                            "library."),
}
REFUSED_FLAGS = ("--config_file",)


def _checkout_refusals(k: dict[str, Any], policy) -> list[str]:
    where = policy.where
    sd = k["sd_scripts"]
    if not policy.kohya_checkouts:
        return [f"kohya jobs are refused until this fluxgymd allows an sd-scripts checkout: a "
                f"kohya job runs that checkout's Python, so each one is the administrator's "
                f"choice. Add it under [kohya] in {where}: checkouts = [\"{sd}\"], then "
                "reload fluxgymd (systemctl reload fluxgymd, or SIGHUP)"]
    for checkout, python in policy.kohya_checkouts:
        if os.path.realpath(checkout) == os.path.realpath(sd):
            break
    else:
        allowed = ", ".join(c for c, _ in policy.kohya_checkouts)
        return [f"kohya.sd_scripts {sd} is not a checkout this fluxgymd allows ({allowed}); "
                f"to allow it, add \"{sd}\" to checkouts under [kohya] in {where} and reload "
                "fluxgymd"]
    out = []
    want = python or found_python(checkout)
    if not want or not _same_file_path(k["python"], want):
        out.append(f"kohya.python {k['python']} is not the Python this fluxgymd runs {checkout} "
                   f"with ({want or 'none found'}); leave kohya.python out, or allow it under "
                   f"[kohya] in {where}: checkouts = [{{ path = \"{checkout}\", python = "
                   f"\"{k['python']}\" }}]")
    script = os.path.join(sd, k["script"])
    if not k["script"].endswith(".py") or k["script"].startswith(".") or \
            os.path.dirname(os.path.realpath(script)) != os.path.realpath(sd):
        out.append(f"kohya.script {k['script']!r} must be one of sd-scripts' own training "
                   f"scripts, a .py file directly in {checkout} (e.g. flux_train_network.py)")
    for name in k["env"]:
        if not ENV_NAME.fullmatch(name):
            out.append(f"kohya.env: {name!r:.60} is not a variable name")
        elif code_loading(name):
            out.append(f"kohya.env.{name} may not be set: it decides which code a process "
                       "loads (LD_*, PYTHON*, PATH and the like are the administrator's)")
    for flag_name in REFUSED_FLAGS:
        if flag(k["args"], flag_name) is not None or flag_name in k["args"]:
            out.append(f"{flag_name} is refused: fluxgymd checks every argument, so give its "
                       "settings as arguments instead")
    for flag_name, prefixes in MODULE_FLAGS.items():
        value = flag(k["args"], flag_name)
        if value is None or (flag_name != "--network_module" and "." not in value):
            continue  # sd-scripts' own names (adamw8bit, cosine) import nothing new
        if not value.startswith(prefixes):
            out.append(f"{flag_name} {value!r:.80} names a module sd-scripts would import; "
                       f"only {', '.join(p + '*' for p in prefixes)} are allowed")
    return out


# sd-scripts' flag for each part a catalog base model brings (it fetches its tokenizers itself)
MODEL_FLAGS = {"transformer": "--pretrained_model_name_or_path", "ae": "--ae",
               "clip_l": "--clip_l", "t5xxl": "--t5xxl"}


def _base_models(name: str, policy) -> list:
    from ..catalog import with_needs

    return [m for m in with_needs(policy.models or {}, [name]) if m.part in MODEL_FLAGS]


def model_flags(name: str, args: list[str], policy, errors: list[str]) -> list[str]:
    """sd-scripts' model flags for a catalog base model, the files in the models dir (each
    one the job's arguments do not give themselves)."""
    catalog = policy.models or {}
    if name not in catalog or catalog[name].part != "transformer":
        transformers = sorted(n for n, m in catalog.items() if m.part == "transformer")
        errors.append(f"kohya.base_model {name!r:.60} is not a base model of the catalog; use "
                      f"one of {', '.join(transformers)} (fluxgymctl models list)")
        return []
    root = Path(policy.models_dir)
    out = []
    for m in _base_models(name, policy):
        if flag(args, MODEL_FLAGS[m.part]) is None:
            out += [MODEL_FLAGS[m.part], str(m.paths(root)[0])]
    return out


class KohyaKind(JobKind):
    name = section = "kohya"
    default_gpus = 1
    speaks_contract = True  # judged by the steps and phases read from its output
    makes_lora = True
    controls = ("save", "sample")  # through the launcher, for *train_network.py scripts

    def control_refused(self, job, action):
        k = job["spec"]["kohya"]
        if "train_network" not in os.path.basename(k["script"]):
            return (f"the launcher takes requests only in a *train_network.py script, not "
                    f"{k['script']}")
        if action == "sample" and flag(k["args"], "--sample_prompts") is None:
            return "it has no --sample_prompts to draw"
        return super().control_refused(job, action)

    def validate(self, section, base, errors, policy):
        if not isinstance(section, dict):
            errors.append("a kohya job needs a [kohya] section with sd_scripts = \"DIR\" and "
                          "args = [...] or train_script = \"train.sh\" (see etc/jobs/kohya.toml)")
            return {}
        for key, value in section.items():
            want = KEYS.get(key)
            if want is None:
                errors.append(f"unknown key kohya.{key}; known: {', '.join(KEYS)}")
            elif not isinstance(value, want) or isinstance(value, bool):
                errors.append(f"kohya.{key} must be {TYPE_NAMES[want]}, got {value!r:.60}")
        if any(e.startswith("kohya.") or e.startswith("unknown key kohya.") for e in errors):
            return {}
        out: dict[str, Any] = {"env": {}, "mixed_precision": section.get("mixed_precision"),
                               "num_cpu_threads_per_process":
                                   section.get("num_cpu_threads_per_process")}
        sd = section.get("sd_scripts")
        if not sd:
            errors.append("missing kohya.sd_scripts: the folder of your sd-scripts checkout")
            return {}
        sd_path = Path(os.path.normpath(base / os.path.expanduser(sd)))
        out["sd_scripts"] = str(sd_path)
        if not sd_path.is_dir():
            errors.append(f"kohya.sd_scripts: {sd_path} is not a folder")
            return {}
        args = section.get("args")
        script = section.get("script")
        if "train_script" in section and args is not None:
            errors.append("give kohya.args or kohya.train_script, not both")
        elif "train_script" in section:
            path = os.path.normpath(base / section["train_script"])
            try:
                read = read_script(path)
            except FluxGymImportError as e:
                errors.append(f"kohya.train_script: {e}")
                return {}
            args = [x for key, values in read.flags() for x in ["--" + key, *values]]
            script = script or os.path.basename(read.script)
            launch = read.launcher
            if out["mixed_precision"] is None and launch.get("mixed_precision"):
                out["mixed_precision"] = launch["mixed_precision"][0]
            if out["num_cpu_threads_per_process"] is None and \
                    launch.get("num_cpu_threads_per_process", [""])[0].isdigit():
                out["num_cpu_threads_per_process"] = int(launch["num_cpu_threads_per_process"][0])
            out["train_script"] = path
        elif args is None:
            errors.append("missing kohya.args (sd-scripts' arguments, as a list) or "
                          "kohya.train_script (a FluxGym train.sh or train.bat)")
            return {}
        if not all(isinstance(a, str) for a in args):
            errors.append("kohya.args must hold only strings")
            return {}
        out["args"] = list(args)
        if section.get("base_model"):
            out["base_model"] = section["base_model"]
            added = model_flags(section["base_model"], out["args"], policy, errors)
            out["args"] += added
            out["base_model_files"] = added[1::2]  # may not exist yet: fetched first
        out["script"] = script = script or DEFAULT_SCRIPT
        if "/" in script or not (sd_path / script).is_file():
            errors.append(f"kohya.script: {sd_path / script} does not exist (give a script "
                          "name in the checkout, e.g. flux_train_network.py)")
        out["python"] = _python(sd_path, section.get("python"), base, errors)
        env = section.get("env", {})
        for k, v in env.items():
            if not isinstance(v, str):
                errors.append(f"kohya.env.{k} must be a string, got {v!r:.60}")
        out["env"] = dict(env)
        every = section.get("save_every_n_steps")
        if every is not None and every < 1:
            errors.append(f"kohya.save_every_n_steps must be 1 or more, got {every}")
        out["save_every_n_steps"] = every or policy.kohya_save_every_n_steps
        return out

    def refusals(self, spec, policy):
        """A kohya job runs a Python: only from a checkout the administrator allowed, with
        the Python found there, one of its own scripts, and no environment or argument that
        makes it load other code; anything goes where command jobs are allowed."""
        if policy.allow_command_jobs:
            return []
        return _checkout_refusals(spec["kohya"], policy)

    def models_needed(self, spec, policy):
        k = spec["kohya"]
        if not k.get("base_model") or not policy.models:
            return []
        root = Path(policy.models_dir)
        return [m.name for m in _base_models(k["base_model"], policy)
                if flag(k["args"], MODEL_FLAGS[m.part]) == str(m.paths(root)[0])
                and not m.present(root)]

    def check(self, spec, outputs_dir):
        """sd-scripts' own parser, run in its own Python, judges the arguments (a model file
        that a download job will fetch first is not there yet: that is no problem)."""
        problems, warnings = self._check(spec, outputs_dir)
        coming = spec["kohya"].get("base_model_files") or []
        problems = [p for p in problems
                    if not any(p.endswith(f" {path}: no such file or folder") for path in coming)]
        return problems, warnings

    def _check(self, spec, outputs_dir):
        k = spec["kohya"]
        warnings = [f"{name} in the arguments is replaced: fluxgymd decides it for each attempt"
                    for name in MANAGED if flag(k["args"], name) is not None
                    or name in k["args"]]
        if flag(k["args"], "--seed") is None:
            warnings.append("no --seed: sd-scripts draws a new random seed in every attempt, so "
                            "a resumed run cannot continue exactly; add --seed N")
        args = self.arguments(k, os.path.join(outputs_dir, spec["name"]), spec["name"])
        argv = [k["python"], LAUNCHER, "--check", str(Path(k["sd_scripts"]) / k["script"]),
                *args]
        try:
            proc = subprocess.run(argv, cwd=k["sd_scripts"], env={**os.environ, **k["env"]},
                                  capture_output=True, text=True, timeout=CHECK_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as e:
            return [f"could not run sd-scripts' argument check with {k['python']}: {e}"], []
        try:
            result = json.loads(proc.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
            return [f"sd-scripts' argument check failed with {k['python']} (exit "
                    f"{proc.returncode}): {tail or 'no output'}"], warnings
        return list(result.get("errors", [])), warnings

    @staticmethod
    def arguments(k: dict[str, Any], out: str, name: str) -> list[str]:
        """The job's arguments with what fluxgymd manages: its folder, the name, state saves
        often enough, at least two states kept, one log line per record."""
        args = without(k["args"], MANAGED) + ["--output_dir", out]
        if flag(args, "--output_name") is None:
            args += ["--output_name", name]
        if "--save_state" not in args:
            args.append("--save_state")
        every = flag(args, "--save_every_n_steps")
        if every is None or not every.isdigit():
            args = without(args, {"--save_every_n_steps": 1})
            every = str(k["save_every_n_steps"])
            args += ["--save_every_n_steps", every]
        # sd-scripts counts it in steps: removes the state older than (this) steps
        keep = flag(args, "--save_last_n_steps_state")
        need = 2 * int(every)
        if keep is None or not keep.isdigit() or int(keep) < need:
            args = without(args, {"--save_last_n_steps_state": 1})
            args += ["--save_last_n_steps_state", str(need)]
        if not any(a.startswith("--console_log") for a in args):
            args.append("--console_log_simple")
        return args

    def command(self, job):
        k, out = job["spec"]["kohya"], job["output_dir"]
        args = self.arguments(k, out, job["name"])
        args += kohya_state.resume_args(out, output_name(job))
        env = dict(k["env"])
        if k.get("mixed_precision"):
            env.setdefault("ACCELERATE_MIXED_PRECISION", k["mixed_precision"])
        if k.get("num_cpu_threads_per_process"):
            env.setdefault("OMP_NUM_THREADS", str(k["num_cpu_threads_per_process"]))
        return ([k["python"], LAUNCHER, str(Path(k["sd_scripts"]) / k["script"]), *args],
                env, k["sd_scripts"])

    def output_parser(self, spec):
        return KohyaOutput()

    def finished(self, job):
        return kohya_state.finished(job["output_dir"], output_name(job),
                                    model_ext(job["spec"]["kohya"]["args"]))

    def sample_dir(self, job):
        return Path(job["output_dir"]) / "sample"  # <name>_000120_00_<time>.png

    def lora_path(self, job):
        return os.path.join(job["output_dir"],
                            output_name(job) + model_ext(job["spec"]["kohya"]["args"]))

    def result(self, job):
        return self.lora_path(job) if self.finished(job) else None


class KohyaOutput:
    """sd-scripts' output → events, in the order they were printed; of its `steps:` bars only
    the newest of a batch counts."""

    def __call__(self, lines: list[str], pending: str) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        self._bar_at: int | None = None
        for line in [*lines, pending]:
            for segment in line.split("\r"):
                self._segment(segment.strip(), events)
        return events

    def _segment(self, text: str, events: list[dict[str, Any]]) -> None:
        if not text:
            return
        if text.startswith("steps:"):
            # a bar is drawn without a newline: what is printed next lands on its line
            end = _BAR_END.search(text)
            bar, rest = (text[:end.end()], text[end.end():]) if end else (text, "")
            ev = parse_tqdm(bar)
            if ev:
                if self._bar_at is not None:
                    events.pop(self._bar_at)
                self._bar_at = len(events)
                events.append(ev)
            self._segment(rest.strip(), events)
            return
        if TAG in text:
            head, _, tail = text.partition(TAG)
            self._segment(head.strip(), events)
            ev = self._marker(tail.strip())
            if ev:
                events.append(ev)
            return
        for phase, rx in PHASES:
            if rx.search(text):
                events.append({"event": "phase", "phase": phase})
                return

    @staticmethod
    def _marker(text: str) -> dict[str, Any] | None:
        if text.startswith("state saved "):
            path = text[len("state saved "):]
            state = kohya_state.complete_state(path)
            if state is None:
                return None
            return {"event": "checkpoint", "path": path, "step": int(state["current_step"])}
        if text.startswith("sample "):
            return {"event": "sample", "path": text[len("sample "):]}
        return None
