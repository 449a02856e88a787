"""Where fluxgymd keeps things by default. Stdlib only, and strings rather than pathlib:
the CLI needs this to find the daemon, and every millisecond of its start-up shows."""
from __future__ import annotations

import os


def default_runtime_dir(env: dict[str, str]) -> str:
    if env.get("RUNTIME_DIRECTORY"):  # set by systemd's RuntimeDirectory=
        return env["RUNTIME_DIRECTORY"].split(":")[0]
    if env.get("XDG_RUNTIME_DIR"):
        return os.path.join(env["XDG_RUNTIME_DIR"], "fluxgymd")
    return f"/tmp/fluxgymd-{os.getuid()}"


def default_dirs(env: dict[str, str]) -> dict[str, str]:
    """Under systemd: $STATE_DIRECTORY (outputs inside it) and $RUNTIME_DIRECTORY. In the
    foreground: the user's XDG state dir, the user's runtime dir, and ./outputs (no root)."""
    if env.get("STATE_DIRECTORY"):  # set by systemd's StateDirectory=
        state = env["STATE_DIRECTORY"].split(":")[0]
        outputs = os.path.join(state, "outputs")
    else:
        home = env.get("HOME") or os.path.expanduser("~")
        base = env.get("XDG_STATE_HOME") or os.path.join(home, ".local", "state")
        state = os.path.join(base, "fluxgymd")
        outputs = os.path.join(os.getcwd(), "outputs")
    return {"state_dir": state, "runtime_dir": default_runtime_dir(env), "outputs_dir": outputs}
