"""`python -m trainer JOBFILE [--output-dir DIR] [--fresh]`: train the job's [train]
section. Run by fluxgymd for kind = "lora" jobs, and usable alone in a terminal."""
from __future__ import annotations

import argparse
import os
import sys

from .config import TrainError, load_job


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer", description=__doc__)
    ap.add_argument("job_file", help="a job file with a [train] section")
    ap.add_argument("--output-dir", help="default: $FLUXGYM_OUTPUT_DIR, else ./outputs/<name>")
    ap.add_argument("--fresh", action="store_true",
                    help="start over: set existing checkpoints aside instead of resuming")
    args = ap.parse_args(argv)
    from .contract import keep_going_without_a_reader

    keep_going_without_a_reader()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models are local folders; never wait on a hub
    cfg, name = load_job(args.job_file)
    out = args.output_dir or os.environ.get("FLUXGYM_OUTPUT_DIR") or os.path.join("outputs", name)
    from .checkpoint import OutputBusy
    from .data import DatasetError
    from .train import run

    try:
        return run(cfg, name, os.path.abspath(out), args.fresh)
    except (DatasetError, TrainError) as e:
        print(f"trainer: {e}", file=sys.stderr)
        return 2
    except OutputBusy as e:  # not the job's fault, and it may pass: a crash, retried later
        print(f"trainer: {e}", file=sys.stderr)
        return 1
    except (OSError, RuntimeError) as e:
        if not disk_full(e):
            raise
        # retrying cannot help until someone frees space: exit 2, the job to fix
        print(f"trainer: the disk is full (No space left on device) writing under {out}: "
              f"{e}; free space there, then retry the job", file=sys.stderr)
        return 2


def disk_full(e: BaseException) -> bool:
    """ENOSPC, as an OSError or as torch.save's RuntimeError ("file write failed")."""
    import errno

    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    return "No space left on device" in text or "write failed" in text


if __name__ == "__main__":
    sys.exit(main())
