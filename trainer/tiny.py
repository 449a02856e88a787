"""Tiny random Flux pipelines and datasets, for the demo, the tests and the benchmarks.

    python -m trainer.tiny DIR [--preset tiny|bench]   a diffusers-format Flux folder
    python -m trainer.tiny DIR --single-file            the same weights as FluxGym holds
                                                        them: flux1-tiny.safetensors (BFL
                                                        keys), clip_l, t5xxl, ae, tokenizers
    python -m trainer.tiny --dataset DIR [--images N]   PNGs with .txt captions

Everything is built from configs (no hub, no download) with a fixed seed, so two calls
write the same weights. The tokenizers are ByT5 (they need no vocabulary files).
"""
from __future__ import annotations

import argparse
import os
import sys

PRESETS = {
    # ~82k parameters in the transformer: trains at dozens of steps/s on a CPU
    "tiny": dict(transformer=dict(num_layers=1, num_single_layers=1, attention_head_dim=16,
                                  num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, axes_dims_rope=[4, 4, 8]),
                 text_dim=32, vae_channels=(16, 32)),
    # ~48M parameters in the transformer: for throughput and checkpoint-size benchmarks
    "bench": dict(transformer=dict(num_layers=2, num_single_layers=7, attention_head_dim=64,
                                   num_attention_heads=8, joint_attention_dim=256,
                                   pooled_projection_dim=256, axes_dims_rope=[16, 24, 24]),
                  text_dim=256, vae_channels=(16, 32)),
}


def build(preset: str = "tiny", seed: int = 0):
    import torch
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline,
                           FluxTransformer2DModel)
    from transformers import (ByT5Tokenizer, CLIPTextConfig, CLIPTextModel, T5Config,
                              T5EncoderModel)

    p = PRESETS[preset]
    torch.manual_seed(seed)
    tok = ByT5Tokenizer(model_max_length=77)
    tok2 = ByT5Tokenizer(model_max_length=512)
    d = p["text_dim"]
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, guidance_embeds=True,
                                         **p["transformer"])
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=p["vae_channels"],
        down_block_types=("DownEncoderBlock2D",) * len(p["vae_channels"]),
        up_block_types=("UpDecoderBlock2D",) * len(p["vae_channels"]),
        layers_per_block=1, latent_channels=16, norm_num_groups=8, use_quant_conv=False,
        use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611, sample_size=64,
    )
    clip = CLIPTextModel(CLIPTextConfig(
        hidden_size=d, intermediate_size=2 * d, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=len(tok), max_position_embeddings=77, projection_dim=d,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id))
    t5 = T5EncoderModel(T5Config(d_model=d, d_ff=2 * d, num_layers=2, num_heads=4,
                                 d_kv=d // 4, vocab_size=len(tok2)))
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                        text_encoder=clip, tokenizer=tok, text_encoder_2=t5, tokenizer_2=tok2,
                        transformer=transformer)


def write_model(path: str, preset: str = "tiny") -> None:
    from . import quiet
    quiet()
    build(preset).save_pretrained(path)


def write_single_files(path: str, preset: str = "tiny") -> str:
    """The model as single files, and the [train] lines that use them."""
    from safetensors.torch import save_file

    from . import quiet
    from .layouts import to_bfl, vae_to_ldm
    quiet()
    pipe = build(preset)
    os.makedirs(path, exist_ok=True)

    def save(state, name):
        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(path, name))

    name = f"flux1-{preset}.safetensors"
    save(to_bfl(pipe.transformer.state_dict(), dict(pipe.transformer.config)), name)
    # clip_l.safetensors as FluxGym and ComfyUI hold it: transformers 4's text_model. names
    save({"text_model." + k.removeprefix("text_model."): v
          for k, v in pipe.text_encoder.state_dict().items()}, "clip_l.safetensors")
    # T5's embedding is one tensor under two names; files hold it once
    save({k: v for k, v in pipe.text_encoder_2.state_dict().items()
          if k != "encoder.embed_tokens.weight"}, "t5xxl.safetensors")
    save(vae_to_ldm(pipe.vae.state_dict(), dict(pipe.vae.config)), "ae.safetensors")
    pipe.tokenizer.save_pretrained(os.path.join(path, "tokenizers", "tokenizer"))
    pipe.tokenizer_2.save_pretrained(os.path.join(path, "tokenizers", "tokenizer_2"))
    a = os.path.abspath(path)
    return "\n".join([f'pretrained_model = "{a}/{name}"', f'clip_l = "{a}/clip_l.safetensors"',
                      f't5xxl = "{a}/t5xxl.safetensors"', f'ae = "{a}/ae.safetensors"',
                      f'tokenizers = "{a}/tokenizers"'])


