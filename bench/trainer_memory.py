"""Memory of the base weights per lever, on the ~48M-parameter `bench` preset (CPU): the
bytes the transformer's weights occupy as stored (fp8, NF4 and int8 packing with their
statistics) divided by bf16's, and the peak RSS of a process that loads the model that way,
each lever in its own process. Targets (issue 9): fp8 <= 0.65 and NF4 <= 0.35 of bf16 here;
the planner's full-size figures (<= 0.52, <= 0.30) are in tests/test_tiers.py and
`python -m trainer.plan JOB --model flux-dev`. Time to the first step on a resume is
bench/trainer_startup.py's figure.

    .venv/bin/python bench/trainer_memory.py
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

PY = sys.executable
ENV = dict(os.environ, HF_HUB_OFFLINE="1")
CHILD = """
import json, resource, sys, torch
from trainer import models, quiet, sources
quiet()
lever = sys.argv[2]
src = sources.resolve(sys.argv[1])
m = models.load_transformer(src, torch.bfloat16, fp8=lever == "fp8",
                            quantize=lever if lever in ("nf4", "int8") else "")
print(json.dumps({"bytes": models.storage_bytes(m),
                  "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "bench")
        subprocess.run([PY, "-m", "trainer.tiny", model, "--preset", "bench"], env=ENV,
                       check=True, capture_output=True)
        got = {}
        for lever in ("bf16", "fp8", "nf4", "int8"):
            out = subprocess.run([PY, "-c", CHILD, model, lever], env=ENV, check=True,
                                 capture_output=True, text=True).stdout
            got[lever] = json.loads(out.strip().splitlines()[-1])
    base = got["bf16"]["bytes"]
    for lever, g in got.items():
        print(f"{lever:5} weights {g['bytes'] / 2**20:7.1f} MiB = {g['bytes'] / base:.3f} of bf16"
              f"   peak RSS {g['rss'] / 2**20:7.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
