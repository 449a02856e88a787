"""trainer: fluxgymd's own Flux LoRA trainer. `python -m trainer JOBFILE`.

This package's top level stays light (the daemon imports trainer.config to validate job
files); torch and diffusers are imported only by the modules that train.
"""


def quiet() -> None:
    """Silence the libraries' own progress bars and advisory warnings: the trainer reports
    progress itself, and a log full of loading bars hides what matters."""
    import logging
    import warnings

    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
