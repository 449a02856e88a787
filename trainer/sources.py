"""Where a Flux model's parts come from: a diffusers folder, a hub id already in the local
Hugging Face cache, or single files as FluxGym and ComfyUI hold them (a transformer file with
BFL key names, maybe under ComfyUI's `model.diffusion_model.` prefix, maybe fp8; and
`clip_l`, `t5xxl`, `ae` files beside it).

Stdlib only: fluxgymd resolves a job's model when it is submitted, reading nothing but the
safetensors headers, so a wrong file is refused before anything loads. The architecture
configs travel with the project (`trainer/configs/`); a single file's config is the shipped
one whose layer shapes match the file, with its depth and guidance read from the keys.
"""
from __future__ import annotations

import glob
import json
import os
import re
import struct
from dataclasses import dataclass, field

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
COMFY_PREFIX = "model.diffusion_model."
WEIGHT_EXTS = (".safetensors", ".sft")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What each tokenizer folder needs, and where a user gets it.
TOKENIZER_FILES = {
    "tokenizer": ("CLIP-L", "vocab.json, merges.txt, tokenizer_config.json, "
                  "special_tokens_map.json"),
    "tokenizer_2": ("T5-XXL", "spiece.model (or tokenizer.json), tokenizer_config.json, "
                    "special_tokens_map.json"),
}
TOKENIZER_HINT = ("copy the tokenizer/ and tokenizer_2/ folders of black-forest-labs/FLUX.1-dev "
                  "(or FLUX.1-schnell) into {dir}, e.g. `huggingface-cli download "
                  "black-forest-labs/FLUX.1-schnell --include 'tokenizer*/*' --local-dir {dir}`, "
                  "and set train.tokenizers = \"{dir}\"")


class SourceError(Exception):
    pass


