"""Daemon configuration: one table of keys, read with flag > environment > file > default.

Every key is documented where it is set, in etc/fluxgymd.toml. An unknown key in the file is
an error that names it and suggests the closest known key.
"""
from __future__ import annotations

import difflib
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .executors import EXECUTORS
from .executors.slurm_job import SlurmSettings, refused_options
from .alerts import EVENTS, FORMATS, HooksConfig, NotifyConfig, parse_events, read_secret
from .paths import default_dirs
from .protocol import CONTROL_SOCKET, MAX_IPC_PATH
from .watchdog import LIMIT_NAMES, Limits


class ConfigError(Exception):
    pass


HOOK_EVENTS = EVENTS + ("idle",)


@dataclass(frozen=True)
class Key:
    section: str
    name: str
    type: type
    default: Any
    minimum: float | None = None

    @property
    def env(self) -> str:
        # [daemon] keys read as FLUXGYM_<KEY>, others as FLUXGYM_<SECTION>_<KEY>.
        prefix = "" if self.section == "daemon" else self.section.upper() + "_"
        return f"FLUXGYM_{prefix}{self.name.upper()}"


KEYS = [
    # "" means: derive from systemd's directories or the user's, see _default_dirs.
    Key("daemon", "state_dir", str, ""),
    Key("daemon", "runtime_dir", str, ""),
    Key("daemon", "outputs_dir", str, ""),
    Key("daemon", "max_concurrent_jobs", int, 1, minimum=1),
    Key("daemon", "log_level", str, "info"),
    Key("daemon", "journal", str, "auto"),
    Key("daemon", "journal_socket", str, "/run/systemd/journal/socket"),
    Key("daemon", "allow_command_jobs", bool, False),
    Key("daemon", "executor", str, "local"),
    Key("slurm", "partition", str, ""),
    Key("slurm", "gres", str, ""),
    Key("slurm", "time_limit", str, ""),
    Key("slurm", "signal_before_end_s", int, 300, minimum=1),
    Key("slurm", "cpus_per_task", int, 0, minimum=0),
    Key("slurm", "mem", str, ""),
    Key("slurm", "sbatch_args", str, ""),
    Key("slurm", "python", str, ""),
    Key("slurm", "bin_dir", str, ""),
    Key("slurm", "poll_s", float, 2.0, minimum=0.1),
    Key("slurm", "follow_s", float, 0.25, minimum=0.02),
    Key("slurm", "probe", bool, True),
    Key("logs", "max_bytes", int, 50 * 1024 * 1024, minimum=4096),
    Key("logs", "backups", int, 3, minimum=0),
    Key("logs", "memory_lines", int, 10000, minimum=100),
    Key("watchdog", "gpu_probe", str, "auto"),
    Key("watchdog", "gpu_poll_s", float, 5.0, minimum=0.1),
    Key("kohya", "save_every_n_steps", int, 100, minimum=1),
    # ["DIR", { path = "DIR", python = "PY" }, ...]; environment: DIRs joined by ":"
    Key("kohya", "checkouts", list, []),
    Key("models", "dir", str, ""),
    Key("caption", "model", str, "florence-2-large"),
    # "all", or [0, 1, "GPU-uuid", ...]; environment: "all" or "0,1"
    Key("gpus", "use", list, "all"),
    Key("gpus", "reserve_mib", int, 1024, minimum=0),
    Key("gpus", "exclusive", bool, False),
    Key("hub", "token_file", str, ""),
    Key("notify", "url", str, ""),
    Key("notify", "url_file", str, ""),
    Key("notify", "format", str, "json"),
    Key("notify", "events", str, "stalled,failed,succeeded,drained"),
    Key("notify", "token", str, ""),
    Key("notify", "token_file", str, ""),
    Key("notify", "timeout_s", float, 10.0, minimum=0.1),
    Key("notify", "retries", int, 5, minimum=0),
    Key("notify", "backoff_s", float, 2.0, minimum=0),
    Key("hooks", "timeout_s", float, 60.0, minimum=0.1),
    Key("web", "listen", str, ""),
    Key("web", "trust_loopback", bool, False),
    Key("web", "token_file", str, ""),
    Key("web", "base_path", str, ""),
    Key("web", "max_upload_mb", int, 50, minimum=1),
    Key("hooks", "idle_after_s", float, 600.0, minimum=0),
]
KEYS += [Key("hooks", f"on_{event}", str, "") for event in HOOK_EVENTS]
# The watchdog's thresholds: one source of names and defaults, watchdog.Limits.
KEYS += [Key("watchdog", name, type(getattr(Limits(), name)), getattr(Limits(), name), minimum=0)
         for name in LIMIT_NAMES]
