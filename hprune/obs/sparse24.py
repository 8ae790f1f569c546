"""Running 2:4-pruned models on semi-structured sparse tensor cores (NVIDIA Ampere and newer).

A 2:4 mask alone saves nothing: the dense GEMM still multiplies the zeros. `to_semi_structured`
swaps the weight of every Linear that is exactly 2:4 sparse for a compressed
`torch.sparse.to_sparse_semi_structured` tensor (values + metadata, cuSPARSELt or CUTLASS
kernels), so `F.linear` runs the sparse matmul. Do it after saving: artifacts store plain weights.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from hprune.errors import BackendUnavailableError, HpruneError


def is_nm_sparse(weight: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """True if every run of `m` consecutive weights along each row of (out, in) has at most `n`
    nonzeros (in_features must be a multiple of m)."""
    if weight.ndim != 2 or weight.shape[1] % m:
        return False
    nz = (weight.detach() != 0).reshape(weight.shape[0], -1, m).sum(-1)
    return bool((nz <= n).all())


class SemiStructuredLinear(nn.Linear):
    """nn.Linear whose weight is a semi-structured sparse tensor. The sparse matmul flattens its
    input with .view(), so the input is made contiguous first (diffusers slices attention outputs
    into image/context halves, which are strided views)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.contiguous(), self.weight, self.bias)


def _shape_fits(weight: torch.Tensor) -> bool:
    from torch.sparse import SparseSemiStructuredTensor

    cls = (torch.sparse.SparseSemiStructuredTensorCUTLASS if SparseSemiStructuredTensor._FORCE_CUTLASS
           else torch.sparse.SparseSemiStructuredTensorCUSPARSELT)
    cons = cls._DTYPE_SHAPE_CONSTRAINTS.get(weight.dtype)
    if cons is None:
        return False
    r, c = weight.shape
    return r % cons.sparse_min_rows == 0 and c % cons.sparse_min_cols == 0


def _convert(converter: Callable[[torch.Tensor], torch.Tensor], w: torch.Tensor) -> torch.Tensor:
    """Compresses with cuSPARSELt (torch's default); a torch built without it falls back to the
    CUTLASS kernels once, then stays there."""
    from torch.sparse import SparseSemiStructuredTensor

    try:
        return converter(w)
    except RuntimeError as exc:
        if converter is not torch.sparse.to_sparse_semi_structured or SparseSemiStructuredTensor._FORCE_CUTLASS:
            raise BackendUnavailableError(f"semi-structured sparse conversion failed: {exc}") from None
        SparseSemiStructuredTensor._FORCE_CUTLASS = True
        try:
            return converter(w)
        except RuntimeError as exc2:
            raise BackendUnavailableError(f"semi-structured sparse conversion failed with cuSPARSELt and "
                                          f"CUTLASS: {exc2}") from None


def to_semi_structured(model: nn.Module, *,
                       prefixes: tuple[str, ...] = ("transformer_blocks.", "single_transformer_blocks."),
                       converter: Callable[[torch.Tensor], torch.Tensor] | None = None) -> list[str]:
    """Converts, in place, the exactly-2:4-sparse Linears under `prefixes` to semi-structured
    sparse weights. Returns the converted layer paths.

    Needs the model on a CUDA GPU in float16/bfloat16 (raises BackendUnavailableError otherwise).
    Layers whose shape the sparse kernels do not support are left dense. `converter` replaces
    torch.sparse.to_sparse_semi_structured (tests use it to check the swap on the CPU)."""
    p = next(model.parameters())
    if converter is None:
        if p.device.type != "cuda":
            raise BackendUnavailableError(f"2:4 semi-structured sparse matmuls need a CUDA GPU; the model is on "
                                          f"{p.device.type} (a 2:4 model still runs there, with dense matmuls)")
        if p.dtype not in (torch.float16, torch.bfloat16):
            raise HpruneError(f"2:4 sparse kernels take float16/bfloat16 weights; the model is {p.dtype}")
        converter = torch.sparse.to_sparse_semi_structured
    converted = []
    targets = [(n, m) for n, m in model.named_modules()
               if type(m) is nn.Linear and n.startswith(prefixes) and is_nm_sparse(m.weight)]
    for name, lin in targets:
        if converter is torch.sparse.to_sparse_semi_structured and not _shape_fits(lin.weight):
            continue
        new = SemiStructuredLinear(lin.in_features, lin.out_features, bias=lin.bias is not None, device="meta")
        new.weight = nn.Parameter(_convert(converter, lin.weight.detach()), requires_grad=False)
        new.bias = None if lin.bias is None else nn.Parameter(lin.bias.detach(), requires_grad=False)
        model.set_submodule(name, new)
        converted.append(name)
    if not converted:
        raise HpruneError("no 2:4-sparse Linear layers to convert (prune with pattern='2:4' first)")
    return converted
