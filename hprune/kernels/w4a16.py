"""`torch.ops.hprune.w4a16_mm`: y = x @ W^T (+ bias) with W stored as packed 4-bit codes.

One op (torch.library schema + fake kernel, so torch.compile traces through it), four backends
behind `hprune.kernels.dispatch` (op name "w4a16_mm"):

    cutlass    CUTLASS wgmma mixed-input kernel from hprune._C_cutlass (sm_90 only; int4 / int4_sym;
               fp16/bf16; group_size % 64, N % 128, K % 64): chosen by dispatch.ROUTES for M >= 128
               on Hopper; its weight order and exact arithmetic: hprune.kernels.cutlass_w4a16
    cuda       CUDA C++ mma.sync kernel from hprune._C (sm_80+; fp16/bf16; K, N multiples of 8)
    triton     Triton kernel (any shape; fp16/bf16/fp32); on the CPU only under TRITON_INTERPRET=1
    reference  plain PyTorch: dequantise, fp32 matmul, round once. The CPU path and the oracle.

Force one with `backend=` (strict), `hprune.kernels.use_backend(name)`, or the environment
(`HPRUNE_BACKEND_W4A16_MM=triton`, `HPRUNE_BACKEND=reference`). When the automatic choice lands
on the cutlass or CUDA backend for inputs it does not take (nf4 or fp32 activations for cutlass,
fp32 activations, K or N not a multiple of 8, unusual group sizes, misaligned pointers) the op
uses the next backend in preference order that takes them (cutlass -> cuda -> triton); a forced
"cutlass" or "cuda" raises ShapeError naming the reason.

The packed layout and the exact weights used are documented in `hprune.formats`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from hprune.errors import BackendUnavailableError, ShapeError
from hprune.kernels import cutlass_w4a16 as CW
from hprune.kernels import dispatch
from hprune import formats as F

OP = "w4a16_mm"
ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ---- validation ---------------------------------------------------------------------------------

def validate(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor], bias: Optional[Tensor],
             group_size: int, fmt: str, in_features: Optional[int] = None) -> tuple[int, int, int]:
    """Checks every argument; returns (M, N, K). Raises ShapeError naming the first problem.

    `in_features` is the weight's K when the caller knows it (a layer does): the packed layout
    alone cannot tell K = 63 from K = 64, so without it a short x would silently use W[:, :K]."""
    F.check_format(fmt)
    F.check_group_size(group_size)
    if x.dim() < 1:
        raise ShapeError("x must have at least one dimension (..., K)")
    if x.dtype not in ACT_DTYPES:
        raise ShapeError(f"x has dtype {x.dtype}; w4a16_mm takes float16, bfloat16 or float32 activations")
    k = x.shape[-1]
    if k == 0:
        raise ShapeError("x has K = 0 input features")
    if in_features is not None and k != in_features:
        raise ShapeError(f"x has {k} input features (last dimension, shape {tuple(x.shape)}) but the weight "
                         f"has in_features = {in_features}")
    if x.dim() > 1 and x.stride(-1) != 1 and x.numel() > 0:
        raise ShapeError(f"x must be contiguous along K (stride {x.stride(-1)} on the last dimension); "
                         f"call .contiguous() first")
    n = F.check_packed(qweight, scales, zeros, k, group_size, fmt)
    if bias is not None:
        if bias.dim() != 1 or bias.shape[0] != n:
            raise ShapeError(f"bias must be (N,) = ({n},), got shape {tuple(bias.shape)}")
        if bias.dtype not in ACT_DTYPES:
            raise ShapeError(f"bias must be a float tensor, got {bias.dtype}")
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ShapeError(f"{name} is on {t.device} but x is on {x.device}")
    m = x.numel() // k
    return m, n, k


def _as_act(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    # The kernels read scales / zeros / bias in the activation dtype (see hprune.formats).
    return None if t is None else t.to(dtype).contiguous()


# ---- reference backend --------------------------------------------------------------------------

@dispatch.register(OP, "reference")
def w4a16_mm_reference(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor],
                       bias: Optional[Tensor], group_size: int, fmt: str) -> Tensor:
    """x (M, K) T; returns (M, N) T = round_T(x.float() @ W.float().T + bias), W = dequantize(..., T)."""
    k = x.shape[-1]
    w = F.dequantize(qweight, scales, zeros, k, group_size, fmt, dtype=x.dtype)
    out = x.float() @ w.float().t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


# ---- Triton backend -----------------------------------------------------------------------------

# ---- launch configurations (the self-test key holds them: dispatch.Backend.config) ----------------
# spec = (M, N, K, group_size, fmt, has_bias): `spec_of` of a call, or a self-test problem.

def spec_of(args: tuple) -> tuple:
    """The spec of a call's arguments (x, qweight, scales, zeros, bias, group_size, fmt)."""
    x, qweight, _s, _z, bias, group_size, fmt = args[:7]
    return (x.numel() // x.shape[-1], qweight.shape[0], x.shape[-1], group_size, fmt, bias is not None)


def _triton_config(spec: tuple, dtype: torch.dtype, info: dispatch.DeviceInfo) -> Optional[str]:
    from hprune.kernels.triton_w4a16 import heuristic_label

    m, n, k = spec[:3]
    return heuristic_label(m, n, k, dtype, info.sms)


# The CUDA kernel's host plan (csrc/cuda/w4a16.cu, w4a16_plan / split_for): (BM, BN, BK) per tile
# and the M bounds; tests/test_selftest_coverage.py reads them back from the source.
CUDA_TILES = {"small": (16, 64, 128), "medium": (64, 64, 64), "large": (128, 128, 64)}
CUDA_SMALL_MAX_M, CUDA_MEDIUM_MAX_M = 16, 256


def cuda_plan(m: int, n: int, k: int, sms: int) -> tuple[str, int]:
    """(tile, split_k) the CUDA kernel launches for an (M, N, K) problem on `sms` SMs."""
    tile = "small" if m <= CUDA_SMALL_MAX_M else "medium" if m <= CUDA_MEDIUM_MAX_M else "large"
    if tile == "large":
        return tile, 1
    bm, bn, bk = CUDA_TILES[tile]
    t = -(-m // bm) * -(-n // bn)
    k_tiles = -(-k // bk)
    split = 1
    while split < 16 and t * split < 2 * sms and k_tiles >= 4 * split:
        split *= 2
    per = -(-k_tiles // split)
    return tile, -(-k_tiles // per)


def _cuda_config(spec: tuple, dtype: torch.dtype, info: dispatch.DeviceInfo) -> Optional[str]:
    m, n, k, group, _fmt, _bias = spec
    if dtype not in (torch.float16, torch.bfloat16) or k % 8 or n % 8 or not (
            group in (32, 64) or group % 128 == 0):
        return None  # declined (cuda_unsupported)
    tile, split = cuda_plan(m, n, k, info.sms)
    return (f"{tile} {'x'.join(map(str, CUDA_TILES[tile]))}" + (" splitK" if split > 1 else "")
            + (" evenK" if k % CUDA_TILES[tile][2] == 0 else " Ktail"))


def _cutlass_config(spec: tuple, dtype: torch.dtype, info: dispatch.DeviceInfo) -> Optional[str]:
    m, n, k, group, fmt, _bias = spec
    if (fmt not in CW.FORMATS or dtype not in (torch.float16, torch.bfloat16) or group % CW.TILE_K
            or n % CW.TILE_N or k % CW.TILE_K):
        return None  # declined (cutlass_unsupported)
    return "128x128x64 persistent" + (" Mtail" if m % 128 else " Mwhole")


@dispatch.register(OP, "triton", supports=dispatch.triton_supports, auto=dispatch.triton_auto,
                   why_not=dispatch.triton_why_not, config=_triton_config)
def w4a16_mm_triton(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor],
                    bias: Optional[Tensor], group_size: int, fmt: str) -> Tensor:
    from hprune.kernels.triton_w4a16 import w4a16_matmul

    return w4a16_matmul(x, qweight, scales, zeros, bias, group_size, fmt)


# ---- CUDA C++ backend ---------------------------------------------------------------------------

def _cuda_supports(device: torch.device) -> bool:
    return device.type == "cuda" and dispatch.ext_has("w4a16_mm_cuda")


def _cuda_why_not(device: torch.device) -> str:
    if device.type != "cuda":
        return f"the cuda backend of {OP} needs a CUDA tensor (got device {device})"
    from hprune._ext import build_info

    return (f"the cuda backend of {OP} is not in this build of hprune._C ({build_info()}); rebuild with a CUDA "
            f"torch and nvcc: python setup.py build_ext --inplace")


def cuda_unsupported(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor], group_size: int,
                     bias: Optional[Tensor] = None) -> Optional[str]:
    """Why the CUDA kernel cannot take these (already validated) inputs, or None."""
    k = x.shape[-1]
    n = qweight.shape[0]
    if x.dtype not in (torch.float16, torch.bfloat16):
        return f"the cuda backend takes float16/bfloat16 activations, not {x.dtype}"
    if k % 8:
        return f"the cuda backend needs K % 8 == 0 (K={k})"
    if n % 8:
        return f"the cuda backend needs N % 8 == 0 (N={n})"
    if not (group_size in (32, 64) or group_size % 128 == 0):
        return f"the cuda backend takes group_size 32, 64 or a multiple of 128 (got {group_size})"
    x2 = x.reshape(-1, k)
    if x2.stride(0) % 8:
        return "the cuda backend needs the rows of x 16-byte aligned"
    for name, t in (("x", x2), ("qweight", qweight), ("scales", scales), ("zeros", zeros)):
        if t is not None and t.data_ptr() % 16:
            return f"the cuda backend needs {name} 16-byte aligned"
    if bias is not None and bias.data_ptr() % 4:
        return "the cuda backend needs bias 4-byte aligned"
    return None


@dispatch.register(OP, "cuda", supports=_cuda_supports, why_not=_cuda_why_not, config=_cuda_config)
def w4a16_mm_cuda(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor],
                  bias: Optional[Tensor], group_size: int, fmt: str) -> Tensor:
    why = cuda_unsupported(x, qweight, scales, zeros, group_size, bias)
    if why:
        raise ShapeError(why)
    return torch.ops.hprune.w4a16_mm_cuda(x, qweight, scales, zeros, bias, group_size, F.FMT_ID[fmt])


# ---- CUTLASS backend (Hopper) ---------------------------------------------------------------------

def _cutlass_supports(device: torch.device) -> bool:
    if device.type != "cuda" or dispatch.device_capability(device) != CW.CAPABILITY:
        return False
    from hprune._ext import load_cutlass_extension

    return load_cutlass_extension() is not None and dispatch.ext_has("w4a16_mm_cutlass")


def _cutlass_why_not(device: torch.device) -> str:
    if device.type != "cuda":
        return f"the cutlass backend of {OP} needs a CUDA tensor (got device {device})"
    cap = dispatch.device_capability(device)
    if cap != CW.CAPABILITY:
        got = f"sm_{cap[0]}{cap[1]}" if cap else "no compute capability"
        return f"the cutlass backend of {OP} is sm_90a code (H100 / H200); {device} has {got}"
    from hprune._ext import load_cutlass_extension

    return (f"the cutlass backend of {OP} is not built ({load_cutlass_extension.error or 'hprune._C_cutlass missing'}); "
            f"rebuild with a CUDA torch, nvcc and nvidia-cutlass==4.2.0.0: python setup.py build_ext --inplace")


@dispatch.register(OP, "cutlass", supports=_cutlass_supports, why_not=_cutlass_why_not, config=_cutlass_config)
def w4a16_mm_cutlass(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor],
                     bias: Optional[Tensor], group_size: int, fmt: str) -> Tensor:
    why = CW.cutlass_unsupported(x, qweight, scales, zeros, group_size, fmt, bias)
    if why:
        raise ShapeError(why)
    p = CW.prepared(qweight, scales, zeros, x.shape[-1], group_size, fmt, x.dtype)
    if p.inexact:
        raise ShapeError(p.inexact)
    return torch.ops.hprune.w4a16_mm_cutlass(x, p.codes, p.scales, p.zeros, bias, group_size, F.FMT_ID[fmt])


# ---- self-test (run by the dispatch point on each backend's first call; see dispatch) ------------

# Max |out - ref| / max|ref| a backend may differ from the reference: both use the same weights
# (rounded once to T) and accumulate in fp32, so only the order and the final rounding differ
# (the bounds of tests/test_w4a16.py).
SELFTEST_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# (M, N, K, group, fmt, bias). Together they reach every launch configuration of every backend
# on any GPU (tests/test_selftest_coverage.py walks the heuristics over the SD3.5 / FLUX layers):
# per tile of each backend, split-K (few output tiles, >= 4 K tiles) and not (<= 3 K tiles), whole
# K tiles and a tail; the CUDA small (M <= 16), medium and large (M > 256) tiles; the cutlass
# shapes (N % 128, K % 64, group % 64, int4 / int4_sym) with and without an M tail. Also odd M and
# N tails, a partial last group, groups of 32 / 64 / 128, the zeros, NF4 and bias paths.
SELFTEST_PROBLEMS = (
    (5, 200, 328, 64, "int4", True), (5, 72, 256, 128, "int4_sym", False),      # M <= 16, no split
    (3, 64, 512, 64, "int4", True), (16, 72, 456, 64, "nf4", False),           # M <= 16, split-K
    (33, 72, 328, 64, "int4", True), (33, 72, 256, 128, "int4_sym", False),     # M 17-128, split-K
    (40, 72, 96, 32, "int4", False), (40, 72, 72, 32, "nf4", True),            # M 17-128, no split
    (133, 72, 328, 128, "nf4", False), (131, 256, 192, 64, "int4", True),       # M > 128
    (133, 128, 256, 128, "int4_sym", False), (256, 128, 128, 128, "int4", True),  # cutlass M tail / whole
    (257, 72, 328, 64, "int4", True), (300, 128, 256, 64, "int4_sym", False),   # M > 256: CUDA large tile
)


def selftest_problems(device: torch.device, dtype: torch.dtype, gen: torch.Generator,
                      problems=SELFTEST_PROBLEMS) -> list[tuple]:
    """Random problems in the argument order of the backends: (x, qweight, scales, zeros, bias,
    group_size, fmt), scales / zeros / bias already in x's dtype (as the op passes them)."""
    out = []
    for m, n, k, group, fmt, with_bias in problems:
        q = F.quantize(torch.randn(n, k, generator=gen) * 0.05, group, fmt, scale_dtype=dtype, refine=False)
        x = torch.randn(m, k, generator=gen).to(dtype)
        b = (torch.randn(n, generator=gen) * 0.1).to(dtype) if with_bias else None
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        out.append((mv(x), mv(q.qweight), mv(q.scales), mv(q.zeros), mv(b), group, fmt))
    return out


dispatch.register_selftest(OP, dispatch.SelfTest(
    make=selftest_problems, outputs=lambda _args, out: [out], tolerance=SELFTEST_TOL.__getitem__,
    dtypes=(torch.float16, torch.bfloat16, torch.float32), specs=SELFTEST_PROBLEMS, spec_of=spec_of))


# ---- the op ---------------------------------------------------------------------------------------

def _unsupported(name: str, x: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor],
                 bias: Optional[Tensor], group_size: int, fmt: str) -> Optional[str]:
    if name == "cutlass":
        return CW.cutlass_unsupported(x, qweight, scales, zeros, group_size, fmt, bias) or CW.prepared(
            qweight, scales, zeros, x.shape[-1], group_size, fmt, x.dtype).inexact
    if name == "cuda":
        return cuda_unsupported(x, qweight, scales, zeros, group_size, bias)
    return None  # triton and reference take every validated input


