"""Peak CUDA memory and s/step of each memory tier on the full-size FLUX.1-dev architecture
with random weights (built from trainer/configs/flux, no download), 512 px, batch 1, rank 16,
with the planner's estimate beside it: measured / planned per tier. Needs a CUDA GPU with
room for the `none` tier's bf16 weights (~24 GB) to build the weights from; each tier runs
in its own process. Targets (issue 9): 24G <= 22 GiB, 16G <= 15, 12G <= 11.5, 8G <= 7.5,
the planner within 10 %.

    .venv/bin/python bench/vram_tiers.py [--steps 5] [--tiers 24G,16G,12G,8G]

Not run yet: no CUDA machine was available since it was written (README says so).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

PY = sys.executable
ENV = dict(os.environ, HF_HUB_OFFLINE="1")
CHILD = r"""
import json, sys, time, torch
from safetensors.torch import save_file
from trainer import models, optim, plan, quiet, sources, tiers, flux
from trainer.config import TrainConfig, lora_targets
from peft import LoraConfig
quiet()
path, tier, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
cfg = TrainConfig(pretrained_model=path, network_dim=16, network_alpha=16, resolution=512,
                  learning_rate=1e-4)
src = sources.resolve(path, tokenizers="")
lever = tiers.TIERS[tier]
planned = plan.plan_tier(src.transformer.config, cfg, lever)["peak_bytes"]
torch.backends.cuda.enable_cudnn_sdp(False)
dev = torch.device("cuda")
m = models.load_transformer(src, torch.bfloat16, fp8=lever["fp8_base"],
    quantize="" if lever["quantize_base"] == "none" else lever["quantize_base"], device=dev)
m.requires_grad_(False)
m.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian",
                         target_modules=lora_targets(cfg.network_target_modules)))
params = [p for p in m.parameters() if p.requires_grad]
for p in params:
    p.data = p.data.float().to(dev)
if lever["gradient_checkpointing"]:
    m.enable_gradient_checkpointing()
if lever["quantize_base"] == "none":
    m.to(dev)
opt = optim.make(lever["optimizer_type"], params, cfg)
torch.cuda.reset_peak_memory_stats()
g = torch.Generator().manual_seed(0)
times = []
for i in range(steps):
    t0 = time.perf_counter()
    with torch.autocast("cuda", torch.bfloat16):
        loss = flux.flow_matching_loss(m, torch.randn(1, 16, 64, 64), torch.randn(1, 512, 4096),
                                       torch.randn(1, 768), cfg, g, dev, torch.bfloat16)
    loss.backward()
    opt.step(); opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    times.append(time.perf_counter() - t0)
print(json.dumps({"peak": torch.cuda.max_memory_allocated(), "planned": planned,
                  "s_per_step": sorted(times[1:] or times)[len(times[1:] or times) // 2]}))
"""
WRITE = r"""
import sys, torch
from accelerate import init_empty_weights
from diffusers import FluxTransformer2DModel
from safetensors.torch import save_file
from trainer.layouts import to_bfl
from trainer.sources import shipped
conf = shipped("flux", "transformer")
torch.manual_seed(0)
m = FluxTransformer2DModel(**{k: v for k, v in conf.items() if not k.startswith("_")})
state = {k: (v * 0.02).to(torch.bfloat16) for k, v in m.state_dict().items()}
save_file(to_bfl(state, conf), sys.argv[1])
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--tiers", default="24G,16G,12G,8G")
    ap.add_argument("--dir", help="where to write the random full-size model (~24 GB)")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("vram_tiers: needs a CUDA GPU", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = os.path.join(tmp, "flux1-dev-random.safetensors")
        subprocess.run([PY, "-c", WRITE, path], env=ENV, check=True)
        print("tier  peak GiB  planned GiB  measured/planned  s/step")
        for tier in args.tiers.split(","):
            out = subprocess.run([PY, "-c", CHILD, path, tier, str(args.steps)], env=ENV,
                                 capture_output=True, text=True)
            if out.returncode:
                print(f"{tier:5} failed: {out.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{tier:5} {r['peak'] / 2**30:8.2f} {r['planned'] / 2**30:12.2f} "
                  f"{r['peak'] / r['planned']:17.3f} {r['s_per_step']:7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
