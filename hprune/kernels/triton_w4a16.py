"""Triton kernel of w4a16_mm: dequantise 4-bit weights in registers inside a tensor-core GEMM.

Layout (hprune.formats): one 16-byte chunk of a packed row holds 32 consecutive k, the low
nibbles the first 16 and the high nibbles the next 16. A K tile of BLOCK_K values is BLOCK_K/2
contiguous bytes per output row; unpacking gives two (BLOCK_K/2, BLOCK_N) weight tiles whose
matching activations are two runs of contiguous columns of x, so each K step is two `tl.dot`s
with no shuffles. Each weight is computed in fp32 ((code | 0x4B000000) bit trick for an exact
int -> float, then * scale (+ zero)), rounded once to the activation dtype, as the reference.

Configurations (`Config`), picked by M:
  small M (<= 16)   BLOCK_M = 16 (or 1-4 with USE_DOT=False: a GEMV on CUDA cores), small
                    BLOCK_N and split-K so that enough programs stream the weight: it is
                    memory bound, ideally ~3.5x faster than bf16.
  medium M          BLOCK_M 32, split-K when the grid is still small.
  large M (> 128)   64x128 tiles, grouped (L2-friendly) tile order: compute bound; the
                    dequantisation cost is amortised over BLOCK_M rows.
The heuristic choices are the ones that compile for sm_80 and sm_90 without spills (see
`heuristic_config`, docs/gpu-readiness.md); the autotuner also times larger tiles, skipping any
that fail to launch. Scales / zeros: one row per group in the K tile (a tile spans one group, or
several whole groups selected per row; groups not aligned to tiles are gathered per row). NF4
code values come from a select tree on the code bits (no table in memory).
Split-K reduces either with fp32 atomics into a zeroed buffer (SPLIT_MODE 0, three launches) or
"serially" (SPLIT_MODE 1: partials to a workspace, the last program of a tile, found with an
acq_rel atomic counter, sums them and writes the output; one launch).

On a GPU the config is autotuned per (M bucket, N, K, dtype, format, group size) on first use
(HPRUNE_TRITON_AUTOTUNE=0 keeps the heuristic choice). Under TRITON_INTERPRET=1 (CPU tests)
the heuristic is used, and bf16 is computed from fp32 upcasts with an exact round-to-bf16
(UPCAST) because the interpreter does not implement bf16 (DESIGN §7).
"""
from __future__ import annotations

import functools
import os
from dataclasses import asdict, dataclass, replace
from typing import Optional

import torch
import triton
import triton.language as tl

from hprune.kernels import dispatch
from hprune import formats as F


@triton.jit
def _round_bf16(v):
    # fp32 -> nearest-even bf16 value, kept in fp32 (used only under the interpreter)
    b = v.to(tl.uint32, bitcast=True)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return b.to(tl.float32, bitcast=True)


# The 16 NF4 values as fp32 constants (a gathered load from a table would be pipelined by Triton
# as a full (BLOCK_K/2, BLOCK_N) fp32 tile per stage in shared memory: 128 KB at 16x64x128,
# more than an A100 allows at 16x64x256: docs/gpu-readiness.md).
def _fp32(v: float) -> float:
    return float(torch.tensor(v, dtype=torch.float32))  # the value the fp32 reference table holds


_NF4_0 = tl.constexpr(_fp32(F.NF4_CODE[0]))
_NF4_1 = tl.constexpr(_fp32(F.NF4_CODE[1]))
_NF4_2 = tl.constexpr(_fp32(F.NF4_CODE[2]))
_NF4_3 = tl.constexpr(_fp32(F.NF4_CODE[3]))
_NF4_4 = tl.constexpr(_fp32(F.NF4_CODE[4]))
_NF4_5 = tl.constexpr(_fp32(F.NF4_CODE[5]))
_NF4_6 = tl.constexpr(_fp32(F.NF4_CODE[6]))
_NF4_7 = tl.constexpr(_fp32(F.NF4_CODE[7]))
_NF4_8 = tl.constexpr(_fp32(F.NF4_CODE[8]))
_NF4_9 = tl.constexpr(_fp32(F.NF4_CODE[9]))
_NF4_10 = tl.constexpr(_fp32(F.NF4_CODE[10]))
_NF4_11 = tl.constexpr(_fp32(F.NF4_CODE[11]))
_NF4_12 = tl.constexpr(_fp32(F.NF4_CODE[12]))
_NF4_13 = tl.constexpr(_fp32(F.NF4_CODE[13]))
_NF4_14 = tl.constexpr(_fp32(F.NF4_CODE[14]))
_NF4_15 = tl.constexpr(_fp32(F.NF4_CODE[15]))


