"""`W4A16Linear` (a Linear with packed 4-bit weights), `W4A8Linear` (the same weights with FP8
activations) and `quantize_linear`: one layer at a time. Whole models: `hprune.quant.model`."""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn as nn

from hprune.errors import BackendUnavailableError, HpruneError, ShapeError
from hprune.kernels import dispatch
from hprune.kernels import w4a8 as _w4a8
from hprune.kernels.w4a8 import w4a8_mm
from hprune.kernels.w4a16 import w4a16_mm
from hprune import formats as F

BLOCK_PREFIXES = ("transformer_blocks.", "single_transformer_blocks.")
BNB_FORMATS = ("nf4", "fp4")
ACTS = (None, "fp8")  # activation quantisation: None = activations stay in their dtype (W4A16)
FALLBACKS = ("w4a16", "error")
QUANT_METHODS = ("rtn", "gptq")


class W4A16Linear(nn.Module):
    """y = x @ W^T + b with W stored as packed 4-bit codes (see hprune.formats).

    Buffers (persistent, so artifacts store them):
        qweight  uint8 (out_features, ceil(in_features/32)*16)
        scales   (G, out_features), G = ceil(in_features / group_size); float
        zeros    (G, out_features) for fmt "int4" only
    Parameter: bias (out_features,) or None.

    Can be built from shapes alone (e.g. on the meta device) and filled by load_state_dict.
    `backend` (None = automatic) is passed to `torch.ops.hprune.w4a16_mm` on every call."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 group_size: int = F.DEFAULT_GROUP_SIZE, fmt: str = F.DEFAULT_FORMAT,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 backend: str | None = None) -> None:
        super().__init__()
        F.check_format(fmt)
        F.check_group_size(group_size)
        if in_features <= 0 or out_features <= 0:
            raise ShapeError(f"in_features and out_features must be positive, got {in_features}, {out_features}")
        dtype = dtype or torch.get_default_dtype()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.group_size, self.fmt, self.backend = int(group_size), fmt, backend
        g = F.num_groups(in_features, group_size)
        self.register_buffer("qweight", torch.zeros((out_features, F.packed_cols(in_features)), dtype=torch.uint8,
                                                    device=device))
        self.register_buffer("scales", torch.zeros((g, out_features), dtype=dtype, device=device))
        if fmt == "int4":
            self.register_buffer("zeros", torch.zeros((g, out_features), dtype=dtype, device=device))
        else:
            self.zeros = None
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_quantized(cls, qw: F.QuantizedWeight, bias: Optional[torch.Tensor] = None,
                       backend: str | None = None) -> "W4A16Linear":
        mod = cls(qw.in_features, qw.out_features, bias=bias is not None, group_size=qw.group_size, fmt=qw.fmt,
                  device="meta", dtype=qw.scales.dtype, backend=backend)
        mod.qweight = qw.qweight
        mod.scales = qw.scales
        if qw.zeros is not None:
            mod.zeros = qw.zeros
        if bias is not None:
            mod.bias = nn.Parameter(bias.detach().to(qw.scales.dtype).clone(), requires_grad=False)
        return mod

    @classmethod
    def from_bnb(cls, module: nn.Module, backend: str | None = None) -> "W4A16Linear":
        """Imports a bitsandbytes NF4 `Linear4bit` (already quantised, i.e. on its device) exactly:
        same codes, its absmax as fp32 scales, group_size = its blocksize."""
        state = getattr(module.weight, "quant_state", None)
        if state is None:
            raise ShapeError(f"{type(module).__name__} has no quantised 4-bit weight (move it to its device first)")
        qw = F.from_bnb_4bit(module.weight.data, state)
        bias = module.bias.detach().float() if module.bias is not None else None
        mod = cls.from_quantized(qw, None, backend=backend)
        if bias is not None:
            mod.bias = nn.Parameter(bias.to(qw.qweight.device), requires_grad=False)
        return mod

    # -- the op -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return w4a16_mm(x, self.qweight, self.scales, self.zeros, self.group_size, self.fmt, bias=self.bias,
                        backend=self.backend, in_features=self.in_features)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (out_features, in_features) weight the kernels multiply by, in `dtype` (default:
        the scales' dtype; pass the activation dtype to get exactly what a call with it uses)."""
        return F.dequantize(self.qweight, self.scales, self.zeros, self.in_features, self.group_size, self.fmt, dtype)

    # -- accounting ----------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes stored: packed codes, scales, zeros and bias."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros, self.bias)
                   if t is not None)

    @property
    def logical_numel(self) -> int:
        """Weights represented (out*in), so hprune.models.stats.param_count counts them like a dense Linear."""
        return self.out_features * self.in_features

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"fmt={self.fmt}, group_size={self.group_size}" + (f", backend={self.backend}" if self.backend else ""))


