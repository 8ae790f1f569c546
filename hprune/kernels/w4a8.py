"""`torch.ops.hprune.w4a8_mm`: y = x @ W^T (+ bias) with INT4 weights and FP8 (e4m3) activations.

Why: at diffusion token counts (thousands of tokens per GEMM) a 4-bit-weight GEMM is compute
bound, so W4A16 can at best match bf16. Hopper's FP8 tensor cores run at twice the bf16 rate;
W4A8 quantises the activations to e4m3 on the fly and multiplies them with the 4-bit weights
converted (exactly) to e4m3 in registers.

The math (what the reference computes and the Triton kernel implements)
-----------------------------------------------------------------------
Inputs: x (M, K) in T (fp16 / bf16 / fp32); 4-bit codes q[n, k] in 0..15 packed as in
`hprune.formats`; group scales s (G, N) and, for "int4", zeros z (G, N), read in T and then
used in fp32 (the W4A16 convention); G = ceil(K / group_size).

1. Activations, per token (row) m:
       amax_m = max_k |x[m, k]|                      (fp32)
       a_m    = amax_m / 448  (1 if amax_m == 0)     (fp32, IEEE division)
       xq[m, k] = e4m3( clamp(x[m, k] / a_m, -448, 448) )   (IEEE division, round to nearest even)
   448 is the largest e4m3 value, so every token uses the full FP8 range.
2. Weights in FP8: wq[n, k] = e4m3(q[n, k]) for "int4", e4m3(q[n, k] - 8) for "int4_sym". These
   are integers in -8..15, all exactly representable in e4m3: NO rounding happens on the weight
   side. The group scale is NOT folded into the FP8 weight (q * s would round to 3 mantissa
   bits); it multiplies the fp32 partial sum of its group.
3. Per group g (the k in [g*group_size, (g+1)*group_size) ∩ [0, K)):
       P[m, n, g] = sum_{k in g} xq[m, k] * wq[n, k]       (products exact in fp32; fp32 sums)
       S[m, g]    = sum_{k in g} xq[m, k]                  ("int4" only; exact in fp32 for group_size <= 64)
4. y[m, n] = round_T( a_m * sum_g ( s[g, n] * P[m, n, g] + z[g, n] * S[m, g] ) + bias[n] )
   (the z term only for "int4": x . (q*s + z) = s * (x . q) + z * sum(x) within a group).

So W4A8 multiplies the FP8-rounded activations a_m * xq[m, k] by exactly the weights
q * s + z (not rounded to T, unlike W4A16, which rounds each weight to T once). Its only
rounding beyond the fp32 accumulation is the activations' e4m3 rounding: a relative error of at
most 2^-4 per activation (3 mantissa bits), ~2.5 % RMS in the output for random data (tests
state the bounds). The kernel sums the K-blocks of a group separately (BLOCK_K divides
group_size) and adds the z term with a tf32x3 dot, so it equals the reference up to fp32
accumulation order (tests: max|y - ref| <= 1e-5 max|ref| in fp32; about one ulp of T otherwise).

Formats: "int4" and "int4_sym". "nf4" is refused: NF4 code values are not e4m3 values, so the
FP8 weights would have to be rounded (up to 6 % per weight). group_size must be a multiple of
64 (each K-block of the kernel, 64 or 128 wide, must lie in one group; its two FP8 dots cover the
low and high nibbles of 16-byte chunks of 32 k).

Backends behind `hprune.kernels.dispatch` (op name "w4a8_mm"):
    triton     FP8 tensor-core kernel: GPUs with compute capability 8.9+ (Ada, Hopper, Blackwell),
               and the CPU under TRITON_INTERPRET=1 (tests)
    reference  plain PyTorch emulation (the CPU path and the oracle; runs on any device)
On a GPU without FP8 tensor cores the automatic choice is the (slow) reference emulation, with a
one-time warning; `W4A8Linear` instead falls back to the W4A16 kernels (see hprune.quant.linear).
Forcing "triton" there raises BackendUnavailableError naming the compute capability.

The activation scales are dynamic (computed per call from the tokens): no calibration.
"""
from __future__ import annotations

import functools
import warnings
from typing import Optional

import torch
from torch import Tensor

from hprune.errors import BackendUnavailableError, ShapeError
from hprune.kernels import dispatch
# the argument checks, the dtype the kernels read scales / zeros / bias in, and what autograd saves
# are those of W4A16 (the same packed weights)
from hprune.kernels.w4a16 import _as_act, _setup_context
from hprune.kernels.w4a16 import validate as _validate_w4a16
from hprune import formats as F

OP = "w4a8_mm"
FORMATS = ("int4", "int4_sym")
GROUP_MULTIPLE = 64
FP8_MAX = 448.0
FP8_DTYPE = torch.float8_e4m3fn
MIN_CAPABILITY = (8, 9)