@triton.jit
def _nf4_value(codes):
    # a 4-level select tree on the code's bits: exact, no memory access
    b0 = (codes & 1) != 0
    b1 = (codes & 2) != 0
    b2 = (codes & 4) != 0
    v0 = tl.where(b1, tl.where(b0, _NF4_3, _NF4_2), tl.where(b0, _NF4_1, _NF4_0))
    v1 = tl.where(b1, tl.where(b0, _NF4_7, _NF4_6), tl.where(b0, _NF4_5, _NF4_4))
    v2 = tl.where(b1, tl.where(b0, _NF4_11, _NF4_10), tl.where(b0, _NF4_9, _NF4_8))
    v3 = tl.where(b1, tl.where(b0, _NF4_15, _NF4_14), tl.where(b0, _NF4_13, _NF4_12))
    lo = tl.where(b2, v1, v0)
    hi = tl.where(b2, v3, v2)
    return tl.where((codes & 8) != 0, hi, lo)


@triton.jit
def _dequant(codes, s, z, FMT: tl.constexpr):
    # codes int32 in 0..15 -> fp32 weights; exact int->float through the 2^23 exponent trick
    if FMT == 2:
        return _nf4_value(codes) * s
    f = (codes | 0x4B000000).to(tl.float32, bitcast=True)
    if FMT == 1:
        return (f - 8388616.0) * s  # (q - 8) * s
    return (f - 8388608.0) * s + z  # q * s + z


