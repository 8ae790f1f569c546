"""`W4A16Linear` (a Linear with packed 4-bit weights), `W4A8Linear` (the same weights with FP8
activations), `quantize_linear`, `quantize_model` and `set_activation_quant`."""
from __future__ import annotations

import fnmatch
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch
import torch.nn as nn

from hprune import recipe
from hprune.errors import BackendUnavailableError, HpruneError, ShapeError
from hprune.kernels import dispatch
from hprune.kernels import w4a8 as _w4a8
from hprune.kernels.w4a8 import w4a8_mm
from hprune.kernels.w4a16 import w4a16_mm
from hprune.quant import formats as F

BLOCK_PREFIXES = ("transformer_blocks.", "single_transformer_blocks.")
BNB_FORMATS = ("nf4", "fp4")
ACTS = (None, "fp8")  # activation quantisation: None = activations stay in their dtype (W4A16)
FALLBACKS = ("w4a16", "error")
QUANT_METHODS = ("rtn", "gptq")


class W4A16Linear(nn.Module):
    """y = x @ W^T + b with W stored as packed 4-bit codes (see hprune.quant.formats).

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
                        backend=self.backend)

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
            return w4a16_mm(x, self.qweight, self.scales, self.zeros, self.group_size, self.fmt, bias=self.bias)
        return w4a8_mm(x, self.qweight, self.scales, self.zeros, self.group_size, self.fmt, bias=self.bias,
                       backend=self.backend)

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
        refine: error-minimising search of the scales (see hprune.quant.formats.quantize).
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


# ---- whole models -----------------------------------------------------------------------------------

@dataclass
class QuantReport:
    """What quantize_model did. Bytes are of the whole model's state dict."""

    backend: str
    fmt: str
    group_size: int
    bytes_before: int
    bytes_after: int
    quantized: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # eligible by prefix but matched a skip pattern
    linear_bytes_before: int = 0  # of the quantised layers only (weight + bias)
    linear_bytes_after: int = 0
    act: str | None = None  # "fp8": W4A8Linear layers (FP8 activations)

    @property
    def ratio(self) -> float:
        return self.bytes_before / max(1, self.bytes_after)

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "fmt": self.fmt, "group_size": self.group_size,
                "bytes_before": self.bytes_before, "bytes_after": self.bytes_after, "ratio": self.ratio,
                "linear_bytes_before": self.linear_bytes_before, "linear_bytes_after": self.linear_bytes_after,
                "num_quantized": len(self.quantized), "quantized": self.quantized, "skipped": self.skipped,
                "act": self.act}

    def __str__(self) -> str:
        kind = " W4A8 (fp8 activations)" if self.act == "fp8" else ""
        return (f"{len(self.quantized)} Linear layers -> {self.backend} {self.fmt} g{self.group_size}{kind}: "
                f"model {self.bytes_before / 2**20:.2f} MiB -> {self.bytes_after / 2**20:.2f} MiB "
                f"({self.ratio:.2f}x); those layers {self.linear_bytes_before / 2**20:.2f} -> "
                f"{self.linear_bytes_after / 2**20:.2f} MiB")


