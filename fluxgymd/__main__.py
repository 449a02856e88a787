"""`fluxgymd`: run the daemon in the foreground (systemd runs it the same way)."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from . import __version__
from .config import ConfigError, load
from .journal import Journal, JournalHandler, wanted


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="fluxgymd",
        description="Supervise LoRA training jobs: queue, run, watch, resume. "
        "Talk to it with fluxgymctl.",
    )
    p.add_argument("--config", metavar="FILE",
                   help="TOML config file (default: $FLUXGYM_CONFIG, else none)")
    p.add_argument("--state-dir", metavar="DIR",
                   help="where the job database lives (default: $STATE_DIRECTORY under "
                   "systemd, else $XDG_STATE_HOME/fluxgymd or ~/.local/state/fluxgymd)")
    p.add_argument("--runtime-dir", metavar="DIR",
                   help="where the control and event sockets live (default: "
                   "$RUNTIME_DIRECTORY under systemd, else $XDG_RUNTIME_DIR/fluxgymd or "
                   "/tmp/fluxgymd-$UID)")
    p.add_argument("--outputs-dir", metavar="DIR",
                   help="root of the per-job output folders (default: the state dir's "
                   "outputs/ under systemd, else ./outputs)")
    p.add_argument("--max-concurrent-jobs", type=int, metavar="N",
                   help="jobs running at once (default 1)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                   help="the daemon's own log detail (default info)")
    p.add_argument("--recover-db", action="store_true",
                   help="copy what can still be read from a damaged job database into a new "
                   "one (the damaged file is kept beside it), then exit; fluxgymd must be "
                   "stopped")
    p.add_argument("--allow-command-jobs", action="store_const", const=True,
                   help="run kind = \"command\" jobs (any program, as this daemon's user); "
                   "off unless set here or in the config")
    p.add_argument("--executor", choices=["local", "slurm"],
                   help="where jobs run: local process groups, or one Slurm job per attempt "
                   "(config: executor; [slurm] sets partition, gres, time limit...)")
    p.add_argument("--web", metavar="HOST:PORT", dest="listen",
                   help="serve the dashboard here (config: listen under [web]; off by default)")
    p.add_argument("--version", action="version", version=f"fluxgymd {__version__}")
    return p.parse_args(argv)


def setup_logging(level: str, journal) -> None:
    if journal is not None:
        # journald keeps time, priority and our name; stderr would only duplicate entries
        handler = JournalHandler(journal)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logging.basicConfig(level=level.upper(), handlers=[handler])
        return
    fmt = "%(levelname)s %(name)s: %(message)s" if os.environ.get("JOURNAL_STREAM") else \
        "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level.upper(), format=fmt, stream=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    flags = {
        "state_dir": args.state_dir, "runtime_dir": args.runtime_dir,
        "outputs_dir": args.outputs_dir, "max_concurrent_jobs": args.max_concurrent_jobs,
        "log_level": args.log_level, "allow_command_jobs": args.allow_command_jobs,
        "listen": args.listen, "executor": args.executor,
    }
    try:
        cfg = load(args.config, flags)
    except ConfigError as e:
        print(f"fluxgymd: configuration error: {e}", file=sys.stderr)
        return 2
    if args.recover_db:
        from .recovery import recover_db

        return recover_db(cfg)
    journal = Journal(cfg.journal_socket) if wanted(cfg.journal, cfg.journal_socket) else None
    setup_logging(cfg.log_level, journal)
    from .daemon import run_daemon  # after logging, so import-time messages are formatted

    try:
        return run_daemon(cfg, journal, lambda: load(args.config, flags))
    except OSError as e:
        logging.getLogger("fluxgymd").error("cannot start: %s", e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