def check_w4a8(fmt: str, group_size: int, what: str = "W4A8") -> None:
    """Raises ShapeError if a 4-bit format / group size cannot run with FP8 activations."""
    if fmt not in _w4a8.FORMATS:
        raise ShapeError(f"{what} takes fmt 'int4' or 'int4_sym', not {fmt!r}: NF4 code values are not FP8 e4m3 "
                         f"values (the FP8 weights would be rounded); keep NF4 layers as W4A16")
    if group_size % _w4a8.GROUP_MULTIPLE:
        raise ShapeError(f"{what} needs group_size a multiple of {_w4a8.GROUP_MULTIPLE}, got {group_size}")


class W4A8Linear(W4A16Linear):
    """A W4A16Linear whose activations are quantised per token to FP8 e4m3 on the fly:
    y = w4a8_mm(x, ...) (math: hprune.kernels.w4a8). Same buffers, same state dict, same bytes.

    FP8 tensor cores need compute capability 8.9+. On a CUDA GPU without them `fallback`
    decides: "w4a16" (default) runs the W4A16 kernels on the same weights, with a one-time
    warning; "error" raises BackendUnavailableError. A forced backend (`backend="triton"`,
    `use_backend`, HPRUNE_BACKEND_W4A8_MM) is never replaced: the op raises if it cannot run.
    On the CPU the op's PyTorch emulation runs (exact W4A8 numerics, for measuring its error)."""

    act = "fp8"

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 group_size: int = F.DEFAULT_GROUP_SIZE, fmt: str = F.DEFAULT_FORMAT,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 backend: str | None = None, fallback: str = "w4a16") -> None:
        check_w4a8(fmt, group_size)
        if fallback not in FALLBACKS:
            raise ShapeError(f"fallback must be one of {FALLBACKS}, got {fallback!r}")
        super().__init__(in_features, out_features, bias, group_size, fmt, device, dtype, backend)
        self.fallback = fallback

    @classmethod
    def from_w4a16(cls, mod: W4A16Linear, fallback: str = "w4a16") -> "W4A8Linear":
        """The same weights (tensors shared, not copied) with FP8 activations."""
        check_w4a8(mod.fmt, mod.group_size)
        new = cls(mod.in_features, mod.out_features, bias=mod.bias is not None, group_size=mod.group_size,
                  fmt=mod.fmt, device="meta", dtype=mod.scales.dtype, backend=mod.backend, fallback=fallback)
        new.qweight, new.scales = mod.qweight, mod.scales
        if mod.zeros is not None:
            new.zeros = mod.zeros
        new.bias = mod.bias
        return new

    def to_w4a16(self) -> W4A16Linear:
        """The same weights (shared) with activations kept in their dtype."""
        new = W4A16Linear(self.in_features, self.out_features, bias=self.bias is not None, group_size=self.group_size,
                          fmt=self.fmt, device="meta", dtype=self.scales.dtype, backend=None)
        new.qweight, new.scales = self.qweight, self.scales
        if self.zeros is not None:
            new.zeros = self.zeros
        new.bias = self.bias
        return new

    def fallback_reason(self, device: torch.device) -> Optional[str]:
        """Why a call on `device` cannot use FP8 tensor cores (None if it can, or on the CPU)."""
        return fp8_fallback_reason(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        why = _fallback_decision(x.device, self.backend, self.fallback)
        if why is not None:
            if self.fallback == "error":
                raise BackendUnavailableError(f"W4A8Linear cannot use FP8 here: {why}")
            return w4a16_mm(x, self.qweight, self.scales, self.zeros, self.group_size, self.fmt, bias=self.bias,
                            in_features=self.in_features)
        return w4a8_mm(x, self.qweight, self.scales, self.zeros, self.group_size, self.fmt, bias=self.bias,
                       backend=self.backend, in_features=self.in_features)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", act=fp8" + (f", fallback={self.fallback}" if self.fallback != "w4a16" else "")


_FALLBACK_WARNED: set[str] = set()


def fp8_fallback_reason(device: torch.device) -> Optional[str]:
    """Why W4A8 cannot use FP8 tensor cores on `device`: None on the CPU (the emulation runs
    there) and on CUDA GPUs of compute capability 8.9+."""
    if device.type != "cuda" or _w4a8.fp8_supported(device):
        return None
    return _w4a8.fp8_unsupported_reason(device)


@torch.compiler.assume_constant_result
def _fallback_decision(device: torch.device, backend: Optional[str], fallback: str) -> Optional[str]:
    """The W4A8Linear fallback decision: the reason to run W4A16 instead (None: run W4A8).
    Depends only on the device, the forcing and the policy, so torch.compile evaluates it once
    at trace time (no graph break). A forced backend (argument, use_backend or environment) is
    never replaced."""
    why = LINEAR_FALLBACK_REASON(device)
    if why is None:
        return None
    name, _strict = dispatch._forced(_w4a8.OP, backend)  # noqa: SLF001 - same package
    if name not in (None, "auto"):
        return None
    if fallback == "w4a16" and str(device) not in _FALLBACK_WARNED:
        _FALLBACK_WARNED.add(str(device))
        warnings.warn(f"W4A8Linear runs W4A16 on {device}: {why}", RuntimeWarning, stacklevel=2)
    return why


LINEAR_FALLBACK_REASON = fp8_fallback_reason  # indirection: tests simulate a GPU without FP8


def quantize_linear(linear: nn.Linear, group_size: int = F.DEFAULT_GROUP_SIZE, fmt: str = F.DEFAULT_FORMAT,
                    scale_dtype: torch.dtype | None = None, refine: bool = True,
                    backend: str | None = None, act: str | None = None,
                    quantized: F.QuantizedWeight | None = None) -> W4A16Linear:
    """Quantises an nn.Linear into a W4A16Linear (or, with act="fp8", a W4A8Linear) on the same device.

    Args:
        group_size: input features per scale (multiple of 32). Default 64: with fp16/bf16 scale and
            zero that is 0.5625 bytes per weight, the same as bitsandbytes NF4 (blocksize 64,
            fp32 absmax), and measurably more accurate (benchmarks/bench_quant_quality.py).
        fmt: "int4" (asymmetric, default), "int4_sym" or "nf4".
        scale_dtype: dtype of scales/zeros (default: the weight's dtype if 16-bit, else float32).
        refine: error-minimising search of the scales (see hprune.formats.quantize).
        act: None (activations stay in their dtype: W4A16) or "fp8" (W4A8: "int4"/"int4_sym",
            group_size a multiple of 64).
        quantized: the layer's weight already quantised (e.g. by hprune.quant.gptq); used as is
            instead of rounding `linear.weight` (its shape, format and group size must match)."""
    if not isinstance(linear, nn.Linear):
        raise ShapeError(f"quantize_linear expects an nn.Linear, got {type(linear).__name__}")
    _check_act(act)
    if act == "fp8":
        check_w4a8(fmt, group_size)
    if quantized is None:
        qw = F.quantize(linear.weight.detach(), group_size, fmt, scale_dtype=scale_dtype, refine=refine)
    elif (quantized.out_features, quantized.in_features, quantized.group_size, quantized.fmt) != \
            (linear.out_features, linear.in_features, group_size, fmt):
        raise ShapeError(f"quantized weight is {quantized.fmt} g{quantized.group_size} "
                         f"({quantized.out_features}, {quantized.in_features}); the layer needs {fmt} "
                         f"g{group_size} ({linear.out_features}, {linear.in_features})")
    else:
        qw = quantized
    mod = W4A16Linear.from_quantized(qw, linear.bias, backend=None if act == "fp8" else backend)
    if act == "fp8":
        mod = W4A8Linear.from_w4a16(mod)
        mod.backend = backend
    return mod


def _check_act(act: str | None) -> None:
    if act not in ACTS:
        raise HpruneError(f"act must be None (W4A16) or 'fp8' (W4A8), got {act!r}")


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replaces submodule `name` of `model` by `new`."""
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)