# ---- capability -----------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def device_capability(device: torch.device | str) -> Optional[tuple[int, int]]:
    """(major, minor) of a CUDA device, None for other devices."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


def fp8_supported(device: torch.device | str) -> bool:
    """True where FP8 (e4m3) tensor cores exist: NVIDIA GPUs of compute capability 8.9+.
    (ROCm GPUs use another e4m3 variant, e4m3fnuz: not supported here.)"""
    device = torch.device(device)
    if device.type != "cuda" or torch.version.hip is not None:
        return False
    cap = device_capability(device)
    return cap is not None and cap >= MIN_CAPABILITY


def fp8_unsupported_reason(device: torch.device | str) -> str:
    device = torch.device(device)
    if torch.version.hip is not None:
        return "FP8 W4A8 kernels target NVIDIA e4m3 (float8_e4m3fn); ROCm GPUs are not supported"
    cap = device_capability(device)
    name = torch.cuda.get_device_name(device) if cap is not None else str(device)
    got = f"sm_{cap[0]}{cap[1]}" if cap is not None else "no compute capability"
    return (f"FP8 tensor cores need compute capability 8.9+ (Ada, Hopper); {name} has {got}. "
            f"Use W4A16 (hprune.quant W4A16Linear / w4a16_mm) on this GPU")


# ---- validation ---------------------------------------------------------------------------------

def validate(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor], bias: Optional[Tensor],
             group_size: int, fmt: str, in_features: Optional[int] = None) -> tuple[int, int, int]:
    """Checks every argument (the W4A16 rules plus W4A8's format and group limits); returns
    (M, N, K). Raises ShapeError naming the first problem."""
    if fmt not in FORMATS:
        if fmt in F.FORMATS:
            raise ShapeError(f"w4a8_mm takes fmt 'int4' or 'int4_sym', not {fmt!r}: NF4 code values are not "
                             f"FP8 e4m3 values, so the FP8 weights would be rounded; use w4a16_mm for NF4")
        F.check_format(fmt)
    F.check_group_size(group_size)
    if group_size % GROUP_MULTIPLE:
        raise ShapeError(f"w4a8_mm needs group_size a multiple of {GROUP_MULTIPLE} (got {group_size}): each "
                         f"K-block of the FP8 GEMM must lie in one scale group")
    return _validate_w4a16(x, qweight, scales, zeros, bias, group_size, fmt, in_features)


# ---- reference ----------------------------------------------------------------------------------

def quantize_activations_reference(x: Tensor, group_size: int, with_sums: bool = True
                                   ) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Step 1 of the math (module docstring). x (M, K) float -> (xq float8_e4m3fn (M, K),
    a fp32 (M,), S fp32 (M, G) or None). `xq.float() * a[:, None]` is the FP8-rounded x."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1) if xf.shape[-1] else xf.new_zeros(xf.shape[:-1])
    a = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    xq = (xf / a[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    sums = None
    if with_sums:
        m, k = xf.shape
        g = F.num_groups(k, group_size)
        v = torch.nn.functional.pad(xq.float(), (0, g * group_size - k))
        sums = v.view(m, g, group_size).sum(-1)
    return xq, a, sums


def fp8_weights(qweight: Tensor, in_features: int, fmt: str) -> Tensor:
    """Step 2: the FP8 weights (N, K) float8_e4m3fn: q ("int4") or q - 8 ("int4_sym"), exact."""
    codes = F.unpack_int4(qweight, in_features).to(torch.int16)
    if fmt == "int4_sym":
        codes = codes - 8
    return codes.to(torch.float32).to(FP8_DTYPE)


@dispatch.register(OP, "reference")
def w4a8_mm_reference(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor],
                      bias: Optional[Tensor], group_size: int, fmt: str, max_elems: int = 1 << 26) -> Tensor:
    """Steps 1-4 of the math literally: x (M, K) T -> (M, N) T. Per-group partial products are
    computed in fp32 (`max_elems` bounds the (groups, M, N) temporary)."""
    m, k = x.shape
    n = qweight.shape[0]
    g = F.num_groups(k, group_size)
    xq, a, sums = quantize_activations_reference(x, group_size, with_sums=fmt == "int4")
    wq = fp8_weights(qweight, k, fmt)
    pad = g * group_size - k
    xg = torch.nn.functional.pad(xq.float(), (0, pad)).view(m, g, group_size).transpose(0, 1)  # (G, M, gs)
    wg = torch.nn.functional.pad(wq.float(), (0, pad)).view(n, g, group_size).permute(1, 2, 0)  # (G, gs, N)
    s = scales.to(x.dtype).float()
    acc = torch.zeros((m, n), dtype=torch.float32, device=x.device)
    step = max(1, max_elems // max(1, m * n))
    for g0 in range(0, g, step):
        part = torch.bmm(xg[g0:g0 + step], wg[g0:g0 + step])  # (g, M, N): P[m, n, g]
        acc += (part * s[g0:g0 + step, None, :]).sum(0)
    if fmt == "int4":
        acc += sums @ zeros.to(x.dtype).float()
    out = acc * a[:, None]
    if bias is not None:
        out = out + bias.to(x.dtype).float()
    return out.to(x.dtype)


def emulated_weight(qweight: Tensor, scales: Tensor, zeros: Optional[Tensor], in_features: int, group_size: int,
                    fmt: str, dtype: torch.dtype) -> Tensor:
    """The weight W4A8 effectively multiplies by, fp32 (N, K): q * s + z (or (q - 8) * s) with s, z
    read in `dtype`, not rounded to it (W4A16 rounds it once to the activation dtype)."""
    return F.dequantize(qweight, scales.to(dtype).float(), None if zeros is None else zeros.to(dtype).float(),
                        in_features, group_size, fmt, dtype=torch.float32)


# ---- Triton backend -----------------------------------------------------------------------------

def _triton_supports(device: torch.device) -> bool:
    if not dispatch.triton_supports(device):
        return False
    return device.type == "cpu" or fp8_supported(device)


def _triton_auto(device: torch.device) -> bool:
    return device.type == "cuda" and _triton_supports(device)


def _triton_why_not(device: torch.device) -> str:
    if device.type == "cuda" and dispatch.triton_supports(device) and not fp8_supported(device):
        return f"the triton backend of {OP} cannot run: {fp8_unsupported_reason(device)}"
    return dispatch.triton_why_not(device)


def _triton_config(spec: tuple, dtype: torch.dtype, info: dispatch.DeviceInfo) -> Optional[str]:
    """The Triton kernel's launch configuration for spec (M, N, K, group, fmt, has_bias)."""
    from hprune.kernels.triton_w4a8 import heuristic_label

    m, n, k, group, fmt, _bias = spec
    if group % 64 or fmt not in ("int4", "int4_sym"):
        return None
    return heuristic_label(m, n, k, group, info.sms)


@dispatch.register(OP, "triton", supports=_triton_supports, auto=_triton_auto, why_not=_triton_why_not,
                   config=_triton_config)
def w4a8_mm_triton(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor],
                   bias: Optional[Tensor], group_size: int, fmt: str) -> Tensor:
    from hprune.kernels.triton_w4a8 import w4a8_matmul

    return w4a8_matmul(x, qweight, scales, zeros, bias, group_size, fmt)


