"""`python -m trainer JOBFILE`: not built yet (see issue 3). Says so instead of pretending."""
import sys

print("trainer: the Flux LoRA trainer is not part of this version yet; "
      "kind = \"lora\" jobs cannot run. Use a kind = \"command\" job meanwhile.",
      file=sys.stderr)
sys.exit(2)
