"""One small interface over the supported transformers: their blocks in order, the removable
components of each, and what removing them frees.

Block indices are global positions in execution order: SD3 `transformer_blocks[i]` is block i;
FLUX `transformer_blocks[i]` (double stream) is block i and `single_transformer_blocks[j]` is
block `num_layers + j`. Indices stay stable under pruning (a removed block is replaced by a
parameterless pass-through), so a plan's indices and the state-dict keys keep their meaning.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn as nn

from hprune.errors import PlanError
from hprune.models import blocks as B


@dataclass(frozen=True)
class BlockInfo:
    index: int  # global position in execution order
    name: str  # module path, e.g. "single_transformer_blocks.3"
    kind: str  # one of blocks.SD3_JOINT, SD3_LAST, FLUX_DOUBLE, FLUX_SINGLE
    components: tuple[str, ...]  # removable components still present ("block" not listed)
    removed: frozenset[str]  # components already removed ({"block"} for a removed block)


def meta_clone(module: nn.Module) -> nn.Module:
    """A structural copy of `module` whose parameters and buffers live on the meta device."""
    memo: dict[int, object] = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(module, memo)


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Adapter:
    """Adapter base: subclasses name the block lists and the kind of each block."""

    family: str = ""
    lists: tuple[str, ...] = ()

    def _kind(self, model: nn.Module, list_name: str, local: int) -> str:
        raise NotImplementedError

    # -- structure ---------------------------------------------------------------------------
    def _slots(self, model: nn.Module) -> list[tuple[str, int]]:
        return [(ln, j) for ln in self.lists for j in range(len(getattr(model, ln)))]

    def num_blocks(self, model: nn.Module) -> int:
        return sum(len(getattr(model, ln)) for ln in self.lists)

    def _slot(self, model: nn.Module, index: int) -> tuple[str, int]:
        slots = self._slots(model)
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(slots):
            raise PlanError(f"unknown block index {index!r}: {type(model).__name__} has blocks 0..{len(slots) - 1}")
        return slots[index]

    def get_block(self, model: nn.Module, index: int) -> nn.Module:
        ln, j = self._slot(model, index)
        return getattr(model, ln)[j]

    def set_block(self, model: nn.Module, index: int, module: nn.Module) -> None:
        ln, j = self._slot(model, index)
        getattr(model, ln)[j] = module

    def block_info(self, model: nn.Module, index: int) -> BlockInfo:
        ln, j = self._slot(model, index)
        block = getattr(model, ln)[j]
        kind = self._kind(model, ln, j)
        removed = frozenset(getattr(block, "removed", ()))
        if "block" in removed:
            comps: tuple[str, ...] = ()
        else:
            comps = tuple(c for c in B.COMPONENTS[kind]
                          if c not in removed and (c != "attn2" or getattr(block, "use_dual_attention", False)))
        return BlockInfo(index, f"{ln}.{j}", kind, comps, removed)

    def blocks(self, model: nn.Module) -> list[BlockInfo]:
        return [self.block_info(model, i) for i in range(self.num_blocks(model))]

    # -- surgery -----------------------------------------------------------------------------
    def check_components(self, model: nn.Module, index: int, components: Iterable[str]) -> None:
        info = self.block_info(model, index)
        allowed = set(B.COMPONENTS[info.kind]) | {"block"}
        if not getattr(self.get_block(model, index), "use_dual_attention", False):
            allowed.discard("attn2")
        bad = sorted(set(components) - allowed)
        if bad:
            raise PlanError(f"block {index} ({info.name}, {info.kind}) has no component {', '.join(map(repr, bad))}; "
                            f"its components: {', '.join(sorted(allowed))}")

    def prune(self, model: nn.Module, index: int, components: Iterable[str]) -> nn.Module:
        """Removes `components` of block `index` in place; returns the replacement module."""
        components = set(components)
        self.check_components(model, index, components)
        info = self.block_info(model, index)
        new = B.prune_block(self.get_block(model, index), info.kind, components)
        self.set_block(model, index, new)
        return new

    # -- accounting --------------------------------------------------------------------------
    def component_params(self, model: nn.Module, index: int) -> dict[str, int]:
        """Parameters freed by removing each component of block `index` alone ("block" included);
        computed by doing the surgery on a meta copy, so it is exact by construction."""
        info = self.block_info(model, index)
        block = self.get_block(model, index)
        total = sum(p.numel() for p in block.parameters())
        out = {"block": total}
        if "block" in info.removed:
            return {"block": 0}
        for c in info.components:
            pruned = B.prune_block(meta_clone(block), info.kind, {c})
            out[c] = total - sum(p.numel() for p in pruned.parameters())
        return out


class SD3Adapter(Adapter):
    family = "sd3"
    lists = ("transformer_blocks",)

    def _kind(self, model: nn.Module, list_name: str, local: int) -> str:
        return B.SD3_LAST if local == len(model.transformer_blocks) - 1 else B.SD3_JOINT


class FluxAdapter(Adapter):
    family = "flux"
    lists = ("transformer_blocks", "single_transformer_blocks")

    def _kind(self, model: nn.Module, list_name: str, local: int) -> str:
        return B.FLUX_DOUBLE if list_name == "transformer_blocks" else B.FLUX_SINGLE


def get_adapter(model: nn.Module) -> Adapter:
    name = type(model).__name__
    if name == "SD3Transformer2DModel":
        return SD3Adapter()
    if name == "FluxTransformer2DModel":
        return FluxAdapter()
    raise TypeError(f"hprune has no adapter for {name}; supported: SD3Transformer2DModel, FluxTransformer2DModel")
