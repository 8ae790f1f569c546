"""Ablation by forward hooks: make components contribute zero WITHOUT touching the weights.

Zeroing a branch's output is exactly what removal computes (tests/test_surgery.py checks every
component of every block kind against the pruned modules), so probing uses these hooks and never
copies weights."""
from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator

import torch
import torch.nn as nn

from hprune.models.adapters import get_adapter


def _zero(_m: nn.Module, _inp: Any, o: Any) -> Any:
    if isinstance(o, tuple):
        return tuple(None if t is None else torch.zeros_like(t) for t in o)
    return torch.zeros_like(o)


def _zero_context_output(_m: nn.Module, _inp: Any, o: Any) -> Any:
    return (o[0], torch.zeros_like(o[1])) + tuple(o[2:])


def _passthrough(_m: nn.Module, args: tuple, kwargs: dict, _o: Any) -> Any:
    hs = kwargs.get("hidden_states", args[0] if args else None)
    ehs = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
    return ehs, hs


def _hook_targets(block: nn.Module, component: str) -> list[tuple[nn.Module, Any, bool]]:
    """(module, hook, with_kwargs) triples that zero `component`'s branch of an unpruned block."""
    if component == "block":
        return [(block, _passthrough, True)]
    if component == "attn":
        return [(block.attn, _zero, False)]
    if component == "attn2":
        return [(block.attn2, _zero, False)]
    if component == "ff":
        return [(block.ff, _zero, False)]
    if component == "context_ff":
        return [(block.ff_context, _zero, False)]
    if component == "context":
        return [(block.attn, _zero_context_output, False), (block.ff_context, _zero, False)]
    if component == "mlp":
        return [(block.act_mlp, _zero, False)]
    raise ValueError(f"unknown component {component!r}")


@contextlib.contextmanager
def ablate(model: nn.Module, index: int, components: Iterable[str], block: nn.Module | None = None) -> Iterator[None]:
    """Inside the block, `components` of block `index` output zero (the weights stay)."""
    ad = get_adapter(model)
    components = set(components)
    ad.check_components(model, index, components)
    blk = block if block is not None else ad.get_block(model, index)
    handles = []
    try:
        for c in components:
            for mod, hook, kw in _hook_targets(blk, c):
                handles.append(mod.register_forward_hook(hook, with_kwargs=kw))
        yield
    finally:
        for h in handles:
            h.remove()
