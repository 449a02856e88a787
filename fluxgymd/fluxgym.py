"""Reading what FluxGym wrote for a LoRA: `outputs/<name>/train.sh` (or `train.bat`), the
`dataset.toml` it names and `sample_prompts.txt`, and turning them into a job file.

Stdlib only (the CLI never imports the trainer's libraries). The script is read, never run:
line continuations (`\\` in sh, `^` in Windows batch), quoting, and the `accelerate launch`
options before the script are taken apart as a shell would.
"""
from __future__ import annotations

import os
import shlex
import tomllib
from dataclasses import dataclass, field

# kohya's optimizer names (case-insensitive there) → ours
OPTIMIZERS = {"adamw": "AdamW", "adamw8bit": "AdamW8bit", "adafactor": "Adafactor",
              "prodigy": "Prodigy"}
# kohya flag → our [train] key, for values that mean the same
SAME = {"pretrained_model_name_or_path": "pretrained_model", "clip_l": "clip_l",
        "t5xxl": "t5xxl", "ae": "ae", "seed": "seed", "network_dim": "network_dim",
        "network_alpha": "network_alpha", "learning_rate": "learning_rate",
        "lr_scheduler": "lr_scheduler", "lr_warmup_steps": "lr_warmup_steps",
        "max_grad_norm": "max_grad_norm", "max_train_epochs": "max_train_epochs",
        "max_train_steps": "max_train_steps", "save_every_n_epochs": "save_every_n_epochs",
        "save_every_n_steps": "save_every_n_steps", "timestep_sampling": "timestep_sampling",
        "discrete_flow_shift": "discrete_flow_shift", "sigmoid_scale": "sigmoid_scale",
        "guidance_scale": "guidance_scale", "gradient_checkpointing": "gradient_checkpointing",
        "fp8_base": "fp8_base", "cpu_offload_checkpointing": "cpu_offload_checkpointing",
        "gradient_accumulation_steps": "gradient_accumulation_steps",
        "t5xxl_max_token_length": "t5xxl_max_token_length",
        "sample_every_n_steps": "sample_every_n_steps", "optimizer_args": "optimizer_args"}
INTS = {"seed", "network_dim", "lr_warmup_steps", "max_train_epochs", "max_train_steps",
        "save_every_n_epochs", "save_every_n_steps", "gradient_accumulation_steps",
        "t5xxl_max_token_length", "sample_every_n_steps"}
FLOATS = {"network_alpha", "learning_rate", "max_grad_norm", "discrete_flow_shift",
          "sigmoid_scale", "guidance_scale"}
# What our trainer already does the same way, or decides by itself: nothing to carry over
BUILT_IN = {"cache_latents_to_disk", "cache_latents", "cache_text_encoder_outputs",
            "cache_text_encoder_outputs_to_disk", "save_model_as", "sdpa",
            "persistent_data_loader_workers", "max_data_loader_n_workers", "mixed_precision",
            "save_precision", "network_module", "highvram", "dataset_config", "output_dir",
            "output_name", "model_prediction_type", "loss_type", "sample_prompts",
            "num_cpu_threads_per_process"}
PATH_FLAGS = ("pretrained_model_name_or_path", "clip_l", "t5xxl", "ae", "dataset_config",
              "sample_prompts", "output_dir")


class FluxGymImportError(Exception):
    """Something in the FluxGym files that cannot be read; the message says what."""


@dataclass
class Script:
    path: str
    launcher: dict[str, list[str]]  # accelerate launch's own options
    script: str  # e.g. sd-scripts/flux_train_network.py
    args: dict[str, list[str]]  # --flag -> its values ([] for a switch)
    order: list[str] = field(default_factory=list)

    def flags(self):
        """(flag, values) in the script's order, each flag once (argparse keeps the last)."""
        for flag in dict.fromkeys(self.order):
            yield flag, self.args[flag]


def _tokens(text: str, windows: bool) -> list[str]:
    lines = []
    cont = "^" if windows else "\\"
    for line in text.splitlines():
        stripped = line.rstrip()
        if stripped.endswith(cont):
            lines.append(stripped[:-1])
        else:
            lines.append(stripped)
            lines.append("\n")
    joined = " ".join(lines)
    if windows:
        lexer = shlex.shlex(joined, posix=False)
        lexer.whitespace_split = True
        return [t[1:-1] if len(t) > 1 and t[0] == t[-1] == '"' else t for t in lexer]
    return shlex.split(joined, comments=True)