@triton.jit
def _w4a16_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
    M, N, K, stride_xm, stride_wn, stride_om,
    GROUP: tl.constexpr, FMT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, SPLIT_MODE: tl.constexpr, GROUP_M: tl.constexpr,
    USE_DOT: tl.constexpr, UPCAST: tl.constexpr, FP32_DOT: tl.constexpr, EVEN_K: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # grouped tile order: GROUP_M row-tiles walk the N tiles together (L2 reuse of x and W)
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    gsize = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % gsize
    pid_n = (pid % width) // gsize

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    HALF: tl.constexpr = BLOCK_K // 2
    jj = tl.arange(0, HALF)
    k_in_tile = (jj // 16) * 32 + (jj % 16)  # k of the low nibble of tile byte jj

    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_cols = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):
        kl = k0 + k_in_tile
        kh = kl + 16
        if EVEN_K:  # K % BLOCK_K == 0: no K masks, so the loads stay vectorised
            ml = tl.full((HALF,), 1, tl.int1)
            mh = ml
            wq = tl.load(w_cols + (k0 // 2 + jj)[:, None], mask=mask_n[None, :], other=0).to(tl.int32)
        else:
            ml = kl < K
            mh = kh < K
            wq = tl.load(w_cols + (k0 // 2 + jj)[:, None], mask=ml[:, None] & mask_n[None, :], other=0).to(tl.int32)
        if GROUP % BLOCK_K == 0:  # the whole tile lies in one group: one scale per column
            g = k0 // GROUP
            s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            if FMT == 0:
                z = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            else:
                z = 0.0
        elif BLOCK_K % GROUP == 0:
            # BLOCK_K // GROUP whole groups per tile: one (BLOCK_N,) row of scales (and zeros) per
            # group, selected per tile row. (A gathered (HALF, BLOCK_N) tile would be pipelined
            # through shared memory as a full tile per stage: ~5x the weight's bytes.)
            GPT: tl.constexpr = BLOCK_K // GROUP
            row_group = jj // (GROUP // 2)  # tile byte jj lies in group k0 // GROUP + row_group
            g0 = k0 // GROUP
            s = tl.load(s_ptr + g0 * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            if FMT == 0:
                z = tl.load(z_ptr + g0 * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            else:
                z = 0.0
            last_g = (K - 1) // GROUP  # groups past K (the tile's masked tail) re-read the last one
            for gg in tl.static_range(1, GPT):
                gi = tl.minimum(g0 + gg, last_g)
                sg = tl.load(s_ptr + gi * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
                s = tl.where((row_group == gg)[:, None], sg[None, :], s)
                if FMT == 0:
                    zg = tl.load(z_ptr + gi * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
                    z = tl.where((row_group == gg)[:, None], zg[None, :], z)
        else:  # groups not aligned to tiles (e.g. 96): per-row gather (a chunk never straddles two)
            gi = kl // GROUP
            sp = gi[:, None] * N + offs_n[None, :]
            smask = ml[:, None] & mask_n[None, :]
            s = tl.load(s_ptr + sp, mask=smask, other=0.0).to(tl.float32)
            if FMT == 0:
                z = tl.load(z_ptr + sp, mask=smask, other=0.0).to(tl.float32)
            else:
                z = 0.0
        wl = _dequant(wq & 0xF, s, z, FMT)
        wh = _dequant(wq >> 4, s, z, FMT)
        if EVEN_K:
            xl = tl.load(x_rows + kl[None, :], mask=mask_m[:, None], other=0.0)
            xh = tl.load(x_rows + kh[None, :], mask=mask_m[:, None], other=0.0)
        else:
            xl = tl.load(x_rows + kl[None, :], mask=mask_m[:, None] & ml[None, :], other=0.0)
            xh = tl.load(x_rows + kh[None, :], mask=mask_m[:, None] & mh[None, :], other=0.0)
        if UPCAST:
            xl = xl.to(tl.float32)
            xh = xh.to(tl.float32)
            wl = _round_bf16(wl)
            wh = _round_bf16(wh)
        elif not FP32_DOT:
            wl = wl.to(x_ptr.dtype.element_ty)
            wh = wh.to(x_ptr.dtype.element_ty)
        if USE_DOT:
            if FP32_DOT:
                acc = tl.dot(xl, wl, acc, input_precision="ieee")
                acc = tl.dot(xh, wh, acc, input_precision="ieee")
            else:
                acc = tl.dot(xl, wl, acc)
                acc = tl.dot(xh, wh, acc)
        else:  # GEMV: broadcast multiply and reduce on CUDA cores (tiny BLOCK_M)
            acc += tl.sum(xl.to(tl.float32)[:, :, None] * wl.to(tl.float32)[None, :, :], axis=1)
            acc += tl.sum(xh.to(tl.float32)[:, :, None] * wh.to(tl.float32)[None, :, :], axis=1)

    out_offs = offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    omask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=omask)
    elif SPLIT_MODE == 0:
        # fp32 atomics into a zeroed buffer; the bias is added once, by the first K slice
        if HAS_BIAS:
            if pid_k == 0:
                acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.atomic_add(out_ptr + out_offs, acc, mask=omask)
    else:
        # serial split-K: publish the partial, count arrivals; the last one reduces
        ws_offs = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        tl.store(ws_ptr + pid_k * M * N + ws_offs, acc, mask=omask)
        tl.debug_barrier()  # every thread's partial is written before the (release) atomic
        count = tl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel")
        if count == SPLIT_K - 1:
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for sk in tl.static_range(SPLIT_K):
                total += tl.load(ws_ptr + sk * M * N + ws_offs, mask=omask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptr + out_offs, total.to(out_ptr.dtype.element_ty), mask=omask)
            tl.atomic_xchg(cnt_ptr + pid, 0)  # ready for the next launch


# ---- configurations -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Config:
    """One launch configuration of the kernel (see the module docstring)."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    split_mode: int = 1  # 0: fp32 atomics + cast, 1: serial (one launch)
    group_m: int = 8
    use_dot: bool = True
    num_warps: int = 4
    num_stages: int = 3

    def short(self) -> str:
        s = f"{self.block_m}x{self.block_n}x{self.block_k}"
        if self.split_k > 1:
            s += f" sk{self.split_k}{'a' if self.split_mode == 0 else 's'}"
        if not self.use_dot:
            s += " gemv"
        return s + f" w{self.num_warps}s{self.num_stages}"


def _next_pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 132  # interpreter: any number works; H100-like keeps CPU and GPU choices alike


def _with_split(cfg: Config, m: int, n: int, k: int, sms: int, max_split: int = 16) -> Config:
    """Splits K until the grid has about two programs per SM (keeping >= 2 K tiles per split)."""
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    k_tiles = triton.cdiv(k, cfg.block_k)
    split = 1
    while split < max_split and tiles * split < 2 * sms and k_tiles >= 4 * split:
        split *= 2
    return replace(cfg, split_k=split)


def heuristic_config(m: int, n: int, k: int, device: Optional[torch.device], dtype: torch.dtype = torch.float16,
                     *, sms: Optional[int] = None) -> Config:
    """A reasonable configuration without tuning, for activations of `dtype` on `device` (`sms`:
    the SM count, for ahead-of-time checks without a device).

    Every configuration returned here compiles for sm_80 and sm_90 within the shared memory of
    both and without register spills, for every format, group size 32 / 64 / 128, with and
    without split-K, bias and a K tail (tests/test_triton_aot.py; docs/gpu-readiness.md). The
    dequantised (BLOCK_K/2, BLOCK_N) fp32 tiles live in registers, hence 8 warps and small K
    tiles: 4 warps spilled at 16x64x128, BLOCK_K 256 at any warp count, 32x64x64, 64x64x32 and
    128x64x32 by a few bytes on sm_80 (where ptxas caps these kernels at 128 registers), and fp32
    activations (an IEEE fp32 dot on CUDA cores) at 16x64x64."""
    sms = sms or _sms(device)
    if dtype == torch.float32:
        return _with_split(Config(16, 64, 32, num_warps=8, num_stages=3), m, n, k, sms)
    if m <= 16:
        return _with_split(Config(16, 64, 128, num_warps=8, num_stages=4), m, n, k, sms)
    if m <= 128:
        return _with_split(Config(32, 64, 32, num_warps=8, num_stages=4), m, n, k, sms)
    return Config(64, 128, 32, num_warps=8, num_stages=4)


def launch_label(cfg: Config, k: int) -> str:
    """The compiled variant a launch of `cfg` at K runs: tile, split-K (and its reduction) or
    not, whole K tiles (EVEN_K) or a tail, GEMV. The self-test key holds it (dispatch)."""
    split = max(1, min(cfg.split_k, triton.cdiv(k, cfg.block_k)))
    s = f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k}"
    if split > 1:
        s += " splitK-" + ("atomic" if cfg.split_mode == 0 else "serial")
    if not cfg.use_dot:
        s += " gemv"
    return s + (" evenK" if k % cfg.block_k == 0 else " Ktail")


def heuristic_label(m: int, n: int, k: int, dtype: torch.dtype, sms: int) -> str:
    """launch_label of the heuristic configuration (what runs without autotuning, and what the
    autotuner's candidates are checked against)."""
    return launch_label(heuristic_config(m, n, k, None, dtype, sms=sms), k)


def candidate_configs(m: int, n: int, k: int, device: Optional[torch.device], dtype: torch.dtype = torch.float16,
                      *, sms: Optional[int] = None) -> list[Config]:
    """Configurations the autotuner times for this regime (H100/H200 oriented): the heuristic's
    choice first (the self-tested one, and the reference the others are checked against), then
    tiles that compile for sm_90 without spills (tests/test_triton_aot.py)."""
    sms = sms or _sms(device)
    out: list[Config] = [heuristic_config(m, n, k, device, dtype, sms=sms)]
    # The dequantised (BLOCK_K/2, BLOCK_N) fp32 tiles live in registers: about 16 values per
    # thread per tile is what fits next to the accumulator (sm_90, triton 3.9: 16x64x128 with 4
    # warps, any BLOCK_K 256, 64x128x64 with 4 warps, 64x256x32 with 8 and every GEMV spilled).
    if m <= 16:
        for bn, bk, w in ((32, 128, 4), (64, 64, 4), (128, 64, 8)):
            base = Config(16, bn, bk, num_warps=w, num_stages=4)
            sp = _with_split(base, m, n, k, sms)
            out += [sp, replace(sp, split_mode=0), base] if sp.split_k > 1 else [sp]
    elif m <= 128:
        for bm, bn, bk, w, st in ((32, 128, 32, 8, 4), (64, 64, 32, 8, 4), (64, 128, 32, 8, 4)):
            if bm > _next_pow2(m) and bm > 32:
                continue
            base = Config(bm, bn, bk, num_warps=w, num_stages=st)
            sp = _with_split(base, m, n, k, sms)
            out += [sp, base] if sp.split_k > 1 else [base]
    else:
        for bm, bn, bk, w, st in ((128, 128, 32, 8, 3), (128, 64, 32, 8, 4), (64, 128, 32, 8, 3)):
            out.append(Config(bm, bn, bk, num_warps=w, num_stages=st))
    seen, uniq = set(), []
    for c in out:
        if c not in seen:
            seen.add(c)
            uniq.append(c)
    return uniq


# ---- launching ------------------------------------------------------------------------------------

_COUNTERS: dict[tuple[torch.device, int], torch.Tensor] = {}
_TUNED: dict[tuple, Config] = {}


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _counters(device: torch.device, n: int) -> torch.Tensor:
    # Arrival counters of serial split-K; every launch leaves them at zero. One set per stream
    # so concurrent launches on different streams do not share them. Inside CUDA-graph capture a
    # fresh zeroed buffer per launch: its zeroing is recorded into the graph (a cached buffer
    # created there would be zeroed only at replay, and two graphs' replays would share it).
    if _capturing(device):
        return torch.zeros(n, dtype=torch.int32, device=device)
    stream = torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0
    key = (device, stream)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
    return buf


def _launch(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
            bias: Optional[torch.Tensor], group_size: int, fmt: str, cfg: Config) -> torch.Tensor:
    m, k = x.shape
    n = qweight.shape[0]
    dev = x.device
    upcast = x.dtype == torch.bfloat16 and dev.type == "cpu"  # interpreter: no bf16 arithmetic
    fp32_dot = x.dtype == torch.float32 or upcast
    split = max(1, min(cfg.split_k, triton.cdiv(k, cfg.block_k)))
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    res_dtype = torch.float32 if upcast else x.dtype
    ws = cnt = None
    if split > 1 and cfg.split_mode == 0:
        out = torch.zeros((m, n), dtype=torch.float32, device=dev)
    else:
        out = torch.empty((m, n), dtype=res_dtype, device=dev)
        if split > 1:
            ws = torch.empty((split, m, n), dtype=torch.float32, device=dev)
            cnt = _counters(dev, tiles)
    dummy = scales
    _w4a16_kernel[(tiles, split)](
        x, qweight, scales, zeros if zeros is not None else dummy, bias if bias is not None else dummy,
        out, ws if ws is not None else out, cnt if cnt is not None else qweight,
        m, n, k, x.stride(0), qweight.stride(0), out.stride(0),
        GROUP=group_size, FMT=F.FMT_ID[fmt], HAS_BIAS=bias is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        SPLIT_K=split, SPLIT_MODE=cfg.split_mode, GROUP_M=cfg.group_m,
        USE_DOT=cfg.use_dot, UPCAST=upcast, FP32_DOT=fp32_dot, EVEN_K=k % cfg.block_k == 0,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out if out.dtype == x.dtype else out.to(x.dtype)


def _m_bucket(m: int) -> int:
    return min(_next_pow2(m), 8192)


def _autotune_enabled(device: torch.device) -> bool:
    if device.type != "cuda" or dispatch.triton_interpret():
        return False
    from hprune.env import flag

    if not flag("HPRUNE_TRITON_AUTOTUNE", True):
        return False
    return not torch.cuda.is_current_stream_capturing()


def tuned_configs() -> dict[str, dict]:
    """The configurations picked so far: {'M<=bucket N K dtype fmt g': Config fields}."""
    return {" ".join(map(str, key[1:])): asdict(cfg) for key, cfg in _TUNED.items()}


def get_config(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
               bias: Optional[torch.Tensor], group_size: int, fmt: str) -> Config:
    m, k = x.shape
    n = qweight.shape[0]
    key = (x.device, _m_bucket(m), n, k, x.dtype, fmt, group_size, bias is not None)
    cfg = _TUNED.get(key)
    if cfg is not None:
        return cfg
    if not _autotune_enabled(x.device):
        return heuristic_config(m, n, k, x.device, x.dtype)
    heur = heuristic_config(m, n, k, x.device, x.dtype)
    best, best_t = None, float("inf")
    want = None
    for c in candidate_configs(m, n, k, x.device, x.dtype):
        try:
            got = _launch(x, qweight, scales, zeros, bias, group_size, fmt, c)
            if c == heur:
                want = got
            elif want is None or not dispatch.agrees("w4a16_mm", x.dtype, [got], [want]):
                continue  # a candidate that disagrees with the self-tested heuristic config is never chosen
            t = triton.testing.do_bench(lambda c=c: _launch(x, qweight, scales, zeros, bias, group_size, fmt, c),
                                        warmup=5, rep=25, return_mode="median")
        except Exception:  # noqa: BLE001 - e.g. out of shared memory for this config on this GPU
            continue
        if t < best_t:
            best, best_t = c, t
    cfg = best or heur
    _TUNED[key] = cfg
    return cfg


def w4a16_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                 bias: Optional[torch.Tensor], group_size: int, fmt: str, config: Optional[Config] = None
                 ) -> torch.Tensor:
    """x (M, K) fp16/bf16/fp32 (unit stride on K); qweight uint8 (N, Kp/2); scales/zeros (G, N) and
    bias (N,) in x's dtype. Returns (M, N) in x's dtype. `config` overrides the tuned choice."""
    if dispatch.triton_interpret() and x.device.type != "cpu":
        raise RuntimeError("TRITON_INTERPRET=1 runs Triton kernels on CPU tensors only")
    cfg = config or get_config(x, qweight, scales, zeros, bias, group_size, fmt)
    return _launch(x, qweight, scales, zeros, bias, group_size, fmt, cfg)


__all__ = ["Config", "w4a16_matmul", "heuristic_config", "candidate_configs", "get_config", "tuned_configs"]