def _state_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def eligible_linears(model: nn.Module, include: Optional[Iterable[str]] = BLOCK_PREFIXES,
                     skip: Iterable[str] = ()) -> tuple[list[str], list[str]]:
    """(names to quantise, names skipped) among the model's nn.Linear modules.

    include: module-name prefixes that are eligible (default: inside the transformer blocks;
        None: every nn.Linear). skip: fnmatch patterns of names to leave alone
        (e.g. "*.norm1.linear" for the adaLN modulation, "transformer_blocks.0.*")."""
    prefixes = None if include is None else tuple(include)
    pats = [skip] if isinstance(skip, str) else list(skip)
    take, skipped = [], []
    for name, mod in model.named_modules():
        if type(mod) is not nn.Linear:  # exactly nn.Linear: not already-quantised subclasses
            continue
        if prefixes is not None and not name.startswith(prefixes):
            continue
        (skipped if any(fnmatch.fnmatchcase(name, p) for p in pats) else take).append(name)
    return take, skipped


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def quantize_model(model: nn.Module, group_size: int = F.DEFAULT_GROUP_SIZE, fmt: str | None = None,
                   skip: Iterable[str] = (), include: Optional[Iterable[str]] = BLOCK_PREFIXES,
                   backend: str = "hprune", scale_dtype: torch.dtype | None = None, refine: bool = True,
                   compress_statistics: bool = False, act: str | None = None, method: str = "rtn",
                   calib: Any = None, groups: int | None = None, weighting: str | None = None,
                   act_order: bool = True, progress: bool = False) -> QuantReport:
    """Replaces every eligible nn.Linear of `model` in place and returns a QuantReport.

    Args:
        group_size: scale group (hprune) or bitsandbytes blocksize (bnb).
        fmt: hprune: "int4" (default), "int4_sym", "nf4"; bnb: "nf4" (default) or "fp4".
        skip / include: see `eligible_linears` (default: the Linear layers of the transformer blocks,
            where nearly all the weights are; embedders and the output projection stay dense).
        backend: "hprune" -> W4A16Linear (recorded in the model's recipe, so save_compressed /
            load_compressed round-trip it); "bnb" -> bitsandbytes Linear4bit, the paper's baseline,
            for comparison (not saveable as an hprune artifact).
        compress_statistics: bnb only: double-quantise the absmax (bitsandbytes' Linear4bit default is
            True; diffusers' BitsAndBytesConfig default, which the paper used, is False).
        act: hprune only: None (W4A16Linear) or "fp8" (W4A8Linear: FP8 e4m3 activations, per-token
            dynamic scales; fmt "int4"/"int4_sym", group_size a multiple of 64). Recorded in the
            recipe, so artifacts reload with the same layer type.
        method: hprune only: "rtn" (round to nearest, with the scale search of
            hprune.quant.formats.quantize; no data needed) or "gptq" (codes chosen with each
            layer's timestep-aware input Hessian from `calib`: see hprune.quant.gptq).
        calib, groups, weighting, act_order, progress: GPTQ only: the CalibrationSet whose denoising
            loop gives the Hessians, the number of sequential groups (1 = one-shot; more bounds the
            memory to one group's Hessians; None = as few as keep them under 2 GiB), the step
            weighting (hprune.obs.WEIGHTINGS), the column order (hprune.quant.gptq), progress bars.
    """
    if backend not in ("hprune", "bnb"):
        raise HpruneError(f"unknown quantisation backend {backend!r}; choose 'hprune' or 'bnb'")
    _check_act(act)
    if method not in QUANT_METHODS:
        raise HpruneError(f"unknown quantisation method {method!r}; choose one of {QUANT_METHODS}")
    if method == "gptq" and backend != "hprune":
        raise HpruneError("method='gptq' needs backend='hprune' (bitsandbytes rounds to nearest)")
    if method == "gptq" and calib is None:
        raise HpruneError("method='gptq' needs a calibration set (calib=...): its denoising loop gives the Hessians")
    if fmt is None:
        fmt = F.DEFAULT_FORMAT if backend == "hprune" else "nf4"
    if backend == "hprune":
        F.check_format(fmt)
    elif fmt not in BNB_FORMATS:
        raise HpruneError(f"bitsandbytes 4-bit formats are {BNB_FORMATS}, got {fmt!r}")
    if act is not None and backend != "hprune":
        raise HpruneError("act='fp8' (W4A8) needs backend='hprune'; bitsandbytes has no FP8-activation 4-bit layer")
    F.check_group_size(group_size)
    if act == "fp8":
        check_w4a8(fmt, group_size)
    names, skipped = eligible_linears(model, include, skip)
    before = _state_bytes(model)
    report = QuantReport(backend, fmt, group_size, before, before, [], skipped, act=act)
    # every layer is quantised before any is swapped in: a layer that fails (e.g. non-finite
    # weights) leaves the model untouched, never half-quantised with no recipe step (the packed
    # layers held meanwhile are about a quarter of the originals' size)
    if method == "gptq":
        from hprune.quant.gptq import gptq_linears

        new_layers = gptq_linears(model, names, calib, group_size=group_size, fmt=fmt, scale_dtype=scale_dtype,
                                  refine=refine, act=act, groups=groups, weighting=weighting, act_order=act_order,
                                  progress=progress)
    else:
        new_layers = [(name, quantize_linear(model.get_submodule(name), group_size, fmt, scale_dtype=scale_dtype,
                                             refine=refine, act=act) if backend == "hprune"
                       else _bnb_linear(model.get_submodule(name), group_size, fmt, compress_statistics))
                      for name in names]
    for name, new in new_layers:
        report.linear_bytes_before += _state_bytes(model.get_submodule(name))
        report.linear_bytes_after += _state_bytes(new)
    for name, new in new_layers:
        _set_module(model, name, new)
        report.quantized.append(name)
    report.bytes_after = _state_bytes(model)
    spec = {"backend": backend, "fmt": fmt, "group_size": group_size, "modules": list(names), "method": method}
    if act is not None:
        spec["act"] = act
    if backend == "bnb":
        spec["compress_statistics"] = compress_statistics
    recipe.record(model, "quantize", spec)
    return report


