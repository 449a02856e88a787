"""A stand-in for a trainer, for `make demo`: prints a tqdm-style bar with a loss."""
import math
import os
import sys
import time

steps = int(sys.argv[sys.argv.index("--steps") + 1]) if "--steps" in sys.argv else 60
pause = float(os.environ.get("DEMO_SLEEP_S", "0.05"))
print(f"demo: training for {steps} steps", flush=True)
t0 = time.monotonic()
for step in range(1, steps + 1):
    time.sleep(pause)
    loss = 0.1 + 0.9 * math.exp(-step / (steps / 4))
    rate = step / (time.monotonic() - t0)
    bar = "#" * (20 * step // steps)
    sys.stdout.write(f"\rsteps: {100 * step // steps:3d}%|{bar:<20}| {step}/{steps} "
                     f"[00:00<00:00, {rate:.2f}it/s, loss={loss:.4f}]")
    sys.stdout.flush()
print(f"\ndemo: done, final loss {loss:.4f}", flush=True)