def _choose(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor], bias: Optional[Tensor],
            group_size: int, fmt: str, backend: Optional[str]) -> dispatch.Backend:
    """The backend for these inputs (as the kernel will receive them): an automatic choice of
    cutlass or cuda that cannot take them falls to the next backend that can instead of raising
    (each candidate self-tested on its first call, see hprune.kernels.dispatch)."""
    m = x.numel() // x.shape[-1]
    spec = spec_of((x, qweight, scales, zeros, bias, group_size, fmt))
    skipped: list[str] = []
    while True:
        b = dispatch.select(OP, x.device, backend, dtype=x.dtype, m=m, exclude=skipped, spec=spec)
        why = _unsupported(b.name, x, qweight, scales, zeros, bias, group_size, fmt)
        if why is None:
            return b
        forced, _strict = dispatch._forced(OP, backend)  # noqa: SLF001 - same package
        if forced == b.name:
            raise ShapeError(why)
        skipped.append(b.name)  # reference takes every validated input, so this ends


def chosen_backend(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor] = None,
                   group_size: int = F.DEFAULT_GROUP_SIZE, fmt: Optional[str] = None, bias: Optional[Tensor] = None,
                   backend: Optional[str] = None) -> str:
    """Name of the backend `w4a16_mm` runs for these arguments (the table, the device, the inputs)."""
    if fmt is None:
        fmt = "int4" if zeros is not None else "int4_sym"
    validate(x, qweight, scales, zeros, bias, group_size, fmt)
    scales, zeros, bias = _as_act(scales, x.dtype), _as_act(zeros, x.dtype), _as_act(bias, x.dtype)
    return _choose(x, qweight, scales, zeros, bias, group_size, fmt, backend).name


