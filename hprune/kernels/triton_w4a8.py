"""Triton kernels of w4a8_mm: INT4 weights x FP8 (e4m3) activations on FP8 tensor cores.

Two launches per call (the math is defined in `hprune.kernels.w4a8`):

1. `_quant_act_kernel`, one program per row of x: amax over the row, the per-token scale
   a = amax / 448, the e4m3 codes of x / a (written as float8_e4m3fn) and, for the asymmetric
   "int4" format, the per-group row sums S[m, g] of those codes (fp32). Memory bound: one read of
   x (the second pass mostly hits L2) and a write of half its bytes.
2. `_w4a8_kernel`, the GEMM. Per K-block of BLOCK_K (which divides group_size, so a K-block lies
   in one group): the packed 4-bit codes are unpacked in registers and converted exactly to e4m3
   (q for "int4", q - 8 for "int4_sym"; integers -8..15 are e4m3 values), two FP8 `tl.dot`s
   (low and high nibbles, as in the W4A16 kernel: see `triton_w4a16`) give the block's fp32
   partial sum, which is multiplied by the block's group scales s[g, n] and added to the fp32
   accumulator. On sm_90 Triton would let the FP8 tensor cores accumulate a whole dot in their
   reduced precision (~14 bits); `max_num_imprecise_acc=32` adds each wgmma's 32 products to an
   fp32 accumulator instead. For "int4" the zero term sum_g S[m, g] z[g, n] is one small extra GEMM over the G groups after the main loop (tf32x3 on a GPU: ~fp32 accuracy, which
   the term needs because it largely cancels against the scaled codes). The epilogue multiplies
   by a[m] and adds the bias.

FP8 rounding is done in software (`_round_e4m3`: round-to-nearest-even on the fp32 bits, then
an exact cast), identically on the GPU and in the interpreter: triton 3.9's interpreter rounds
fp32 -> e4m3 wrongly when the mantissa carries into the exponent (125.7 becomes 64), and the
result then does not depend on the hardware conversion's rounding mode. Divisions use
`div_rn` (IEEE), so the codes match the PyTorch reference bit for bit.

FP8 `tl.dot` needs FP8 tensor cores: compute capability 8.9+ (Ada, Hopper). Elsewhere the
dispatch point does not pick this backend (see `hprune.kernels.w4a8`). In interpreter mode
(CPU tests) fp8 dots are exact; bf16 tensors are upcast right after their loads and the output
is written in fp32 and rounded by PyTorch (DESIGN §7).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from typing import Optional

import torch
import triton
import triton.language as tl

from hprune.kernels import dispatch

FP8_MAX = 448.0
FP8_ACC_K = tl.constexpr(32)  # K of one FP8 wgmma: products summed in reduced precision at most


@triton.jit
def _round_e4m3(v):
    """fp32 -> the nearest e4m3 value (ties to even), returned in fp32. Expects |v| <= 448."""
    b = v.to(tl.uint32, bitcast=True)
    sign = b & 0x80000000
    mag = b & 0x7FFFFFFF
    # normal e4m3 (|v| >= 2^-6): keep 3 mantissa bits; the integer add carries into the exponent
    normal = (mag + 0x7FFFF + ((mag >> 20) & 1)) & 0xFFF00000
    # subnormal e4m3 (|v| < 2^-6): multiples of 2^-9; adding 1.5 * 2^14 rounds there (fp32 RNE)
    fm = mag.to(tl.float32, bitcast=True)
    sub = ((fm + 24576.0) - 24576.0).to(tl.uint32, bitcast=True)
    r = tl.where(fm < 0.015625, sub, normal)
    return (r | sign).to(tl.float32, bitcast=True)


@triton.jit
def _quant_act_kernel(x_ptr, xq_ptr, a_ptr, sums_ptr, K, G, stride_xm, stride_qm,
                      GROUP: tl.constexpr, GROUP_P2: tl.constexpr, GPB: tl.constexpr, HAS_SUMS: tl.constexpr):
    # One row; a (GPB, GROUP_P2) tile covers GPB whole groups (columns >= GROUP are padding).
    row = tl.program_id(0).to(tl.int64)
    gi = tl.arange(0, GPB)
    jj = tl.arange(0, GROUP_P2)
    x_row = x_ptr + row * stride_xm
    amax = tl.zeros((GPB, GROUP_P2), dtype=tl.float32)
    for k0 in range(0, K, GPB * GROUP):
        kk = k0 + gi[:, None] * GROUP + jj[None, :]
        mask = (jj[None, :] < GROUP) & (kk < K)
        v = tl.load(x_row + kk, mask=mask, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(v), propagate_nan=tl.PropagateNan.ALL)
    m = tl.max(tl.max(amax, axis=1), axis=0)
    a = tl.where(m > 0.0, tl.math.div_rn(m, 448.0), 1.0)
    tl.store(a_ptr + row, a)
    for k0 in range(0, K, GPB * GROUP):
        kk = k0 + gi[:, None] * GROUP + jj[None, :]
        mask = (jj[None, :] < GROUP) & (kk < K)
        v = tl.load(x_row + kk, mask=mask, other=0.0).to(tl.float32)
        v = tl.math.div_rn(v, tl.full((GPB, GROUP_P2), 1.0, tl.float32) * a)
        v = tl.clamp(v, -448.0, 448.0, propagate_nan=tl.PropagateNan.ALL)
        q = _round_e4m3(v)
        tl.store(xq_ptr + row * stride_qm + kk, q.to(tl.float8e4nv), mask=mask)
        if HAS_SUMS:
            g = k0 // GROUP + gi
            tl.store(sums_ptr + row * G + g, tl.sum(q, axis=1), mask=g < G)


@triton.jit
def _codes_to_fp8(codes, SYM: tl.constexpr):
    # int32 codes 0..15 -> e4m3 q (int4) or q - 8 (int4_sym), exactly: 0x6400 | q is the fp16
    # 1024 + q, so the subtraction is exact and so is the conversion of the small integer.
    f = (codes | 0x6400).to(tl.uint16).to(tl.float16, bitcast=True)
    if SYM:
        f = f - 1032.0
    else:
        f = f - 1024.0
    return f.to(tl.float8e4nv)


@triton.jit
def _w4a8_kernel(
    xq_ptr, a_ptr, sums_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr,
    M, N, K, G, stride_xm, stride_wn, stride_om,
    GROUP: tl.constexpr, FMT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr,
    SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, ZPREC: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # grouped tile order: GROUP_M row tiles sweep the N tiles together (L2 reuse)
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    rows_here = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % rows_here
    pid_n = (pid % width) // rows_here

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    HALF: tl.constexpr = BLOCK_K // 2
    jj = tl.arange(0, HALF)
    k_lo = (jj // 16) * 32 + (jj % 16)  # k of the low nibble of tile byte jj (16-byte chunks of 32 k)

    x_rows = xq_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_cols = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):
        kl = k0 + k_lo
        kh = kl + 16
        if EVEN_K:  # K % BLOCK_K == 0: no K masks, vectorised loads
            wq = tl.load(w_cols + (k0 // 2 + jj)[:, None], mask=mask_n[None, :], other=0).to(tl.int32)
            xl = tl.load(x_rows + kl[None, :], mask=mask_m[:, None], other=0.0)
            xh = tl.load(x_rows + kh[None, :], mask=mask_m[:, None], other=0.0)
        else:
            wq = tl.load(w_cols + (k0 // 2 + jj)[:, None], mask=(kl < K)[:, None] & mask_n[None, :],
                         other=0).to(tl.int32)
            xl = tl.load(x_rows + kl[None, :], mask=mask_m[:, None] & (kl < K)[None, :], other=0.0)
            xh = tl.load(x_rows + kh[None, :], mask=mask_m[:, None] & (kh < K)[None, :], other=0.0)
        wl = _codes_to_fp8(wq & 0xF, FMT == 1)
        wh = _codes_to_fp8(wq >> 4, FMT == 1)
        # max_num_imprecise_acc=32: on sm_90 Triton lets FP8 wgmma accumulate in the tensor cores'
        # reduced precision (~14 bits kept) over the whole dot by default; 32 adds every
        # instruction's result (k = 32) to an fp32 register accumulator instead.
        part = tl.dot(xl, wl, max_num_imprecise_acc=FP8_ACC_K)
        part = tl.dot(xh, wh, part, max_num_imprecise_acc=FP8_ACC_K)
        s = tl.load(s_ptr + (k0 // GROUP) * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc += part * s[None, :]

    if FMT == 0:  # zero term of "int4": sum_g S[m, g] * z[g, n], once (by the first K slice)
        if pid_k == 0:
            sum_rows = sums_ptr + offs_m.to(tl.int64)[:, None] * G
            for g0 in range(0, G, BLOCK_G):
                gg = g0 + tl.arange(0, BLOCK_G)
                sm = tl.load(sum_rows + gg[None, :], mask=mask_m[:, None] & (gg < G)[None, :], other=0.0)
                zt = tl.load(z_ptr + gg[:, None] * N + offs_n[None, :], mask=(gg < G)[:, None] & mask_n[None, :],
                             other=0.0).to(tl.float32)
                acc = tl.dot(sm, zt, acc, input_precision=ZPREC)

    a = tl.load(a_ptr + offs_m, mask=mask_m, other=0.0)
    acc = acc * a[:, None]
    out_offs = offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    omask = mask_m[:, None] & mask_n[None, :]
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=omask)
    else:  # fp32 atomics into a zeroed buffer (rounded to the output dtype by the launcher)
        tl.atomic_add(out_ptr + out_offs, acc, mask=omask)


# ---- configurations -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Config:
    """One launch configuration of the GEMM kernel. block_k must divide the group size."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3

    def short(self) -> str:
        s = f"{self.block_m}x{self.block_n}x{self.block_k}"
        if self.split_k > 1:
            s += f" sk{self.split_k}"
        return s + f" w{self.num_warps}s{self.num_stages}"


