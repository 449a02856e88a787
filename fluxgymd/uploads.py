"""Photos uploaded through the dashboard: hostile input until proven otherwise.

A draft is a folder of its own (`<state_dir>/drafts/<id>/`, the id random) that the new-LoRA
page fills one file per request; `fluxgymd new` copies it into the job's folder when the
user starts training. Each file:

- is named by `safe_name`: a bare file name (no path, no leading dot, no control character,
  at most 120 characters, an image or .txt extension); other characters become "_"; a name
  the draft already holds gets a suffix ("-2");
- is streamed to a hidden temporary file in the draft, counting bytes as they come, and
  refused the moment it passes the limit (the rest is never read);
- is an image by its first bytes (PNG, JPEG, WebP) and decodes whole with PIL, with PIL's
  decompression-bomb limit as an error (a small file declaring 50000×50000 is refused before
  any pixel is decoded); a caption is UTF-8 text;
- is moved into place only then, inside the draft and nowhere else.

No zip is accepted: a folder's files are uploaded one by one by the page.
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import time
import unicodedata
from pathlib import Path

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")
EXTS_OF = {"png": (".png",), "jpeg": (".jpg", ".jpeg"), "webp": (".webp",)}
CAPTION_EXT = ".txt"
DRAFT_ID = re.compile(r"[0-9a-f]{16}")
MAX_NAME = 120
MAX_FILES = 1000  # per draft
CHUNK = 64 * 1024
KEEP_DRAFTS_S = 3 * 86400  # drafts nobody touched for this long are removed


class UploadError(Exception):
    """What is wrong with an upload, said so the user can fix it (HTTP `status`)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message, self.status = message, status


def safe_name(name: str) -> str:
    """A bare file name that can be written into a draft, or UploadError."""
    if not name:
        raise UploadError("a file needs a name")
    if "/" in name or "\\" in name or name in (".", "..") or ".." in name:
        raise UploadError(f"{name[:80]!r}: a file name, not a path (no '/', '\\' or '..')")
    if any(unicodedata.category(c) in ("Cc", "Cf") for c in name):
        raise UploadError(f"{name[:80]!r}: control characters (NUL, newline, ...) are not "
                          "allowed in a file name")
    if name.startswith("."):
        raise UploadError(f"{name[:80]!r}: a hidden file (leading dot) is not a photo")
    stem, ext = os.path.splitext(name)
    ext = ext.lower()
    if ext not in IMAGE_EXTS + (CAPTION_EXT,):
        raise UploadError(f"{name[:80]!r}: only photos ({', '.join(IMAGE_EXTS)}) and their "
                          f"captions ({CAPTION_EXT}) are taken")
    stem = re.sub(r"[^A-Za-z0-9._ -]", "_", stem).strip(" .") or "file"
    return stem[:MAX_NAME - len(ext)] + ext


def free_name(folder: Path, name: str) -> str:
    """`name`, or with a suffix when the draft holds it already."""
    stem, ext = os.path.splitext(name)
    candidate, n = name, 1
    while (folder / candidate).exists():
        n += 1
        candidate = f"{stem}-{n}{ext}"
    return candidate


def check_image(path: Path, name: str) -> tuple[int, int]:
    """The image's size, once it decoded whole; UploadError for anything else."""
    import warnings

    from PIL import Image

    from trainer.preflight import sniff  # the header reader submit-time checks use

    found = sniff(str(path))
    if found is None:
        raise UploadError(f"{name}: not a PNG, JPEG or WebP image (its first bytes say "
                          "otherwise)", 415)
    kind, width, height = found
    if os.path.splitext(name)[1].lower() not in EXTS_OF[kind]:
        raise UploadError(f"{name}: its bytes are a {kind.upper()} image; give it a "
                          f"{EXTS_OF[kind][0]} name", 415)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                size = img.size
                img.load()  # every pixel decoded once: a truncated file fails here
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UploadError(f"{name}: declares {width}x{height} pixels, over the "
                          f"decompression-bomb limit ({Image.MAX_IMAGE_PIXELS} pixels); "
                          "shrink it first", 413) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise UploadError(f"{name}: cannot be decoded as an image ({e})", 415) from None
    return size