def _options(tokens: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    out: dict[str, list[str]] = {}
    order: list[str] = []
    key = None
    for tok in tokens:
        if tok.startswith("--"):
            key = tok[2:].split("=", 1)[0]
            out[key] = [tok.split("=", 1)[1]] if "=" in tok else []
            order.append(key)
        elif key is not None:
            out[key].append(tok)
    return out, order


def read_script(path: str) -> Script:
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as e:
        raise FluxGymImportError(f"cannot read {path}: {e}") from None
    windows = path.lower().endswith(".bat")
    try:
        tokens = [t for t in _tokens(text, windows) if t != "\n"]
    except ValueError as e:
        raise FluxGymImportError(f"{path}: {e} (unbalanced quotes?)") from None
    script_at = next((i for i, t in enumerate(tokens) if t.endswith(".py")), None)
    if script_at is None:
        raise FluxGymImportError(f"{path} runs no Python script (no *.py argument); is it a "
                                 "FluxGym train.sh?")
    head = tokens[:script_at]
    launch = head.index("launch") + 1 if "launch" in head else len(head)
    launcher, _ = _options(head[launch:])
    args, order = _options(tokens[script_at + 1:])
    return Script(path, launcher, tokens[script_at], args, order)


def flag(args: list[str], name: str) -> str | None:
    """The last value given to --name (argparse keeps the last)."""
    value = None
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args) and not args[i + 1].startswith("--"):
            value = args[i + 1]
        elif a.startswith(name + "="):
            value = a.split("=", 1)[1]
    return value


def without(args: list[str], names: dict[str, int]) -> list[str]:
    """args less the flags in `names` (name -> how many values follow it)."""
    out, i = [], 0
    while i < len(args):
        a = args[i]
        head = a.split("=", 1)[0]
        if head in names:
            i += 1 + (names[head] if "=" not in a else 0)
            continue
        out.append(a)
        i += 1
    return out


def locate(path: str) -> str:
    """A FluxGym output folder or its script → the script's path."""
    if os.path.isdir(path):
        for name in ("train.sh", "train.bat"):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise FluxGymImportError(f"{path} has no train.sh or train.bat; give a FluxGym output "
                                 "folder or the script itself")
    if not os.path.isfile(path):
        raise FluxGymImportError(f"{path} does not exist")
    return path


def remap(value: str, maps: list[tuple[str, str]]) -> str:
    for old, new in maps:
        if value == old or value.startswith(old.rstrip("/") + "/"):
            return new.rstrip("/") + value[len(old.rstrip("/")):]
    return value


# Files FluxGym writes beside train.sh (outputs/<name>/): a folder copied to another machine
# keeps them together while the script's absolute paths point at the old one.
BESIDE_FLAGS = ("dataset_config", "sample_prompts")


def _found_beside(script: Script, flag: str, value: str, notes: list[str]) -> str:
    """value, or the file of that name beside the script when value does not exist here."""
    if flag not in BESIDE_FLAGS or os.path.exists(value):
        return value
    # a Windows path (FluxGym's train.bat) names its file after a backslash
    name = value.replace("\\", "/").rsplit("/", 1)[-1]
    here = os.path.join(os.path.dirname(os.path.abspath(script.path)), name)
    if name and os.path.isfile(here):
        notes.append(f"--{flag} {value} is not here; using {here}, the {name} beside the "
                     "script")
        return here
    return value


@dataclass
class Imported:
    name: str
    train: dict
    missing: list[str]  # "--flag: path" that do not exist here
    no_counterpart: list[str]  # settings with nothing like them in our trainer
    notes: list[str] = field(default_factory=list)  # what the import decided, for the user


def _one(args: dict[str, list[str]], flag: str) -> str | None:
    values = args.get(flag)
    return values[0] if values else None


def as_lora(script: Script, maps: list[tuple[str, str]], name: str | None = None) -> Imported:
    args = {k: list(v) for k, v in script.args.items()}
    notes: list[str] = []
    for flag in PATH_FLAGS:
        if args.get(flag):
            args[flag] = [_found_beside(script, flag, remap(args[flag][0], maps), notes)]
    missing = [f"--{flag}: {args[flag][0]}" for flag in PATH_FLAGS
               if args.get(flag) and flag != "output_dir" and not os.path.exists(args[flag][0])]
    train: dict = {}
    no_counterpart: list[str] = []
    for flag in script.order:
        values = args[flag]
        if flag in SAME:
            key = SAME[flag]
            if flag == "optimizer_args":
                train[key] = values
            elif not values:
                train[key] = True
            elif key in INTS:
                train[key] = int(float(values[0]))
            elif key in FLOATS:
                train[key] = float(values[0])
            else:
                train[key] = values[0]
        elif flag == "optimizer_type":
            kind = (values or [""])[0]
            if kind.lower() in OPTIMIZERS:
                train["optimizer_type"] = OPTIMIZERS[kind.lower()]
            else:
                no_counterpart.append(f"--optimizer_type {kind}")
        elif flag not in BUILT_IN:
            no_counterpart.append(" ".join(["--" + flag, *values]))
    if "optimizer_type" in train or "fp8_base" in train:
        # FluxGym chose these levers for its VRAM preset; keep them, and the tier out of it
        train.setdefault("vram", "none")
    config = _one(args, "dataset_config")
    if config:
        _dataset(config, maps, train, missing, no_counterpart)
    prompts = _one(args, "sample_prompts")
    if prompts and os.path.isfile(prompts):
        with open(prompts, encoding="utf-8") as fh:
            lines = [line.strip() for line in fh if line.strip()
                     and not line.lstrip().startswith("#")]
        # kohya's per-prompt options ("--w 512") have no counterpart: keep the text
        train["sample_prompts"] = [line.split(" --", 1)[0].strip() for line in lines]
    out_name = name or _one(args, "output_name") or os.path.basename(
        os.path.dirname(os.path.abspath(script.path)))
    return Imported(out_name, train, missing, no_counterpart, notes)


