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


def zero_branch_hooks(model: nn.Module, index: int, components: set[str]) -> list:
    """Hooks on the UNPRUNED model that make the given components' branches output zero: the
    oracle for what removal must compute (independent of the surgery code in blocks.py)."""
    from hprune.models.ablation import _hook_targets

    blk = get_adapter(model).get_block(model, index)
    return [mod.register_forward_hook(hook, with_kwargs=kw)
            for c in components for mod, hook, kw in _hook_targets(blk, c)]
