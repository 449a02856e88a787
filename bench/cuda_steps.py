"""A few training steps of the ~50M-parameter Flux preset on CUDA in bf16, for a machine
with a GPU: prints steps/s, and the same loop's steps/s on the CPU in fp32 as the baseline
(the ratio is the GPU's speed-up). Exits 3 without a GPU.

    .venv/bin/python bench/cuda_steps.py [--steps 30] [--batch 4] [--resolution 256]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def steps_per_s(model_dir: str, device: str, dtype, steps: int, batch: int, res: int) -> float:
    import torch
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    from trainer.config import TrainConfig, lora_targets
    from trainer.flux import flow_matching_loss

    cfg = TrainConfig()
    torch.backends.cuda.enable_cudnn_sdp(False)  # as the trainer does: its backward gives nan
    tr = FluxTransformer2DModel.from_pretrained(model_dir, subfolder="transformer",
                                                torch_dtype=dtype)
    tr.requires_grad_(False)
    torch.manual_seed(0)
    tr.add_adapter(LoraConfig(r=cfg.network_dim, lora_alpha=cfg.network_alpha,
                              init_lora_weights="gaussian",
                              target_modules=lora_targets(cfg.network_target_modules)))
    params = [p for p in tr.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    tr.to(device)
    opt = torch.optim.AdamW(params, lr=1e-4)
    lat = torch.randn(batch, 16, res // 2, res // 2)
    emb = torch.randn(batch, 32, tr.config.joint_attention_dim)
    pooled = torch.randn(batch, tr.config.pooled_projection_dim)

    def step(i):
        g = torch.Generator().manual_seed(i)
        with torch.autocast(device_type=device.split(":")[0], dtype=dtype,
                            enabled=dtype != torch.float32):
            loss = flow_matching_loss(tr, lat, emb, pooled, cfg, g, device, dtype)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(3):
        step(i)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - t0)


def main() -> int:
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--resolution", type=int, default=256)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure", file=sys.stderr)
        return 3
    from trainer.tiny import write_model

    root = tempfile.mkdtemp(prefix="fgc")
    try:
        write_model(os.path.join(root, "m"), "bench")
        gpu = steps_per_s(os.path.join(root, "m"), "cuda", torch.bfloat16, args.steps,
                          args.batch, args.resolution)
        cpu = steps_per_s(os.path.join(root, "m"), "cpu", torch.float32, max(3, args.steps // 10),
                          args.batch, args.resolution)
        print(f"{torch.cuda.get_device_name(0)}: {gpu:.2f} steps/s (bf16), CPU fp32 "
              f"{cpu:.2f} steps/s; ratio GPU/CPU {gpu / cpu:.1f}  (batch {args.batch}, "
              f"{args.resolution}px)")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