class Drafts:
    """The drafts folder: make one, find one, store a file in one."""

    def __init__(self, root: Path, max_file_bytes: int):
        self.root, self.max_file_bytes = Path(root), max_file_bytes

    def create(self) -> str:
        self.prune()
        draft_id = secrets.token_hex(8)
        (self.root / draft_id).mkdir(parents=True, mode=0o700)
        return draft_id

    def folder(self, draft_id: str) -> Path:
        if not DRAFT_ID.fullmatch(draft_id or ""):
            raise UploadError("no such draft", 404)
        path = self.root / draft_id
        if not path.is_dir():
            raise UploadError("no such draft (drafts are kept three days)", 404)
        return path

    def prune(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        if not self.root.is_dir():
            return
        for entry in self.root.iterdir():
            try:
                if DRAFT_ID.fullmatch(entry.name) and \
                        now - entry.stat().st_mtime > KEEP_DRAFTS_S:
                    shutil.rmtree(entry, ignore_errors=True)
            except OSError:
                pass

    def listing(self, draft_id: str) -> list[dict]:
        folder = self.folder(draft_id)
        files = []
        for p in sorted(folder.iterdir()):
            if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."):
                txt = p.with_suffix(CAPTION_EXT)
                files.append({"name": p.name, "size": p.stat().st_size,
                              "caption": txt.read_text(encoding="utf-8", errors="replace")
                              if txt.is_file() else None})
        return files

    async def store(self, draft_id: str, name: str, declared: int | None, chunks) -> dict:
        """Stream one upload (`chunks`: an async iterator of bytes) into the draft, every
        check passed before it is in place. `declared`: its Content-Length, if sent."""
        import asyncio

        folder = self.folder(draft_id)
        clean = safe_name(name)
        limit = self.max_file_bytes
        if declared is not None and declared > limit:
            raise UploadError(f"{clean}: {declared} bytes, over the {limit // 2**20} MiB "
                              "limit ([web] max_upload_mb)", 413)
        if sum(1 for _ in folder.iterdir()) >= MAX_FILES:
            raise UploadError(f"a draft holds at most {MAX_FILES} files", 413)
        tmp = folder / f".upload-{secrets.token_hex(6)}.part"
        got = 0
        try:
            with open(tmp, "wb") as fh:
                async for chunk in chunks:
                    got += len(chunk)
                    if got > limit:
                        raise UploadError(f"{clean}: over the {limit // 2**20} MiB limit "
                                          "([web] max_upload_mb); the rest was not read", 413)
                    fh.write(chunk)
            if clean.lower().endswith(CAPTION_EXT):
                try:
                    tmp.read_bytes().decode("utf-8")
                except UnicodeDecodeError:
                    raise UploadError(f"{clean}: a caption must be UTF-8 text", 415) from None
                kind, size = "caption", None
            else:
                size = await asyncio.to_thread(check_image, tmp, clean)
                kind = "image"
            # a caption goes with its photo's name; a photo never overwrites another
            final = clean if kind == "caption" else free_name(folder, clean)
            os.replace(tmp, folder / final)
        finally:
            if tmp.exists():
                tmp.unlink()
        os.utime(folder)  # a draft in use is not pruned
        return {"name": final, "kind": kind, "bytes": got,
                **({"width": size[0], "height": size[1]} if size else {})}

    def write_caption(self, draft_id: str, image: str, text: str) -> dict:
        folder = self.folder(draft_id)
        clean = safe_name(image)
        if not (folder / clean).is_file() or clean.lower().endswith(CAPTION_EXT):
            raise UploadError(f"{image[:80]!r}: no such photo in this draft", 404)
        if len(text.encode("utf-8")) > 64 * 1024:
            raise UploadError("a caption is at most 64 KiB", 413)
        txt = (folder / clean).with_suffix(CAPTION_EXT)
        tmp = folder / f".caption-{secrets.token_hex(6)}.part"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, txt)
        return {"name": clean, "caption": text}
