"""The dataset: images with optional same-name .txt captions, aspect-ratio buckets, and a
data order that is a pure function of (seed, epoch) so a resumed run sees the same batches.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")
CAPTION_EXT = ".txt"
# Files a dataset folder may hold besides images and captions.
IGNORED = {".ds_store", "thumbs.db", "desktop.ini"}


class DatasetError(Exception):
    pass


def max_caption_chars(t5_tokens: int) -> int:
    """The longest caption worth reading: no T5 or CLIP token covers 32 characters, so text
    past this can never reach the encoders (which cut at t5xxl_max_token_length tokens).
    A 10 MB caption file otherwise held the tokenizer for minutes."""
    return 32 * max(t5_tokens, 77)


@dataclass(frozen=True)
class Item:
    path: str
    caption: str
    width: int
    height: int
    sha256: str  # of the file's bytes: the cache key


def _caption(image_path: str, trigger: str, max_chars: int = 0, warn=None) -> str:
    cap_path = os.path.splitext(image_path)[0] + CAPTION_EXT
    caption = ""
    if os.path.exists(cap_path):
        try:
            with open(cap_path, encoding="utf-8", errors="strict") as fh:
                text = fh.read(max_chars + 1) if max_chars else fh.read()
        except (OSError, UnicodeDecodeError) as e:
            raise DatasetError(f"caption {cap_path} cannot be read: {e}") from None
        if max_chars and len(text) > max_chars:
            text = text[:max_chars]
            if warn:
                warn(f"warning: caption {cap_path} is longer than the text encoders can use; "
                     f"only its first {max_chars} characters are read")
        caption = " ".join(text.split())
    if trigger:
        # the trigger word goes first, once
        rest = caption[len(trigger):].lstrip(" ,") if caption.startswith(trigger) else caption
        caption = f"{trigger}, {rest}" if rest else trigger
    return caption


def dataset_files(dataset_dir: str):
    """(path, kind) for each file a dataset folder holds, sorted by name; kind is "image",
    "caption" or "other". Folders, hidden files and OS litter are skipped."""
    for name in sorted(os.listdir(dataset_dir)):
        path = os.path.join(dataset_dir, name)
        if os.path.isdir(path) or name.lower() in IGNORED or name.startswith("."):
            continue
        ext = os.path.splitext(name)[1].lower()
        yield path, ("caption" if ext == CAPTION_EXT else
                     "image" if ext in IMAGE_EXTS else "other")


def scan(dataset_dir: str, trigger: str = "", max_chars: int = 0, warn=None,
         resolution: int = 0) -> list[Item]:
    """Every image in the folder (sorted by name), checked to open; errors name the file.
    `warn` hears of captions cut at `max_chars` and images smaller than `resolution`."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isdir(dataset_dir):
        raise DatasetError(f"dataset folder {dataset_dir} does not exist")
    items: list[Item] = []
    for path, kind in dataset_files(dataset_dir):
        if kind == "caption":
            continue
        if kind == "other":
            raise DatasetError(
                f"{path} is not an image this trainer reads (use {', '.join(IMAGE_EXTS)} "
                "with optional same-name .txt captions), or move it out of the dataset folder"
            )
        try:
            with open(path, "rb") as fh:
                data = fh.read()
            with Image.open(path) as img:
                img.verify()  # truncated or corrupt files fail here, not mid-training
            with Image.open(path) as img:
                width, height = img.size
        except (OSError, UnidentifiedImageError, SyntaxError) as e:
            raise DatasetError(f"{path} cannot be read as an image: {e}") from None
        if warn and resolution and width * height < resolution * resolution * 0.9:
            warn(f"warning: {path} is {width}x{height}, smaller than the {resolution}px "
                 "buckets it trains in: it is upscaled, and the LoRA learns the blur")
        items.append(Item(path, _caption(path, trigger, max_chars, warn), width, height,
                          hashlib.sha256(data).hexdigest()))
    if not items:
        raise DatasetError(f"dataset folder {dataset_dir} holds no images "
                           f"({', '.join(IMAGE_EXTS)})")
    return items


def dataset_hash(items: list[Item]) -> str:
    h = hashlib.sha256()
    for it in items:
        h.update(f"{os.path.basename(it.path)}\0{it.sha256}\0{it.caption}\n".encode())
    return h.hexdigest()


def buckets(resolution: int, divisor: int, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(width, height) pairs of about resolution^2 pixels, sides multiples of divisor."""
    area = resolution * resolution
    out = set()
    w = divisor
    while w <= resolution * max_ratio:
        h = (area // w) // divisor * divisor
        if h >= divisor and max(w / h, h / w) <= max_ratio:
            out.add((w, h))
        w += divisor
    return sorted(out)


def assign_bucket(width: int, height: int, choices: list[tuple[int, int]]) -> tuple[int, int]:
    ratio = width / height
    return min(choices, key=lambda b: (abs(b[0] / b[1] - ratio), -b[0] * b[1]))


def load_image(item: Item, bucket: tuple[int, int]):
    """The image resized to cover the bucket and centre-cropped, as a -1..1 CHW tensor."""
    import numpy as np
    import torch
    from PIL import Image

    bw, bh = bucket
    with Image.open(item.path) as img:
        img = img.convert("RGB")
        scale = max(bw / img.width, bh / img.height)
        size = (max(bw, round(img.width * scale)), max(bh, round(img.height * scale)))
        img = img.resize(size, Image.Resampling.BICUBIC)
        left, top = (img.width - bw) // 2, (img.height - bh) // 2
        img = img.crop((left, top, left + bw, top + bh))
        arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def epoch_batches(bucket_of: list[tuple[int, int]], repeats: int, batch_size: int,
                  seed: int, epoch: int) -> list[list[int]]:
    """The batches (lists of item indices) of one epoch, in order. Depends only on its
    arguments: each image `repeats` times, batches never mix buckets, the order is a
    permutation drawn from its own generator seeded with (seed + epoch)."""
    import torch

    g = torch.Generator().manual_seed(seed + epoch)
    pool = [i for i in range(len(bucket_of)) for _ in range(repeats)]
    order = [pool[j] for j in torch.randperm(len(pool), generator=g).tolist()]
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for i in order:
        by_bucket.setdefault(bucket_of[i], []).append(i)
    batches = [members[k:k + batch_size]
               for _, members in sorted(by_bucket.items())
               for k in range(0, len(members), batch_size)]
    return [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]
