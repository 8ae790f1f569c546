"""Quantising whole models: `quantize_model` (RTN or GPTQ, hprune kernels or bitsandbytes),
`convert_bnb_model`, `set_activation_quant`, and the recipe replays of those steps."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch
import torch.nn as nn

from hprune import formats as F
from hprune import recipe
from hprune.errors import HpruneError
from hprune.quant.linear import (ACTS, BLOCK_PREFIXES, BNB_FORMATS, QUANT_METHODS, W4A8Linear, W4A16Linear,
                                 _check_act, check_w4a8, quantize_linear, set_module)


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


def linears_to_quantize(model: nn.Module, include: Optional[Iterable[str]] = BLOCK_PREFIXES,
                        skip: Iterable[str] = ()) -> tuple[list[str], list[str]]:
    """eligible_linears, refusing a model with none left to quantise (already quantised, or every
    layer skipped): re-quantising would add an empty step to the recipe."""
    names, skipped = eligible_linears(model, include, skip)
    if not names:
        done = sum(1 for m in model.modules() if hasattr(m, "logical_numel") or hasattr(getattr(m, "weight", None),
                                                                                          "quant_state"))
        why = (f"its {done} block Linear layers are already quantised" if done and not skipped
               else f"every eligible Linear is skipped ({len(skipped)} by the skip patterns)" if skipped
               else "it has no nn.Linear layers in its blocks")
        raise HpruneError(f"nothing to quantise: {why}")
    return names, skipped


def quantize_model(model: nn.Module, group_size: int = F.DEFAULT_GROUP_SIZE, fmt: str | None = None,
                   skip: Iterable[str] = (), include: Optional[Iterable[str]] = BLOCK_PREFIXES,
                   backend: str = "hprune", scale_dtype: torch.dtype | None = None, refine: bool = True,
                   compress_statistics: bool = False, act: str | None = None, method: str = "rtn",
                   calib: Any = None, groups: int | None = None, weighting: str | None = None,
                   act_order: bool = True, progress: bool = False, offload: Any = None,
                   sequential: bool = False, spill: Any = None) -> QuantReport:
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
            hprune.formats.quantize; no data needed) or "gptq" (codes chosen with each
            layer's timestep-aware input Hessian from `calib`: see hprune.quant.gptq).
        calib, groups, weighting, act_order, progress: GPTQ only: the CalibrationSet whose denoising
            loop gives the Hessians, the number of sequential groups (1 = one-shot; more bounds the
            memory to one group's Hessians; None = as few as keep them under 2 GiB), the step
            weighting (hprune.obs.WEIGHTINGS), the column order (hprune.quant.gptq).
        progress: progress report (hprune.report.tqdm: a bar on a terminal, plain lines in a log).
        offload: a device (e.g. "cuda"): quantise block by block there, the weights staying where
            they are (the host); see hprune.quant.blockwise. RTN gives the same codes as without;
            GPTQ takes the Hessians of one block at a time from ONE pass over the set's stored
            inputs (`groups` is then unused; `sequential`: later blocks see the quantised earlier
            ones). hprune backend only.
        spill: with offload, a hprune.models.offload.Spill: each block's new layers leave anonymous
            memory for its file as soon as the block is done (the host then holds one block's
            output, not the whole model's); the layers' values are unchanged.
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
    names, skipped = linears_to_quantize(model, include, skip)
    before = _state_bytes(model)
    report = QuantReport(backend, fmt, group_size, before, before, [], skipped, act=act)
    # every layer is quantised before any is swapped in: a layer that fails (e.g. non-finite
    # weights) leaves the model untouched, never half-quantised with no recipe step (the packed
    # layers held meanwhile are about a quarter of the originals' size)
    if offload is not None and backend != "hprune":
        raise HpruneError("offload (block-by-block quantisation) needs backend='hprune'")
    if spill is not None and offload is None:
        raise HpruneError("spill (each block's output to a file) needs offload (block-by-block quantisation)")
    if offload is not None and method == "gptq":
        from hprune.quant.blockwise import gptq_blockwise

        new_layers = gptq_blockwise(model, names, calib, offload, group_size=group_size, fmt=fmt,
                                    scale_dtype=scale_dtype, refine=refine, act=act, weighting=weighting,
                                    act_order=act_order, sequential=sequential, progress=progress, spill=spill)
    elif offload is not None:
        from hprune.quant.blockwise import rtn_blockwise

        new_layers = rtn_blockwise(model, names, offload, progress=progress, spill=spill, group_size=group_size,
                                   fmt=fmt, scale_dtype=scale_dtype, refine=refine, act=act)
    elif method == "gptq":
        from hprune.quant.gptq import gptq_linears

        new_layers = gptq_linears(model, names, calib, group_size=group_size, fmt=fmt, scale_dtype=scale_dtype,
                                  refine=refine, act=act, groups=groups, weighting=weighting, act_order=act_order,
                                  progress=progress)
    else:
        from hprune.report import tqdm

        bar = tqdm(names, desc=f"quantising ({'RTN' if backend == 'hprune' else backend})", unit="layer",
                   disable=not progress)
        new_layers = [(name, quantize_linear(model.get_submodule(name), group_size, fmt, scale_dtype=scale_dtype,
                                             refine=refine, act=act) if backend == "hprune"
                       else _bnb_linear(model.get_submodule(name), group_size, fmt, compress_statistics))
                      for name in bar]
    for name, new in new_layers:
        report.linear_bytes_before += _state_bytes(model.get_submodule(name))
        report.linear_bytes_after += _state_bytes(new)
    for name, new in new_layers:
        set_module(model, name, new)
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
        set_module(model, name, new)
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
        set_module(model, name, cls(lin.in_features, lin.out_features, bias=lin.bias is not None,
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
            set_module(model, n, W4A8Linear.from_w4a16(m, fallback=fallback))
            done.append(n)
        elif act is None and isinstance(m, W4A8Linear):
            set_module(model, n, m.to_w4a16())
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
        set_module(model, name, W4A8Linear.from_w4a16(m) if act == "fp8" else
                    (m.to_w4a16() if isinstance(m, W4A8Linear) else m))
    recipe.record(model, "quant_act", spec)
    return model