@torch.library.custom_op("hprune::w4a16_mm", mutates_args=())
def _w4a16_mm_op(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor], bias: Optional[Tensor],
                 group_size: int, fmt: str, backend: Optional[str], in_features: Optional[int] = None) -> Tensor:
    m, n, k = validate(x, qweight, scales, zeros, bias, group_size, fmt, in_features)
    out_shape = (*x.shape[:-1], n)
    if m == 0:
        return x.new_empty(out_shape)
    scales, zeros, bias = _as_act(scales, x.dtype), _as_act(zeros, x.dtype), _as_act(bias, x.dtype)
    b = _choose(x, qweight, scales, zeros, bias, group_size, fmt, backend)
    out = b.fn(x.reshape(m, k), qweight, scales, zeros, bias, group_size, fmt)
    return out.reshape(out_shape)


@_w4a16_mm_op.register_fake
def _w4a16_mm_fake(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor], bias: Optional[Tensor],
                   group_size: int, fmt: str, backend: Optional[str], in_features: Optional[int] = None) -> Tensor:
    validate(x, qweight, scales, zeros, bias, group_size, fmt, in_features)
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def _setup_context(ctx, inputs, output) -> None:
    x, qweight, scales, zeros, bias, group_size, fmt = inputs[:7]
    ctx.save_for_backward(qweight, scales, zeros)
    ctx.meta = (x.shape[-1], group_size, fmt, x.dtype, bias is not None)


