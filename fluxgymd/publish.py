"""`python -m fluxgymd.publish JOBFILE`: the child of a kind = "publish" job.

It writes the model card (README.md with YAML front matter, huggingface_hub's ModelCardData),
creates the repo if it is not there (`create_repo(exist_ok=True)`) and commits the LoRA, the
chosen samples and the card in one `create_commit`. huggingface_hub leaves out files the
repo already holds unchanged (their git oid, from the preupload answer); when nothing is
left it makes no commit, and this child says so (the head commit did not move).

It speaks the supervision contract: phase "publishing" while huggingface_hub uploads (the
watchdog's publishing_limit_s bounds it: the bytes in flight cannot be counted from here,
whichever way they go, inline, LFS or Xet), then one step of the bytes published. It exits
2 with what to do where retrying cannot help: no token, a token that may not write there
(401, 403), a conflict (409), a repo id the Hub refuses, a LoRA that is not there. Network errors
and the Hub's 5xx exit 1, so the watchdog retries within the job's budget. The token comes
in HF_TOKEN and is never printed. On success it writes published.json (repo, commit, files)
in its job folder. Imported only by this child, never by the daemon.
"""
from __future__ import annotations

import json
import os
import string
import sys
from pathlib import Path

from . import child
from .child import Fatal

TAGS = ["text-to-image", "flux", "lora", "diffusers", "template:sd-lora", "fluxgymd"]


def _settings_table(settings: dict) -> str:
    rows = "\n".join(f"| {k} | {json.dumps(v) if not isinstance(v, str) else v} |"
                     for k, v in settings.items())
    return f"| setting | value |\n|---|---|\n{rows}" if rows else "(not recorded)"


def card_text(card: dict, repo: str) -> str:
    """The model card: front matter the Hub reads (base_model, license, tags, instance_prompt,
    widget) and a body for people. Nothing of this machine (no paths) goes in."""
    from huggingface_hub import ModelCardData

    meta = {"tags": TAGS}
    for key in ("base_model", "license", "license_name", "license_link"):
        if card.get(key):
            meta[key] = card[key]
    if card.get("trigger_word"):
        meta["instance_prompt"] = card["trigger_word"]
    if card.get("widgets"):
        meta["widget"] = card["widgets"]
    front = ModelCardData(**meta).to_yaml()
    trigger = card.get("trigger_word") or ""
    lora = card.get("lora_file") or "the .safetensors file"
    base = card.get("base_model") or "black-forest-labs/FLUX.1-dev"
    prompt = (trigger + ", " if trigger else "") + "a photo"
    use_trigger = (f"You should use `{trigger}` to trigger the image generation."
                   if trigger else "No trigger word was set.")
    # the body is a template beside this module: its code sample is text, not imports
    template = string.Template((Path(__file__).with_name("modelcard.md")).read_text("utf-8"))
    return template.substitute(
        front=front, title=card.get("title") or repo.split("/")[-1], use_trigger=use_trigger,
        base=base, repo=repo, lora=lora, prompt=prompt,
        settings=_settings_table(card.get("settings") or {}))


def _http_error(e: BaseException, repo: str, token: str) -> Exception:
    """The Hub's refusals as what to do; the same error (retried) when a retry may help."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError

    status = getattr(getattr(e, "response", None), "status_code", None)
    server = str(getattr(e, "server_message", "") or "").strip()
    said = f" (the Hub said: {server[:200]})" if server else ""
    owner = repo.split("/")[0]
    if isinstance(e, HfHubHTTPError) and status == 401:
        return Fatal(f"{constants.ENDPOINT} refused the token (HTTP 401){said}: give fluxgymd "
                     "a valid write token (token_file under [hub] in fluxgymd.toml, or HF_TOKEN "
                     "in its environment), then retry the job")
    if isinstance(e, HfHubHTTPError) and status == 403:
        return Fatal(f"the token may not write to {repo} (HTTP 403){said}: use a token with "
                     f"write access to {owner}'s repos (a fine-grained token needs \"write\" on "
                     f"{owner}), or publish to a repo of the token's own user, then retry")
    if isinstance(e, HfHubHTTPError) and status == 409:
        return Fatal(f"{repo} is in a conflicting state (HTTP 409){said}: look at the repo on "
                     "the Hub (another commit or operation in progress?), then retry the job")
    if isinstance(e, HfHubHTTPError) and status is not None and 400 <= status < 500 and \
            status not in (408, 429):
        return Fatal(f"the Hub refused publishing to {repo} (HTTP {status}){said}")
    if token and token in str(e):  # never let the token reach the log
        return RuntimeError(str(e).replace(token, "***"))
    return e


def publish(doc: dict, rep, token: str | None, out_dir: Path) -> dict:
    from huggingface_hub import CommitOperationAdd, HfApi

    repo = doc["repo"]
    if not token:
        raise Fatal("publishing needs a Hugging Face token with write access: set token_file "
                    "under [hub] in fluxgymd.toml (a file holding the token, mode 0600) or "
                    "HF_TOKEN in fluxgymd's environment, then retry the job")
    files = doc.get("files") or []
    if not files:
        raise Fatal(f"{doc['source']} has no finished LoRA to publish (it did not write one, "
                    "or it was removed); retry that job, then this one")
    missing = [f["local"] for f in files if not os.path.isfile(f["local"])]
    if missing:
        raise Fatal(f"{', '.join(missing)} is gone; retry {doc['source']}, then this job")
    card = json.loads(doc["card"])
    readme = card_text(card, repo).encode("utf-8")
    rep.phase("publishing", f"{len(files)} file(s) and a model card to {repo}")
    api = HfApi(token=token)
    size = sum(os.path.getsize(f["local"]) for f in files) + len(readme)
    try:
        url = api.create_repo(repo, private=bool(doc.get("private")), exist_ok=True)
        rep.say(f"repo {url}")
        before = api.repo_info(repo).sha
        ops = [CommitOperationAdd(path_in_repo=f["path"], path_or_fileobj=f["local"])
               for f in files]
        ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=readme))
        info = api.create_commit(repo, operations=ops, commit_message=doc["commit_message"])
    except Fatal:
        raise
    except Exception as e:  # noqa: BLE001 - mapped to what to do, or re-raised (retried)
        raise _http_error(e, repo, token) from None
    rep.send("step", step=size, total=size)  # the bytes published, once they are
    changed = info.oid != before
    rep.say(f"published {len(files) + 1} file(s) to {repo} as commit {info.oid[:12]}: "
            f"{info.commit_url}" if changed else
            f"{repo} already holds these files (commit {str(info.oid)[:12]}): no new commit")
    record = {"repo": repo, "url": str(url), "commit": info.oid, "new_commit": changed,
              "files": [f["path"] for f in files] + ["README.md"],
              "private": bool(doc.get("private"))}
    tmp = out_dir / "published.json.tmp"
    tmp.write_text(json.dumps(record, indent=1), encoding="utf-8")
    os.replace(tmp, out_dir / "published.json")
    return record


def main(argv: list[str] | None = None) -> int:
    return child.run(argv, "python -m fluxgymd.publish", __doc__, "publish",
                     "publishing again is safe",
                     lambda job, rep, path: publish(job["publish"], rep,
                                                    os.environ.get("HF_TOKEN") or None,
                                                    path.parent))


if __name__ == "__main__":
    sys.exit(main())
