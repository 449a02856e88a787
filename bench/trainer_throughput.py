"""Trainer throughput, checkpoint size and write time, peak RSS, on the ~50M-parameter Flux
preset (`python -m trainer.tiny --preset bench`).

Throughput: the trainer (events on, checkpoints every --ckpt-every steps, measured from its
"training" phase event to its last step event, so checkpoint writes count) as a ratio to a
bare loop in its own process: the same model, LoRA, batch, optimizer and loss function,
with no checkpoints, events or data pipeline. Medians over --runs pairs. Target >= 0.95.
Checkpoint size: one checkpoint folder / (LoRA + optimizer tensor bytes). Target <= 1.1.

    .venv/bin/python bench/trainer_throughput.py [--steps 60] [--runs 3] [--tier 12G]

--tier runs both sides with that memory tier's levers (fp8 base, NF4, checkpointing, the
tier's optimizer): the target holds for every tier that does not offload.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import tomli_w
import zmq

PY = sys.executable
ENV = dict({k: v for k, v in os.environ.items() if not k.startswith("FLUXGYM_")},
           HF_HUB_OFFLINE="1")

BARE = textwrap.dedent("""
    import sys, time, torch
    from peft import LoraConfig
    from trainer import models, optim, quiet, sources, tiers
    from trainer.config import TrainConfig, lora_targets
    from trainer.flux import flow_matching_loss
    quiet()
    model, steps, batch, res = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    lever = tiers.TIERS[sys.argv[5]]
    cfg = TrainConfig(learning_rate=1e-4)
    quant = lever["quantize_base"]
    tr = models.load_transformer(sources.resolve(model), torch.float32, fp8=lever["fp8_base"],
                                 quantize="" if quant == "none" else quant)
    tr.requires_grad_(False)
    torch.manual_seed(0)
    tr.add_adapter(LoraConfig(r=cfg.network_dim, lora_alpha=cfg.network_alpha,
                              init_lora_weights="gaussian", target_modules=lora_targets(cfg.network_target_modules)))
    params = [p for p in tr.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    if lever["gradient_checkpointing"]:
        tr.enable_gradient_checkpointing()
    opt = optim.make(lever["optimizer_type"], params, cfg)
    dim = tr.config.joint_attention_dim
    lat = torch.randn(batch, 16, res // 2, res // 2)
    emb, pooled = torch.randn(batch, 32, dim), torch.randn(batch, tr.config.pooled_projection_dim)
    tr.train()
    def step(i):
        g = torch.Generator().manual_seed(i)
        loss = flow_matching_loss(tr, lat, emb, pooled, cfg, g, "cpu", torch.float32)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step(); opt.zero_grad(set_to_none=True)
    for i in range(3):
        step(i)  # warm-up, as the trainer's first steps are not timed either
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    print((time.perf_counter() - t0) / steps)
""")


def trainer_run(root: Path, steps: int, ckpt_every: int, batch: int, res: int, run: int,
                tier: str):
    out = root / f"out{run}"
    job = root / f"job{run}.toml"
    job.write_text(tomli_w.dumps({"job": {"name": "bench"}, "train": {
        "pretrained_model": str(root / "model"), "dataset_dir": str(root / "data"),
        "resolution": res, "max_train_steps": steps + 3, "train_batch_size": batch,
        "num_repeats": 4, "save_every_n_steps": ckpt_every, "save_every_n_epochs": 0,
        "t5xxl_max_token_length": 32, "learning_rate": 1e-4, "vram": tier}}))
    ctx = zmq.Context.instance()
    pull = ctx.socket(zmq.PULL)
    endpoint = f"ipc://{root}/p{run}.sock"
    pull.bind(endpoint)
    env = dict(ENV, FLUXGYM_PROGRESS_ENDPOINT=endpoint, FLUXGYM_JOB_ID="1", FLUXGYM_ATTEMPT="1")
    p = subprocess.Popen([PY, "-m", "trainer", str(job), "--output-dir", str(out)], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    events = []
    while p.poll() is None or pull.poll(0):
        if pull.poll(200):
            events.append((time.perf_counter(), json.loads(pull.recv())))
    pull.close(linger=0)
    if p.returncode != 0:
        sys.exit(f"trainer failed:\n{p.stderr.read().decode()[-3000:]}")
    steps_ev = [(t, e) for t, e in events if e["event"] == "step"]
    # time from the end of step 3 (warm-up, like the bare loop) to the last step
    t_start = next(t for t, e in steps_ev if e["step"] == 3)
    per_step = (steps_ev[-1][0] - t_start) / (steps_ev[-1][1]["step"] - 3)
    saves = []
    for (t0, e0), (t1, e1) in zip(events, events[1:]):
        if e0["event"] == "phase" and e0.get("phase") == "saving" and e1["event"] == "checkpoint":
            saves.append(t1 - t0)
    return per_step, saves, out


def checkpoint_ratio(out: Path) -> tuple[float, int, int]:
    import torch
    from safetensors.torch import load_file

    ck = sorted((out / "checkpoints").iterdir())[-1]
    lora = load_file(str(ck / "lora.safetensors"))
    opt = torch.load(ck / "optimizer.pt", weights_only=True)
    tensor_bytes = sum(v.numel() * v.element_size() for v in lora.values())
    def nbytes(v) -> int:  # bitsandbytes nests its 8-bit state one dict deeper
        if isinstance(v, dict):
            return sum(nbytes(x) for x in v.values())
        return v.numel() * v.element_size() if torch.is_tensor(v) and v.dim() > 0 else 0

    tensor_bytes += sum(nbytes(state) for state in opt["state"].values())
    size = sum(f.stat().st_size for f in ck.iterdir())
    return size / tensor_bytes, size, tensor_bytes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--ckpt-every", type=int, default=20)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--tier", default="none", choices=["none", "24G", "16G", "12G", "8G"],
                    help="the memory tier both sides use (8G offloads: no target there)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fgt", dir="/tmp"))
    try:
        subprocess.run([PY, "-m", "trainer.tiny", str(root / "model"), "--preset", "bench"],
                       check=True, env=ENV, capture_output=True)
        subprocess.run([PY, "-m", "trainer.tiny", "--dataset", str(root / "data")],
                       check=True, env=ENV, capture_output=True)
        ours, bare, saves = [], [], []
        for run in range(args.runs):
            per_step, s, out = trainer_run(root, args.steps, args.ckpt_every, args.batch,
                                           args.resolution, run, args.tier)
            ours.append(per_step)
            saves += s
            r = subprocess.run([PY, "-c", BARE, str(root / "model"), str(args.steps),
                                str(args.batch), str(args.resolution), args.tier],
                               check=True, env=ENV, capture_output=True, text=True)
            bare.append(float(r.stdout.strip().splitlines()[-1]))
        rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        ratio, size, tensor_bytes = checkpoint_ratio(out)
        m_ours, m_bare = statistics.median(ours), statistics.median(bare)
        print(f"~50M Flux preset, tier {args.tier}, batch {args.batch} at {args.resolution}px, "
              f"{args.steps} steps, "
              f"checkpoint every {args.ckpt_every}, {args.runs} runs")
        print(f"trainer   {1 / m_ours:6.2f} steps/s  (per run: "
              f"{', '.join(f'{1 / x:.2f}' for x in ours)})")
        print(f"bare loop {1 / m_bare:6.2f} steps/s  (per run: "
              f"{', '.join(f'{1 / x:.2f}' for x in bare)})")
        print(f"throughput ratio trainer/bare: {m_bare / m_ours:.3f}  (target >= 0.95)")
        print(f"checkpoint: {size / 2**20:.2f} MiB for {tensor_bytes / 2**20:.2f} MiB of LoRA + "
              f"optimizer tensors: ratio {ratio:.3f}  (target <= 1.1)")
        print(f"checkpoint write time: median {statistics.median(saves) * 1000:.0f} ms "
              f"({len(saves)} writes)")
        print(f"peak RSS of the largest child (trainer or bare loop): {rss_mb:.0f} MB")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