def _backward(ctx, grad: Tensor):
    # dL/dx = grad @ W (W the dequantised weight); codes and scales are not trained.
    qweight, scales, zeros = ctx.saved_tensors
    k, group_size, fmt, dtype, has_bias = ctx.meta
    gx = None
    if ctx.needs_input_grad[0]:  # the dequantised (N, K) weight only when it is needed
        w = F.dequantize(qweight, scales, zeros, k, group_size, fmt, dtype=dtype)
        gx = (grad.float() @ w.float()).to(dtype)
    gb = grad.reshape(-1, grad.shape[-1]).sum(0) if has_bias and ctx.needs_input_grad[4] else None
    return gx, None, None, None, gb, None, None, None, None


_w4a16_mm_op.register_autograd(_backward, setup_context=_setup_context)


def w4a16_mm(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor] = None,
             group_size: int = F.DEFAULT_GROUP_SIZE, fmt: Optional[str] = None, bias: Optional[Tensor] = None,
             backend: Optional[str] = None, in_features: Optional[int] = None) -> Tensor:
    """y = x @ W^T + bias with W packed in 4 bits (layout: hprune.formats).

    Args:
        x: (..., K) float16 / bfloat16 (GPU kernels) or float32, unit stride along K.
        qweight: uint8 (N, ceil(K/32)*16), packed codes.
        scales: (G, N) float, G = ceil(K / group_size); used in x's dtype.
        zeros: (G, N) float additive offsets for fmt "int4" (asymmetric); None otherwise.
        group_size: K values per scale (a multiple of 32).
        fmt: "int4" (needs zeros), "int4_sym" or "nf4"; default: "int4" if zeros is given else "int4_sym".
        bias: (N,) or None.
        backend: force "cutlass", "cuda", "triton" or "reference" (default: automatic, see module docstring).
        in_features: the weight's K, checked against x's last dimension (the packed width alone
            cannot tell K from K - 1; layers always pass it).
    Returns (..., N) in x's dtype.
    Raises ShapeError for bad arguments, BackendUnavailableError for a forced backend that cannot run."""
    if fmt is None:
        fmt = "int4" if zeros is not None else "int4_sym"
    if backend is not None and backend not in dispatch.PREFERENCE and backend != "auto":
        raise BackendUnavailableError(f"unknown backend {backend!r} for {OP}; choose from {dispatch.PREFERENCE}")
    return torch.ops.hprune.w4a16_mm(x, qweight, scales, zeros, bias, group_size, fmt, backend, in_features)


__all__ = ["w4a16_mm", "w4a16_mm_reference", "w4a16_mm_cutlass", "chosen_backend", "validate", "cuda_unsupported",
           "OP"]