# ---- self-test (run by the dispatch point on each backend's first call; see dispatch) ------------

# the bounds of tests/test_w4a8.py: equal to the reference up to fp32 accumulation order and the
# final rounding to T (the FP8 rounding of the activations is the same on both sides)
SELFTEST_TOL = {torch.float32: 1e-5, torch.float16: 1.5e-3, torch.bfloat16: 1e-2}
# (M, N, K, group, fmt, bias): odd tails, a partial last group, and every launch configuration
# (tests/test_selftest_coverage.py): per tile (M <= 16, 17-128, > 128) and K block (64 for group
# 64, 128 for group 128), split-K (>= 8 K blocks) and not, whole K blocks and a tail.
SELFTEST_PROBLEMS = (
    (5, 200, 328, 64, "int4", True), (5, 72, 256, 64, "int4_sym", False),
    (3, 64, 512, 64, "int4", True), (16, 72, 520, 64, "int4_sym", False),
    (5, 72, 328, 128, "int4", False), (5, 72, 256, 128, "int4_sym", True),
    (3, 64, 1024, 128, "int4_sym", False), (16, 72, 1096, 128, "int4", True),
    (33, 200, 328, 64, "int4", True), (40, 72, 256, 64, "int4_sym", False),
    (33, 64, 512, 64, "int4", False), (40, 72, 520, 64, "int4_sym", True),
    (33, 72, 328, 128, "int4", False), (40, 72, 256, 128, "int4_sym", True),
    (33, 64, 1024, 128, "int4_sym", False), (40, 72, 1096, 128, "int4", True),
    (133, 72, 328, 128, "int4_sym", False), (131, 128, 256, 64, "int4", True),
)


def _spec_of(args: tuple) -> tuple:
    from hprune.kernels.w4a16 import spec_of

    return spec_of(args)


def _selftest_problems(device: torch.device, dtype: torch.dtype, gen: torch.Generator,
                       specs=SELFTEST_PROBLEMS) -> list[tuple]:
    from hprune.kernels.w4a16 import selftest_problems

    return selftest_problems(device, dtype, gen, specs)