def _sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # interpreter: H100-like, so the CPU tests take the GPU's choices


def _block_k(group_size: int, prefer: int = 128) -> int:
    return prefer if group_size % prefer == 0 else 64


def _with_split(cfg: Config, m: int, n: int, k: int, sms: int, max_split: int = 8) -> Config:
    """Splits K while the grid has fewer than ~2 programs per SM (keeping >= 4 K-blocks per split)."""
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    k_blocks = triton.cdiv(k, cfg.block_k)
    split = 1
    while split < max_split and tiles * split < 2 * sms and k_blocks >= 8 * split:
        split *= 2
    return replace(cfg, split_k=split)


def heuristic_config(m: int, n: int, k: int, group_size: int, device: Optional[torch.device], *,
                     sms: Optional[int] = None) -> Config:
    """A reasonable configuration without tuning (`sms`: the SM count, for ahead-of-time checks)."""
    # Each compiles for sm_90 without register spills (tests/test_triton_aot.py): the per-K-block
    # partial sum is a second fp32 tile next to the accumulator, so 64x64x128 needs 8 warps and
    # 128x128x64 spilled even with 8 (128x64x64 does not).
    sms = sms or _sms(device)
    bk = _block_k(group_size)
    if m <= 16:
        return _with_split(Config(16, 64, bk, num_warps=4, num_stages=4), m, n, k, sms)
    if m <= 128:
        return _with_split(Config(64, 64, bk, num_warps=8, num_stages=4), m, n, k, sms)
    return Config(128, 64, _block_k(group_size, 64), num_warps=8, num_stages=3)


