"""Optimal Brain Surgeon pruning of one Linear layer (the SparseGPT scheme).

For a Linear `y = x Wᵀ` whose inputs have (weighted) second moment H = E[xᵀx], removing weights
changes the layer output by ΔW x; its expected squared norm is tr(ΔW H ΔWᵀ). OBS prunes weight
w_ij with the error score w_ij² / [H⁻¹]_jj and moves the rest of row i by
-w_ij / [H⁻¹]_jj · [H⁻¹]_j,: to cancel the error. SparseGPT makes that tractable for whole
layers: process the input columns left to right, using the rows of the upper Cholesky factor of
H⁻¹ (each row j is the inverse Hessian of the not-yet-processed columns j.., scaled), so every
pruned weight's error is spread over the columns to its right only; work in column blocks so the
updates to later blocks are one matmul per block.

Speed (docs/solvers.md): the sweep uses the upper factor R of H = R Rᵀ itself (one Cholesky; U =
R⁻¹ is never formed) and works on Wᵀ, so each column is a contiguous row and its update a BLAS
rank-1 update; decisions that look ahead (masks, group scales) get the reference's values by a
small triangular solve. The masks and codes are the reference's up to float32 rounding.
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


def hessian_factor(H: torch.Tensor, perm: torch.Tensor | None = None, max_tries: int = 4) -> torch.Tensor:
    """Upper-triangular R with H[perm][:, perm] = R Rᵀ (the Cholesky factor taken from the last
    column backwards; perm None: the identity). R⁻¹ is the upper Cholesky factor U of H⁻¹ that
    SparseGPT / GPTQ sweep with (H⁻¹ = UᵀU), so `obs_sweep` can use R itself: one Cholesky
    instead of Cholesky, inverse and a second Cholesky (about 4× fewer flops; the result is the
    same up to float32 rounding). If H is numerically not positive definite, retries with 10× more
    damping each time (warning), as a rank-deficient Hessian of a layer with few calibration
    tokens can be. H: (K, K) float32, already damped. Returns R (K, K) float32."""
    k = H.shape[0]
    rev = torch.arange(k - 1, -1, -1, device=H.device) if perm is None else perm.flip(0)
    mean_diag = float(torch.diagonal(H).mean())
    extra = 0.0
    for attempt in range(max_tries):
        Hf = H[rev][:, rev]  # reversed (and permuted): its lower Cholesky factor, reversed, is R
        if extra:
            torch.diagonal(Hf).add_(extra)
        L, info = torch.linalg.cholesky_ex(Hf, out=(Hf, torch.empty((), dtype=torch.int32, device=H.device)))
        if int(info) == 0 and bool(torch.isfinite(torch.diagonal(L)).all()):
            if extra:
                warnings.warn(f"Hessian was not positive definite; damped with {extra:.3g} more", stacklevel=3)
            return L.flip((0, 1))
        del Hf, L
        extra = mean_diag * 0.01 * 10 ** (attempt + 1)
    raise ShapeError("Hessian is not positive definite even after extra damping (non-finite activations?)")


def cholesky_inverse_upper(H: torch.Tensor, max_tries: int = 4) -> torch.Tensor:
    """Upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU), as the reference SparseGPT / GPTQ code computes
    it; the solvers use `hessian_factor` (U = R⁻¹) instead."""
    R = hessian_factor(H, max_tries=max_tries)
    eye = torch.eye(R.shape[0], dtype=R.dtype, device=R.device)
    return torch.linalg.solve_triangular(R, eye, upper=True)


def obs_sweep(W: torch.Tensor, R: torch.Tensor, blocksize: int,
              column: Callable[[torch.Tensor, int, int, Callable[[int, int], torch.Tensor]], torch.Tensor]
              ) -> None:
    """The OBS / SparseGPT / GPTQ column sweep, in the transposed layout.

    W: (cols, rows) float32, the weight TRANSPOSED (one input column per contiguous row), updated
    in place; R: (cols, cols) upper triangular with H = R Rᵀ (`hessian_factor`), overwritten.
    Columns are fixed first to last: `column(W1, b0, i, ahead)` returns the new value (rows,) of
    row i of the current block W1 = W[b0:b0 + blocksize] (zero where pruned, the nearest code
    where rounded), W1[i] being that column compensated for every earlier one. To decide for a
    group that starts at i it calls `ahead(i, m)`: rows i..i+m-1 of the block as the reference
    sweep has them at that point, i.e. compensated for every column before i ((m, rows), new).

    Why R and not U = R⁻¹: the reference sweep spreads err_i = (w̃_i - q_i) / U_ii over the later
    columns with U's row i. Since E = (W - Q) U⁻¹ = (W - Q) R, the compensated weights are
    w̃_j = w_j + Σ_{i<j} (w_i - q_i) R_ij / R_jj with w the ORIGINAL weights: R scaled by its
    diagonal per column is the update matrix, and U is never formed. Within a block the update is
    one rank-1 update per column on contiguous rows (BLAS ger); to later blocks one matmul per
    block. A later column j then holds its value for the columns fixed so far only up to that
    diagonal scaling, so `ahead` solves with the unit upper triangle of the group's columns:
    v = w + (p - w) Rn_SS⁻¹ (the OBS update of S = i..i+m-1 given the fixed columns)."""
    cols = W.shape[0]
    W0 = W.clone()  # the original weights: the update is (w - q) with w original
    rdiag = torch.diagonal(R).clone()
    R.div_(rdiag)  # Rn: column j scaled by 1 / R_jj (unit diagonal)
    D1 = torch.empty(min(blocksize, cols), W.shape[1], dtype=W.dtype, device=W.device)
    for b0 in range(0, cols, blocksize):
        b1 = min(b0 + blocksize, cols)
        W1, R1, D = W[b0:b1], R[b0:b1, b0:b1], D1[:b1 - b0]

        def ahead(i: int, m: int) -> torch.Tensor:
            base = W0[b0 + i:b0 + i + m]
            return torch.linalg.solve_triangular(R1[i:i + m, i:i + m].t(), W1[i:i + m] - base, upper=False,
                                                 unitriangular=True).add_(base)

        for i in range(b1 - b0):
            q = column(W1, b0, i, ahead)
            torch.sub(W0[b0 + i], q, out=D[i])
            if i + 1 < b1 - b0:
                W1[i + 1:].addr_(R1[i, i + 1:], D[i])
            W1[i] = q
        if b1 < cols:
            W[b1:].addmm_(R[b0:b1, b1:].t(), D)


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
    R = hessian_factor(H)
    del H
    nm = pattern.kind == "nm"
    if nm:
        check_nm_fits(cols, pattern)
        blocksize = max(pattern.m, (blocksize // pattern.m) * pattern.m)  # N:M groups never straddle blocks
    maskT = torch.zeros(cols, rows, dtype=torch.bool, device=W.device)  # transposed, as the sweep
    # OBS error of removing w_ij: w_ij² / [H⁻¹]_jj, and U_jj = 1 / R_jj
    rd2 = torch.diagonal(R).square().unsqueeze(1)  # (cols, 1)

    def column(W1: torch.Tensor, b0: int, i: int, ahead: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
        M1 = maskT[b0:b0 + W1.shape[0]]
        if not nm and i == 0:
            # Adaptive mask for the whole block: the `sparsity` fraction with the lowest OBS error.
            score = ahead(0, W1.shape[0]).square_().mul_(rd2[b0:b0 + W1.shape[0]])
            k = int(round(sparsity * score.numel()))
            if k:
                M1.view(-1)[torch.topk(score.reshape(-1), k, largest=False, sorted=False).indices] = True
        if nm and i % pattern.m == 0:
            # Choose this group's M-N weights with the current (already compensated) values.
            score = ahead(i, pattern.m).square_().mul_(rd2[b0 + i:b0 + i + pattern.m])
            drop = torch.topk(score, pattern.m - pattern.n, dim=0, largest=False).indices
            M1.scatter_(0, i + drop, True)
        return W1[i].masked_fill(M1[i], 0.0)

    WT = W.t().contiguous()
    del W
    obs_sweep(WT, R, blocksize, column)
    WT[maskT] = 0  # exact zeros where pruned (the sweep sets them exactly; this guards rounding)
    return WT.t().contiguous(), maskT.t().contiguous()


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
