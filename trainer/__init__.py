"""trainer: fluxgymd's own Flux LoRA trainer (issue 3; not built yet)."""
