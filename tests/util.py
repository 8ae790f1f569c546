"""Helpers shared by the tests."""
from __future__ import annotations

import copy
import functools

import torch
import torch.nn as nn

from hprune.models import get_adapter, load_model, sample_inputs

TINY = ["tiny-sd3", "tiny-sd35", "tiny-flux"]


@functools.lru_cache(maxsize=None)
def _base(name: str) -> nn.Module:
    return load_model(name)


def fresh(name: str) -> nn.Module:
    """A private copy of a built-in tiny model (surgery is in place)."""
    return copy.deepcopy(_base(name))


def inputs(model: nn.Module, seed: int = 0, t: float = 0.6, batch: int = 2) -> dict[str, torch.Tensor]:
    return sample_inputs(model, batch=batch, seed=seed, t=t)


@torch.no_grad()
def out(model: nn.Module, x: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**x, return_dict=False)[0]


def _zero(_m, _inp, o):
    if isinstance(o, tuple):
        return tuple(None if t is None else torch.zeros_like(t) for t in o)
    return torch.zeros_like(o)


def _zero_context_output(_m, _inp, o):
    return (o[0], torch.zeros_like(o[1])) + tuple(o[2:])


def _passthrough(_m, args, kwargs, _o):
    hs = kwargs.get("hidden_states", args[0] if args else None)
    ehs = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
    return ehs, hs


def zero_branch_hooks(model: nn.Module, index: int, components: set[str]) -> list:
    """Hooks on the UNPRUNED model that make the given components' branches output zero: the
    independent oracle for what removal must compute."""
    blk = get_adapter(model).get_block(model, index)
    hs = []
    for c in components:
        if c == "block":
            hs.append(blk.register_forward_hook(_passthrough, with_kwargs=True))
        elif c == "attn":
            hs.append(blk.attn.register_forward_hook(_zero))
        elif c == "attn2":
            hs.append(blk.attn2.register_forward_hook(_zero))
        elif c == "ff":
            hs.append(blk.ff.register_forward_hook(_zero))
        elif c == "context_ff":
            hs.append(blk.ff_context.register_forward_hook(_zero))
        elif c == "context":
            hs.append(blk.attn.register_forward_hook(_zero_context_output))
            hs.append(blk.ff_context.register_forward_hook(_zero))
        elif c == "mlp":
            hs.append(blk.act_mlp.register_forward_hook(_zero))
        else:
            raise ValueError(c)
    return hs
