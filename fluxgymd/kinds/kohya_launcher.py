"""fluxgymd's launcher for kohya sd-scripts: run with sd-scripts' own Python, never with ours.

    python kohya_launcher.py --check SCRIPT [ARG...]   validate the arguments (JSON on stdout)
    python kohya_launcher.py SCRIPT [ARG...]           train, as `python SCRIPT ARG...` would

It imports nothing of fluxgymd (that package is not in sd-scripts' venv) and changes no file of
sd-scripts. It runs the script in this process and fixes, from outside, what sd-scripts does
not do for a supervised run. Each fix says so on stderr in a line starting `fluxgymd-kohya:`.

- SIGTERM: sd-scripts saves nothing. Here the first SIGTERM saves a state at the next step
  boundary and exits 75 (interrupted, resume me). Before the first step of this attempt there
  is nothing newer than the last state to save: it exits 75 at once. DataLoader workers move
  to a process group of their own (the daemon signals the job's whole group), so they cannot
  die under the trainer before its save; they die with it (PR_SET_PDEATHSIG).
- The step count on resume: sd-scripts (48d368f) sets `global_step` to the resumed step minus
  the skipped epochs' batches, so a run resumed past its first epoch trains that many steps
  too many and names its states wrongly. The launcher recompiles `NetworkTrainer.train` with
  that one assignment set to the step in the state's train_state.json.
- Exact resume: each epoch's data order is drawn from (seed, epoch) alone, and the loader's
  draws leave the training RNG untouched, so an attempt resumed inside an epoch, or with
  persistent DataLoader workers, sees the same images in the same order as the straight run.
- The progress bar starts at the resumed step, out of max_train_steps (sd-scripts restarts it
  at 0 out of the steps left), so every attempt prints the run's true step.
- KeyError: 'step' (accelerate 0.32-0.33 reading states saved by older versions): the loaded
  attributes always carry `step` (0: states are saved at optimizer-step boundaries).
- SIGUSR1 (the watchdog's stack-dump request when it judges the run stalled) prints every
  thread's stack to stderr, as fluxgymd's own trainer does, instead of ending the process.
- After each state save a line `fluxgymd-kohya: state saved DIR`, after each sampling one
  `fluxgymd-kohya: sample PATH` per new image: the daemon follows checkpoints and samples.
- Save now / sample now (`fluxgymctl save-now`, `sample-now`): at each step boundary the
  requests the daemon left in `$FLUXGYM_OUTPUT_DIR/.control/` (the contract's files, as
  trainer/contract.py takes them) are taken: a state saved at that step, or the sample
  prompts drawn at it (sd-scripts' own sampling, which restores the RNG it used).
"""
from __future__ import annotations

import faulthandler
import json
import os
import random
import runpy
import signal
import sys

TAG = "fluxgymd-kohya:"
EXIT_INTERRUPTED = 75
CONTROL_DIR, CONTROLS = ".control", ("save", "sample")  # as trainer/contract.py
PATH_FLAGS = ("pretrained_model_name_or_path", "clip_l", "t5xxl", "ae", "dataset_config",
              "train_data_dir", "reg_data_dir", "sample_prompts", "network_weights", "resume",
              "tokenizer_cache_dir", "config_file", "in_json")


def say(msg: str) -> None:
    print(f"{TAG} {msg}", file=sys.stderr, flush=True)


# --- --check ------------------------------------------------------------------------------
class _ArgError(Exception):
    pass


