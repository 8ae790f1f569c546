"""The fast paths of the solvers compute what the reference formulations compute.

- `obs_sweep` runs on R (H = R Rᵀ) in the transposed layout; the reference SparseGPT / GPTQ sweep
  runs on U (upper Cholesky factor of H⁻¹). Same compensated columns, same decisions, including
  those that look ahead (N:M masks, per-block masks, group scales), via `ahead`.
- `formats.quantize`'s scale search for whole groups (`_asym_full`, `_sym_full`: reused buffers,
  no masks) is bit-identical to the masked search it replaces, and chunking does not matter.
"""
import pytest
import torch

from hprune import formats as F
from hprune.obs.patterns import parse_pattern
from hprune.obs.solver import damped_hessian, hessian_factor, obs_prune, obs_sweep
from hprune.quant.gptq import gptq_quantize


def problem(n: int = 48, k: int = 160, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(512, k, generator=g) @ (torch.eye(k) + 0.3 * torch.randn(k, k, generator=g) / k ** 0.5)
    X[:, 5] = 0  # a dead input
    return torch.randn(n, k, generator=g), X.t() @ X / 512


def reference_sweep(W: torch.Tensor, H: torch.Tensor, blocksize: int, column) -> torch.Tensor:
    """The SparseGPT / GPTQ sweep as published: U = chol(H⁻¹) upper, W (rows, cols), in place."""
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    cols = W.shape[1]
    for b0 in range(0, cols, blocksize):
        b1 = min(b0 + blocksize, cols)
        W1, U1 = W[:, b0:b1].clone(), U[b0:b1, b0:b1]
        E1 = torch.zeros_like(W1)
        for i in range(b1 - b0):
            q = column(W1, b0, i, U)
            err = (W1[:, i] - q) / U1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            W1[:, i] = q
            E1[:, i] = err
        W[:, b0:b1] = W1
        W[:, b1:] -= E1 @ U[b0:b1, b1:]
    return W


def test_hessian_factor_is_the_inverse_of_the_reference_factor():
    _, H = problem()
    Hd, _ = damped_hessian(H)
    perm = torch.randperm(Hd.shape[0], generator=torch.Generator().manual_seed(1))
    R = hessian_factor(Hd, perm)
    Hp = Hd[perm][:, perm]
    assert torch.equal(R, R.triu())
    torch.testing.assert_close(R @ R.t(), Hp, rtol=1e-4, atol=1e-4)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hp)), upper=True)
    torch.testing.assert_close(torch.linalg.inv(R), U, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("blocksize", [16, 64])
def test_sweep_with_look_ahead_decisions_matches_the_reference(blocksize):
    """2:4 masks chosen from the four columns' values when the group starts: the values `ahead`
    gives must be the reference's (the raw rows of the block are not: they are compensated only
    up to a diagonal scaling), so the masks agree exactly."""
    W, H = problem()
    Hd, dead = damped_hessian(H)
    W[:, dead] = 0

    def ref_col(W1, b0, i, U):
        if i % 4 == 0:
            score = W1[:, i:i + 4].square() / torch.diagonal(U)[b0 + i:b0 + i + 4].square()
            ref_mask[:, b0 + i:b0 + i + 4].scatter_(1, torch.topk(score, 2, dim=1, largest=False).indices, True)
        return torch.where(ref_mask[:, b0 + i], 0.0, W1[:, i])

    R = hessian_factor(Hd)
    rd2 = torch.diagonal(R).square()

    def new_col(W1, b0, i, ahead):
        if i % 4 == 0:
            score = ahead(i, 4) * ahead(i, 4) * rd2[b0 + i:b0 + i + 4].unsqueeze(1)
            new_mask[b0 + i:b0 + i + 4].scatter_(0, torch.topk(score, 2, dim=0, largest=False).indices, True)
        return W1[i].masked_fill(new_mask[b0 + i], 0.0)

    ref_mask = torch.zeros(W.shape, dtype=torch.bool)
    new_mask = torch.zeros(W.shape[1], W.shape[0], dtype=torch.bool)
    ref = reference_sweep(W.clone(), Hd, blocksize, ref_col)
    WT = W.t().contiguous()
    obs_sweep(WT, R, blocksize, new_col)
    assert torch.equal(new_mask.t(), ref_mask)
    torch.testing.assert_close(WT.t(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_obs_prune_keeps_the_reference_masks(pattern):
    W, H = problem(seed=2)
    Hd, dead = damped_hessian(H)
    Wd = W.clone()
    Wd[:, dead] = 0
    pat = parse_pattern(pattern)
    ref_mask = torch.zeros(W.shape, dtype=torch.bool)

    def ref_col(W1, b0, i, U):
        d = torch.diagonal(U)
        if pat.kind != "nm" and i == 0:
            score = W1.square() / d[b0:b0 + W1.shape[1]].square()
            chosen = torch.zeros_like(W1, dtype=torch.bool)
            chosen.view(-1)[torch.topk(score.flatten(), int(round(0.5 * score.numel())), largest=False).indices] = True
            ref_mask[:, b0:b0 + W1.shape[1]] = chosen
        if pat.kind == "nm" and i % 4 == 0:
            score = W1[:, i:i + 4].square() / d[b0 + i:b0 + i + 4].square()
            ref_mask[:, b0 + i:b0 + i + 4].scatter_(1, torch.topk(score, 2, dim=1, largest=False).indices, True)
        return torch.where(ref_mask[:, b0 + i], 0.0, W1[:, i])

    ref = reference_sweep(Wd, Hd, 32, ref_col)
    Wp, mask = obs_prune(W, H, 0.5, pat, blocksize=32)
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(Wp, ref, rtol=1e-4, atol=1e-5)


def test_natural_order_gptq_fits_groups_to_the_reference_values():
    """Natural order fits each group's scale to its columns as the reference sweep has them at
    the group's start (look-ahead): the codes equal a reference GPTQ built on `reference_sweep`."""
    W, H = problem(n=32, k=192, seed=3)
    Hd, dead = damped_hessian(H)
    Wd = W.clone()
    Wd[:, dead] = 0
    g = 64
    n = W.shape[0]
    state = {}

    def ref_col(W1, b0, i, U):
        if i % g == 0:
            s, z = F.fit_groups(W1[:, i:i + g].contiguous().view(n, 1, g), torch.ones(1, 1, g, dtype=torch.bool),
                                "int4", torch.float32, True)
            state["s"], state["z"] = s.view(n), z.view(n)
        return F.encode(W1[:, i], state["s"], state["z"], "int4")[1]

    ref = reference_sweep(Wd, Hd, 128, ref_col)
    qw = gptq_quantize(W, H, g, "int4", torch.float32, refine=True, act_order=False)
    deq = qw.dequantize(torch.float32)
    step = qw.scales.t().repeat_interleave(g, dim=1)  # (n, k): each weight's quantisation step
    moved = (deq - ref).abs() > step / 4  # a different code, not float32 rounding of the same one
    assert moved.float().mean() < 1e-3  # a rare code may flip on float32 rounding


@pytest.mark.parametrize("sdtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("refine", [True, False])
def test_whole_group_search_is_bit_identical_to_the_masked_search(sdtype, refine):
    g = torch.Generator().manual_seed(4)
    wg = torch.randn(37, 5, 64, generator=g) * torch.rand(37, 5, 1, generator=g)
    wg[0, 0] = 0.25  # constant groups: zero range (s = 0) and clipped ranges with s < 0
    wg[1, 1] = -3.0
    wg[2, 2] = 0.0
    valid = torch.ones(1, 5, 64, dtype=torch.bool)
    # (the fast codes are views into the buffers, valid until their next use: one set each)
    for fast, slow in ((F._asym_full(wg, sdtype, refine, F._Buffers(wg.device)), F._quantize_asym(wg, valid, sdtype, refine)),
                       (F._sym_full(wg, sdtype, refine, F._Buffers(wg.device)), F._quantize_sym(wg, valid, sdtype, refine))):
        for a, b in zip(fast, slow):
            assert torch.equal(a.view(b.shape), b)


@pytest.mark.parametrize("fmt", F.FORMATS)
def test_chunking_and_reused_buffers_do_not_change_the_result(fmt):
    w = torch.randn(50, 192, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    one = F.quantize(w, 64, fmt, rows_per_chunk=50)
    for rows in (1, 7, 16):  # uneven last chunk: the buffers are reused at a smaller size
        other = F.quantize(w, 64, fmt, rows_per_chunk=rows)
        assert torch.equal(one.qweight, other.qweight) and torch.equal(one.scales, other.scales)
        assert (one.zeros is None) == (other.zeros is None)
        if one.zeros is not None:
            assert torch.equal(one.zeros, other.zeros)
