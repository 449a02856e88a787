"""The training loop, top to bottom: load, cache, resume, train, checkpoint, sample, save.

Exit codes: 0 finished (the LoRA is written), 75 interrupted with a checkpoint (resumable),
2 bad job file or dataset (the message says what to fix), 1 a crash.
"""
from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import time
from dataclasses import dataclass

from . import checkpoint as ckpt
from .config import PATH_KEYS, TrainConfig, TrainError, lora_targets
from .tiers import TIERS
from .contract import EXIT_INTERRUPTED, Reporter, Stop, StopNow, take as take_requests
from .data import (assign_bucket, buckets, dataset_hash, epoch_batches, max_caption_chars,
                   scan)

# Settings a checkpoint must agree with to be resumed from: anything that changes what the
# saved state means. max_train_steps may change (train longer); these may not.
RESUME_KEYS = ("pretrained_model", "clip_l", "t5xxl", "ae", "network_dim", "network_alpha",
               "network_target_modules",
               "resolution", "train_batch_size", "gradient_accumulation_steps", "num_repeats",
               "seed", "timestep_sampling", "discrete_flow_shift", "sigmoid_scale",
               "guidance_scale", "learning_rate", "lr_scheduler", "lr_warmup_steps",
               "weight_decay", "max_grad_norm", "mixed_precision", "optimizer_args")
STATE_LEVERS = ("fp8_base", "quantize_base", "optimizer_type")
# What checkpoints written before a key existed were made with: no extra part files, and
# the levers of what is now the `none` tier
LEGACY = {"clip_l": "", "t5xxl": "", "ae": "", "optimizer_args": [],
          **{k: TIERS["none"][k] for k in STATE_LEVERS}}


@dataclass
class Plan:
    batches_per_epoch: int
    total_steps: int

    def epoch_of(self, micro: int) -> tuple[int, int]:
        return divmod(micro, self.batches_per_epoch)


def plan(cfg: TrainConfig, n_batches: int) -> Plan:
    accum = cfg.gradient_accumulation_steps
    if cfg.max_train_steps:
        total = cfg.max_train_steps
    else:
        total = math.ceil(cfg.max_train_epochs * n_batches / accum)
    return Plan(n_batches, total)


def _free(torch) -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def step_seed(seed: int, micro: int) -> int:
    # A distinct, reproducible stream per micro-batch; no state carried between steps.
    return (seed * 1_000_003 + micro * 7_919 + 17) % (2**63 - 1)


def run(cfg: TrainConfig, name: str, out: str, fresh: bool) -> int:
    stop = Stop()
    rep = Reporter()
    try:
        return _run(cfg, name, out, fresh, stop, rep)
    except StopNow as e:
        rep.say(f"stopped by {e.signame} before training started; nothing to save "
                "(exit 75, resumable)")
        return EXIT_INTERRUPTED
    finally:
        rep.close()


