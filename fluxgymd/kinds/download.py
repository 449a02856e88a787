"""kind = "download": model files from the Hugging Face Hub into the models dir, supervised
like training: a child of its own (`python -m fluxgymd.fetch`) that reports bytes as steps
through the contract, resumes a partial file after a kill or a cut connection
(huggingface_hub keeps it), and fails at once, with what to do, where retrying cannot help
(a gated repo without a token, a missing file, no room)."""
from __future__ import annotations

import sys
from pathlib import Path

import tomli_w

from .base import JobKind

KEYS = {"models": list, "repo": str, "files": list, "revision": str}


class DownloadKind(JobKind):
    name = section = "download"
    speaks_contract = True
    uses_gpu = False
    hub_token = True
    local_only = True

    def validate(self, section, base, errors, policy):
        if not isinstance(section, dict):
            errors.append("a download job needs a [download] section with models = [\"NAME\", "
                          "...] (fluxgymctl models list) or repo = \"owner/name\" and files")
            return {}
        for key, value in section.items():
            if key not in KEYS:
                errors.append(f"unknown key download.{key}; known: {', '.join(KEYS)}")
            elif not isinstance(value, KEYS[key]):
                errors.append(f"download.{key} must be a {KEYS[key].__name__}")
        if any(e.startswith(("download.", "unknown key download.")) for e in errors):
            return {}
        catalog = policy.models or {}
        models_dir = Path(policy.models_dir or "models")
        items = []
        names = section.get("models", [])
        if names and "repo" in section:
            errors.append("give download.models (catalog names) or download.repo and files, "
                          "not both")
            return {}
        if names:
            from ..catalog import with_needs

            unknown = [n for n in names if not isinstance(n, str) or n not in catalog]
            if unknown:
                errors.append(f"download.models: {', '.join(map(str, unknown))} not in the "
                              f"catalog (known: {', '.join(sorted(catalog))}; add one as "
                              "[models.NAME] in fluxgymd.toml)")
                return {}
            for m in with_needs(catalog, names):
                items += [{"model": m.name, "repo": m.repo, "file": f, "revision": m.revision,
                           "dir": str(m.folder(models_dir)), "gated": m.gated}
                          for f in m.files]
                items += [{"model": m.name, "repo": m.repo, "file": f, "revision": m.revision,
                           "dir": str(m.folder(models_dir)), "gated": m.gated,
                           "optional": True} for f in m.optional if f not in m.files]
        elif "repo" in section:
            from ..catalog import entry, CatalogError

            files = section.get("files") or []
            try:
                m = entry(section["repo"].replace("/", "--"),
                          {"repo": section["repo"], "files": files,
                           "revision": section.get("revision", "main")}, "")
            except CatalogError as e:
                errors.append(str(e).replace(f"[models.{section['repo'].replace('/', '--')}]",
                                             "[download]"))
                return {}
            items = [{"model": m.name, "repo": m.repo, "file": f, "revision": m.revision,
                      "dir": str(m.folder(models_dir)), "gated": False} for f in m.files]
        else:
            errors.append("a download job names models = [\"NAME\", ...] or repo = "
                          "\"owner/name\" with files = [...]")
            return {}
        return {"files": items}

    def command(self, job):
        out = Path(job["output_dir"])
        doc = {"job": {"name": job["spec"]["name"], "kind": "download"},
               "download": job["spec"]["download"]}
        path = out / "job.toml"
        path.write_text(tomli_w.dumps(doc), encoding="utf-8")
        # a download is online by definition, whatever the daemon's own setting
        return ([sys.executable, "-m", "fluxgymd.fetch", str(path)],
                {"HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}, None)

    def finished(self, job):
        # an optional file the repo lacks never comes: what is needed is there
        return all((Path(f["dir"]) / f["file"]).is_file()
                   for f in job["spec"]["download"]["files"] if not f.get("optional"))

    def result(self, job):
        files = job["spec"]["download"]["files"]
        return str(Path(files[0]["dir"])) if files and self.finished(job) else None

    def sample_dir(self, job):
        return None