_BY_SECTION: dict[str, dict[str, Key]] = {}
for _k in KEYS:
    _BY_SECTION.setdefault(_k.section, {})[_k.name] = _k

LOG_LEVELS = ("debug", "info", "warning", "error")
_BOOL_WORDS = {"true": True, "1": True, "yes": True, "on": True,
               "false": False, "0": False, "no": False, "off": False}


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _coerce(key: Key, value: Any, where: str) -> Any:
    full = f"{key.section}.{key.name}"
    if full == "gpus.use":
        return _gpu_use(value, f"{where}: {full}")
    if key.type is list:
        if isinstance(value, str) and where.startswith("environment"):
            value = [v for v in value.split(os.pathsep) if v.strip()]
        if full == "kohya.checkouts":
            return _checkouts(value, f"{where}: {full}")
    if key.type is bool:
        if isinstance(value, str) and where.startswith("environment") \
                and value.strip().lower() in _BOOL_WORDS:
            value = _BOOL_WORDS[value.strip().lower()]
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {full} must be true or false, got {value!r}")
        return value
    if key.type is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, str) and key.type is not str and where.startswith("environment"):
        try:
            value = key.type(value)
        except ValueError:
            raise ConfigError(f"{where}: {full} must be a number, got {value!r}") from None
    if not isinstance(value, key.type) or isinstance(value, bool):
        raise ConfigError(
            f"{where}: {full} must be {key.type.__name__}, got {type(value).__name__} {value!r}"
        )
    if key.minimum is not None and value < key.minimum:
        raise ConfigError(f"{where}: {full} must be at least {key.minimum}, got {value}")
    if full == "daemon.log_level" and value not in LOG_LEVELS:
        raise ConfigError(f"{where}: {full} must be one of {', '.join(LOG_LEVELS)}")
    if full == "daemon.journal" and value not in ("auto", "on", "off"):
        raise ConfigError(f"{where}: {full} must be auto, on or off")
    if full == "daemon.executor" and value not in EXECUTORS:
        raise ConfigError(f"{where}: {full} must be one of {', '.join(EXECUTORS)}, got {value!r}")
    if full == "watchdog.gpu_probe" and value not in ("auto", "nvml", "none") \
            and not value.startswith("file:"):
        raise ConfigError(f"{where}: {full} must be auto, nvml, none or file:PATH")
    return value


def _gpu_use(value: Any, where: str) -> tuple[str, ...]:
    """[gpus] use: the GPUs fluxgymd hands out, as indices or UUIDs (strings); () = all."""
    if isinstance(value, str):
        if value.strip().lower() == "all":
            return ()
        if where.startswith("environment"):  # FLUXGYM_GPUS_USE=0,1
            value = [v.strip() for v in value.split(",") if v.strip()]
            value = [int(v) if v.isdigit() else v for v in value]
    if not isinstance(value, list) or not value or not all(
            (isinstance(v, int) and not isinstance(v, bool) and v >= 0)
            or (isinstance(v, str) and v.strip()) for v in value):
        raise ConfigError(f"{where} must be \"all\" or a list of GPU indices or UUIDs, e.g. "
                          f"use = [0, 1], got {value!r:.80}")
    return tuple(str(v).strip() for v in value)


def _checkouts(value: Any, where: str) -> tuple[tuple[str, str], ...]:
    """[kohya] checkouts as (checkout folder, its Python or "" for the one found in it), each
    an absolute path with ~ expanded."""
    if not isinstance(value, list):
        raise ConfigError(f"{where} must be a list, e.g. checkouts = [\"/opt/fluxgym/sd-scripts\"]")
    out = []
    for item in value:
        if isinstance(item, str):
            path, python = item, ""
        elif isinstance(item, dict) and set(item) <= {"path", "python"} \
                and isinstance(item.get("path"), str) \
                and isinstance(item.get("python", ""), str):
            path, python = item["path"], item.get("python", "")
        else:
            raise ConfigError(f"{where}: {item!r:.80} is not a folder; give \"DIR\" or "
                              "{ path = \"DIR\", python = \"DIR/venv/bin/python\" }")
        for what, p in (("path", path), ("python", python)):
            if p and not os.path.isabs(os.path.expanduser(p)):
                raise ConfigError(f"{where}: {what} {p!r} must be an absolute path")
        if not path.strip():
            raise ConfigError(f"{where}: an empty folder name")
        out.append((os.path.normpath(os.path.expanduser(path)),
                    os.path.normpath(os.path.expanduser(python)) if python else ""))
    return tuple(out)