def check(script: str, argv: list[str]) -> dict:
    """What is wrong with these arguments, judged by the script's own parser."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    module = runpy.run_path(script, run_name="fluxgymd_kohya_check")
    if "setup_parser" not in module:
        return {"ok": False, "errors": [f"{script} has no setup_parser(): is it an sd-scripts "
                                        "training script?"]}
    parser = module["setup_parser"]()

    def error(message):
        raise _ArgError(message)
    parser.error = error
    errors: list[str] = []
    try:
        args = parser.parse_args(argv)
    except _ArgError as e:
        return {"ok": False, "errors": [f"sd-scripts refuses the arguments: {e}"]}
    if getattr(args, "config_file", None):
        from library import train_util
        try:
            args = train_util.read_config_from_file(args, parser)
        except (SystemExit, Exception) as e:  # it exits when the file is missing
            errors.append(f"--config_file {args.config_file}: cannot be read ({e})")
    for flag in PATH_FLAGS:
        value = getattr(args, flag, None)
        if isinstance(value, str) and value and not os.path.exists(value):
            if flag == "pretrained_model_name_or_path" and "/" in value and \
                    not value.startswith(("/", ".")) and value.count("/") == 1:
                continue  # a hub id: sd-scripts resolves it itself
            errors.append(f"--{flag} {value}: no such file or folder")
    if getattr(args, "dataset_config", None) and os.path.isfile(args.dataset_config):
        errors.extend(_dataset_problems(args.dataset_config))
    elif not getattr(args, "dataset_config", None) and not getattr(args, "train_data_dir", None):
        errors.append("no dataset: give --dataset_config (FluxGym's dataset.toml) or "
                      "--train_data_dir")
    return {"ok": not errors, "errors": errors,
            "output_name": getattr(args, "output_name", None),
            "save_model_as": getattr(args, "save_model_as", None) or "safetensors",
            "max_train_steps": getattr(args, "max_train_steps", None),
            "max_train_epochs": getattr(args, "max_train_epochs", None)}


def _dataset_problems(path: str) -> list[str]:
    import toml
    try:
        doc = toml.load(path)
    except Exception as e:
        return [f"--dataset_config {path}: not valid TOML ({e})"]
    out = []
    for i, ds in enumerate(doc.get("datasets", [])):
        for j, sub in enumerate(ds.get("subsets", [])):
            for key in ("image_dir", "metadata_file", "conditioning_data_dir"):
                p = sub.get(key)
                if isinstance(p, str) and not os.path.exists(p):
                    out.append(f"--dataset_config {path}: datasets[{i}].subsets[{j}].{key} "
                               f"{p}: no such folder")
    return out


# --- training -------------------------------------------------------------------------------
class _Run:
    stop = False  # SIGTERM seen
    stepped = False  # a step of this attempt completed: a stop must save first
    resumed_step = 0
    args = None
    samples_seen: set[str] = set()


def _resumed_step(argv: list[str]) -> int:
    if "--resume" not in argv:
        return 0
    i = argv.index("--resume")
    try:
        with open(os.path.join(argv[i + 1], "train_state.json"), encoding="utf-8") as fh:
            return int(json.load(fh)["current_step"])
    except (IndexError, OSError, ValueError, KeyError, TypeError):
        return 0


def _on_sigterm(signum, frame):
    if _Run.stop:
        return
    _Run.stop = True
    if not _Run.stepped:
        say("SIGTERM before the first step of this attempt: nothing new to save; exit 75")
        raise SystemExit(EXIT_INTERRUPTED)
    say("SIGTERM: saving state at the next step boundary, then exit 75")


def _worker_leaves_the_group(loop):
    """DataLoader workers in a process group of their own: the daemon's SIGTERM to the job's
    group cannot kill them under the trainer before it saves (torch's SIGCHLD handler would
    raise in the trainer). They die with the trainer instead (PR_SET_PDEATHSIG), and its own
    terminate() at exit still reaches them."""
    trainer = os.getpid()

    def worker_loop(*a, **kw):
        try:
            os.setpgid(0, 0)
            import ctypes
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
        if os.getppid() != trainer:
            os._exit(0)  # the trainer died before the death signal was armed
        return loop(*a, **kw)
    return worker_loop


def _random_samplers(obj, depth: int = 0):
    import torch.utils.data as tud
    if obj is None or depth > 4:
        return
    if isinstance(obj, tud.RandomSampler):
        yield obj
        return
    for name in ("sampler", "batch_sampler", "base_dataloader"):
        child = getattr(obj, name, None)
        if child is not None and child is not obj:
            yield from _random_samplers(child, depth + 1)


def _catch_up(loader, epoch: int):
    """sd-scripts sets a dataset copy's epoch in the collate function, after the batch was
    fetched with the copy's previous bucket order. So in the straight run a worker's first
    batch of an epoch uses the order it had before (a persistent worker: the previous epoch's;
    a fresh one: the trainer's copy, epoch 0), and its later batches this epoch's. A resumed
    attempt's fresh workers start inside an epoch: their copy (forked from the trainer's) is
    set to what the straight run's workers had at that batch. Returns an undo for after the
    fork, or None (without workers the trainer's own copy goes on from here)."""
    base = getattr(loader, "base_dataloader", loader)
    dataset = getattr(base, "dataset", None)
    copies = getattr(dataset, "datasets", [dataset])
    if dataset is None or not hasattr(dataset, "set_current_epoch") or \
            not all(hasattr(d, "buckets_indices") for d in copies):
        return None
    workers = base.num_workers
    persistent = getattr(base, "persistent_workers", False)
    if workers and persistent and getattr(base, "_iterator", None) is not None:
        return None  # the straight run's own persistent workers: nothing to imitate
    # a resumed loader skips the trained batches, and sd-scripts drops one more: when every
    # fresh worker's first batch that counts lies past the first `workers` batches, the
    # straight run's workers had all moved to this epoch's order by then
    skip = getattr(getattr(base, "batch_sampler", None), "skip_batches", 0) or 0
    if not workers:
        target = epoch - 1
    elif skip and skip + 1 >= workers:
        target = epoch
    else:
        target = epoch - 1 if persistent else 0
    if target < 1 or all(getattr(d, "current_epoch", 0) >= target for d in copies):
        return None
    saved = [(d, d.current_epoch, list(d.buckets_indices),
              [list(b) for b in getattr(getattr(d, "bucket_manager", None), "buckets", [])])
             for d in copies]
    dataset.set_current_epoch(target)
    if not workers:
        return None

    def undo():
        for d, epoch_was, indices, buckets in saved:
            d.current_epoch, d.buckets_indices = epoch_was, indices
            for live, old in zip(getattr(getattr(d, "bucket_manager", None), "buckets", []),
                                 buckets):
                live[:] = old
    return undo


def _keyed_epochs(data_loader_cls) -> None:
    """Each epoch's data order from (seed, epoch) alone, and the training RNG untouched by the
    loader. sd-scripts draws an epoch's order from the global RNG when the epoch's loader
    starts (and a new loader also draws its workers' seed): a resumed attempt starts its loader
    at the state's RNG, not the epoch's start, and with persistent workers the straight run
    draws fewer numbers than a resumed one. Either way the rest of the epoch would differ."""
    import torch
    orig = data_loader_cls.__iter__

    def keyed_iter(self):
        counter = getattr(getattr(self, "collate_fn", None), "current_epoch", None)
        if counter is None or _Run.args is None:
            yield from orig(self)
            return
        key = (int(getattr(_Run.args, "seed", None) or 0) * 1_000_003 + int(counter.value)) \
            % (2 ** 63)
        for sampler in _random_samplers(self):
            sampler.generator = torch.Generator().manual_seed(key)
        training_rng, python_rng = torch.get_rng_state(), random.getstate()
        torch.manual_seed(key)
        undo = _catch_up(self, int(counter.value))
        it = orig(self)
        try:
            first = next(it)  # the workers are forked by now
        except StopIteration:
            return
        finally:
            if undo is not None:
                undo()
            torch.set_rng_state(training_rng)
            random.setstate(python_rng)
        yield first
        yield from it
    data_loader_cls.__iter__ = keyed_iter


def _patch_step_count(train_network) -> None:
    """sd-scripts' epoch skip leaves global_step at the step within the epoch."""
    import inspect
    import textwrap
    cls = train_network.NetworkTrainer
    src = textwrap.dedent(inspect.getsource(cls.train))
    anchor = "for skip_epoch in range(epoch_to_start):"
    bad = "global_step = initial_step\n"
    at = src.find(anchor)
    end = src.find(bad, at) if at >= 0 else -1
    if end < 0:
        say("step count on resume: this sd-scripts has no epoch-skip assignment to fix")
        return
    src = src[:end] + "global_step = _fluxgymd_resumed_step(initial_step)\n" + \
        src[end + len(bad):]
    ns = train_network.__dict__
    ns["_fluxgymd_resumed_step"] = lambda fallback: _Run.resumed_step or fallback
    code = compile(src, inspect.getsourcefile(cls.train), "exec")
    local: dict = {}
    exec(code, ns, local)
    cls.train = local["train"]


def _install(argv: list[str]) -> None:
    import accelerate
    import accelerate.accelerator
    import accelerate.checkpointing
    import accelerate.data_loader
    import torch.utils.data._utils.worker as worker
    import train_network
    from library import train_util

    worker._worker_loop = _worker_leaves_the_group(worker._worker_loop)
    _keyed_epochs(accelerate.data_loader.DataLoaderShard)
    _Run.resumed_step = _resumed_step(argv)
    if _Run.resumed_step:
        _patch_step_count(train_network)

    load = accelerate.checkpointing.load_accelerator_state

    def load_with_step(*a, **kw):
        attrs = load(*a, **kw)
        if isinstance(attrs, dict) and "step" not in attrs:
            say("this state has no accelerate 'step' (saved by an older accelerate): using 0")
            attrs["step"] = 0
        return attrs
    accelerate.checkpointing.load_accelerator_state = load_with_step
    accelerate.accelerator.load_accelerator_state = load_with_step

    save_state = accelerate.Accelerator.save_state

    def save_state_and_say(self, output_dir=None, *a, **kw):
        result = save_state(self, output_dir, *a, **kw)
        say(f"state saved {os.path.abspath(output_dir or result)}")
        return result
    accelerate.Accelerator.save_state = save_state_and_say

    tqdm = train_network.tqdm

    def steps_bar(*a, **kw):
        if kw.get("desc") == "steps" and _Run.args is not None:
            kw["initial"] = _Run.resumed_step
            kw["total"] = _Run.args.max_train_steps
        return tqdm(*a, **kw)
    train_network.tqdm = steps_bar

    train = train_network.NetworkTrainer.train

    def supervised_train(self, args):
        _Run.args = args
        sample = self.sample_images

        def sample_then_maybe_stop(accelerator, args, epoch, global_step, *rest, **kw):
            result = sample(accelerator, args, epoch, global_step, *rest, **kw)
            _report_samples(args.output_dir)
            if epoch is None and global_step > 0:
                if not _Run.stepped and _Run.resumed_step and \
                        global_step != _Run.resumed_step + 1:
                    say(f"warning: resumed at step {_Run.resumed_step} but the first step is "
                        f"{global_step}: the step count is off")
                _Run.stepped = True
                _requests(sample, accelerator, args, global_step, rest, kw)
                if _Run.stop:
                    say(f"stopping after step {global_step}")
                    train_util.save_and_remove_state_stepwise(args, accelerator, global_step)
                    raise SystemExit(EXIT_INTERRUPTED)
            return result
        self.sample_images = sample_then_maybe_stop
        return train(self, args)
    train_network.NetworkTrainer.train = supervised_train


def _take_requests() -> list[str]:
    """The daemon's requests waiting in the job's folder, each taken once."""
    folder = os.path.join(os.environ.get("FLUXGYM_OUTPUT_DIR") or ".", CONTROL_DIR)
    taken = []
    for action in CONTROLS:
        try:
            os.unlink(os.path.join(folder, action))
            taken.append(action)
        except OSError:
            pass
    return taken


def _requests(sample, accelerator, args, global_step, rest, kw) -> None:
    from library import train_util

    for action in _take_requests():
        if action == "save":
            say(f"save now (asked by fluxgymd) at step {global_step}")
            train_util.save_and_remove_state_stepwise(args, accelerator, global_step)
        elif action == "sample" and getattr(args, "sample_prompts", None):
            say(f"sample now (asked by fluxgymd) at step {global_step}")
            every = (args.sample_every_n_steps, args.sample_every_n_epochs)
            args.sample_every_n_steps, args.sample_every_n_epochs = 1, None  # due now
            try:
                sample(accelerator, args, None, global_step, *rest, **kw)
            finally:
                args.sample_every_n_steps, args.sample_every_n_epochs = every
            _report_samples(args.output_dir)
        else:
            say("sample now: this run has no --sample_prompts; nothing drawn")


def _report_samples(output_dir: str) -> None:
    folder = os.path.join(output_dir, "sample")
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return
    for n in names:
        if n not in _Run.samples_seen and n.lower().endswith((".png", ".jpg", ".jpeg", ".webp")):
            _Run.samples_seen.add(n)
            say(f"sample {os.path.join(os.path.abspath(folder), n)}")


def main(argv: list[str]) -> int:
    if argv[:1] == ["--check"]:
        if len(argv) < 2:
            print(json.dumps({"ok": False, "errors": ["no script given"]}))
            return 2
        try:
            result = check(argv[1], argv[2:])
        except Exception as e:  # the script failed to import: say what, don't crash silently
            result = {"ok": False, "errors": [f"{argv[1]} could not be loaded with this "
                                              f"Python: {type(e).__name__}: {e}"]}
        print(json.dumps(result))
        return 0 if result["ok"] else 1
    if not argv:
        print("usage: kohya_launcher.py [--check] SCRIPT [ARG...]", file=sys.stderr)
        return 2
    script, args = argv[0], argv[1:]
    signal.signal(signal.SIGTERM, _on_sigterm)
    # the watchdog asks a stalled run for its stacks with SIGUSR1 (the contract's dump);
    # Python's default for it would end the run before it can save
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    if any(x in os.path.basename(script) for x in ("train_network", "_train_network")):
        _install(args)
    else:
        say(f"{os.path.basename(script)} is not a *train_network.py script: run as is "
            "(a stop saves nothing)")
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