def launch_label(cfg: Config, k: int) -> str:
    """The compiled variant a launch of `cfg` at K runs (tile, split-K or not, EVEN_K or a tail):
    the self-test key holds it (dispatch)."""
    split = max(1, min(cfg.split_k, triton.cdiv(k, cfg.block_k)))
    return (f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k}" + (" splitK" if split > 1 else "")
            + (" evenK" if k % cfg.block_k == 0 else " Ktail"))


def heuristic_label(m: int, n: int, k: int, group_size: int, sms: int) -> str:
    return launch_label(heuristic_config(m, n, k, group_size, None, sms=sms), k)


def candidate_configs(m: int, n: int, k: int, group_size: int, device: Optional[torch.device], *,
                      sms: Optional[int] = None) -> list[Config]:
    """What the autotuner times (H100/H200 oriented). Kept short: every config is a compile. The
    heuristic's choice first (self-tested; the others are checked against it), then tiles that
    compile for sm_90 without spills (tests/test_triton_aot.py)."""
    sms = sms or _sms(device)
    out: list[Config] = [heuristic_config(m, n, k, group_size, device, sms=sms)]
    # sm_90, triton 3.9: 64x64x128 spilled with 4 warps, 64x128x128 and 128x128x64 with 8.
    if m <= 128:
        bm = 16 if m <= 16 else 64
        for bn, bk in ((64, 64), (64, 128), (128, 128)):
            if group_size % bk or (bm == 64 and bn == 128):  # 64x128x128 spilled even with 8 warps
                continue
            w = 4 if bm == 16 or (bn, bk) == (64, 64) else 8
            base = Config(bm, bn, bk, num_warps=w, num_stages=4)
            out += [base, _with_split(base, m, n, k, sms)]
    else:
        for bm, bn, bk, w, st in ((128, 64, 64, 8, 4), (64, 128, 64, 8, 4), (64, 64, 64, 4, 4)):
            if group_size % bk == 0:
                out.append(Config(bm, bn, bk, num_warps=w, num_stages=st))
    return list(dict.fromkeys(out))


