"""The test shim that lets kohya sd-scripts train a tiny Flux on a CPU.

sd-scripts reads a checkpoint's depth from its keys but takes every width from configs written
in its code: `library.flux_models.configs` (the transformer and the AE) and the CLIP-L and
T5-XXL configs inside `library.flux_utils.load_clip_l` / `load_t5xxl`. This shim shrinks those
widths and changes nothing else: no training code, no argument, no file of sd-scripts.

It is installed into the test virtualenv as a `.pth` line (tests/kohya/env.py), and acts only
when FLUXGYMD_TEST_TINY_KOHYA=1 is in the environment, so the same venv validates arguments
exactly as a user's would.

    python tiny_shim.py --fixtures DIR    (with the test venv's Python) writes the tiny files:
        flux1-tiny.safetensors (BFL keys), ae.safetensors, clip_l.safetensors,
        t5xxl.safetensors, tokenizers/ (what --tokenizer_cache_dir expects) and dataset/.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys

ENV = "FLUXGYMD_TEST_TINY_KOHYA"

FLUX = dict(vec_in_dim=32, context_in_dim=32, hidden_size=32, mlp_ratio=4.0, num_heads=2,
            depth=1, depth_single_blocks=1, axes_dim=[4, 4, 8])
# GroupNorm(32) is hard-coded in sd-scripts' AE: keep 32 channels, 4 levels (8x downsampling)
AE = dict(ch=32, ch_mult=[1, 1, 1, 1], num_res_blocks=1)
CLIP = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
            projection_dim=32)
T5 = dict(d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2, num_decoder_layers=2)


def _shrink(module) -> None:
    from dataclasses import replace
    if module.__name__ == "library.flux_models":
        for spec in module.configs.values():
            spec.params = replace(spec.params, **FLUX)
            spec.ae_params = replace(spec.ae_params, **AE)
    elif module.__name__ == "library.flux_utils":
        clip_config, t5_config = module.CLIPConfig, module.T5Config
        vocab = int(os.environ.get("FLUXGYMD_TEST_CLIP_VOCAB", "0"))
        module.CLIPConfig = lambda **kw: clip_config(**{**kw, **CLIP, **(
            {"vocab_size": vocab} if vocab else {})})
        module.T5Config = lambda **kw: t5_config(**{**kw, **T5})


class _Finder(importlib.abc.MetaPathFinder):
    """Runs _shrink on two of sd-scripts' modules right after they are executed."""
    NAMES = ("library.flux_models", "library.flux_utils")

    def find_spec(self, name, path, target=None):
        if name not in self.NAMES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_shrink(module):
            exec_module(module)
            _shrink(module)
        spec.loader.exec_module = exec_and_shrink
        return spec


def install() -> None:
    if os.environ.get(ENV) == "1" and not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


def _clip_tokenizer(path: str) -> int:
    """A byte-level CLIP BPE with no merges: every byte is a token. Returns the vocab size."""
    import json
    from transformers.models.clip.tokenization_clip import bytes_to_unicode
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "vocab.json"), "w") as fh:
        json.dump({t: i for i, t in enumerate(vocab)}, fh)
    with open(os.path.join(path, "merges.txt"), "w") as fh:
        fh.write("#version: 0.2\n")
    from transformers import CLIPTokenizer
    CLIPTokenizer(os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt"),
                  model_max_length=77).save_pretrained(path)
    return len(vocab)


def write_fixtures(out: str, sd_scripts: str, images: int = 4) -> None:
    import shutil

    import torch
    from PIL import Image
    from safetensors.torch import save_file
    sys.path.insert(0, sd_scripts)
    os.environ[ENV] = "1"
    tok = os.path.join(out, "tokenizers")
    vocab = _clip_tokenizer(os.path.join(tok, "openai_clip-vit-large-patch14"))
    os.environ["FLUXGYMD_TEST_CLIP_VOCAB"] = str(vocab)
    install()
    from library import flux_models, flux_utils  # noqa: E402  (shrunk by the finder)
    del flux_utils
    from transformers import CLIPTextModel, T5EncoderModel
    t5_tok = os.path.join(tok, "google_t5-v1_1-xxl")
    if not os.path.isdir(t5_tok):
        # sd-scripts ships a T5 tokenizer (T5 v1.0's, same SentencePiece as v1.1)
        shutil.copytree(os.path.join(sd_scripts, "configs", "t5_old"), t5_tok,
                        copy_function=shutil.copyfile)
    torch.manual_seed(0)

    def save(model, name):
        # clone: T5 ties encoder.embed_tokens to shared, and safetensors refuses shared memory
        state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        save_file(state, os.path.join(out, name))
    save(flux_models.Flux(flux_models.configs["dev"].params), "flux1-tiny.safetensors")
    save(flux_models.AutoEncoder(flux_models.configs["dev"].ae_params), "ae.safetensors")
    import json
    from transformers import CLIPTextConfig
    clip_cfg = CLIPTextConfig(**CLIP, vocab_size=vocab, max_position_embeddings=77,
                              hidden_act="quick_gelu", eos_token_id=2, pad_token_id=1)
    save(CLIPTextModel(clip_cfg), "clip_l.safetensors")
    from transformers import T5Config
    t5_cfg = T5Config(**T5, vocab_size=32128, feed_forward_proj="gated-gelu",
                      is_encoder_decoder=False, use_cache=False)
    save(T5EncoderModel(t5_cfg), "t5xxl.safetensors")
    data = os.path.join(out, "dataset")
    os.makedirs(data, exist_ok=True)
    g = torch.Generator().manual_seed(1)
    for i in range(images):
        px = (torch.rand(64, 64, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(px).save(os.path.join(data, f"img{i}.png"))
        with open(os.path.join(data, f"img{i}.txt"), "w") as fh:
            fh.write(f"tinylora, a picture number {i}")
    with open(os.path.join(out, "clip_vocab.json"), "w") as fh:
        json.dump({"vocab_size": vocab}, fh)


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixtures", required=True)
    ap.add_argument("--sd-scripts", required=True)
    a = ap.parse_args()
    os.makedirs(a.fixtures, exist_ok=True)
    write_fixtures(a.fixtures, a.sd_scripts)