def read_file(path: Path) -> dict[tuple[str, str], Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} cannot be read: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    out: dict[tuple[str, str], Any] = {}
    for section, table in data.items():
        if section not in _BY_SECTION:
            raise ConfigError(
                f"{path}: unknown section [{section}]{_suggest(section, list(_BY_SECTION))}; "
                f"known sections: {', '.join(_BY_SECTION)}"
            )
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: {section} must be a table ([{section}])")
        for name, value in table.items():
            keys = _BY_SECTION[section]
            if section == "models" and isinstance(value, dict):
                out.setdefault(("models", "*"), {})[name] = value  # [models.NAME]: an entry
                continue
            if name not in keys:
                every = [f"{k.section}.{k.name}" for k in KEYS]
                hint = _suggest(name, list(keys)) or _suggest(f"{section}.{name}", every)
                raise ConfigError(f"{path}: unknown key {section}.{name}{hint}")
            out[(section, name)] = _coerce(keys[name], value, str(path))
    return out


@dataclass(frozen=True)
class WebConfig:
    listen: str = ""  # HOST:PORT; empty: no dashboard
    trust_loopback: bool = False
    token_file: str = ""
    base_path: str = ""
    max_upload_mb: int = 50  # one uploaded photo or caption
    drafts_dir: str = ""  # the new-LoRA page's uploads, before training starts


@dataclass
class Config:
    state_dir: Path
    runtime_dir: Path
    outputs_dir: Path
    max_concurrent_jobs: int
    log_level: str
    journal: str
    journal_socket: str
    allow_command_jobs: bool
    log_max_bytes: int
    log_backups: int
    log_memory_lines: int
    limits: Limits
    gpu_probe: str
    gpu_poll_s: float
    kohya_save_every_n_steps: int = 100
    kohya_checkouts: tuple[tuple[str, str], ...] = ()  # (folder, its Python or "")
    models_dir: Path = Path("models")
    models: dict = field(default_factory=dict)  # the catalog: name -> catalog.Model
    hub_token_file: str = ""
    caption_model: str = "florence-2-large"  # a caption job's model when it names none
    gpus_use: tuple[str, ...] = ()  # indices or UUIDs; () = every GPU the probe sees
    gpu_reserve_mib: int = 1024
    gpus_exclusive: bool = False
    executor: str = "local"
    slurm: SlurmSettings = field(default_factory=SlurmSettings)
    notify: NotifyConfig = field(default_factory=NotifyConfig)
    hooks: HooksConfig = field(default_factory=HooksConfig)
    web: WebConfig = field(default_factory=lambda: WebConfig())
    config_file: Path | None = None

    @property
    def kill_grace_s(self) -> float:
        return self.limits.kill_grace_s

    @property
    def control_endpoint(self) -> str:
        return f"ipc://{self.runtime_dir / CONTROL_SOCKET}"