@dataclass
class ImportedKohya:
    name: str
    kohya: dict  # the job's [kohya] section
    missing: list[str]  # "--flag: path" that do not exist here
    dataset_copy: str | None  # the dataset.toml text with its paths remapped, when they were
    notes: list[str]


def as_kohya(script: Script, maps: list[tuple[str, str]], name: str | None = None,
             sd_scripts: str | None = None) -> ImportedKohya:
    """The script as a kind = "kohya" job: the same arguments for the same sd-scripts, paths
    remapped, --output_dir left to fluxgymd (it owns the job's folder)."""
    args: list[str] = []
    missing: list[str] = []
    notes: list[str] = []
    for flag, values in script.flags():
        values = list(values)
        if flag == "output_dir":
            notes.append(f"--output_dir {values[0] if values else ''}: fluxgymd writes to the "
                         "job's own folder instead")
            continue
        if flag in PATH_FLAGS and values:
            values = [_found_beside(script, flag, remap(values[0], maps), notes)] + values[1:]
            if not os.path.exists(values[0]):
                missing.append(f"--{flag}: {values[0]}")
        args += ["--" + flag, *values]
    dataset_copy = None
    config = _one(script.args, "dataset_config")
    if config:
        config = _found_beside(script, "dataset_config", remap(config, maps), [])
        try:
            with open(config, encoding="utf-8") as fh:
                text = fh.read()
            doc = tomllib.loads(text)
        except (OSError, tomllib.TOMLDecodeError):
            doc, text = {}, ""
        for ds in doc.get("datasets") or []:
            for sub in ds.get("subsets") or []:
                old = sub.get("image_dir")
                if isinstance(old, str):
                    new = remap(old, maps)
                    if new != old:
                        text = text.replace(f"'{old}'", f"'{new}'").replace(f'"{old}"',
                                                                            f'"{new}"')
                        dataset_copy = text
                    if not os.path.isdir(new):
                        missing.append(f"image_dir in {config}: {new}")
    here = os.path.dirname(os.path.abspath(script.path))
    if sd_scripts is None:
        # FluxGym runs outputs/<name>/train.sh from its own folder, two levels up
        root = os.path.normpath(os.path.join(here, "..", ".."))
        sd_scripts = os.path.normpath(os.path.join(root, os.path.dirname(script.script)))
    if not os.path.isfile(os.path.join(sd_scripts, os.path.basename(script.script))):
        missing.append(f"sd-scripts checkout (--sd-scripts): {sd_scripts}")
    kohya: dict = {"sd_scripts": sd_scripts, "script": os.path.basename(script.script),
                   "args": args}
    launch = script.launcher
    if launch.get("mixed_precision"):
        kohya["mixed_precision"] = launch["mixed_precision"][0]
    threads = (launch.get("num_cpu_threads_per_process") or [""])[0]
    if threads.isdigit():
        kohya["num_cpu_threads_per_process"] = int(threads)
    out_name = name or _one(script.args, "output_name") or os.path.basename(here)
    return ImportedKohya(out_name, kohya, missing, dataset_copy, notes)


def _dataset(path: str, maps, train: dict, missing: list[str], no_counterpart: list[str]):
    try:
        with open(path, "rb") as fh:
            doc = tomllib.load(fh)
    except FileNotFoundError:
        return  # already reported as missing
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise FluxGymImportError(f"{path}: {e}") from None
    datasets = doc.get("datasets") or []
    if not datasets:
        raise FluxGymImportError(f"{path} has no [[datasets]]")
    ds = datasets[0]
    subsets = ds.get("subsets") or []
    if len(datasets) > 1 or len(subsets) > 1:
        no_counterpart.append(f"{path}: more than one dataset or subset (only the first is used)")
    if "resolution" in ds:
        res = ds["resolution"]
        train["resolution"] = int(res[0] if isinstance(res, list) else res)
    if "batch_size" in ds:
        train["train_batch_size"] = int(ds["batch_size"])
    if subsets:
        sub = subsets[0]
        if sub.get("image_dir"):
            train["dataset_dir"] = remap(sub["image_dir"], maps)
            if not os.path.isdir(train["dataset_dir"]):
                missing.append(f"image_dir in {path}: {train['dataset_dir']}")
        if sub.get("class_tokens"):
            train["trigger_word"] = sub["class_tokens"]
        if "num_repeats" in sub:
            train["num_repeats"] = int(sub["num_repeats"])
    general = doc.get("general") or {}
    if general.get("shuffle_caption"):
        no_counterpart.append("shuffle_caption = true")
