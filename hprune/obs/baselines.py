"""Baselines with the same interface as `prune_linear`: magnitude and Wanda masks, no weight update.

- magnitude: score |W_ij|; unstructured masks compare the whole layer (the classic layer-wise
  magnitude pruning).
- Wanda (Sun et al. 2023): score |W_ij| · ‖X_j‖₂, compared within each output row; ‖X_j‖₂² is
  the diagonal of the same (timestep-weighted) Hessian OBS uses, up to a positive scale that does
  not change the ranking.
Both support N:M (the M-N lowest scores of every group of M input columns in a row).
"""
from __future__ import annotations

import torch

from hprune.errors import ShapeError
from hprune.obs.patterns import Pattern, check_nm_fits, parse_pattern, resolve_sparsity


def wanda_scores(weight: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """|W| · ‖X_j‖₂ as float32 (out, in), with ‖X_j‖₂ = sqrt(H_jj)."""
    if hessian.ndim != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ShapeError(f"hessian must be ({weight.shape[1]}, {weight.shape[1]}), got {tuple(hessian.shape)}")
    norms = torch.diagonal(hessian.to(device=weight.device, dtype=torch.float32)).clamp_min(0).sqrt()
    return weight.detach().float().abs() * norms.unsqueeze(0)


@torch.no_grad()
def mask_from_scores(scores: torch.Tensor, sparsity: float, pattern: Pattern, per_row: bool) -> torch.Tensor:
    """(out, in) bool mask, True = prune: the lowest scores, per layer (per_row=False) or per
    output row (per_row=True) for unstructured; per group of M columns for N:M."""
    rows, cols = scores.shape
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if pattern.kind == "nm":
        check_nm_fits(cols, pattern)
        groups = scores.reshape(rows, cols // pattern.m, pattern.m)
        drop = torch.topk(groups, pattern.m - pattern.n, dim=2, largest=False).indices
        mask.view(rows, cols // pattern.m, pattern.m).scatter_(2, drop, True)
        return mask
    if per_row:
        k = int(round(sparsity * cols))
        if k:
            mask.scatter_(1, torch.topk(scores, k, dim=1, largest=False).indices, True)
    else:
        k = int(round(sparsity * scores.numel()))
        if k:
            mask.view(-1)[torch.topk(scores.flatten(), k, largest=False).indices] = True
    return mask


def magnitude_prune(weight: torch.Tensor, sparsity: float | None = None, pattern: str = "unstructured",
                    hessian: torch.Tensor | None = None) -> torch.Tensor:
    """Zeroes the smallest-magnitude weights. weight: (out, in); `hessian` is accepted and
    ignored so all methods share one call shape. Returns a pruned copy in weight's dtype."""
    pat = parse_pattern(pattern)
    s = resolve_sparsity(sparsity, pat)
    mask = mask_from_scores(weight.detach().float().abs(), s, pat, per_row=False)
    return weight.detach().masked_fill(mask, 0)


def wanda_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float | None = None,
                pattern: str = "unstructured") -> torch.Tensor:
    """Wanda: zeroes the weights with the lowest |W_ij|·‖X_j‖₂ in each row (or N:M group).
    weight: (out, in); hessian: (in, in) input second moment. Returns a pruned copy."""
    pat = parse_pattern(pattern)
    s = resolve_sparsity(sparsity, pat)
    mask = mask_from_scores(wanda_scores(weight, hessian), s, pat, per_row=True)
    return weight.detach().masked_fill(mask, 0)
