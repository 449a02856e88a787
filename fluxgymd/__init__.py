"""fluxgymd: a supervisor daemon for LoRA training jobs."""
__version__ = "0.1.0"
