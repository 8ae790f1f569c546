"""GPTQ: 4-bit weights chosen with the layer's input Hessian (Optimal Brain Surgeon applied to
rounding instead of removal; Frantar et al., 2022).

Round-to-nearest picks each weight's code on its own. For a Linear whose inputs have second
moment H = E[xᵀx], what matters is the output error tr(ΔW H ΔWᵀ): GPTQ rounds the input columns
left to right and, after each, moves the not-yet-rounded columns of the same row by
-err · [H⁻¹]_j,: / [H⁻¹]_jj to cancel what the rounding did to the output (the SparseGPT solver of
hprune.obs.solver with "set to the nearest code" in place of "set to zero").

Column order. By default ("act-order") the columns are rounded in order of decreasing H_jj, the
inputs with the most energy first, while they can still be compensated by every other column;
each group's scale and zero are then fitted (with `quantize`'s clipping search) to the group's
original weights ("static groups"), since its columns are visited out of order. The clipped
ranges can lose to min-max ones once compensation has moved the weights (large K, few tokens),
so with refine both grids are swept and each output row keeps the one with the lower GPTQ
error on H. With
act_order=False the columns go left to right and a group's scale is fitted to its weights as they
stand when the solver reaches its first column (after compensation). On the block Linears of the
ShapesBench teacher and tiny-sd3, with their calibration Hessians, act-order has the lower
Hessian-weighted error tr(ΔW H ΔWᵀ) in nearly every layer (`python -m benchmarks.gptq_order`; the
README has the numbers). Either way the codes are stored in the natural layout, groups contiguous
in K: kernels see no difference.

Here H is OBS-Diff's timestep-aware Hessian (hprune.obs.HessianCollector): the same calibration
denoising loop that drives pruning. The output is an ordinary QuantizedWeight in the packed
layout, so every kernel runs it unchanged.
"""
from __future__ import annotations

from typing import Any

import torch

