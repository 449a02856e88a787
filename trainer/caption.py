"""Caption a dataset folder with Florence-2: `python -m trainer.caption JOBFILE`.

The [caption] section of a job file (fluxgymd's kind = "caption"): `dataset_dir`, `model`
(a local Florence-2 folder), `task`, `trigger_word`, `overwrite`, `batch_size`,
`num_beams`, `max_new_tokens`. As FluxGym does: the caption is `f"{trigger} {caption}"`,
"The image shows " removed, num_beams 3, max_new_tokens 1024.

Only images without a .txt are captioned (all of them with overwrite); each .txt is written
to a temporary file and renamed, so a kill never leaves a torn caption, and a job that
resumes skips what is done. A file that is not a decodable image is listed and skipped; an
image over PIL's decompression-bomb limit is refused by name; no usable image at all is exit
2. Progress goes through the supervision contract: a step per image done.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import tomllib

from .contract import Reporter, Stop, StopNow, keep_going_without_a_reader

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
TASKS = ("<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>", "<CAPTION>")
DEFAULTS = {"task": "<DETAILED_CAPTION>", "trigger_word": "", "overwrite": False,
            "batch_size": 8, "num_beams": 3, "max_new_tokens": 1024}
EXIT_INTERRUPTED = 75


class CaptionError(Exception):
    pass


def images_of(folder: str) -> list[str]:
    return sorted(os.path.join(folder, n) for n in os.listdir(folder)
                  if n.lower().endswith(IMAGE_EXTS) and not n.startswith("."))


def caption_path(image: str) -> str:
    return os.path.splitext(image)[0] + ".txt"


def clean(text: str, trigger: str) -> str:
    """FluxGym's finishing: no "The image shows " prefix, the trigger word in front."""
    text = text.replace("<s>", "").replace("</s>", "").replace("<pad>", "").strip()
    text = text.replace("The image shows ", "")
    return f"{trigger} {text}".strip() if trigger else text


def write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load_image(path: str):
    """The image as RGB, or a CaptionError that says why it cannot be used. Images over
    PIL's decompression-bomb limit are refused (the warning is an error here)."""
    import warnings

    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as img:
                img.load()
                return img.convert("RGB")
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise CaptionError(f"{os.path.basename(path)} is refused: {e}") from None
        except (OSError, ValueError, SyntaxError) as e:
            raise CaptionError(f"{os.path.basename(path)} is not a readable image "
                               f"({type(e).__name__}: {e})") from None


def generate(model, processor, images, task: str, num_beams: int, max_new_tokens: int,
             device, dtype) -> list[str]:
    """One batch: the raw decoded text of each image, as the processor decodes it."""
    import torch

    inputs = processor(text=[task] * len(images), images=images, return_tensors="pt")
    inputs = {k: v.to(device) for k, v in inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    with torch.inference_mode():
        out = model.generate(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"],
                             max_new_tokens=max_new_tokens, num_beams=num_beams,
                             do_sample=False)
    return processor.batch_decode(out, skip_special_tokens=False)


def parse_text(processor, raw: str, task: str, size) -> str:
    """FluxGym's parse: post_process_generation for the task; a processor without the
    task's parsing rules falls back to the decoded text itself."""
    try:
        return processor.post_process_generation(raw, task=task, image_size=size)[task]
    except (ValueError, KeyError):
        return raw


def load(model_dir: str):
    import torch
    from transformers import AutoProcessor, Florence2ForConditionalGeneration

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    # transformers' native Florence-2: no remote code, local files only
    model = Florence2ForConditionalGeneration.from_pretrained(
        model_dir, dtype=dtype, local_files_only=True, trust_remote_code=False).to(device).eval()
    processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True,
                                              trust_remote_code=False)
    return model, processor, device, dtype


def run(cfg: dict, rep: Reporter, stop: Stop) -> int:
    folder = cfg["dataset_dir"]
    if not os.path.isdir(folder):
        raise CaptionError(f"caption.dataset_dir {folder} is not a folder")
    for name in os.listdir(folder):  # a caption a kill interrupted before its rename
        if name.endswith(".tmp") and ".txt." in name:
            os.unlink(os.path.join(folder, name))
    every = images_of(folder)
    todo, usable, bad = [], 0, []
    for path in every:
        try:
            load_image(path)
        except CaptionError as e:
            bad.append(str(e))
            continue
        usable += 1
        if cfg["overwrite"] or not os.path.exists(caption_path(path)):
            todo.append(path)
    for why in bad:
        rep.say(f"warning: skipped {why}")
    if not usable:
        raise CaptionError(f"no usable image in {folder} ({len(every)} file(s) with an image "
                           f"extension, {len(bad)} unreadable); add PNG, JPEG or WebP photos")
    done_before = usable - len(todo)
    rep.say(f"{len(todo)} of {usable} image(s) to caption in {folder} "
            f"({done_before} already have a caption)")
    rep.start_bar(done_before, usable)
    if not todo:
        rep.done()
        return 0
    rep.phase("loading", cfg["model"])
    model, processor, device, dtype = load(cfg["model"])
    rep.phase("training", f"captioning on {device.type}, batches of {cfg['batch_size']}")
    stop.deferred = True  # from here a stop waits for the batch: its captions are written
    done, batch_size = done_before, cfg["batch_size"]
    for start in range(0, len(todo), batch_size):
        if stop:
            rep.say(f"stopped by {stop.requested} at {done}/{usable}: every caption written is "
                    "whole; the rest is done when it resumes (exit 75)")
            return EXIT_INTERRUPTED
        batch = todo[start:start + batch_size]
        images = [load_image(p) for p in batch]
        t = time.monotonic()
        raw = generate(model, processor, images, cfg["task"], cfg["num_beams"],
                       cfg["max_new_tokens"], device, dtype)
        for path, img, text in zip(batch, images, raw):
            write_atomic(caption_path(path),
                         clean(parse_text(processor, text, cfg["task"], img.size),
                               cfg["trigger_word"]))
            done += 1
        rep.say(f"captioned {len(batch)}: {', '.join(os.path.basename(p) for p in batch)} "
                f"in {time.monotonic() - t:.2f}s")
        rep.send("step", step=done, total=usable,
                 seconds_per_step=(time.monotonic() - t) / len(batch))
    rep.say(f"captioned {len(todo)} image(s); {usable} of {usable} have a caption")
    rep.done()
    return 0


def load_job(path: str) -> dict:
    with open(path, "rb") as fh:
        section = tomllib.load(fh).get("caption") or {}
    return {**DEFAULTS, **section}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer.caption", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("job_file", help="a job file with a [caption] section")
    args = ap.parse_args(argv)
    keep_going_without_a_reader()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    stop = Stop()
    rep = Reporter("caption")
    try:
        return run(load_job(args.job_file), rep, stop)
    except CaptionError as e:
        print(f"caption: {e}", file=sys.stderr)
        return 2
    except StopNow as e:
        rep.say(f"stopped by {e.signame} while loading; nothing to save (exit 75)")
        return EXIT_INTERRUPTED
    finally:
        rep.close()


if __name__ == "__main__":
    sys.exit(main())