def _run(cfg: TrainConfig, name: str, out: str, fresh: bool, stop: Stop, rep: Reporter) -> int:
    ckpt.hold_output(out)  # first: one trainer per output folder, ever
    rep.phase("loading", f"{cfg.pretrained_model}")
    from .preflight import check_model

    for problem in check_model(cfg):  # not a Flux pipeline: nothing a retry could change
        raise TrainError(problem)
    items = scan(cfg.dataset_dir, cfg.trigger_word, max_caption_chars(cfg.t5xxl_max_token_length),
                 rep.say, cfg.resolution)
    os.makedirs(out, exist_ok=True)
    ckpt_root = os.path.join(out, "checkpoints")
    if fresh and os.path.isdir(ckpt_root):
        aside = f"{ckpt_root}.old-{time.strftime('%Y%m%d-%H%M%S')}"
        os.rename(ckpt_root, aside)
        rep.say(f"--fresh: moved the previous checkpoints to {aside}")

    import torch
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    from . import flux, memory, models, optim, quiet, sources
    from .lora import save_lora

    quiet()
    mp = cfg.mixed_precision
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() else "no"
    accelerator = Accelerator(mixed_precision=mp)
    if torch.cuda.is_available():
        # cuDNN's attention backward gives inf/nan gradients for Flux in bf16 (H200, torch
        # 2.11): measured by bench/gpu_checks.sh; flash and memory-efficient are exact.
        torch.backends.cuda.enable_cudnn_sdp(False)
    device = accelerator.device
    dtype = torch.bfloat16 if mp == "bf16" else torch.float32
    try:
        src = sources.resolve(cfg.pretrained_model, cfg.clip_l, cfg.t5xxl, cfg.ae, cfg.tokenizers)
    except sources.SourceError as e:
        raise TrainError(str(e)) from None
    if src.problems:
        raise TrainError("; ".join(src.problems))
    rep.say(f"model: {src.describe()}")
    lever = memory.choose_levers(cfg, src, ckpt_root, device, rep)
    divisor = models.vae_scale_factor(src) * 2
    choices = buckets(cfg.resolution, divisor)
    bucket_of = [assign_bucket(it.width, it.height, choices) for it in items]

    # --- caching: load each frozen encoder only when an entry it makes is missing, use
    # it, and free it before the next part loads; a resume with a complete cache loads none
    rep.phase("caching", f"{len(items)} images in {len(set(bucket_of))} bucket(s)")
    cache = flux.Cache(os.path.join(out, "cache"), src, cfg.t5xxl_max_token_length)
    captions = [it.caption for it in items] + cfg.sample_prompts
    need_vae = any(not os.path.exists(cache.latent_path(it, b))
                   for it, b in zip(items, bucket_of))
    loaded = []
    encoder = models.load_vae(src, dtype, device).to(device) if need_vae else None
    latents = flux.cache_latents(encoder, cache, items, bucket_of, device)
    if encoder is not None:
        loaded.append("VAE")
        del encoder
        _free(torch)
    texts, encoders = flux.cache_text(src, dtype, cache, captions, device,
                                      cfg.t5xxl_max_token_length, lambda: _free(torch))
    loaded += encoders
    rep.say("cache: encoded with " + ", then ".join(loaded) + " (each freed before the next)"
            if loaded else "cache: complete; text encoders and VAE not loaded")
    quantized = lever["quantize_base"] != "none"
    transformer = models.load_transformer(src, dtype, fp8=lever["fp8_base"],
                                          quantize=lever["quantize_base"] if quantized else "",
                                          device=device)
    vae = None  # for samples: loaded at the first one, kept on the CPU between them

    # --- the LoRA ------------------------------------------------------------------------
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=cfg.network_dim, lora_alpha=cfg.network_alpha,
                                       init_lora_weights="gaussian",
                                       target_modules=lora_targets(cfg.network_target_modules)))
    params = [p for p in transformer.parameters() if p.requires_grad]
    if not params:
        raise TrainError(f"train.network_target_modules {cfg.network_target_modules} match no "
                         "layer of this transformer")
    for p in params:
        p.data = p.data.float()  # LoRA weights train in fp32 even when the base is bf16 or less
    # The initial weights, drawn again in fp32: peft created them in the base layer's dtype
    # (fp8 under fp8_base), and the same seed must give the same LoRA in every tier.
    torch.manual_seed(cfg.seed)
    for module in transformer.modules():
        if hasattr(module, "reset_lora_parameters") and "default" in getattr(module, "lora_A", {}):
            module.reset_lora_parameters("default", "gaussian")
    if lever["gradient_checkpointing"]:
        transformer.enable_gradient_checkpointing()
    if not quantized:
        transformer.to(device)
    else:
        for p in params:
            p.data = p.data.to(device)
    optimizer = optim.make(lever["optimizer_type"], params, cfg)
    n_batches = len(epoch_batches(bucket_of, cfg.num_repeats, cfg.train_batch_size, cfg.seed, 0))
    p = plan(cfg, n_batches)
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                              num_training_steps=p.total_steps)
    transformer, optimizer = accelerator.prepare(transformer, optimizer)
    model = accelerator.unwrap_model(transformer)

    # --- resume -----------------------------------------------------------------------
    resume_meta = {k: getattr(cfg, k) for k in RESUME_KEYS}
    resume_meta["dataset_sha256"] = dataset_hash(items)
    # an optimizer's state belongs to its optimizer, and the base's storage changes the
    # numbers; checkpointing (recomputation) changes neither, so it may differ on resume
    resume_meta.update({k: lever[k] for k in STATE_LEVERS})
    start = 0
    for found in ckpt.complete(ckpt_root):
        why = ckpt.verify(found)
        if why:
            rep.say(f"checkpoint {found.path} is damaged ({why}); trying an older one")
            continue
        saved = found.manifest.get("resume", {})
        diff = [k for k in resume_meta if saved.get(k, LEGACY.get(k)) != resume_meta[k]]
        if diff:
            raise TrainError(
                f"{found.path} was made with different settings "
                + ", ".join(f"{k}={saved.get(k, LEGACY.get(k))!r} (now {resume_meta[k]!r})"
                            for k in diff)
                + "; restore them, or start over with --fresh")
        set_peft_model_state_dict(model, load_file(os.path.join(found.path, "lora.safetensors")))
        optimizer.load_state_dict(torch.load(os.path.join(found.path, "optimizer.pt"),
                                             weights_only=True))
        scheduler.load_state_dict(torch.load(os.path.join(found.path, "scheduler.pt"),
                                             weights_only=True))
        rng = torch.load(os.path.join(found.path, "rng.pt"), weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if torch.cuda.is_available() and rng.get("cuda"):
            torch.cuda.set_rng_state_all(rng["cuda"])
        start = found.step
        rep.say(f"resuming from {found.path} (step {start})")
        break

    def save_checkpoint(step: int) -> None:
        rep.phase("saving", f"checkpoint at step {step}")
        epoch, pos = p.epoch_of(step * cfg.gradient_accumulation_steps)
        rng = {"cpu": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        lora_sd = {k: v.detach().float().cpu().contiguous()
                   for k, v in get_peft_model_state_dict(model).items()}
        path = ckpt.save(ckpt_root, step, {
            "lora.safetensors": lambda f: save_file(lora_sd, f),
            "optimizer.pt": lambda f: torch.save(optimizer.state_dict(), f),
            "scheduler.pt": lambda f: torch.save(scheduler.state_dict(), f),
            "rng.pt": lambda f: torch.save(rng, f),
        }, {"resume": resume_meta, "levers": lever, "epoch": epoch, "batch_in_epoch": pos,
            "total_steps": p.total_steps, "name": name})
        ckpt.prune(ckpt_root, cfg.save_last_n_checkpoints)
        rep.checkpoint(path, step)

    def save_sample(step: int) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

        nonlocal vae
        rep.phase("sampling", f"{len(cfg.sample_prompts)} prompt(s) at step {step}")
        if vae is None:
            vae = models.load_vae(src, dtype, device)
        vae.to(device)
        sampler = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                               text_encoder=None, tokenizer=None, text_encoder_2=None,
                               tokenizer_2=None, transformer=model)
        sampler.set_progress_bar_config(disable=True)
        os.makedirs(os.path.join(out, "samples"), exist_ok=True)
        with torch.no_grad():
            for i, prompt in enumerate(cfg.sample_prompts):
                emb = texts[prompt]
                image = sampler(prompt_embeds=emb["prompt_embeds"][None].to(device, dtype),
                                pooled_prompt_embeds=emb["pooled"][None].to(device, dtype),
                                height=cfg.resolution, width=cfg.resolution,
                                num_inference_steps=cfg.sample_steps,
                                guidance_scale=cfg.sample_guidance_scale,
                                generator=torch.Generator().manual_seed(cfg.seed + i),
                                ).images[0]
                path = os.path.join(out, "samples", f"step-{step:08d}-{i:02d}.png")
                image.save(path)
                rep.sample(path, step)
        vae.to("cpu")
        rep.send("phase", phase="training")

    # --- train ------------------------------------------------------------------------
    accum = cfg.gradient_accumulation_steps
    epoch_cache: dict[int, list[list[int]]] = {}

    def batch_at(micro: int) -> list[int]:
        epoch, pos = p.epoch_of(micro)
        if epoch not in epoch_cache:
            epoch_cache.clear()
            epoch_cache[epoch] = epoch_batches(bucket_of, cfg.num_repeats, cfg.train_batch_size,
                                               cfg.seed, epoch)
        return epoch_cache[epoch][pos]

    def offload():
        # kohya's cpu_offload_checkpointing: what autograd keeps between the checkpointed
        # blocks waits in (pinned) CPU memory, and comes back for the backward
        if not lever["cpu_offload_checkpointing"]:
            return contextlib.nullcontext()
        return torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available())

    rep.phase("training", f"steps {start}..{p.total_steps}, {n_batches} batches per epoch")
    stop.deferred = True  # from here a stop waits for the step boundary and a checkpoint
    if stop:
        raise StopNow(stop.requested)
    rep.start_bar(start, p.total_steps)
    transformer.train()
    last_saved = start
    step = start
    while step < p.total_steps:
        if stop:
            break
        t0 = time.perf_counter()
        total_loss = 0.0
        for k in range(accum):
            micro = step * accum + k
            idx = batch_at(micro)
            g = torch.Generator().manual_seed(step_seed(cfg.seed, micro))
            lat = torch.stack([latents[i] for i in idx])
            emb = torch.stack([texts[items[i].caption]["prompt_embeds"] for i in idx])
            pooled = torch.stack([texts[items[i].caption]["pooled"] for i in idx])
            with accelerator.autocast(), offload():
                loss = flux.flow_matching_loss(transformer, lat, emb, pooled, cfg, g, device,
                                               dtype)
            accelerator.backward(loss / accum)
            total_loss += loss.item() / accum
        if cfg.max_grad_norm:
            accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        lr = scheduler.get_last_lr()[0]
        rep.step(step, total_loss, lr, time.perf_counter() - t0, cfg.log_every_n_steps)
        if not math.isfinite(total_loss):
            raise TrainError(f"the loss became {total_loss} at step {step}; lower "
                             "train.learning_rate or check the dataset")
        epoch_done = (step * accum) // n_batches > ((step - 1) * accum) // n_batches
        if (cfg.save_every_n_steps and step % cfg.save_every_n_steps == 0) or (
                cfg.save_every_n_epochs and epoch_done
                and ((step * accum) // n_batches) % cfg.save_every_n_epochs == 0):
            save_checkpoint(step)
            last_saved = step
            rep.send("phase", phase="training")  # back to steps: the step limit applies again
        if cfg.sample_every_n_steps and step % cfg.sample_every_n_steps == 0 and not stop:
            save_sample(step)
        for action in take_requests(out):  # `fluxgymctl save-now` / `sample-now`
            if action == "save" and step > last_saved:
                rep.say(f"save now (asked by fluxgymd) at step {step}")
                save_checkpoint(step)
                last_saved = step
                rep.send("phase", phase="training")
            elif action == "save":
                rep.say(f"save now: the checkpoint at step {step} is already saved")
            elif action == "sample" and cfg.sample_prompts and not stop:
                rep.say(f"sample now (asked by fluxgymd) at step {step}")
                save_sample(step)
            elif action == "sample":
                rep.say("sample now: this job has no sample_prompts; nothing drawn")

    if step < p.total_steps:  # stopped by a signal, at a step boundary
        if step > last_saved or not ckpt.complete(ckpt_root):
            save_checkpoint(step)
        rep.say(f"stopped by {stop.requested} at step {step}; resumable (exit 75)")
        return EXIT_INTERRUPTED
    if step > last_saved or not ckpt.complete(ckpt_root):
        save_checkpoint(step)  # the finished state: a rerun sees there is nothing left to do
    rep.phase("saving", "the final LoRA")
    public = cfg.to_dict()  # what travels with a published LoRA: names, not this machine's paths
    for key in PATH_KEYS + ("dataset_dir",):
        public[key] = os.path.basename(os.path.normpath(public[key])) if public[key] else ""
    public.update(lever)  # the levers it trained with, whichever tier set them
    path = save_lora(model, out, name, cfg.save_lora_format, src.transformer.config, {
        "base_model": public["pretrained_model"], "network_dim": cfg.network_dim,
        "network_alpha": cfg.network_alpha, "steps": step, "trigger_word": cfg.trigger_word,
        "dataset_sha256": resume_meta["dataset_sha256"], "seed": cfg.seed,
        "resolution": cfg.resolution, "learning_rate": cfg.learning_rate,
        "optimizer_type": lever["optimizer_type"], "model_variant": src.variant,
        "config": json.dumps(public, sort_keys=True),
    })
    rep.say(f"finished: {path}")
    rep.done()
    return 0
