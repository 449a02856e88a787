"""Where fluxgymd keeps things by default. Stdlib only and cheap to import: the CLI needs it
to find the daemon."""
from __future__ import annotations

import os
from pathlib import Path


def default_runtime_dir(env: dict[str, str]) -> Path:
    if env.get("RUNTIME_DIRECTORY"):  # set by systemd's RuntimeDirectory=
        return Path(env["RUNTIME_DIRECTORY"].split(":")[0])
    if env.get("XDG_RUNTIME_DIR"):
        return Path(env["XDG_RUNTIME_DIR"]) / "fluxgymd"
    return Path(f"/tmp/fluxgymd-{os.getuid()}")


def default_dirs(env: dict[str, str]) -> dict[str, Path]:
    """Under systemd: $STATE_DIRECTORY (outputs inside it) and $RUNTIME_DIRECTORY. In the
    foreground: the user's XDG state dir, the user's runtime dir, and ./outputs (no root)."""
    if env.get("STATE_DIRECTORY"):  # set by systemd's StateDirectory=
        state = Path(env["STATE_DIRECTORY"].split(":")[0])
        outputs = state / "outputs"
    else:
        home = Path(env["HOME"]) if env.get("HOME") else Path.home()
        base = Path(env.get("XDG_STATE_HOME") or home / ".local" / "state")
        state = base / "fluxgymd"
        outputs = Path.cwd() / "outputs"
    return {"state_dir": state, "runtime_dir": default_runtime_dir(env), "outputs_dir": outputs}