def load(
    config_file: str | Path | None = None,
    flags: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
) -> Config:
    """Resolve every key: flag > environment > file > default."""
    env = dict(os.environ if env is None else env)
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    path = config_file or env.get("FLUXGYM_CONFIG")
    from_file = read_file(Path(path)) if path else {}
    values: dict[str, Any] = {}
    for key in KEYS:
        if key.name in flags:
            value = _coerce(key, flags[key.name], f"option --{key.name.replace('_', '-')}")
        elif key.env in env:
            value = _coerce(key, env[key.env], f"environment {key.env}")
        elif (key.section, key.name) in from_file:
            value = from_file[(key.section, key.name)]
        else:
            value = key.default
        values[f"{key.section}.{key.name}"] = value
    dirs = default_dirs(env)
    resolved = {
        name: Path(values[f"daemon.{name}"]).expanduser().resolve()
        if values[f"daemon.{name}"]
        else Path(dirs[name])
        for name in ("state_dir", "runtime_dir", "outputs_dir")
    }
    cfg = Config(
        **resolved,
        max_concurrent_jobs=values["daemon.max_concurrent_jobs"],
        log_level=values["daemon.log_level"],
        journal=values["daemon.journal"],
        journal_socket=values["daemon.journal_socket"],
        allow_command_jobs=values["daemon.allow_command_jobs"],
        log_max_bytes=values["logs.max_bytes"],
        log_backups=values["logs.backups"],
        log_memory_lines=values["logs.memory_lines"],
        limits=Limits(**{name: values[f"watchdog.{name}"] for name in LIMIT_NAMES}),
        gpu_probe=values["watchdog.gpu_probe"],
        gpu_poll_s=values["watchdog.gpu_poll_s"],
        kohya_save_every_n_steps=values["kohya.save_every_n_steps"],
        kohya_checkouts=tuple(values["kohya.checkouts"]),
        models_dir=Path(values["models.dir"]).expanduser().resolve() if values["models.dir"]
        else resolved["state_dir"] / "models",
        models=_catalog(from_file.get(("models", "*"), {})),
        hub_token_file=str(Path(values["hub.token_file"]).expanduser())
        if values["hub.token_file"] else "",
        caption_model=values["caption.model"],
        gpus_use=values["gpus.use"] if isinstance(values["gpus.use"], tuple)
        else _gpu_use(values["gpus.use"], "gpus.use"),
        gpu_reserve_mib=values["gpus.reserve_mib"], gpus_exclusive=values["gpus.exclusive"],
        executor=values["daemon.executor"], slurm=_slurm(values),
        web=_web(values, resolved["state_dir"]),
        notify=_notify(values), hooks=HooksConfig(
            commands={e: values[f"hooks.on_{e}"] for e in HOOK_EVENTS if values[f"hooks.on_{e}"]},
            timeout_s=values["hooks.timeout_s"], idle_after_s=values["hooks.idle_after_s"]),
        config_file=Path(path) if path else None,
    )
    sock = str(cfg.runtime_dir / CONTROL_SOCKET)
    if len(sock.encode()) > MAX_IPC_PATH:
        raise ConfigError(
            f"runtime dir {cfg.runtime_dir} is too long: the socket path {sock} is "
            f"{len(sock.encode())} bytes and Unix sockets allow {MAX_IPC_PATH}; "
            "choose a shorter --runtime-dir"
        )
    return cfg


def _catalog(extra: dict[str, Any]) -> dict:
    from .catalog import CatalogError, load as load_catalog

    try:
        return load_catalog(extra)
    except CatalogError as e:
        raise ConfigError(f"models: {e}") from None


def _notify(values: dict[str, Any]) -> NotifyConfig:
    fmt = values["notify.format"]
    if fmt not in FORMATS:
        raise ConfigError(f"notify.format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    try:
        events = parse_events(values["notify.events"])
        url = read_secret(values["notify.url"], values["notify.url_file"], "notify.url_file")
        token = read_secret(values["notify.token"], values["notify.token_file"],
                            "notify.token_file")
    except ValueError as e:
        raise ConfigError(f"notify: {e}") from None
    if url and not url.startswith(("http://", "https://")):
        raise ConfigError("notify.url must start with http:// or https:// (the value is not "
                          "shown: it may hold a secret)")
    return NotifyConfig(url=url, format=fmt, events=events, token=token,
                        timeout_s=values["notify.timeout_s"], retries=values["notify.retries"],
                        backoff_s=values["notify.backoff_s"])


def _slurm(values: dict[str, Any]) -> SlurmSettings:
    import shlex

    try:
        extra = tuple(shlex.split(values["slurm.sbatch_args"]))
    except ValueError as e:
        raise ConfigError(f"slurm.sbatch_args: {e}") from None
    refused = refused_options(extra)
    if refused:
        raise ConfigError("slurm.sbatch_args may not hold " + "; ".join(refused))
    return SlurmSettings(**{
        k: values[f"slurm.{k}"] for k in ("partition", "gres", "time_limit",
                                          "signal_before_end_s", "cpus_per_task", "mem",
                                          "python", "bin_dir", "poll_s", "follow_s", "probe")},
        sbatch_args=extra)


def parse_listen(text: str) -> tuple[str, int]:
    """HOST:PORT (an empty host is 127.0.0.1; [::1]:PORT for IPv6)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"web.listen {text!r}: use HOST:PORT, e.g. 127.0.0.1:8377")
    return host.strip("[]") or "127.0.0.1", int(port)


def _web(values: dict[str, Any], state_dir: Path) -> WebConfig:
    listen = values["web.listen"].strip()
    if listen:
        try:
            parse_listen(listen)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    base = values["web.base_path"].strip()
    if base and not all(part and all(c.isalnum() or c in "-_." for c in part)
                        for part in base.strip("/").split("/")):
        raise ConfigError(f"web.base_path {base!r}: use a path like /fluxgymd")
    token_file = values["web.token_file"] or str(state_dir / "web-token")
    return WebConfig(listen=listen, trust_loopback=values["web.trust_loopback"],
                     token_file=str(Path(token_file).expanduser()), base_path=base,
                     max_upload_mb=values["web.max_upload_mb"],
                     drafts_dir=str(state_dir / "drafts"))
