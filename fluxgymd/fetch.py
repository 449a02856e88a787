"""`python -m fluxgymd.fetch JOBFILE`: the child of a kind = "download" job.

For each file it asks the Hub (huggingface_hub's `get_hf_file_metadata`: honours
HF_ENDPOINT and HF_TOKEN) for its size, ETag and location, then fetches it with
huggingface_hub's `http_get` into a partial file of its own,
`<folder>/.cache/fluxgymd/<file>.<etag>.part`, and moves it into place once it is whole
(and its sha256 matches the ETag, for an LFS file). The partial file is kept across
attempts, so a kill or a restart resumes where it stopped (a `Range` request from its size):
huggingface_hub's own `hf_hub_download` resumes within a process only (since 1.x it writes
to a process-unique temporary file and drops it on failure). A file already in the local
Hugging Face cache is linked or copied instead.

It speaks the supervision contract: phase "downloading", then bytes done and total as `step`
events every half second while bytes come in (so the watchdog sees a download that stopped
moving), and says on its last `fetch:` line what to do when retrying cannot help, exiting 2:

- a gated or private repo without a token that may read it (401/403): accept the licence
  and set [hub] token_file;
- a repo or file that does not exist (404);
- not enough free disk for what is left to fetch (checked before the first byte).

Network errors exit 1: the watchdog retries within the job's budget. SIGTERM exits 75 at
once (what was written is kept). Imported only by this child, never by the daemon.
"""
from __future__ import annotations

import os
import shutil
import sys
import threading
import time

from . import child
from .child import Fatal

REPORT_EVERY_S = 0.5
# Test hook: the free bytes the disk check sees (a full disk without filling one).
FREE_BYTES_ENV = "FLUXGYMD_FREE_BYTES"


