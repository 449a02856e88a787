"""The model catalog: named models on the Hugging Face Hub and where a pull puts them.

The shipped entries are `etc/models.toml` (inside the package as `fluxgymd/models.toml` once
installed); `[models.NAME]` tables in fluxgymd.toml add entries or replace shipped ones.
A model's files go to `<models dir>/<NAME>/<file>` (hf_hub_download's `local_dir`), so a
lora job can name them before they exist. Stdlib only: the daemon and the CLI read it.
"""
from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PARTS = ("transformer", "ae", "clip_l", "t5xxl", "tokenizers")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
REPO_RE = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
KEYS = {"description": str, "repo": str, "file": str, "files": list, "revision": str,
        "part": str, "needs": list, "base": str, "license": str, "license_name": str,
        "license_link": str, "gated": bool, "size": int, "optional": list}


class CatalogError(Exception):
    pass


@dataclass(frozen=True)
class Model:
    name: str
    repo: str
    files: tuple[str, ...]
    revision: str = "main"
    part: str = ""
    needs: tuple[str, ...] = ()
    base: str = ""
    license: str = ""
    license_name: str = ""
    license_link: str = ""
    gated: bool = False
    size: int | None = None
    description: str = ""
    # files fetched when the repo has them and skipped when it has not (a model whose repos
    # differ in their tokenizer or processor files); never needed for `present`
    optional: tuple[str, ...] = ()
    origin: str = field(default="", compare=False)  # the file it was read from

    def folder(self, models_dir: Path) -> Path:
        return Path(models_dir) / self.name

    def paths(self, models_dir: Path) -> list[Path]:
        return [self.folder(models_dir) / f for f in self.files]

    def present(self, models_dir: Path) -> bool:
        """Every file is there, whole: hf_hub_download moves a file into place only when it
        is complete, so a partial one is never taken for it."""
        return all(p.is_file() for p in self.paths(models_dir))

    def bytes_on_disk(self, models_dir: Path) -> int:
        """Its files, and what a pull left of them so far (partial downloads included)."""
        total = 0
        for root, _, names in os.walk(self.folder(models_dir)):
            for n in names:
                try:
                    total += os.path.getsize(os.path.join(root, n))
                except OSError:
                    pass
        return total


def shipped_path() -> Path:
    """The shipped catalog: beside this module once installed, etc/ in a checkout."""
    here = Path(__file__).resolve().parent
    installed = here / "models.toml"
    return installed if installed.is_file() else here.parent / "etc" / "models.toml"


def entry(name: str, table: Any, origin: str) -> Model:
    """One catalog entry, every mistake named (CatalogError)."""
    where = f"{origin}: [{name}]" if origin else f"[models.{name}]"
    if not NAME_RE.fullmatch(name):
        raise CatalogError(f"{where}: a model name is 1-64 letters, digits, '.', '_' or '-'")
    if not isinstance(table, dict):
        raise CatalogError(f"{where} must be a table with repo and file")
    problems = []
    for key, value in table.items():
        want = KEYS.get(key)
        if want is None:
            problems.append(f"unknown key {key} (known: {', '.join(KEYS)})")
        elif not isinstance(value, want) or (want is int and isinstance(value, bool)):
            problems.append(f"{key} must be {want.__name__}")
    repo = table.get("repo")
    if not isinstance(repo, str) or not REPO_RE.fullmatch(repo):
        problems.append("repo must be a Hub repo id, e.g. \"black-forest-labs/FLUX.1-dev\"")
    files = table.get("files", [table["file"]] if isinstance(table.get("file"), str) else [])
    if "file" in table and "files" in table:
        problems.append("give file or files, not both")
    optional = table.get("optional", [])

    def in_repo(f) -> bool:
        return isinstance(f, str) and bool(f) and not f.startswith("/") and \
            ".." not in f.split("/") and "*" not in f
    if not files or not all(map(in_repo, files)):
        problems.append("file (or files) must name files in the repo, e.g. file = "
                        "\"flux1-dev.sft\"")
    if not isinstance(optional, list) or not all(map(in_repo, optional)):
        problems.append("optional must name files in the repo (fetched when it has them)")
    part = table.get("part", "")
    if part and part not in PARTS:
        problems.append(f"part must be one of {', '.join(PARTS)}")
    needs = table.get("needs", [])
    if not isinstance(needs, list) or not all(isinstance(n, str) for n in needs):
        problems.append("needs must be a list of catalog names")
    if problems:
        raise CatalogError(f"{where}: " + "; ".join(problems))
    return Model(name=name, repo=repo, files=tuple(files), revision=table.get("revision", "main"),
                 part=part, needs=tuple(needs), base=table.get("base", ""),
                 license=table.get("license", ""), license_name=table.get("license_name", ""),
                 license_link=table.get("license_link", ""), gated=table.get("gated", False),
                 size=table.get("size"), description=table.get("description", ""),
                 optional=tuple(optional) if isinstance(optional, list) else (), origin=origin)


def load(extra: dict[str, Any] | None = None, path: Path | None = None) -> dict[str, Model]:
    """The shipped catalog with `extra` ([models.NAME] tables of the config) over it."""
    path = path or shipped_path()
    try:
        with open(path, "rb") as fh:
            shipped = tomllib.load(fh)
    except FileNotFoundError:
        shipped = {}  # a daemon installed without its catalog still takes the config's
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise CatalogError(f"{path}: {e}") from None
    models = {name: entry(name, table, str(path)) for name, table in shipped.items()}
    models.update({name: entry(name, table, "") for name, table in (extra or {}).items()})
    for m in models.values():
        missing = [n for n in m.needs if n not in models]
        if missing:
            raise CatalogError(f"[{m.name}] needs {', '.join(missing)}, which the catalog "
                               "does not have")
    return models


def with_needs(models: dict[str, Model], names: list[str]) -> list[Model]:
    """The named models and what each needs, each once, in order."""
    out: dict[str, Model] = {}

    def add(name: str) -> None:
        if name not in out:
            out[name] = models[name]
            for n in models[name].needs:
                add(n)
    for name in names:
        add(name)
    return list(out.values())
