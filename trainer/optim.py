"""The optimizers a job can name (`optimizer_type`, kohya's names), each from the library
that maintains it, with kohya's `optimizer_args` ("key=value", values as Python literals)."""
from __future__ import annotations

import ast

from .tiers import ADAFACTOR_ARGS


class OptimizerArgsError(ValueError):
    pass


def parse_args(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise OptimizerArgsError(f"train.optimizer_args: {item!r} is not key=value")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()  # a bare word, as kohya's shell quoting gives
    return out


def make(kind: str, params, cfg):
    import torch

    extra = parse_args(cfg.optimizer_args)
    common = dict(lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    try:
        if kind == "AdamW":
            return torch.optim.AdamW(params, **common, **extra)
        if kind == "AdamW8bit":
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(params, **common, **extra)
        if kind == "Adafactor":
            from transformers.optimization import Adafactor

            return Adafactor(params, **common, **{**ADAFACTOR_ARGS, **extra})
        if kind == "Prodigy":
            from prodigyopt import Prodigy

            return Prodigy(params, **common, **extra)
    except TypeError as e:  # an argument the optimizer does not take
        raise OptimizerArgsError(f"train.optimizer_args for {kind}: {e}") from None
    raise OptimizerArgsError(f"train.optimizer_type {kind!r} is unknown")