def human(n: float) -> str:
    """Bytes as people read them (the daemon's status uses the same units)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


class Progress:
    """Bytes done over every file of the job, fed by huggingface_hub's progress bars, and
    sent as `step` events by one thread (the contract's socket is not thread-safe)."""

    def __init__(self, rep, total: int):
        self.rep, self.total = rep, total
        self.done = 0  # bytes of files finished before the current one (or found whole)
        self.current = 0  # bytes of the file being fetched, resumed part included
        self.lock = threading.Lock()
        self.sent = -1
        self.started = time.monotonic()
        self.at_start: int | None = None  # bytes already there when this attempt began
        self.stop = threading.Event()

    def bar_class(self):
        from huggingface_hub.utils import tqdm as hf_tqdm

        progress = self

        class Bar(hf_tqdm):
            def __init__(self, *args, **kwargs):
                kwargs["disable"] = True  # our events are the progress; no bar in the log
                initial = kwargs.get("initial") or 0
                super().__init__(*args, **kwargs)
                with progress.lock:
                    progress.current = initial  # a resumed file starts where it stopped

            def update(self, n=1):
                with progress.lock:
                    progress.current += n or 0
                return super().update(n)
        return Bar

    def resumed(self, have: int) -> None:
        """A file starts with `have` bytes an earlier attempt fetched: not this one's pace."""
        with self.lock:
            self.current = have
            if self.at_start is not None:
                self.at_start += have

    def file_done(self, size: int) -> None:
        with self.lock:
            self.done += size
            self.current = 0

    def report(self) -> None:
        with self.lock:
            now = self.done + self.current
        if self.at_start is None:
            self.at_start = now
        if now != self.sent:
            # seconds per byte since this attempt began fetching (the daemon's ETA before
            # it has a window of its own); none until a byte came
            fields = {}
            if now > self.at_start:
                fields["seconds_per_step"] = (time.monotonic() - self.started) / \
                    (now - self.at_start)
            self.sent = now
            self.rep.send("step", step=now, total=self.total, **fields)

    def run(self) -> None:
        while not self.stop.wait(REPORT_EVERY_S):
            self.report()


def _hub_error(e: BaseException, item: dict, token: bool) -> Exception:
    """huggingface_hub's errors as what to do; None-like (the same error) when a retry may
    help (a network error)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    repo, file, rev = item["repo"], item["file"], item["revision"]
    page = f"{constants.ENDPOINT.rstrip('/')}/{repo}"
    if isinstance(e, GatedRepoError):
        how = ("the token it was given may not read it: accept the licence there while logged "
               "in as the token's user") if token else \
            ("no token was given: accept the licence there, then give fluxgymd a token that "
             "may read it (token_file under [hub] in fluxgymd.toml, or HF_TOKEN in its "
             "environment)")
        return Fatal(f"{repo} is gated (licence at {page}); {how}, then retry the job")
    if isinstance(e, RepositoryNotFoundError):
        return Fatal(f"no repo {repo} at {constants.ENDPOINT} (or it is private and the token "
                     "may not read it: token_file under [hub])")
    if isinstance(e, RevisionNotFoundError):
        return Fatal(f"{repo} has no revision {rev}")
    if isinstance(e, EntryNotFoundError):
        return Fatal(f"{repo} has no file {file} (revision {rev}); check the catalog entry")
    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, HfHubHTTPError) and status in (401, 403):
        return Fatal(f"{page} refused {file} (HTTP {status}): give fluxgymd a token that may "
                     "read it (token_file under [hub] in fluxgymd.toml)")
    return e


def _part(item: dict, etag: str) -> str:
    """Where a file is fetched to, kept across attempts, until it is whole."""
    tag = "".join(c for c in etag if c.isalnum())[:16] or "noetag"
    return os.path.join(item["dir"], ".cache", "fluxgymd", f"{item['file']}.{tag}.part")


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _sha256(path: str, limit: int | None = None):
    """A sha256 of the file's first `limit` bytes (all of them by default), to go on with."""
    import hashlib

    h = hashlib.sha256()
    left = limit
    if left == 0:
        return h
    with open(path, "rb") as fh:
        while left is None or left > 0:
            chunk = fh.read(8 << 20 if left is None else min(8 << 20, left))
            if not chunk:
                break
            h.update(chunk)
            if left is not None:
                left -= len(chunk)
    return h


class HashingWriter:
    """The partial file as http_get writes it, hashed on the way (the sha256 costs no second
    read of a 24 GB file). A seek (a server that ignored our Range) spoils the running hash:
    the file is hashed again at the end."""

    def __init__(self, fh, sha):
        self.fh, self.sha, self.valid = fh, sha, True

    def write(self, data) -> int:
        self.sha.update(data)
        return self.fh.write(data)

    def seek(self, *args):
        self.valid = False
        return self.fh.seek(*args)

    def truncate(self, *args):
        self.valid = False
        return self.fh.truncate(*args)

    def __getattr__(self, name):  # tell, flush, fileno, ...
        return getattr(self.fh, name)


def _from_hf_cache(item: dict, part: str) -> bool:
    """The file from the local Hugging Face cache, when it is there: linked, else copied."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(item["repo"], item["file"], revision=item["revision"])
    if not isinstance(cached, str) or not os.path.isfile(cached):
        return False
    try:
        os.link(os.path.realpath(cached), part)
    except OSError:
        shutil.copyfile(cached, part)
    return True


def fetch(items: list[dict], rep, token: str | None) -> None:
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    rep.phase("downloading", f"{len(items)} file(s)")
    from huggingface_hub.errors import EntryNotFoundError

    metas, found = [], []
    for item in items:  # HEAD first: the sizes, and any refusal, before the first byte
        try:
            metas.append(get_hf_file_metadata(hf_hub_url(item["repo"], item["file"],
                                                         revision=item["revision"]),
                                              token=token))
            found.append(item)
        except EntryNotFoundError:
            if not item.get("optional"):
                raise Fatal(f"{item['repo']} has no file {item['file']} (revision "
                            f"{item['revision']}); check the catalog entry") from None
            rep.say(f"{item['repo']} has no {item['file']} (optional): skipped")
        except Exception as e:  # noqa: BLE001 - mapped to what to do, or re-raised
            raise _hub_error(e, item, bool(token)) from None
    items = found
    todo = [(item, meta) for item, meta in zip(items, metas)
            if not os.path.isfile(os.path.join(item["dir"], item["file"]))]
    need = sum((meta.size or 0) - _size(_part(item, meta.etag or "")) for item, meta in todo)
    folder = items[0]["dir"] if items else "."
    os.makedirs(folder, exist_ok=True)
    free = int(os.environ[FREE_BYTES_ENV]) if os.environ.get(FREE_BYTES_ENV) else \
        shutil.disk_usage(folder).free
    if need > free:
        raise Fatal(f"not enough disk: {human(need)} left to fetch and {human(free)} free in "
                    f"{os.path.dirname(folder)}; free some space or set [models] dir to a "
                    "bigger disk, then retry the job")
    total = sum(meta.size or 0 for meta in metas)
    progress = Progress(rep, total)
    for item, meta in zip(items, metas):
        if not any(item is t for t, _ in todo):
            progress.file_done(meta.size or 0)
    rep.say(f"{len(todo)} of {len(items)} file(s) to fetch, {human(need)} ({human(total)} in "
            "all)")
    progress.report()  # where this attempt starts: the bytes of the files already whole
    reporter = threading.Thread(target=progress.run, name="progress", daemon=True)
    reporter.start()
    try:
        for item, meta in todo:
            dest = os.path.join(item["dir"], item["file"])
            part = _part(item, meta.etag or "")
            os.makedirs(os.path.dirname(part), exist_ok=True)
            size = meta.size or 0
            have = _size(part)
            if have > size or (not have and _from_hf_cache(item, part)):
                have = _size(part) if have <= size else 0
                if have != size:
                    os.unlink(part)
                    have = 0
            rep.say(f"{item['repo']}/{item['file']} ({human(size)}) -> {dest}"
                    + (f", resuming at {human(have)}" if 0 < have < size else ""))
            progress.resumed(have)
            sha = _sha256(part, have)  # what an earlier attempt wrote, to go on from
            writer = None
            if have < size:
                try:
                    with open(part, "ab") as fh:
                        writer = HashingWriter(fh, sha)
                        http_get(meta.location, writer, resume_size=have,
                                 headers=build_hf_headers(token=token), expected_size=size,
                                 tqdm_class=progress.bar_class())
                except Exception as e:  # noqa: BLE001
                    raise _hub_error(e, item, bool(token)) from None
            if writer is None or not writer.valid:
                sha = _sha256(part)
            etag = (meta.etag or "").strip('"')
            if len(etag) == 64 and all(c in "0123456789abcdef" for c in etag) and \
                    sha.hexdigest() != etag:
                os.unlink(part)  # torn or wrong: fetched again from the start next time
                raise RuntimeError(f"{item['file']}: sha256 does not match the Hub's ({etag});"
                                   " fetching it again")
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            os.replace(part, dest)
            progress.file_done(size)
    finally:
        progress.stop.set()
        reporter.join()
    progress.report()
    rep.say(f"done: {len(items)} file(s), {human(total)}")


def main(argv: list[str] | None = None) -> int:
    return child.run(argv, "python -m fluxgymd.fetch", __doc__, "fetch",
                     "what was fetched is kept, resumable",
                     lambda job, rep, _: fetch(job["download"]["files"], rep,
                                               os.environ.get("HF_TOKEN") or None))


if __name__ == "__main__":
    sys.exit(main())