# ---- launching ------------------------------------------------------------------------------------

def _interpreting(device: torch.device) -> bool:
    return device.type == "cpu"


def quantize_activations(x: torch.Tensor, group_size: int, with_sums: bool
                         ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """x (M, K) fp16/bf16/fp32 (unit stride on K) -> (xq float8_e4m3fn (M, K), a fp32 (M,),
    S fp32 (M, G) or None): the Triton version of `w4a8.quantize_activations_reference`."""
    m, k = x.shape
    g = -(-k // group_size)
    xq = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    a = torch.empty((m,), dtype=torch.float32, device=x.device)
    sums = torch.empty((m, g), dtype=torch.float32, device=x.device) if with_sums else None
    if m == 0:
        return xq, a, sums
    gp2 = triton.next_power_of_2(group_size)
    gpb = max(1, min(triton.next_power_of_2(g), 2048 // gp2))
    _quant_act_kernel[(m,)](x, xq, a, sums if sums is not None else a, k, g, x.stride(0), xq.stride(0),
                            GROUP=group_size, GROUP_P2=gp2, GPB=gpb, HAS_SUMS=with_sums, num_warps=4)
    return xq, a, sums


def _launch(xq: torch.Tensor, a: torch.Tensor, sums: Optional[torch.Tensor], qweight: torch.Tensor,
            scales: torch.Tensor, zeros: Optional[torch.Tensor], bias: Optional[torch.Tensor], group_size: int,
            fmt: str, out_dtype: torch.dtype, cfg: Config) -> torch.Tensor:
    m, k = xq.shape
    n = qweight.shape[0]
    dev = xq.device
    g = -(-k // group_size)
    if group_size % cfg.block_k:
        raise ValueError(f"config block_k={cfg.block_k} does not divide group_size={group_size}")
    split = max(1, min(cfg.split_k, triton.cdiv(k, cfg.block_k)))
    interp = _interpreting(dev)
    if split > 1:
        out = torch.zeros((m, n), dtype=torch.float32, device=dev)
    else:
        out = torch.empty((m, n), dtype=torch.float32 if interp else out_dtype, device=dev)
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    _w4a8_kernel[(tiles, split)](
        xq, a, sums if sums is not None else a, qweight, scales, zeros if zeros is not None else scales,
        bias if bias is not None else scales, out,
        m, n, k, g, xq.stride(0), qweight.stride(0), out.stride(0),
        GROUP=group_size, FMT=0 if fmt == "int4" else 1, HAS_BIAS=bias is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_G=16,
        SPLIT_K=split, GROUP_M=cfg.group_m, EVEN_K=k % cfg.block_k == 0,
        ZPREC="ieee" if interp else "tf32x3",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out if out.dtype == out_dtype else out.to(out_dtype)


_TUNED: dict[tuple, Config] = {}


def _m_bucket(m: int) -> int:
    return min(triton.next_power_of_2(max(m, 1)), 8192)


def _autotune_enabled(device: torch.device) -> bool:
    if device.type != "cuda" or dispatch.triton_interpret():
        return False
    from hprune.env import flag

    if not flag("HPRUNE_TRITON_AUTOTUNE", True):
        return False
    return not torch.cuda.is_current_stream_capturing()


def tuned_configs() -> dict[str, dict]:
    """The configurations picked so far: {'M<=bucket N K dtype fmt g bias': Config fields}."""
    return {" ".join(map(str, key[1:])): asdict(cfg) for key, cfg in _TUNED.items()}


def _get_config(xq: torch.Tensor, a: torch.Tensor, sums: Optional[torch.Tensor], qweight: torch.Tensor,
                scales: torch.Tensor, zeros: Optional[torch.Tensor], bias: Optional[torch.Tensor], group_size: int,
                fmt: str, out_dtype: torch.dtype) -> Config:
    m, k = xq.shape
    n = qweight.shape[0]
    key = (xq.device, _m_bucket(m), n, k, out_dtype, fmt, group_size, bias is not None)
    cfg = _TUNED.get(key)
    if cfg is not None:
        return cfg
    if not _autotune_enabled(xq.device):
        return heuristic_config(m, n, k, group_size, xq.device)
    heur = heuristic_config(m, n, k, group_size, xq.device)
    best, best_t = None, float("inf")
    want = None
    for c in candidate_configs(m, n, k, group_size, xq.device):
        try:
            got = _launch(xq, a, sums, qweight, scales, zeros, bias, group_size, fmt, out_dtype, c)
            if c == heur:
                want = got
            elif want is None or not dispatch.agrees("w4a8_mm", out_dtype, [got], [want]):
                continue  # a candidate that disagrees with the self-tested heuristic config is never chosen
            t = triton.testing.do_bench(
                lambda c=c: _launch(xq, a, sums, qweight, scales, zeros, bias, group_size, fmt, out_dtype, c),
                warmup=5, rep=25, return_mode="median")
        except Exception:  # noqa: BLE001 - e.g. out of shared memory for this config on this GPU
            continue
        if t < best_t:
            best, best_t = c, t
    cfg = best or heur
    _TUNED[key] = cfg
    return cfg


def w4a8_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                bias: Optional[torch.Tensor], group_size: int, fmt: str, config: Optional[Config] = None
                ) -> torch.Tensor:
    """x (M, K) fp16/bf16/fp32 (unit stride on K); qweight uint8 (N, ceil(K/32)*16); scales/zeros
    (G, N) and bias (N,) in x's dtype; fmt "int4" or "int4_sym"; group_size a multiple of 64.
    Returns (M, N) in x's dtype. `config` overrides the tuned choice."""
    if dispatch.triton_interpret() and x.device.type != "cpu":
        raise RuntimeError("TRITON_INTERPRET=1 runs Triton kernels on CPU tensors only")
    xq, a, sums = quantize_activations(x, group_size, with_sums=fmt == "int4")
    cfg = config or _get_config(xq, a, sums, qweight, scales, zeros, bias, group_size, fmt, x.dtype)
    return _launch(xq, a, sums, qweight, scales, zeros, bias, group_size, fmt, x.dtype, cfg)


__all__ = ["Config", "w4a8_matmul", "quantize_activations", "heuristic_config", "candidate_configs",
           "tuned_configs", "FP8_MAX"]