COLOURS = [(220, 40, 40), (40, 160, 60), (40, 80, 220), (230, 200, 40), (150, 60, 200),
           (30, 190, 190), (240, 130, 30), (90, 90, 90)]


def write_dataset(path: str, images: int = 8, size: int = 64) -> None:
    """Coloured squares and discs on varied backgrounds, in two aspect ratios."""
    from PIL import Image, ImageDraw

    os.makedirs(path, exist_ok=True)
    for i in range(images):
        w, h = (size, size) if i % 2 == 0 else (size * 3 // 2, size)
        fg, bg = COLOURS[i % len(COLOURS)], COLOURS[(i * 3 + 1) % len(COLOURS)]
        img = Image.new("RGB", (w, h), bg)
        draw = ImageDraw.Draw(img)
        box = (w // 4, h // 4, w * 3 // 4, h * 3 // 4)
        (draw.ellipse if i % 3 else draw.rectangle)(box, fill=fg)
        img.save(os.path.join(path, f"img{i:03d}.png"))
        shape = "disc" if i % 3 else "square"
        with open(os.path.join(path, f"img{i:03d}.txt"), "w") as fh:
            fh.write(f"a {shape} in colour {fg} on {bg}")


def write_florence(path: str, seed: int = 0) -> None:
    """A tiny random Florence-2 (transformers' own Florence2ForConditionalGeneration, a
    shrunken Florence2Config) with a byte-level tokenizer and a 64-px image processor: what
    a caption job loads, in a second. Its captions are gibberish, and deterministic."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import (BartConfig, BartTokenizerFast, CLIPImageProcessor,
                              Florence2Config, Florence2ForConditionalGeneration,
                              Florence2Processor)
    from transformers.models.florence2.configuration_florence2 import Florence2VisionConfig

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    tokenizer = BartTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", pad_token="<pad>", mask_token="<unk>",
                                  extra_special_tokens={"image_token": "<image>"})
    # 64 px through strides 4·2·2·2: 2×2 patches and one pooled token
    images = CLIPImageProcessor(size={"height": 64, "width": 64}, do_center_crop=False,
                                image_seq_length=5)
    processor = Florence2Processor(image_processor=images, tokenizer=tokenizer)
    vision = Florence2VisionConfig(depths=[1, 1, 1, 1], embed_dim=[8, 16, 32, 32],
                                   num_heads=[1, 1, 1, 1], num_groups=[1, 1, 1, 1],
                                   projection_dim=32, window_size=2,
                                   max_position_embeddings=16, max_temporal_embeddings=4)
    text = BartConfig(vocab_size=len(processor.tokenizer), d_model=32, encoder_layers=1,
                      decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                      encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=1100)
    config = Florence2Config(text_config=text.to_dict(), vision_config=vision.to_dict(),
                             image_token_id=processor.tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(seed)
    Florence2ForConditionalGeneration(config).save_pretrained(path)
    processor.save_pretrained(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer.tiny", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", help="where to write")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--dataset", action="store_true", help="write a dataset, not a model")
    ap.add_argument("--florence", action="store_true",
                    help="write a tiny Florence-2 captioner, not a Flux model")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--single-file", action="store_true",
                    help="write single files as FluxGym holds them, and print the [train] lines")
    args = ap.parse_args(argv)
    if args.dataset:
        write_dataset(args.path, args.images)
    elif args.florence:
        write_florence(args.path)
    elif args.single_file:
        print("[train]\n" + write_single_files(args.path, args.preset))
    else:
        write_model(args.path, args.preset)
    print(f"wrote {args.path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
