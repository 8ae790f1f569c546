"""Parameter and byte accounting of a (possibly pruned, quantised or meta) transformer."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from hprune.models.adapters import get_adapter, model_class_name

GiB = 1024 ** 3
GB = 1000 ** 3


def weight_bytes(module: nn.Module) -> int:
    """Bytes of everything the module stores (parameters and persistent buffers, e.g. packed INT4
    weights and their scales), at their current dtypes."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def param_count(module: nn.Module) -> int:
    """Number of weights, counting a quantised Linear's logical weight (out*in) like a dense one."""
    n = sum(p.numel() for p in module.parameters())
    for m in module.modules():
        logical = getattr(m, "logical_numel", None)
        if logical is not None:
            n += int(logical() if callable(logical) else logical)
    return n


def bytes_at(module: nn.Module, dtype: torch.dtype = torch.bfloat16, int4_group: int | None = None,
             quantize_prefix: tuple[str, ...] = ("transformer_blocks.", "single_transformer_blocks."),
             int4_fmt: str = "int4") -> int:
    """Bytes the module would take with floating tensors stored as `dtype`; with `int4_group`,
    Linear weights under `quantize_prefix` (the blocks) count as packed 4-bit weights of format
    `int4_fmt` (exactly as hprune.quant.quantize_model would store them)."""
    from hprune.formats import packed_nbytes

    elt = torch.empty((), dtype=dtype).element_size()
    q_weights: set[str] = set()
    total = 0
    if int4_group is not None:
        for name, m in module.named_modules():
            if isinstance(m, nn.Linear) and name.startswith(quantize_prefix):
                q_weights.add(f"{name}.weight")
                total += packed_nbytes(m.out_features, m.in_features, int4_group, int4_fmt)
    for name, t in module.state_dict().items():
        if name in q_weights:
            continue
        total += t.numel() * (elt if t.is_floating_point() else t.element_size())
    return total


def model_report(model: nn.Module, int4_group: int = 64) -> dict[str, Any]:
    """Blocks, components and their parameters; totals in parameters and bytes (stored, bf16, INT4)."""
    ad = get_adapter(model)
    blocks = []
    block_params = 0
    for info in ad.blocks(model):
        blk = ad.get_block(model, info.index)
        n = param_count(blk)
        block_params += n
        blocks.append({
            "index": info.index, "name": info.name, "kind": info.kind, "params": n,
            "removed": sorted(info.removed),
            "components": ad.component_params(model, info.index) if n else {},
        })
    total = param_count(model)
    return {
        "class": model_class_name(model), "family": ad.family, "num_blocks": len(blocks),
        "params": total, "block_params": block_params, "other_params": total - block_params,
        "bytes_stored": weight_bytes(model),
        "bytes_bf16": bytes_at(model, torch.bfloat16),
        "bytes_int4": bytes_at(model, torch.bfloat16, int4_group=int4_group),
        "int4_group": int4_group,
        "blocks": blocks,
    }
