"""Optimal Brain Surgeon pruning of one Linear layer (the SparseGPT scheme).

For a Linear `y = x Wᵀ` whose inputs have (weighted) second moment H = E[xᵀx], removing weights
changes the layer output by ΔW x; its expected squared norm is tr(ΔW H ΔWᵀ). OBS prunes weight
w_ij with the error score w_ij² / [H⁻¹]_jj and moves the rest of row i by
-w_ij / [H⁻¹]_jj · [H⁻¹]_j,: to cancel the error. SparseGPT makes that tractable for whole
layers: process the input columns left to right, using the rows of the upper Cholesky factor of
H⁻¹ (each row j is the inverse Hessian of the not-yet-processed columns j.., scaled), so every
pruned weight's error is spread over the columns to its right only; work in column blocks so the
updates to later blocks are one matmul per block.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch

from hprune.errors import ShapeError
from hprune.obs.patterns import Pattern, check_nm_fits, parse_pattern, resolve_sparsity


def _check_pair(weight: torch.Tensor, hessian: torch.Tensor) -> None:
    if weight.ndim != 2:
        raise ShapeError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    cols = weight.shape[1]
    if hessian.shape != (cols, cols):
        raise ShapeError(f"hessian must be ({cols}, {cols}) for a weight with {cols} input features, "
                         f"got {tuple(hessian.shape)}")


def damped_hessian(hessian: torch.Tensor, percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (H + λI in float32, dead) where dead (in,) marks inputs that were always zero.

    A dead input's weights cannot matter, so SparseGPT sets its diagonal to 1 (keeping H
    invertible) and zeroes its weights; λ = percdamp · mean(diag H) keeps the inverse stable."""
    H = hessian.detach().to(torch.float32).clone()
    diag = torch.diagonal(H)
    dead = diag == 0
    diag[dead] = 1.0
    diag.add_(percdamp * diag.mean())
    return H, dead


def cholesky_inverse_upper(H: torch.Tensor, max_tries: int = 4) -> torch.Tensor:
    """Upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU). If H is numerically not positive definite,
    retries with 10× more damping each time (warning), as a rank-deficient Hessian of a layer
    with few calibration tokens can be."""
    extra = 0.0
    mean_diag = float(torch.diagonal(H).mean())
    for attempt in range(max_tries):
        Hd = H if extra == 0 else H + extra * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                if extra:
                    warnings.warn(f"Hessian was not positive definite; damped with {extra:.3g} more", stacklevel=3)
                return U
        extra = mean_diag * 0.01 * 10 ** (attempt + 1)
    raise ShapeError("Hessian is not positive definite even after extra damping (non-finite activations?)")


def obs_sweep(W: torch.Tensor, U: torch.Tensor, blocksize: int,
              column: Callable[[torch.Tensor, int, int], torch.Tensor]) -> None:
    """The OBS / SparseGPT / GPTQ column sweep, in place on W (rows, cols) float32.

    Columns are fixed left to right: `column(W1, b0, i)` returns the new value of column i of the
    current block W1 = W[:, b0:b0 + blocksize] (zero where pruned, the nearest code where rounded);
    it may read the block's columns i.. (already compensated for every earlier column) to decide
    for a group that starts at i. Each change's error is spread over the columns to its right with
    the rows of U (upper Cholesky factor of H⁻¹), within the block at once and to later blocks as
    one matmul per block."""
    cols = W.shape[1]
    for b0 in range(0, cols, blocksize):
        b1 = min(b0 + blocksize, cols)
        W1 = W[:, b0:b1].clone()
        U1 = U[b0:b1, b0:b1]
        Err1 = torch.zeros_like(W1)
        for i in range(b1 - b0):
            w = W1[:, i]
            q = column(W1, b0, i)
            err = (w - q) / U1[i, i]
            # Spread the error over the rest of the block (column i itself becomes q exactly).
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            W1[:, i] = q
            Err1[:, i] = err
        W[:, b0:b1] = W1
        W[:, b1:] -= Err1 @ U[b0:b1, b1:]


@torch.no_grad()
def obs_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, pattern: Pattern,
              blocksize: int = 128, percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """The OBS/SparseGPT solver. Returns (pruned weight float32 (out, in), mask (out, in) bool,
    True = pruned). `pattern` is unstructured or N:M."""
    _check_pair(weight, hessian)
    W = weight.detach().to(torch.float32).clone()
    rows, cols = W.shape
    H, dead = damped_hessian(hessian.to(W.device), percdamp)
    W[:, dead] = 0
    U = cholesky_inverse_upper(H)
    nm = pattern.kind == "nm"
    if nm:
        check_nm_fits(cols, pattern)
        blocksize = max(pattern.m, (blocksize // pattern.m) * pattern.m)  # N:M groups never straddle blocks
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)

    diag = torch.diagonal(U)

    def column(W1: torch.Tensor, b0: int, i: int) -> torch.Tensor:
        M1 = mask[:, b0:b0 + W1.shape[1]]
        if not nm and i == 0:
            # Adaptive mask for the whole block: the `sparsity` fraction with the lowest OBS error.
            score = W1.square() / diag[b0:b0 + W1.shape[1]].square().unsqueeze(0)
            k = int(round(sparsity * score.numel()))
            if k:
                chosen = torch.zeros_like(M1)  # contiguous: M1 is a column slice of the mask
                chosen.view(-1)[torch.topk(score.flatten(), k, largest=False).indices] = True
                M1.copy_(chosen)
        if nm and i % pattern.m == 0:
            # Choose this group's M-N weights with the current (already compensated) values.
            score = W1[:, i:i + pattern.m].square() / diag[b0 + i:b0 + i + pattern.m].square().unsqueeze(0)
            drop = torch.topk(score, pattern.m - pattern.n, dim=1, largest=False).indices
            M1.scatter_(1, i + drop, True)
        w = W1[:, i]
        return torch.where(M1[:, i], torch.zeros_like(w), w)

    obs_sweep(W, U, blocksize, column)
    W[mask] = 0  # exact zeros where pruned (the update leaves them exact; this guards rounding)
    return W, mask


def prune_linear(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float | None = None,
                 pattern: str = "unstructured", blocksize: int = 128, percdamp: float = 0.01) -> torch.Tensor:
    """OBS-prunes one Linear weight.

    Args:
        weight: (out_features, in_features), any floating dtype and device.
        hessian: (in_features, in_features) input second moment Σ α_t XᵀX (any positive scale:
            the damping is relative), e.g. from `hprune.obs.HessianCollector`.
        sparsity: fraction of weights to remove, in (0, 1); default 0.5. N:M patterns imply
            1 - N/M (a conflicting value raises).
        pattern: "unstructured", or "N:M" ("2:4", "4:8"): at most N nonzeros in each run of M
            input columns of every row.
        blocksize: columns per lazy-update block (the unstructured mask is chosen per block).
        percdamp: damping λ = percdamp · mean(diag H) added to the diagonal.
    Returns the pruned weight, same shape, dtype and device as `weight`, with exact zeros.
    """
    pat = parse_pattern(pattern)
    if pat.kind == "structured":
        raise ShapeError("prune_linear does unstructured and N:M pruning; structured pruning removes whole "
                         "heads/neurons across layers: use hprune.obs.obs_prune_model(pattern='structured')")
    s = resolve_sparsity(sparsity, pat)
    W, _ = obs_prune(weight, hessian, s, pat, blocksize=blocksize, percdamp=percdamp)
    return W.to(weight.dtype)
