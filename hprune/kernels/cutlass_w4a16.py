"""The CUTLASS W4A16 backend's side of the weights: the order its kernel reads the codes in, the
scale dtypes its exact arithmetic needs, and the once-per-weight preparation.

Kernel: csrc/cuda/cutlass/w4a16_cutlass.cu, CUTLASS's Hopper mixed-input GEMM
(`sm90_mma_tma_gmma_rs_warpspecialized_mixed_input`, sm_90a only), built as `hprune._C_cutlass`
when CUDA and the pinned nvidia-cutlass headers are there (hprune/kernels/cutlass_headers.py).

The codes are stored as signed 4-bit q - 8 (the nibble q ^ 8) for both formats: CUTLASS converts
signed nibbles to fp32 / fp16 / bf16 with bit tricks, unsigned ones to fp32 one at a time. The
arithmetic is exactly `hprune.formats.dequantize(..., dtype=T)` for T = fp16 / bf16:
    "int4"      scale-with-zero mode with float32 s' = s.to(T) and z' = z.to(T) + 8 s': the kernel's
                fp32 FMA (q - 8) * s' + z' rounds the exact value q * s + z once to fp32, as formats'
                q * s + z does (q * s is exact in fp32), and then once to T. That needs z' exact in
                fp32, which holds unless a group's |z| exceeds 8 s by more than ~2^13 (fp16) /
                2^16 (bf16) (asymmetric zeros are about the group's minimum); `prepared` checks
                every group (error-free TwoSum) and a weight where it fails goes to the other
                kernels. (With T scales and zeros CUTLASS computes q * s in T and
                then adds z in T: two roundings, a different weight.)
    "int4_sym"  scale-only mode in T: w = round_T((q - 8) * s), one rounding of an exact product.
The products accumulate in fp32 on the tensor cores and the bias is added in fp32 before the one
rounding to T, as in the reference.

What CUTLASS's mixed-input path cannot serve goes to the existing kernels (the dispatch falls
through to them; `cutlass_unsupported` names the reason):
    nf4         a codebook, not integers: the collective converts integer codes and scales them;
                its only lookup-table mode serves FP8 x int4 with scales folded into 8 FP8 values.
    fp32 x      wgmma has no fp32 x 4-bit path (tf32 would change the arithmetic).
    group_size  a scale group must cover whole 64-wide K tiles of the kernel: multiples of 64 only.
    N % 128, K % 64   whole tiles of the reordered weight (its TMA box); the SD3.5 / FLUX shapes
                all qualify. Partial weight tiles may work but are not verified on a GPU yet.
W4A8 (FP8 activations) has no CUTLASS backend: the collective applies group scales to the
weights *before* the FP8 MMA, so each q * s would be rounded to e4m3 (3 mantissa bits, up to 6 %
per weight), which hprune's W4A8 math avoids by scaling the fp32 partial sums of each group
(hprune/kernels/w4a8.py); CUTLASS 4.2's Hopper per-K-block accumulator scaling exists only for
FP8 x FP8 operands. The Triton W4A8 kernel keeps serving it.

Weight order (`reorder_weight`, exact inverse `restore_weight`): codes (N, K), as the nibbles
q ^ 8, go to a flat array in 16 x 16 atoms, atoms N-fastest, and inside an atom thread-major:
code (n, k) sits at
    256 * (n // 16 + (N / 16) * (k // 16)) + 32 * t1 + 8 * t0 + 4 * v0 + 2 * v2 + v1
with n % 16 = t1 + 8 v1 and k % 16 = v0 + 2 t0 + 8 v2 (csrc/cuda/cutlass/w4a16_cutlass_layout.hpp
says why; tests check both agree). Two codes per byte, the even position in the low nibble.

Preparation happens once per weight, on its first call that reaches this backend (make that an
eager call before capturing a CUDA graph), and is cached beside the weight (a second copy of the
codes, N*K/2 bytes, plus float32 scales / zeros for "int4") for as long as that qweight lives;
the packed format, the state dict and artifacts on disk are unchanged. The cache notices
in-place changes (tensor version counters).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor
from torch.utils.weak import WeakTensorKeyDictionary

from hprune.errors import ShapeError
from hprune import formats as F

FORMATS = ("int4", "int4_sym")
ACT_DTYPES = (torch.float16, torch.bfloat16)
TILE_N = 128  # weight rows per tile (the kernel's tile M)
TILE_K = 64  # K per tile: a scale group must be a whole number of these
ATOM = 16  # the reorder atom is 16 x 16 codes
CAPABILITY = (9, 0)  # sm_90a code: Hopper (H100 / H200 / GH200) only


# ---- the weight order ---------------------------------------------------------------------------

def _check_shape(n: int, k: int) -> None:
    if n % ATOM or k % ATOM:
        raise ShapeError(f"the CUTLASS weight order needs N and K multiples of {ATOM} (N={n}, K={k})")


def reorder_codes(codes: Tensor, signed: bool = True) -> Tensor:
    """codes uint8 (N, K) in 0..15 -> uint8 (N * K // 2,) in the kernel's order, two per byte.
    signed: store q - 8 as a two's-complement nibble (q ^ 8), what the kernel reads."""
    n, k = codes.shape
    _check_shape(n, k)
    c = codes.to(torch.uint8)
    if signed:
        c = c ^ 8
    # (n, k) = (16 nt + 8 v1 + t1, 16 kt + 8 v2 + 2 t0 + v0)  ->  order kt, nt, t1, t0, v0, v2, v1
    c = c.reshape(n // ATOM, 2, 8, k // ATOM, 2, 4, 2).permute(3, 0, 2, 5, 6, 4, 1).reshape(-1, 2)
    return (c[:, 0] | (c[:, 1] << 4)).contiguous()


def restore_codes(packed: Tensor, n: int, k: int, signed: bool = True) -> Tensor:
    """Inverse of `reorder_codes`: uint8 (N * K // 2,) -> codes uint8 (N, K) in 0..15."""
    _check_shape(n, k)
    if packed.dtype != torch.uint8 or packed.numel() * 2 != n * k:
        raise ShapeError(f"reordered codes must be uint8 with N*K/2 = {n * k // 2} bytes, "
                         f"got {packed.dtype} with {packed.numel()}")
    c = torch.stack([packed.reshape(-1) & 0xF, packed.reshape(-1) >> 4], dim=1)
    c = c.reshape(k // ATOM, n // ATOM, 8, 4, 2, 2, 2).permute(1, 6, 2, 0, 5, 3, 4).reshape(n, k)
    return (c ^ 8 if signed else c).contiguous()


def reorder_weight(qweight: Tensor, in_features: int, fmt: str) -> Tensor:
    """The packed weight (hprune.formats layout, uint8 (N, ceil(K/32)*16)) in the CUTLASS
    kernel's order: uint8 (N * K // 2,). Pure PyTorch, on the weight's device; exact inverse:
    `restore_weight`."""
    if fmt not in FORMATS:
        raise ShapeError(f"the CUTLASS kernel takes fmt 'int4' or 'int4_sym', not {fmt!r}")
    return reorder_codes(F.unpack_int4(qweight, in_features))


def restore_weight(packed: Tensor, out_features: int, in_features: int, fmt: str) -> Tensor:
    """Inverse of `reorder_weight`: the formats-layout qweight uint8 (N, ceil(K/32)*16)."""
    if fmt not in FORMATS:
        raise ShapeError(f"the CUTLASS kernel takes fmt 'int4' or 'int4_sym', not {fmt!r}")
    return F.pack_int4(restore_codes(packed, out_features, in_features), fmt)


def kernel_scales(scales: Tensor, zeros: Optional[Tensor], fmt: str, dtype: torch.dtype
                  ) -> tuple[Tensor, Optional[Tensor], Optional[str]]:
    """Scales (and zeros) as the kernel reads them, and why they are not exact (None if they are).
    "int4": (G, N) float32 s' = s.to(dtype) (exact: every fp16 / bf16 value is a float32) and
    z' = z.to(dtype) + 8 s' (for codes stored as q - 8); "int4_sym": (G, N) s.to(dtype)."""
    if fmt != "int4":
        return scales.to(dtype).contiguous(), None, None
    s32 = scales.to(dtype).float().contiguous()
    z32 = zeros.to(dtype).float()
    shift = 8.0 * s32  # exact (a power of two), barring overflow
    z_shifted = z32 + shift
    # error-free TwoSum: the rounding error of z32 + shift, exactly (IEEE fp32, no overflow)
    back = z_shifted - z32
    err = (z32 - (z_shifted - back)) + (shift - back)
    why = None
    if not bool(torch.isfinite(z_shifted).all()) or bool((err != 0).any()):
        bad = int((err != 0).sum()) + int((~torch.isfinite(z_shifted)).sum())
        why = (f"the cutlass backend reads int4 codes as q - 8 with zero z + 8 * scale, which float32 cannot hold "
               f"exactly in {bad} group(s) of this weight (|zero| >> scale)")
    return s32, z_shifted.contiguous(), why


def kernel_weight(codes: Tensor, scales: Tensor, zeros: Optional[Tensor], n: int, k: int, group_size: int,
                  fmt: str, dtype: torch.dtype) -> Tensor:
    """The (N, K) weight the kernel multiplies by, computed from its own operands the way the
    kernel does (fp32 FMA of the signed code then one rounding for "int4"; a `dtype` multiply for
    "int4_sym"). Tests compare it with formats.dequantize: equal means the kernel's weights are formats'."""
    u = restore_codes(codes, n, k, signed=False).float()  # the stored nibbles, as unsigned
    q = torch.where(u >= 8, u - 16, u)  # their two's-complement value: q - 8 of the format's code
    s = scales.repeat_interleave(group_size, 0)[:k].t()
    if fmt == "int4":
        return torch.addcmul(zeros.float().repeat_interleave(group_size, 0)[:k].t(), q, s.float()).to(dtype)
    return (q.to(dtype) * s.to(dtype)).to(dtype)


# ---- what the kernel takes ------------------------------------------------------------------------

def cutlass_unsupported(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor], group_size: int,
                        fmt: str, bias: Optional[Tensor] = None) -> Optional[str]:
    """Why the CUTLASS kernel cannot take these (already validated) inputs, or None."""
    k = x.shape[-1]
    n = qweight.shape[0]
    if fmt not in FORMATS:
        return (f"the cutlass backend takes fmt 'int4' or 'int4_sym', not {fmt!r} (CUTLASS's mixed-input GEMM "
                f"scales integer codes; NF4 is a codebook)")
    if x.dtype not in ACT_DTYPES:
        return f"the cutlass backend takes float16/bfloat16 activations, not {x.dtype}"
    if group_size % TILE_K:
        return f"the cutlass backend needs group_size a multiple of {TILE_K} (got {group_size})"
    if n % TILE_N or k % TILE_K:
        return f"the cutlass backend needs N % {TILE_N} == 0 and K % {TILE_K} == 0 (N={n}, K={k})"
    x2 = x.reshape(-1, k)
    if x2.stride(0) % 8:
        return "the cutlass backend needs the rows of x 16-byte aligned"
    for name, t in (("x", x2), ("bias", bias)):
        if t is not None and t.data_ptr() % 16:
            return f"the cutlass backend needs {name} 16-byte aligned"
    return None


# ---- once-per-weight preparation ------------------------------------------------------------------

@dataclass(frozen=True)
class PreparedWeight:
    """A weight in the kernel's operands: codes uint8 (N*K/2,), scales / zeros (G, N); `inexact`:
    why the kernel would not reproduce formats' weights (then it is not used), else None."""

    codes: Tensor
    scales: Tensor
    zeros: Optional[Tensor]
    inexact: Optional[str]
    key: tuple


_PREPARED: WeakTensorKeyDictionary = WeakTensorKeyDictionary()


def _version(t: Optional[Tensor]) -> tuple:
    if t is None:
        return ()
    try:
        v = t._version
    except RuntimeError:  # inference tensors have no version counter
        v = -1
    return (t.data_ptr(), v, t.dtype)


def prepared(qweight: Tensor, scales: Tensor, zeros: Optional[Tensor], in_features: int, group_size: int,
             fmt: str, dtype: torch.dtype) -> PreparedWeight:
    """The kernel's operands for this weight: computed on first use, then cached with the qweight
    tensor (recomputed if qweight, scales or zeros are replaced or changed in place)."""
    key = (_version(qweight), _version(scales), _version(zeros), in_features, group_size, fmt, dtype)
    hit = _PREPARED.get(qweight)
    if hit is not None and hit.key == key:
        return hit
    s, z, inexact = kernel_scales(scales, zeros, fmt, dtype)
    p = PreparedWeight(reorder_weight(qweight, in_features, fmt), s, z, inexact, key)
    # During CUDA-graph capture the work above is only recorded (it runs at each replay): caching
    # its not-yet-computed output would hand later eager calls garbage. Warm up before capturing.
    if not (qweight.is_cuda and torch.cuda.is_current_stream_capturing()):
        _PREPARED[qweight] = p
    return p


__all__ = ["reorder_weight", "restore_weight", "reorder_codes", "restore_codes", "kernel_scales", "kernel_weight",
           "cutlass_unsupported", "prepared", "PreparedWeight", "FORMATS", "CAPABILITY", "TILE_N", "TILE_K"]