from hprune.errors import HpruneError, ShapeError
from hprune import formats as F


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, group_size: int = F.DEFAULT_GROUP_SIZE,
                  fmt: str = F.DEFAULT_FORMAT, scale_dtype: torch.dtype | None = None, refine: bool = True,
                  blocksize: int = 128, percdamp: float = 0.01, act_order: bool = True) -> F.QuantizedWeight:
    """Quantises one Linear weight with GPTQ.

    Args:
        weight: (out_features, in_features), any float dtype and device (work in float32 there).
        hessian: (in_features, in_features) input second moment (any positive scale: the damping
            is relative), e.g. from hprune.obs.HessianCollector.
        group_size, fmt, scale_dtype, refine: as in `hprune.formats.quantize`.
        blocksize: columns per lazy-update block (natural order: rounded down to whole groups, at
            least one, so a group's scale is fitted to weights that are already fully compensated).
        percdamp: damping λ = percdamp · mean(diag H) added to the diagonal.
        act_order: round the columns in order of decreasing diag(H), with static group scales
            (default; with refine, per row the searched or the min-max static grid, whichever
            gives the lower error tr(ΔW H ΔWᵀ)); False: left to right, scales fitted to the
            compensated weights.
    Returns a QuantizedWeight. With H ∝ I it equals `quantize(weight, ...)` exactly (natural
    order, or refine off; act-order + refine: per row quantize()'s or min-max's, the better).
    """
    from hprune.obs.solver import damped_hessian, hessian_factor, obs_sweep

    F.check_format(fmt)
    F.check_group_size(group_size)
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ShapeError(f"weight must be a 2-D float tensor (N, K), got {weight.dtype} {tuple(weight.shape)}")
    n, k = weight.shape
    if tuple(hessian.shape) != (k, k):
        raise ShapeError(f"hessian must be ({k}, {k}) for a weight with {k} input features, "
                         f"got {tuple(hessian.shape)}")
    if not 0 < percdamp < 1:
        raise ShapeError(f"percdamp must be in (0, 1), got {percdamp}")
    if scale_dtype is None:
        scale_dtype = weight.dtype if weight.dtype in (torch.float16, torch.bfloat16) else torch.float32
    W = weight.detach().to(torch.float32).clone()
    if not torch.isfinite(W).all():
        raise ShapeError("weight contains inf or NaN")
    H, dead = damped_hessian(hessian.to(W.device), percdamp)
    W[:, dead] = 0  # inputs that were always zero: their weights cannot matter
    g = group_size
    # The sweep works on Wᵀ (one input column per contiguous row); codes are written the same way.
    codesT = torch.empty(k, n, dtype=torch.uint8, device=W.device)
    if act_order:
        # static groups: round-to-nearest's scales of the original weights, columns by energy
        static = F.quantize(W, g, fmt, scale_dtype=scale_dtype, refine=refine)
        minmax = F.quantize(W, g, fmt, scale_dtype=scale_dtype, refine=False) if refine else None
        s_all, z_all = static.scales, static.zeros  # (G, N) in scale_dtype
        perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)  # H ∝ I: natural order
        group_of = (perm // g).tolist()
        lam = float(torch.diagonal(H).mean()) * percdamp / (1 + percdamp)  # the damping damped_hessian added
        R = hessian_factor(H, perm)
        del H
        WT = W.t()[perm].contiguous()
        del W
        if refine:
            # The search clips each group's range to minimise the round-to-nearest error of the
            # ORIGINAL weights; the sweep's compensation then pushes weights past the clipped
            # range, and at large K (strong compensation) that loses to min-max scales. Rows are
            # independent in GPTQ (same R, own scales), so sweep both grids side by side (rows
            # N..2N-1: min-max) and keep, per row, the one whose GPTQ error is lower: never worse
            # than either. Shares the factorisation; the sweep does twice the rows.
            s_all = torch.cat([s_all, minmax.scales], 1)
            z_all = torch.cat([z_all, minmax.zeros], 1) if z_all is not None else None
            orig = WT
            WT = torch.cat([WT, WT], 1)
            codesT = torch.empty(k, 2 * n, dtype=torch.uint8, device=WT.device)
            rd2 = torch.diagonal(R).square().tolist()  # GPTQ error = Σ_j R_jj² (w̃_j - q_j)² per row
            err = torch.zeros(2 * n, dtype=torch.float64, device=WT.device)
            tmp = torch.empty(2 * n, dtype=torch.float32, device=WT.device)
        enc = _Encoder(s_all.float(), z_all.float() if z_all is not None else None, fmt)

        def column(W1: torch.Tensor, b0: int, i: int, ahead: Any) -> torch.Tensor:
            q = enc(W1[i], group_of[b0 + i], codesT[b0 + i])
            if refine:
                torch.sub(W1[i], q, out=tmp)
                err.add_(tmp.square_(), alpha=rd2[b0 + i])
            return q

        obs_sweep(WT, R, blocksize, column)
        if refine:
            # the error on the calibration inputs themselves, tr(ΔW H ΔWᵀ) without the damping λI:
            # Σ_j R_jj² (w̃_j - q_j)² - λ Σ_j (q_j - w_j)² per row (WT now holds the dequantised Q)
            err.add_(WT.view(k, 2, n).sub_(orig.unsqueeze(1)).square_().sum(0).view(2 * n), alpha=-lam)
            use_mm = err[n:] < err[:n]  # ties keep the searched grid
            codesT = torch.where(use_mm, codesT[:, n:], codesT[:, :n])
            s_all = torch.where(use_mm, s_all[:, n:], s_all[:, :n]).contiguous()
            if z_all is not None:
                z_all = torch.where(use_mm, z_all[:, n:], z_all[:, :n]).contiguous()
        codes = torch.empty_like(codesT)
        codes[perm] = codesT
        codes = codes.t()
    else:
        scales: list[torch.Tensor] = []
        zeros: list[torch.Tensor | None] = []
        state: list[_Encoder] = []
        valid_all = torch.arange(g, device=W.device)
        R = hessian_factor(H)
        del H
        WT = W.t().contiguous()
        del W

        def column(W1: torch.Tensor, b0: int, i: int, ahead: Any) -> torch.Tensor:
            if i % g == 0:  # a new group: fit its scale to the compensated weights
                width = min(g, W1.shape[0] - i)
                wg = torch.nn.functional.pad(ahead(i, width).t(), (0, g - width)).view(n, 1, g)
                s, z = F.fit_groups(wg, (valid_all < width).view(1, 1, g), fmt, scale_dtype, refine)
                scales.append(s.view(n))
                zeros.append(z.view(n) if z is not None else None)
                state[:] = [_Encoder(scales[-1].view(1, n), zeros[-1].view(1, n) if z is not None else None, fmt)]
            return state[0](W1[i], 0, codesT[b0 + i])

        # blocks are whole groups, so a group's scale is fitted to fully compensated weights
        obs_sweep(WT, R, max(g, (blocksize // g) * g), column)
        codes = codesT.t()
        s_all = torch.stack(scales).to(scale_dtype).contiguous()  # (G, N)
        z_all = torch.stack(zeros).to(scale_dtype).contiguous() if fmt == "int4" else None
    return F.QuantizedWeight(F.pack_int4(codes, fmt), s_all, z_all, k, g, fmt)


class _Encoder:
    """Rounds one column to the nearest code of its group, `formats.encode`'s rules, with the
    per-group division guard (s <= 0 gives the zero code) prepared once: dividing by +inf instead
    of s gives ±0, the code `encode` picks there. s, z: (G, N) float32 (z for "int4" only)."""

    def __init__(self, s: torch.Tensor, z: torch.Tensor | None, fmt: str):
        self.s, self.z, self.fmt = s, z, fmt
        self.safe = torch.where(s > 0, s, torch.inf)

    def __call__(self, w: torch.Tensor, gi: int, code_out: torch.Tensor) -> torch.Tensor:
        """w (N,) -> its dequantised value (N,) float32; writes the codes into code_out (N,) uint8."""
        s = self.s[gi]
        if self.fmt == "int4":
            z = self.z[gi]
            q = torch.sub(w, z).div_(self.safe[gi]).round_().clamp_(0, 15)
            code_out.copy_(q)
            return q.mul_(s).add_(z)
        if self.fmt == "int4_sym":
            v = torch.div(w, self.safe[gi]).round_().clamp_(-8, 7)
            code_out.copy_(v + 8)
            return v.mul_(s)
        q, value = F.encode(w, s, None, self.fmt)
        code_out.copy_(q)
        return value


@torch.no_grad()
def hessian_error(weight: torch.Tensor, qw: F.QuantizedWeight, hessian: torch.Tensor) -> float:
    """tr(ΔW H ΔWᵀ) / tr(W H Wᵀ): the relative output error of a quantised layer on inputs whose
    second moment is `hessian` (ΔW = dequantised - weight, all in float64)."""
    w = weight.detach().double()
    d = qw.dequantize(torch.float32).double().to(w.device) - w
    h = hessian.double().to(w.device)
    return float(torch.einsum("ij,jk,ik->", d, h, d) / torch.einsum("ij,jk,ik->", w, h, w).clamp_min(1e-300))


HESSIAN_BUDGET = 2 << 30  # bytes of float32 Hessians held at once when groups is chosen automatically


def auto_groups(in_features: list[int], budget: int = HESSIAN_BUDGET) -> int:
    """Sequential groups needed so one group's Hessians (in² float32 per unit) fit `budget`."""
    total = sum(4 * k * k for k in in_features)
    return max(1, -(-total // budget))


def gptq_linears(model: torch.nn.Module, names: list[str], calib: Any, *, group_size: int, fmt: str,
                 scale_dtype: torch.dtype | None, refine: bool, act: str | None, groups: int | None = None,
                 weighting: str | None = None, act_order: bool = True, progress: bool = False
                 ) -> list[tuple[str, torch.nn.Module]]:
    """The quantised replacement of each named nn.Linear of `model`, chosen with GPTQ.

    Linears that read one input (q/k/v) share one Hessian. The AdaLN modulation Linears (fed by
    the timestep embedding: a handful of distinct inputs, a rank-deficient Hessian that says
    nothing about unseen timesteps) and any named Linear outside the blocks use round-to-nearest.
    groups > 1: the units are split into that many contiguous groups; each group's Hessians are
    collected with the earlier groups already quantised (sequential GPTQ, and only one group's
    Hessians in memory). None: total Hessian bytes / HESSIAN_BUDGET groups, rounded up (1 for
    small models; 16 for SD3.5-Large, whose block Hessians total 32 GiB); groups are balanced by
    weight count, so one group's Hessians are about, not exactly, within the budget. act_order is
    `gptq_quantize`'s column order. The model is
    unchanged on return, also on error (layers swapped in for a later group's calibration are
    swapped back)."""
    from hprune.report import tqdm

    from hprune.obs.hessian import DEFAULT_WEIGHTING, HessianCollector, run_calibration_loop, step_weights
    from hprune.obs.sequential import find_linear_units, split_groups
    from hprune.quant.linear import quantize_linear, set_module

    if groups is not None and (not isinstance(groups, int) or groups < 1):
        raise HpruneError(f"groups must be a positive integer (or None: automatic), got {groups!r}")
    calib.check_fits(model)
    wanted = set(names)
    units = []
    for u in find_linear_units(model):
        members = [(p, lin) for p, lin in u.linears if p in wanted]
        if members:
            units.append((u.name, members))
    in_units = {p for _, members in units for p, _ in members}
    if groups is None:
        groups = auto_groups([members[0][1].in_features for _, members in units])
    weights = step_weights(weighting or DEFAULT_WEIGHTING, calib.num_steps)
    kw = dict(group_size=group_size, fmt=fmt, scale_dtype=scale_dtype, refine=refine, act=act)
    new: dict[str, torch.nn.Module] = {p: quantize_linear(model.get_submodule(p), **kw)
                                       for p in names if p not in in_units}
    swapped: list[tuple[str, torch.nn.Module]] = []  # (name, original) of layers swapped in meanwhile
    try:
        parts = split_groups([sum(l.weight.numel() for _, l in m) for _, m in units], groups) if units else []
        for gi, part in enumerate(parts):
            group = [units[i] for i in part]
            collector = HessianCollector({name: [l for _, l in members] for name, members in group}, weights)
            run_calibration_loop(model, calib, collector, progress=progress,
                                 desc=f"GPTQ calibration {gi + 1}/{len(parts)}")
            hs = collector.hessians()
            for name, members in tqdm(group, desc=f"GPTQ {gi + 1}/{len(parts)}", unit="unit", disable=not progress,
                                      leave=False):
                if name not in hs:
                    raise HpruneError(f"layer {name} never ran during the calibration loop")
                for p, lin in members:
                    qw = gptq_quantize(lin.weight, hs[name], group_size, fmt, scale_dtype=scale_dtype,
                                       refine=refine, act_order=act_order)
                    new[p] = quantize_linear(lin, **kw, quantized=qw)
                del hs[name]
            if gi + 1 < len(parts):  # later groups calibrate on the quantised earlier ones
                for _, members in group:
                    for p, lin in members:
                        swapped.append((p, lin))
                        set_module(model, p, new[p])
    finally:
        for p, lin in swapped:
            set_module(model, p, lin)
    return [(p, new[p]) for p in names]
