"""What fluxgymd's own children (`python -m fluxgymd.fetch`, `python -m fluxgymd.publish`)
share: one job file argument, the supervision contract's Reporter with the child's voice,
SIGTERM/SIGINT exit 75 at once (nothing half done is lost: each child's work is resumable or
repeatable), a Fatal error exits 2 with its message as the last line in that voice (the
daemon quotes it and does not retry), and a full disk is one of those. Imported only by the
children, never by the daemon."""
from __future__ import annotations

import argparse
import signal
import tomllib
from pathlib import Path
from typing import Any, Callable

EXIT_FIX = 2
EXIT_INTERRUPTED = 75


class Fatal(Exception):
    """Retrying cannot help: the message says what to do."""


def run(argv: list[str] | None, prog: str, doc: str | None, voice: str, stopped: str,
        work: Callable[[dict[str, Any], Any, Path], Any]) -> int:
    """Parse the job file argument and run `work(its tables, reporter, its path)` under the
    contract;
    `stopped`: what a stop keeps, for the line it prints."""
    ap = argparse.ArgumentParser(prog=prog, description=doc)
    ap.add_argument("job_file")
    args = ap.parse_args(argv)
    from trainer.contract import Reporter, keep_going_without_a_reader

    keep_going_without_a_reader()
    rep = Reporter(voice=voice)

    def on_term(signum, frame):
        rep.say(f"stopped by {signal.Signals(signum).name}; {stopped} (exit 75)")
        raise SystemExit(EXIT_INTERRUPTED)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_term)
    try:
        with open(args.job_file, "rb") as fh:
            job = tomllib.load(fh)
        work(job, rep, Path(args.job_file))
        rep.done()
        return 0
    except Fatal as e:
        rep.say(str(e))
        return EXIT_FIX
    except OSError as e:
        if e.errno in (28, 122):  # ENOSPC, EDQUOT
            rep.say(f"the disk is full: {e}; free some space, then retry the job")
            return EXIT_FIX
        raise
    finally:
        rep.close()
