"""Captioning throughput: images/s of the caption job's loop (`trainer.caption.generate`,
batches of --batch-size, 8) against FluxGym's `run_captioning` loop (the model loaded once,
one image per `generate`), same tiny random Florence-2 (`trainer.tiny --florence`), same
images, same settings (FluxGym's: <DETAILED_CAPTION>, 3 beams), same process, alternating,
medians of --runs. Target: >= 1.5 on this CPU.

    .venv/bin/python bench/caption.py [--images 32] [--runs 3] [--max-new-tokens 64]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def fluxgym_loop(model, processor, images, task, max_new_tokens):
    """FluxGym's app.py run_captioning, minus the UI: one image per generate."""
    import torch

    out = []
    for image in images:
        inputs = processor(text=task, images=image, return_tensors="pt")
        with torch.inference_mode():
            ids = model.generate(input_ids=inputs["input_ids"],
                                 pixel_values=inputs["pixel_values"],
                                 max_new_tokens=max_new_tokens, num_beams=3, do_sample=False)
        out.append(processor.batch_decode(ids, skip_special_tokens=False)[0])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args()
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        subprocess.run([sys.executable, "-m", "trainer.tiny", "--florence", str(root / "m")],
                       check=True, env=env, capture_output=True)
        subprocess.run([sys.executable, "-m", "trainer.tiny", "--dataset", str(root / "d"),
                        "--images", str(args.images)], check=True, env=env,
                       capture_output=True)
        from trainer.caption import generate, images_of, load, load_image

        model, processor, device, dtype = load(str(root / "m"))
        images = [load_image(p) for p in images_of(str(root / "d"))]
        task = "<DETAILED_CAPTION>"
        fluxgym_loop(model, processor, images[:2], task, 4)  # warm up both paths
        generate(model, processor, images[:2], task, 3, 4, device, dtype)
        ours, theirs = [], []
        for _ in range(args.runs):
            t = time.perf_counter()
            for i in range(0, len(images), args.batch_size):
                generate(model, processor, images[i:i + args.batch_size], task, 3,
                         args.max_new_tokens, device, dtype)
            ours.append(len(images) / (time.perf_counter() - t))
            t = time.perf_counter()
            fluxgym_loop(model, processor, images, task, args.max_new_tokens)
            theirs.append(len(images) / (time.perf_counter() - t))
            print(f"run: {ours[-1]:.1f} vs {theirs[-1]:.1f} images/s = "
                  f"{ours[-1] / theirs[-1]:.2f}")
    a, b = statistics.median(ours), statistics.median(theirs)
    print(f"caption job (batches of {args.batch_size}) {a:.1f} images/s vs FluxGym's loop "
          f"{b:.1f} images/s: ratio {a / b:.2f} (median of {args.runs}; target >= 1.5)")


if __name__ == "__main__":
    main()