dispatch.register_selftest(OP, dispatch.SelfTest(
    make=_selftest_problems, outputs=lambda _args, out: [out], tolerance=SELFTEST_TOL.__getitem__,
    dtypes=(torch.float16, torch.bfloat16, torch.float32), specs=SELFTEST_PROBLEMS, spec_of=_spec_of))


# ---- the op -------------------------------------------------------------------------------------

_warned: set[str] = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


@torch.library.custom_op("hprune::w4a8_mm", mutates_args=())
def _w4a8_mm_op(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor], bias: Optional[Tensor],
                group_size: int, fmt: str, backend: Optional[str], in_features: Optional[int] = None) -> Tensor:
    m, n, k = validate(x, qweight, scales, zeros, bias, group_size, fmt, in_features)
    out_shape = (*x.shape[:-1], n)
    if m == 0:
        return x.new_empty(out_shape)
    b = dispatch.select(OP, x.device, backend, dtype=x.dtype,
                        spec=(x.numel() // x.shape[-1], qweight.shape[0], x.shape[-1], group_size, fmt,
                              bias is not None))
    if b.name == "reference" and x.device.type == "cuda":
        _warn_once(f"emulated:{x.device}",
                   f"w4a8_mm runs the PyTorch emulation on {x.device} (slow): "
                   + (fp8_unsupported_reason(x.device) if not fp8_supported(x.device)
                      else "the triton backend is unavailable or not chosen"))
    x2 = x.reshape(m, k)
    out = b.fn(x2, qweight, _as_act(scales, x.dtype), _as_act(zeros, x.dtype), _as_act(bias, x.dtype),
               group_size, fmt)
    return out.reshape(out_shape)


@_w4a8_mm_op.register_fake
def _w4a8_mm_fake(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor], bias: Optional[Tensor],
                  group_size: int, fmt: str, backend: Optional[str], in_features: Optional[int] = None) -> Tensor:
    validate(x, qweight, scales, zeros, bias, group_size, fmt, in_features)
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def _backward(ctx, grad: Tensor):
    # Straight-through estimator: the FP8 rounding of x counts as the identity, so
    # dL/dx = grad @ W with W = q*s + z (the weight W4A8 multiplies by). Codes/scales are not trained.
    qweight, scales, zeros = ctx.saved_tensors
    k, group_size, fmt, dtype, has_bias = ctx.meta
    gx = gb = None
    if ctx.needs_input_grad[0]:
        w = emulated_weight(qweight, scales, zeros, k, group_size, fmt, dtype)
        gx = (grad.float() @ w).to(dtype)
    if has_bias and ctx.needs_input_grad[4]:
        gb = grad.reshape(-1, grad.shape[-1]).sum(0)
    return gx, None, None, None, gb, None, None, None, None


_w4a8_mm_op.register_autograd(_backward, setup_context=_setup_context)


def w4a8_mm(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor] = None,
            group_size: int = F.DEFAULT_GROUP_SIZE, fmt: Optional[str] = None, bias: Optional[Tensor] = None,
            backend: Optional[str] = None, in_features: Optional[int] = None) -> Tensor:
    """y = x @ W^T + bias with W in packed 4 bits and x quantised per token to FP8 e4m3.

    Args:
        x: (..., K) float16 / bfloat16 (GPU kernels) or float32, unit stride along K.
        qweight: uint8 (N, ceil(K/32)*16), packed codes (hprune.formats, as for w4a16_mm).
        scales: (G, N) float, G = ceil(K / group_size); used in x's dtype.
        zeros: (G, N) float additive offsets for fmt "int4"; None for "int4_sym".
        group_size: K values per scale, a multiple of 64.
        fmt: "int4" (needs zeros) or "int4_sym"; default: "int4" if zeros is given else "int4_sym".
        bias: (N,) or None.
        backend: force "triton" or "reference" (default: automatic, see the module docstring).
        in_features: the weight's K, checked against x's last dimension (as for w4a16_mm).
    Returns (..., N) in x's dtype: the math in the module docstring.
    Raises ShapeError for bad arguments, BackendUnavailableError for a forced backend that cannot run
    (e.g. "triton" on a GPU without FP8 tensor cores)."""
    if fmt is None:
        fmt = "int4" if zeros is not None else "int4_sym"
    if backend is not None and backend not in dispatch.PREFERENCE and backend != "auto":
        raise BackendUnavailableError(f"unknown backend {backend!r} for {OP}; choose from {dispatch.PREFERENCE}")
    return torch.ops.hprune.w4a8_mm(x, qweight, scales, zeros, bias, group_size, fmt, backend, in_features)


__all__ = ["w4a8_mm", "w4a8_mm_reference", "quantize_activations_reference", "fp8_weights", "emulated_weight",
           "validate", "fp8_supported", "fp8_unsupported_reason", "device_capability", "OP", "FORMATS",
           "GROUP_MULTIPLE", "FP8_MAX"]