def header(path: str) -> dict:
    """A safetensors file's header: {name: {"dtype", "shape", ...}} without reading weights."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise SourceError(f"{path} is too short to be a safetensors file")
            (n,) = struct.unpack("<Q", raw)
            if n > 200 * (1 << 20):
                raise SourceError(f"{path} is not a safetensors file (header size {n})")
            doc = json.loads(fh.read(n))
    except OSError as e:
        raise SourceError(f"{path} cannot be read: {e.strerror}") from None
    except (ValueError, UnicodeDecodeError):
        raise SourceError(f"{path} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(doc, dict):
        raise SourceError(f"{path} is not a safetensors file")
    doc.pop("__metadata__", None)
    return doc


def shipped(arch: str, part: str) -> dict:
    with open(os.path.join(CONFIGS, arch, f"{part}.json"), encoding="utf-8") as fh:
        return json.load(fh)


def architectures() -> list[str]:
    return sorted(os.listdir(CONFIGS))


@dataclass
class Part:
    files: list[str]  # safetensors files holding this part's weights
    config: dict
    layout: str = "diffusers"  # or "bfl" (transformer), "ldm" (VAE), "transformers"
    prefix: str = ""  # stripped from every key
    dtype: str = ""  # the storage dtype of the largest tensors (safetensors' name)


@dataclass
class Source:
    kind: str  # "folder" or "single"
    transformer: Part
    vae: Part | None = None
    clip: Part | None = None
    t5: Part | None = None
    tokenizer: str = ""
    tokenizer_2: str = ""
    problems: list[str] = field(default_factory=list)

    @property
    def variant(self) -> str:
        return "dev" if self.transformer.config.get("guidance_embeds") else "schnell"

    def describe(self) -> str:
        t = self.transformer
        layers = f"{t.config['num_layers']}+{t.config['num_single_layers']} blocks"
        return f"FLUX {self.variant}, {layers}, {t.layout} keys, {t.dtype or '?'} ({self.kind})"


def _dtype(head: dict) -> str:
    sizes: dict[str, int] = {}
    for v in head.values():
        n = 1
        for d in v.get("shape", []):
            n *= d
        sizes[v.get("dtype", "")] = sizes.get(v.get("dtype", ""), 0) + n
    return max(sizes, key=sizes.get) if sizes else ""


def _depth(head: dict, pattern: str) -> int:
    found = {int(m.group(1)) for k in head if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def _shape(head: dict, key: str) -> list[int]:
    return list(head.get(key, {}).get("shape", []))


def transformer_part(path: str) -> Part:
    head = header(path)
    prefix = COMFY_PREFIX if any(k.startswith(COMFY_PREFIX) for k in head) else ""
    keys = {k[len(prefix):]: v for k, v in head.items() if k.startswith(prefix)}
    if "img_in.weight" in keys:
        layout, inner = "bfl", _shape(keys, "img_in.weight")
        head_dim = _shape(keys, "double_blocks.0.img_attn.norm.query_norm.scale")
        joint = _shape(keys, "txt_in.weight")
        pooled = _shape(keys, "vector_in.in_layer.weight")
        double = _depth(keys, r"double_blocks\.(\d+)\.")
        single = _depth(keys, r"single_blocks\.(\d+)\.")
        guidance = any(k.startswith("guidance_in.") for k in keys)
    elif "x_embedder.weight" in keys:
        layout, inner = "diffusers", _shape(keys, "x_embedder.weight")
        head_dim = _shape(keys, "transformer_blocks.0.attn.norm_q.weight")
        joint = _shape(keys, "context_embedder.weight")
        pooled = _shape(keys, "time_text_embed.text_embedder.linear_1.weight")
        double = _depth(keys, r"transformer_blocks\.(\d+)\.")
        single = _depth(keys, r"single_transformer_blocks\.(\d+)\.")
        guidance = any(".guidance_embedder." in k for k in keys)
    else:
        raise SourceError(f"{path} is not a Flux transformer: it has neither BFL keys "
                          "(img_in, double_blocks…) nor diffusers keys (x_embedder, "
                          "transformer_blocks…). Is it a text encoder, a VAE or a LoRA?")
    if len(inner) != 2 or len(head_dim) != 1 or len(joint) != 2 or len(pooled) != 2:
        raise SourceError(f"{path} has Flux key names but not Flux's layer shapes")
    for arch in architectures():
        conf = shipped(arch, "transformer")
        if (conf["num_attention_heads"] * conf["attention_head_dim"] == inner[0]
                and conf["attention_head_dim"] == head_dim[0]
                and conf["in_channels"] == inner[1] and conf["joint_attention_dim"] == joint[1]
                and conf["pooled_projection_dim"] == pooled[1]):
            conf.update(num_layers=double, num_single_layers=single, guidance_embeds=guidance)
            return Part([path], conf, layout, prefix, _dtype(head))
    raise SourceError(f"{path}: no shipped Flux architecture has width {inner[0]} and head "
                      f"size {head_dim[0]} (known: {', '.join(architectures())})")


def vae_part(path: str) -> Part:
    head = header(path)
    prefix = next((p for p in ("first_stage_model.", "vae.") if any(k.startswith(p) for k in head)),
                  "")
    keys = {k[len(prefix):]: v for k, v in head.items() if k.startswith(prefix)}
    if "encoder.conv_in.weight" not in keys:
        raise SourceError(f"{path} is not a VAE (no encoder.conv_in.weight)")
    ldm = any(k.startswith("encoder.down.") for k in keys)
    levels = _depth(keys, r"encoder\.down\.(\d+)\." if ldm else r"encoder\.down_blocks\.(\d+)\.")
    first = _shape(keys, "encoder.conv_in.weight")[0]
    latent = _shape(keys, "decoder.conv_in.weight")[1:2]
    for arch in architectures():
        conf = shipped(arch, "vae")
        if (conf["block_out_channels"][0] == first and len(conf["block_out_channels"]) == levels
                and [conf["latent_channels"]] == latent):
            return Part([path], conf, "ldm" if ldm else "diffusers", prefix, _dtype(head))
    raise SourceError(f"{path} is a VAE but not Flux's: {levels} levels from {first} channels "
                      f"with {latent} latent channels (Flux's AE has 16)")


def clip_part(path: str) -> Part:
    head = header(path)
    # transformers 4 (and the files FluxGym and ComfyUI hold) prefix keys with text_model.
    head = {k.removeprefix("text_model."): v for k, v in head.items()}
    shape = _shape(head, "embeddings.token_embedding.weight")
    if len(shape) != 2:
        raise SourceError(f"{path} is not a CLIP text encoder "
                          "(no text_model.embeddings.token_embedding.weight)")
    for arch in architectures():
        conf = shipped(arch, "text_encoder")
        if conf["hidden_size"] == shape[1]:
            conf.update(vocab_size=shape[0],
                        num_hidden_layers=_depth(head, r"encoder\.layers\.(\d+)\."))
            return Part([path], conf, "transformers", "", _dtype(head))
    raise SourceError(f"{path}: a CLIP text encoder of width {shape[1]}; Flux uses CLIP-L (768)")


def t5_part(path: str) -> Part:
    head = header(path)
    shape = _shape(head, "shared.weight") or _shape(head, "encoder.embed_tokens.weight")
    if len(shape) != 2 or not any(k.startswith("encoder.block.") for k in head):
        raise SourceError(f"{path} is not a T5 encoder (no shared.weight and encoder.block.*)")
    for arch in architectures():
        conf = shipped(arch, "text_encoder_2")
        if conf["d_model"] == shape[1]:
            conf.update(vocab_size=shape[0], num_layers=_depth(head, r"encoder\.block\.(\d+)\."))
            return Part([path], conf, "transformers", "", _dtype(head))
    raise SourceError(f"{path}: a T5 encoder of width {shape[1]}; Flux uses T5-XXL (4096)")


def _folder_part(folder: str, sub: str, config_name: str = "config.json") -> Part | None:
    conf_path = os.path.join(folder, sub, config_name)
    if not os.path.isfile(conf_path):
        return None
    with open(conf_path, encoding="utf-8") as fh:
        conf = json.load(fh)
    files = sorted(glob.glob(os.path.join(folder, sub, "*.safetensors")))
    dtype = _dtype(header(files[0])) if files else ""
    return Part(files, conf, "diffusers" if sub in ("transformer", "vae") else "transformers",
                "", dtype)


def hub_cache_dirs() -> list[str]:
    env = os.environ
    dirs = [env.get("HF_HUB_CACHE", ""),
            os.path.join(env["HF_HOME"], "hub") if env.get("HF_HOME") else "",
            os.path.join(os.path.expanduser("~"), ".cache", "huggingface", "hub")]
    return [d for d in dict.fromkeys(dirs) if d]


def from_hub_cache(repo_id: str) -> str | None:
    """The snapshot folder of `repo_id` in the local Hugging Face cache: the one `refs/main`
    names, else the newest. Never a download."""
    for root in hub_cache_dirs():
        repo = os.path.join(root, "models--" + repo_id.replace("/", "--"))
        snaps = os.path.join(repo, "snapshots")
        if not os.path.isdir(snaps):
            continue
        try:
            with open(os.path.join(repo, "refs", "main"), encoding="utf-8") as fh:
                main = os.path.join(snaps, fh.read().strip())
            if os.path.isfile(os.path.join(main, "model_index.json")):
                return main
        except OSError:
            pass
        found = [p for p in glob.glob(os.path.join(snaps, "*"))
                 if os.path.isfile(os.path.join(p, "model_index.json"))]
        if found:
            return max(found, key=os.path.getmtime)
    return None


def custom_code(folder: str) -> str | None:
    """The code a tokenizer folder asks transformers to import (`auto_map` in its
    tokenizer_config.json), or None. The trainer never runs a model's own code, so such a
    folder is refused rather than loaded (transformers would ask on a terminal, or refuse)."""
    try:
        with open(os.path.join(folder, "tokenizer_config.json"), encoding="utf-8") as fh:
            conf = json.load(fh)
    except (OSError, ValueError):
        return None
    auto = conf.get("auto_map") if isinstance(conf, dict) else None
    return json.dumps(auto)[:120] if auto else None


def _custom_code_problems(src: Source) -> list[str]:
    out = []
    for sub in ("tokenizer", "tokenizer_2"):
        folder = getattr(src, sub)
        if folder and (code := custom_code(folder)):
            out.append(f"the tokenizer in {folder} asks to run its own code (auto_map {code}); "
                       "the trainer never runs code that comes with a model: use FLUX.1's own "
                       "tokenizer files (" + TOKENIZER_FILES[sub][1] + ")")
    return out


def _tokenizer_problems(tokenizers: str, src: Source) -> list[str]:
    problems = []
    for sub in ("tokenizer", "tokenizer_2"):
        path = os.path.join(tokenizers, sub)
        if not os.path.isfile(os.path.join(path, "tokenizer_config.json")):
            what, files = TOKENIZER_FILES[sub]
            problems.append(f"train.tokenizers: the {what} tokenizer is missing: {path} needs "
                            f"{files}; " + TOKENIZER_HINT.format(dir=tokenizers))
        setattr(src, sub, path)
    return problems


def resolve(model: str, clip_l: str = "", t5xxl: str = "", ae: str = "",
            tokenizers: str = "") -> Source:
    """The job's model, as parts to load. Problems that need the user's attention are in
    `.problems`; a wrong file raises SourceError."""
    src = _resolve(model, clip_l, t5xxl, ae, tokenizers)
    src.problems += _custom_code_problems(src)
    return src


def _resolve(model: str, clip_l: str, t5xxl: str, ae: str, tokenizers: str) -> Source:
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "model_index.json")):
            raise SourceError(f"{model} has no model_index.json; is it a diffusers-format Flux "
                              "folder?")
        transformer = _folder_part(model, "transformer")
        if transformer is None or transformer.config.get("_class_name") != \
                "FluxTransformer2DModel":
            raise SourceError(f"{model}/transformer/config.json is missing or is not a "
                              "FluxTransformer2DModel's")
        src = Source("folder", transformer, _folder_part(model, "vae"),
                     _folder_part(model, "text_encoder"), _folder_part(model, "text_encoder_2"),
                     os.path.join(model, "tokenizer"), os.path.join(model, "tokenizer_2"))
        # single files named beside a folder replace its parts (an fp8 T5, another AE)
        _single_parts(src, clip_l, t5xxl, ae)
        if tokenizers:
            src.problems += _tokenizer_problems(tokenizers, src)
        for name, part in (("vae", src.vae), ("text_encoder", src.clip),
                           ("text_encoder_2", src.t5)):
            if part is None:
                key = {"vae": "ae", "text_encoder": "clip_l"}.get(name, "t5xxl")
                src.problems.append(f"{model} has no {name}/ folder; name a file for it "
                                    f"(train.{key})")
        return src
    if os.path.isfile(model):
        if not model.endswith(WEIGHT_EXTS):
            raise SourceError(f"{model} is not a .safetensors or .sft file")
        src = Source("single", transformer_part(model))
        _single_parts(src, clip_l, t5xxl, ae)
        for key, part in (("clip_l", src.clip), ("t5xxl", src.t5), ("ae", src.vae)):
            if part is None:
                where = "vae/ae.sft" if key == "ae" else f"clip/{key}.safetensors"
                src.problems.append(f"train.pretrained_model is a single transformer file; name "
                                    f"its other parts too: train.{key} (e.g. FluxGym's "
                                    f"models/{where})")
        if tokenizers:
            src.problems += _tokenizer_problems(tokenizers, src)
        else:
            cached = from_hub_cache("black-forest-labs/FLUX.1-dev") or from_hub_cache(
                "black-forest-labs/FLUX.1-schnell")
            if cached:
                src.problems += _tokenizer_problems(cached, src)
            else:
                src.problems.append("train.tokenizers is not set and no FLUX.1 snapshot is in "
                                    "the Hugging Face cache; "
                                    + TOKENIZER_HINT.format(dir="models/flux-tokenizers"))
        return src
    if HUB_ID.match(model) and not model.startswith((".", "/")):
        found = from_hub_cache(model)
        if found:
            return _resolve(found, clip_l, t5xxl, ae, tokenizers)
        raise SourceError(f"{model} is not a local path and is not in the Hugging Face cache "
                          f"({', '.join(hub_cache_dirs())}); download it first, e.g. "
                          f"`huggingface-cli download {model}`, or give a local path")
    raise SourceError(f"{model} does not exist")


def _single_parts(src: Source, clip_l: str, t5xxl: str, ae: str) -> None:
    for key, path, make, attr in (("clip_l", clip_l, clip_part, "clip"),
                                  ("t5xxl", t5xxl, t5_part, "t5"), ("ae", ae, vae_part, "vae")):
        if not path:
            continue
        if not os.path.isfile(path):
            src.problems.append(f"train.{key}: {path} does not exist")
            continue
        try:
            setattr(src, attr, make(path))
        except SourceError as e:
            src.problems.append(f"train.{key}: {e}")


def identity(part: Part | None) -> str:
    """What a cache entry made by this part depends on: its config and its files' names,
    sizes and times (hashing the weights would take minutes for T5-XXL)."""
    import hashlib

    h = hashlib.sha256()
    if part is not None:
        h.update(json.dumps(part.config, sort_keys=True).encode())
        for path in part.files:
            st = os.stat(path)
            h.update(f"{os.path.basename(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]