def convert_bnb_model(model: nn.Module) -> QuantReport:
    """Replaces every bitsandbytes NF4 `Linear4bit` of `model` (e.g. loaded with diffusers'
    BitsAndBytesConfig) by the identical W4A16Linear, so hprune's kernels run it and artifacts
    store it. Records the step in the model's recipe. Returns a QuantReport (fmt "nf4")."""
    import bitsandbytes as bnb

    found = [(n, m) for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    groups = {int(m.weight.quant_state.blocksize) for _, m in found if getattr(m.weight, "quant_state", None)}
    if len(groups) > 1:
        raise HpruneError(f"the model mixes bitsandbytes blocksizes {sorted(groups)}; hprune records one per step")
    group = groups.pop() if groups else 64
    before = _state_bytes(model)
    report = QuantReport("hprune", "nf4", group, before, before)
    new_layers = []  # all converted before any is swapped in (see quantize_model)
    for name, mod in found:
        report.linear_bytes_before += _state_bytes(mod)
        new = W4A16Linear.from_bnb(mod)
        report.linear_bytes_after += _state_bytes(new)
        new_layers.append((name, new))
    for name, new in new_layers:
        _set_module(model, name, new)
        report.quantized.append(name)
    report.bytes_after = _state_bytes(model)
    # bitsandbytes steps recorded by quantize_model(backend="bnb") are now hprune modules: drop
    # them so the recipe replays (hprune artifacts cannot rebuild bitsandbytes layers)
    done = set(report.quantized)
    steps = [st for st in recipe.get_recipe(model)
             if not (st.get("op") == "quantize" and st.get("backend") == "bnb" and set(st.get("modules", ())) <= done)]
    object.__setattr__(model, recipe._ATTR, steps)  # noqa: SLF001 - rewriting the recipe this step supersedes
    recipe.record(model, "quantize", {"backend": "hprune", "fmt": "nf4", "group_size": group,
                                      "modules": list(report.quantized), "imported_from": "bitsandbytes"})
    return report


def _bnb_linear(lin: nn.Linear, blocksize: int, quant_type: str, compress_statistics: bool) -> nn.Module:
    """bitsandbytes Linear4bit with the same weights (quantised when moved to its device)."""
    try:
        import bitsandbytes as bnb
    except ImportError as exc:  # pragma: no cover - bitsandbytes is a dependency
        raise HpruneError(f"backend='bnb' needs bitsandbytes ({exc})") from None
    dev = lin.weight.device
    if dev.type == "meta":
        raise HpruneError("cannot quantise a model whose weights are on the meta device")
    dtype = lin.weight.dtype
    new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, compute_dtype=dtype,
                            compress_statistics=compress_statistics, quant_type=quant_type, device="cpu")
    new.weight = bnb.nn.Params4bit(lin.weight.detach().to("cpu").clone(), requires_grad=False,
                                   quant_type=quant_type, compress_statistics=compress_statistics,
                                   blocksize=blocksize)
    if lin.bias is not None:
        new.bias = nn.Parameter(lin.bias.detach().to("cpu").clone(), requires_grad=False)
    return new.to(dev)  # moving a Params4bit quantises it


def replay_quantize(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """Recipe replay: swaps the recorded Linear layers for empty W4A16Linear modules (on meta)."""
    if spec.get("backend", "hprune") != "hprune":
        raise HpruneError("this artifact was quantised with bitsandbytes (backend='bnb'), which hprune artifacts do "
                          "not store; save the model before quantising and quantise after loading, or use "
                          "backend='hprune'")
    fmt, group = spec["fmt"], int(spec["group_size"])
    act = spec.get("act")
    if act not in ACTS:
        raise HpruneError(f"recipe quantises with act={act!r}; this hprune knows {ACTS}")
    cls = W4A8Linear if act == "fp8" else W4A16Linear
    for name in spec["modules"]:
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            raise HpruneError(f"recipe quantises {name!r}, which this model does not have") from None
        if not isinstance(lin, nn.Linear):
            raise HpruneError(f"recipe quantises {name!r}, which is a {type(lin).__name__}, not nn.Linear")
        _set_module(model, name, cls(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                     group_size=group, fmt=fmt, device="meta"))
    recipe.record(model, "quantize", spec)
    return model


def set_activation_quant(model: nn.Module, act: str | None, fallback: str = "w4a16") -> list[str]:
    """Switches every hprune 4-bit layer of `model` between W4A16 (act=None) and W4A8 (act="fp8"),
    in place, sharing the packed weights (no copy, no requantisation; the bytes do not change).
    Recorded in the recipe as a "quant_act" step, so artifacts reload with the same layer types.
    Returns the names of the layers switched. Raises ShapeError naming a layer whose format or
    group size cannot run W4A8 (nothing is changed then)."""
    _check_act(act)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, W4A16Linear)]
    if act == "fp8":
        for n, m in layers:
            if not isinstance(m, W4A8Linear):
                check_w4a8(m.fmt, m.group_size, what=f"W4A8 ({n})")
    done = []
    for n, m in layers:
        if act == "fp8" and not isinstance(m, W4A8Linear):
            _set_module(model, n, W4A8Linear.from_w4a16(m, fallback=fallback))
            done.append(n)
        elif act is None and isinstance(m, W4A8Linear):
            _set_module(model, n, m.to_w4a16())
            done.append(n)
    if done:
        recipe.record(model, "quant_act", {"act": act, "modules": done})
    return done


def replay_quant_act(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """Recipe replay of set_activation_quant."""
    act = spec.get("act")
    if act not in ACTS:
        raise HpruneError(f"recipe switches activations to {act!r}; this hprune knows {ACTS}")
    for name in spec["modules"]:
        try:
            m = model.get_submodule(name)
        except AttributeError:
            raise HpruneError(f"recipe switches {name!r}, which this model does not have") from None
        if not isinstance(m, W4A16Linear):
            raise HpruneError(f"recipe switches {name!r}, which is a {type(m).__name__}, not a 4-bit hprune layer")
        _set_module(model, name, W4A8Linear.from_w4a16(m) if act == "fp8" else
                    (m.to_w4a16() if isinstance(m, W4A8Linear) else m))
    recipe.record(model, "quant_act", spec)
    return model
