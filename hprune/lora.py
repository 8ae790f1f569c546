"""LoRA on compressed transformers: a LoRA trained for the original model, applied to the pruned /
quantised one as an unfused low-rank side branch.

    report = hprune.apply_lora(model, "pytorch_lora_weights.safetensors", scale=0.8)
    print(report)                      # applied / sliced / dropped modules, with reasons
    hprune.set_lora_scale(model, 0.5)  # change it later (no re-quantisation: codes stay as they are)
    hprune.remove_lora(model)          # outputs are bit-identical to before

Each targeted layer (nn.Linear, W4A16Linear or W4A8Linear) computes
    y = layer(x) + scale · s · B (A x)        A (r, in), B (out, r), s = alpha / r (1 without alpha)
through a forward hook; A and B are non-persistent buffers on the layer, so the model's state dict
(and an artifact saved from it) is unchanged. On W4A8 layers the branch sees the unquantised x.

Files are read with diffusers' own LoRA readers (diffusers / PEFT `pytorch_lora_weights.safetensors`,
old `lora.down/up` keys, and the kohya / xlabs FLUX keys diffusers converts). Keys that cannot
apply are dropped and named in the report: modules of removed blocks or components, and layers
the compressed model does not have. Layers OBS-Diff shrank (heads / neurons removed) and AdaLN
layers trimmed by pruning get the LoRA's matching rows / columns.
"""
from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from hprune import recipe
from hprune.errors import CheckpointError, HpruneError
from hprune.models.adapters import get_adapter
from hprune.models.blocks import _ADALN_CONTINUOUS, _ADALN_ZERO, _ADALN_ZERO_X, Modulation, PrunedSingleBlock, RemovedBlock
from hprune.obs.structured import kept_groups
from hprune.quant.linear import W4A16Linear

_ATTR = "_hprune_lora"  # model attribute: {adapter name: _Adapter}
_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)(?:\.[A-Za-z0-9_]+)?\.(?P<what>weight|bias)$")
_ALPHA = re.compile(r"^(?P<module>.+)\.alpha$")
_PREFIXES = ("transformer.", "base_model.model.")


@dataclass
class LoraReport:
    """What `apply_lora` did. applied: module paths that got the LoRA (sliced: the subset whose
    rows / columns were cut to the compressed layer); dropped: {module path: reason};
    other_keys: keys for other components (e.g. text encoders), left alone."""

    adapter: str
    scale: float
    applied: list[str] = field(default_factory=list)
    sliced: list[str] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)
    other_keys: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [(f"LoRA {self.adapter!r} (scale {self.scale:g}): {len(self.applied)} layers applied "
                  f"({len(self.sliced)} sliced to pruned heads / neurons / chunks), {len(self.dropped)} dropped")]
        for path, why in self.dropped.items():
            lines.append(f"  dropped {path}: {why}")
        if self.other_keys:
            lines.append(f"  {len(self.other_keys)} keys for other components ignored (e.g. {self.other_keys[0]})")
        return "\n".join(lines)


class _Adapter:
    """One loaded LoRA: its scale (read by the hooks on every call) and the hooks' handles."""

    def __init__(self, name: str, scale: float) -> None:
        self.name = name
        self.scale = float(scale)
        self.call_scale = 1.0  # joint_attention_kwargs={"scale": s} of the current forward call
        self.handles: list[Any] = []
        self.modules: list[tuple[nn.Module, list[str]]] = []  # (layer, its buffer names)


def _buffer_names(adapter: str) -> tuple[str, str, str]:
    return f"lora_down_{adapter}", f"lora_up_{adapter}", f"lora_up_bias_{adapter}"


class _LoraHook:
    """Forward hook adding the branch of one adapter to one layer's output. An object, not a
    closure, so that a deep copy of the model gets hooks bound to its own adapter copy."""

    def __init__(self, adapter: _Adapter, scaling: float, names: tuple[str, str, str]) -> None:
        self.adapter, self.scaling, self.names = adapter, float(scaling), names

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        down_name, up_name, bias_name = self.names
        down, up = getattr(module, down_name), getattr(module, up_name)
        delta = F.linear(F.linear(args[0].to(down.dtype), down), up, getattr(module, bias_name, None))
        return output + (self.adapter.scale * self.adapter.call_scale * self.scaling) * delta.to(output.dtype)


_CALL_HOOKS = "_hprune_lora_call_hooks"  # model attribute: handles of the two hooks below


def _call_scale_pre_hook(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
    """diffusers' SD3 / FLUX pipelines scale a LoRA at call time with
    `transformer(..., joint_attention_kwargs={"scale": s})` (PEFT's scale_lora_layers multiplies
    each layer's scaling by s for that call): the same here, on top of set_lora_scale."""
    jak = kwargs.get("joint_attention_kwargs")
    s = float(jak.get("scale", 1.0)) if isinstance(jak, Mapping) else 1.0
    for a in getattr(model, _ATTR, {}).values():
        a.call_scale = s


def _call_scale_reset(model: nn.Module, args: tuple, output: Any) -> None:
    for a in getattr(model, _ATTR, {}).values():
        a.call_scale = 1.0


def _add_call_hooks(model: nn.Module) -> None:
    if getattr(model, _CALL_HOOKS, None) is None:
        object.__setattr__(model, _CALL_HOOKS, (model.register_forward_pre_hook(_call_scale_pre_hook, with_kwargs=True),
                                                model.register_forward_hook(_call_scale_reset)))


def _remove_call_hooks(model: nn.Module) -> None:
    for h in getattr(model, _CALL_HOOKS, None) or ():
        h.remove()
    object.__setattr__(model, _CALL_HOOKS, None)


# -- reading ------------------------------------------------------------------------------------------
def read_lora(source: str | os.PathLike | Mapping[str, torch.Tensor], family: str
              ) -> tuple[dict[str, torch.Tensor], dict[str, float], dict[str, Any]]:
    """Reads a LoRA (file, folder with pytorch_lora_weights.safetensors, or a state dict) with
    diffusers' reader for the model family ("sd3" / "flux"), which converts kohya / xlabs FLUX keys.
    Returns (state dict, network alphas {key: alpha}, PEFT adapter metadata or {})."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    if not isinstance(source, Mapping):
        p = Path(source)
        if not p.exists():
            raise CheckpointError(f"LoRA not found: {p}")
        if p.is_file() and p.suffix != ".safetensors":
            raise CheckpointError(f"{p}: hprune reads LoRAs from .safetensors files only")
        if p.is_dir():  # never a pickle (.bin) beside or instead of it: name the safetensors file
            p = _safetensors_in(p)
        # use_safetensors=True: diffusers' pickle fallback off
        kw: dict[str, Any] = {"weight_name": p.name, "use_safetensors": True}
        label = str(p)
        source = str(p.parent)
    else:
        source, kw, label = _check_mapping(source), {}, "the LoRA state dict"
    alphas: dict[str, float] = {}
    try:
        if family == "flux":
            state, alphas, meta = FluxPipeline.lora_state_dict(source, return_alphas=True,
                                                               return_lora_metadata=True, **kw)
        else:
            state, meta = StableDiffusion3Pipeline.lora_state_dict(source, return_lora_metadata=True, **kw)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read the LoRA {label}: {_one_line(exc)}") from None
    except (AssertionError, RuntimeError, KeyError, IndexError) as exc:
        # diffusers' kohya / xlabs FLUX converter asserts (or fails to split) on shapes it does not expect
        raise CheckpointError(f"{label}: diffusers cannot convert this kohya / xlabs-format FLUX LoRA: its "
                              f"keys or shapes do not match FLUX.1's layers ({_one_line(exc) or type(exc).__name__})"
                              ) from None
    check_lora_kind(state, label, family)
    state, alphas, meta = dict(state), dict(alphas or {}), _own_metadata(meta)
    check_lora_values(state, alphas, meta, label)
    return state, alphas, meta


LORA_FILE = "pytorch_lora_weights.safetensors"
MAX_LORA_VALUE = 1e6  # |weight| beyond this overflows the layer's output (black images), not a real LoRA


def _safetensors_in(folder: Path) -> Path:
    """The LoRA file in a folder: pytorch_lora_weights.safetensors, else its only .safetensors file.
    A folder with only pickles (.bin / .pt / .ckpt) is refused: hprune never unpickles a LoRA."""
    if (folder / LORA_FILE).is_file():
        return folder / LORA_FILE
    found = sorted(folder.glob("*.safetensors"))
    if len(found) == 1:
        return found[0]
    if found:
        raise CheckpointError(f"{folder}: {len(found)} .safetensors files and none named {LORA_FILE}; give the LoRA "
                              f"file itself")
    pickles = sorted(q.name for q in folder.iterdir() if q.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    extra = f" ({pickles[0]} is a pickle, which hprune never reads)" if pickles else ""
    raise CheckpointError(f"{folder}: no .safetensors LoRA in the folder{extra}; hprune reads LoRAs from "
                          f".safetensors files only")


def _check_mapping(source: Mapping[str, Any]) -> dict[str, Any]:
    """A LoRA given as a state dict: str keys, tensor values (an alpha may be a number)."""
    out = dict(source)
    for k, v in out.items():
        if not isinstance(k, str):
            raise CheckpointError(f"LoRA state dict: key {k!r} is not a string")
        if torch.is_tensor(v):
            continue
        if k.endswith(".alpha") and isinstance(v, (int, float)) and not isinstance(v, bool):
            continue
        raise CheckpointError(f"LoRA state dict: {k} is a {type(v).__name__}, not a tensor")
    return out


def check_lora_values(state: Mapping[str, Any], alphas: Mapping[str, Any], meta: Mapping[str, Any],
                      source: str) -> None:
    """CheckpointError naming the first LoRA tensor that is not floating point (int8: quantised,
    hprune would apply its codes as numbers), or that holds NaN / inf / values beyond
    MAX_LORA_VALUE, and the first non-finite alpha: each would give black images, silently."""
    for k, v in state.items():
        if not torch.is_tensor(v):
            continue
        if not v.is_floating_point():
            if k.endswith(".alpha") and v.numel() == 1:
                continue
            raise CheckpointError(f"{source}: LoRA tensor {k} is {str(v.dtype).replace('torch.', '')}; hprune "
                                  f"applies floating-point LoRA weights only (dequantise it first)")
        if v.numel() and not bool(torch.isfinite(v).all()):
            raise CheckpointError(f"{source}: LoRA tensor {k} holds NaN/inf values (a diverged training run?)")
        if v.numel() and float(v.abs().max()) > MAX_LORA_VALUE:
            raise CheckpointError(f"{source}: LoRA tensor {k} holds values up to {float(v.abs().max()):.3g}, beyond "
                                  f"{MAX_LORA_VALUE:g}: the layers' outputs would overflow")
    named = [(k, v) for k, v in alphas.items()] + [(k, v) for k, v in state.items() if k.endswith(".alpha")]
    named += [("lora_alpha", meta["lora_alpha"])] if "lora_alpha" in meta else []
    named += [(f"alpha_pattern {k}", v) for k, v in (meta.get("alpha_pattern") or {}).items()]
    for k, v in named:
        try:
            x = float(v.item() if torch.is_tensor(v) else v)
        except (TypeError, ValueError, RuntimeError):
            raise CheckpointError(f"{source}: LoRA alpha {k} is {v!r}, not a number") from None
        if not math.isfinite(x):
            raise CheckpointError(f"{source}: LoRA alpha {k} is {x}; it must be a finite number")


def check_scale(scale: Any, what: str = "LoRA scale") -> float:
    """A LoRA scale as a float; HpruneError unless it is a finite number."""
    try:
        x = float(scale)
    except (TypeError, ValueError):
        raise HpruneError(f"{what} must be a number, got {scale!r}") from None
    if not math.isfinite(x):
        raise HpruneError(f"{what} must be a finite number, got {x}")
    return x


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def check_lora_kind(state: Mapping[str, Any], label: str, family: str) -> None:
    """Refuses, in one line naming `label`, what hprune cannot apply as a plain LoRA:

    - DoRA (PEFT use_dora=True, `lora_magnitude_vector` keys): its update renormalises each row of
      the whole weight W + s·BA to a learned magnitude. On a 4-bit or pruned layer W is not the
      original's, so the norms (and the output) would differ from the original model's; applied as
      plain LoRA it was silently ~20 % off.
    - kohya-format keys (lora_unet_…) for SD3 / SD3.5, which diffusers does not convert."""
    dora = next((k for k in state if "lora_magnitude_vector" in k), None)
    if dora is not None:
        raise CheckpointError(f"{label}: a DoRA adapter (PEFT use_dora=True; e.g. {dora}), which hprune does not "
                              f"apply: DoRA renormalises the whole weight, which pruning / 4-bit codes change. "
                              f"Merge it into the original model before compressing, or train a plain LoRA")
    kohya = next((k for k in state if k.startswith(("lora_unet_", "lora_te"))), None)
    if kohya is not None and family != "flux":
        raise CheckpointError(f"{label}: a kohya-format LoRA (keys like {kohya}), which diffusers cannot convert "
                              f"for SD3 / SD3.5; convert it to diffusers / PEFT keys "
                              f"(transformer.<module>.lora_A / lora_B) first")


def _own_metadata(meta: Mapping[str, Any] | None) -> dict[str, Any]:
    """The transformer's PEFT adapter metadata (diffusers keys it per component: "transformer.r")."""
    meta = dict(meta or {})
    if any(k.startswith("transformer.") for k in meta):
        meta = {k[len("transformer."):]: v for k, v in meta.items() if k.startswith("transformer.")}
    return meta


def _split_keys(state: Mapping[str, torch.Tensor], alphas: Mapping[str, float]
                ) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """{module path: {"A", "B", "B_bias", "alpha"}} for the transformer, and the other keys."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    ours = any(k.startswith(_PREFIXES) for k in state)
    own: dict[str, torch.Tensor] = {}
    other: list[str] = []
    for k, v in state.items():
        for pre in _PREFIXES:
            if k.startswith(pre):
                own[k[len(pre):]] = v
                break
        else:
            if ours:
                other.append(k)
            else:
                own[k] = v
    own = convert_unet_state_dict_to_peft(own)  # old diffusers keys: lora.down / lora.up -> lora_A / lora_B
    for k, v in alphas.items():
        own.setdefault(k.removeprefix("transformer."), v)
    modules: dict[str, dict[str, Any]] = {}
    for k, v in own.items():
        m = _KEY.match(k)
        if m:
            entry = modules.setdefault(m["module"], {})
            entry[{"lora_A": "A", "lora_B": "B"}[m["part"]] + ("_bias" if m["what"] == "bias" else "")] = v
            continue
        m = _ALPHA.match(k)
        if m:
            modules.setdefault(m["module"], {})["alpha"] = float(v.item() if torch.is_tensor(v) else v)
            continue
        other.append(k)
    for path, entry in modules.items():
        if "A" not in entry or "B" not in entry:
            raise CheckpointError(f"LoRA module {path}: lora_A and lora_B weights must both be present")
    return modules, other


def _scaling(path: str, entry: dict[str, Any], meta: Mapping[str, Any]) -> float:
    """alpha / r as PEFT computes it (network alphas first, then the adapter metadata)."""
    r = entry["A"].shape[0]
    if "alpha" in entry:
        return entry["alpha"] / r
    if not meta or "lora_alpha" not in meta:
        return 1.0
    alpha = meta["lora_alpha"]
    for pattern, value in (meta.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            alpha = value
            break
    return alpha / math.sqrt(r) if meta.get("use_rslora") else alpha / r


# -- finding the layer and its kept rows / columns ---------------------------------------------------
def _find_layer(model: nn.Module, path: str) -> tuple[nn.Module | None, str]:
    """The layer at `path`, or (None, why it is not there)."""
    mod: Any = model
    pruned = False
    for part in path.split("."):
        if isinstance(mod, RemovedBlock):
            return None, "its block was removed by pruning"
        pruned = pruned or hasattr(mod, "removed")
        nxt = mod._modules.get(part) if isinstance(mod, nn.Module) else None
        if nxt is None:
            if pruned:
                return None, "its component was removed by pruning"
            return None, "no such layer in this model"
        mod = nxt
    if isinstance(mod, RemovedBlock):
        return None, "its block was removed by pruning"
    if not isinstance(mod, (nn.Linear, W4A16Linear)):
        return None, f"not a linear layer ({type(mod).__name__})"
    return mod, ""


def _kept_indices(model: nn.Module, path: str, out_orig: int, in_orig: int
                  ) -> tuple[torch.Tensor, torch.Tensor] | str:
    """(rows, cols) of the original layer that the compressed layer keeps, from the recipe's
    shrink ops (positions, in order) and the pruned branches; or why they cannot be known."""
    rows, cols = torch.arange(out_orig), torch.arange(in_orig)
    blocks = {info.index: info.name for info in get_adapter(model).blocks(model)}
    filtered = False
    for step in recipe.get_recipe(model):
        if step.get("op") == "prune":
            owner = path.rsplit(".", 1)[0]
            touched = {blocks.get(e.get("block")) for e in step.get("plan", {}).get("entries", [])}
            blk = model.get_submodule(owner) if path.endswith(".proj_out") and owner in touched else None
            if isinstance(blk, PrunedSingleBlock) and not filtered:
                # proj_out columns: [attention outputs (out_features) | MLP], original numbering
                keep = torch.zeros_like(cols, dtype=torch.bool)
                if blk.has_attn:
                    keep |= cols < out_orig
                if blk.has_mlp:
                    keep |= cols >= out_orig
                cols, filtered = cols[keep], True
        elif step.get("op") == "shrink":
            for entry in step.get("sites", []):
                consumers = [(c[0], int(c[1])) for c in entry.get("consumers", [])]
                if path not in entry.get("producers", []) and path not in [c for c, _ in consumers]:
                    continue
                keep = kept_groups(entry)
                if keep is None:
                    return "OBS-Diff removed heads / neurons here but the recipe does not say which"
                g, before = int(entry["group_size"]), int(entry["before"])
                idx = (keep.view(-1, 1) * g + torch.arange(g)).flatten()
                if path in entry["producers"]:
                    rows = rows[idx]
                for cpath, off in consumers:
                    if cpath == path:
                        cols = cols[torch.cat([torch.arange(off), off + idx, torch.arange(off + before * g, len(cols))])]
    parent = model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else None
    if isinstance(parent, Modulation):  # AdaLN rows of the removed branches are gone
        n_orig = out_orig // parent.dim
        names = next((n for n in (_ADALN_ZERO, _ADALN_ZERO_X, _ADALN_CONTINUOUS)
                      if len(n) == n_orig and set(parent.names) <= set(n)), None)
        if names is None:
            return f"AdaLN layer with {n_orig} chunks of {parent.dim}: unknown layout"
        chunk = rows // parent.dim
        rows = rows[torch.isin(chunk, torch.tensor([names.index(n) for n in parent.names]))]
    return rows, cols


def _check_name(model: nn.Module, adapter_name: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9_]+", adapter_name):
        raise HpruneError(f"adapter name must be letters, digits and _, got {adapter_name!r}")
    if adapter_name in getattr(model, _ATTR, {}):
        raise HpruneError(f"a LoRA named {adapter_name!r} is already applied; remove_lora(model, "
                          f"{adapter_name!r}) first or pick another adapter_name")


# -- public API ---------------------------------------------------------------------------------------
def apply_lora(model: nn.Module, source: str | os.PathLike | Mapping[str, torch.Tensor], scale: float = 1.0,
               adapter_name: str = "default", *, warn: bool = True) -> LoraReport:
    """Adds a LoRA made for the original model to `model` (compressed or not), unfused.

    Args:
        source: a .safetensors LoRA, a folder holding pytorch_lora_weights.safetensors, or a state dict.
        scale: multiplies the LoRA's update (changed later with `set_lora_scale`).
        adapter_name: several adapters can be active at once under different names.
        warn: emit a warning naming the dropped modules.
    Returns a LoraReport. Raises HpruneError if nothing of the LoRA fits the model."""
    return _apply_source(model, source, scale, adapter_name, warn, "hprune.apply_lora")


def _apply_source(model: nn.Module, source: Any, scale: float, adapter_name: str, warn: bool,
                  returned_by: str | None) -> LoraReport:
    _check_name(model, adapter_name)
    scale = check_scale(scale)
    state, alphas, meta = read_lora(source, get_adapter(model).family)
    return _apply(model, state, alphas, meta, scale, adapter_name, warn, returned_by)


def _dropped_warning(adapter_name: str, report: LoraReport, n_modules: int, returned_by: str | None) -> str:
    """One line: how many layers were dropped and why (grouped by reason, one example each), and
    where the full list is: the report that the user's own call returned, if it returns one."""
    by_reason: dict[str, list[str]] = {}
    for path, why in report.dropped.items():
        by_reason.setdefault(why, []).append(path)
    parts = [f"{why}: {len(paths)} (e.g. {paths[0]})" for why, paths in list(by_reason.items())[:3]]
    more = f"; {len(by_reason) - 3} more reasons" if len(by_reason) > 3 else ""
    tail = f"; the LoraReport returned by {returned_by} lists every one" if returned_by else ""
    return (f"LoRA {adapter_name!r}: {len(report.dropped)} of {n_modules} layers dropped: "
            + "; ".join(parts) + more + tail)


def _apply(model: nn.Module, state: Mapping[str, torch.Tensor], alphas: Mapping[str, float],
           meta: Mapping[str, Any], scale: float, adapter_name: str, warn: bool,
           returned_by: str | None = None) -> LoraReport:
    adapters: dict[str, _Adapter] = getattr(model, _ATTR, {})
    modules, other = _split_keys(state, alphas)
    if not modules:
        raise CheckpointError("the LoRA has no transformer layers (lora_A / lora_B keys)")
    report = LoraReport(adapter_name, float(scale), other_keys=other)
    plans = []
    for path, entry in sorted(modules.items()):
        layer, why = _find_layer(model, path)
        if layer is None:
            report.dropped[path] = why
            continue
        A, B, bias = entry["A"], entry["B"], entry.get("B_bias")
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            report.dropped[path] = f"not a linear LoRA (lora_A {tuple(A.shape)}, lora_B {tuple(B.shape)})"
            continue
        if A.shape[0] == 0:
            report.dropped[path] = "rank 0 (lora_A has no rows): it changes nothing"
            continue
        sliced = (layer.out_features, layer.in_features) != (B.shape[0], A.shape[1])
        if sliced:
            kept = _kept_indices(model, path, B.shape[0], A.shape[1])
            if isinstance(kept, str) or (len(kept[0]), len(kept[1])) != (layer.out_features, layer.in_features):
                report.dropped[path] = (kept if isinstance(kept, str) else
                                        f"the LoRA is for a ({B.shape[0]}, {A.shape[1]}) layer, this one is "
                                        f"({layer.out_features}, {layer.in_features})")
                continue
            rows, cols = kept
            A, B = A[:, cols], B[rows]
            bias = bias[rows] if bias is not None else None
        plans.append((path, layer, A, B, bias, _scaling(path, entry, meta), sliced))
    if not plans:
        raise HpruneError(f"none of the LoRA's {len(modules)} layers fits this model (e.g. {next(iter(report.dropped))}: "
                          f"{next(iter(report.dropped.values()))})")
    adapter = _Adapter(adapter_name, scale)
    for path, layer, A, B, bias, scaling, sliced in plans:
        ref = layer.scales if isinstance(layer, W4A16Linear) else layer.weight
        dtype = ref.dtype if ref.is_floating_point() else torch.float32
        names = _buffer_names(adapter_name)
        layer.register_buffer(names[0], A.detach().to(ref.device, dtype).contiguous(), persistent=False)
        layer.register_buffer(names[1], B.detach().to(ref.device, dtype).contiguous(), persistent=False)
        if bias is not None:
            layer.register_buffer(names[2], bias.detach().to(ref.device, dtype), persistent=False)
        adapter.handles.append(layer.register_forward_hook(_LoraHook(adapter, scaling, names)))
        adapter.modules.append((layer, [n for n in names if n in layer._buffers]))
        report.applied.append(path)
        if sliced:
            report.sliced.append(path)
    object.__setattr__(model, _ATTR, {**adapters, adapter_name: adapter})
    _add_call_hooks(model)
    if warn and report.dropped:
        warnings.warn(_dropped_warning(adapter_name, report, len(modules), returned_by), UserWarning, stacklevel=4)
    return report


def lora_adapters(model: nn.Module) -> dict[str, float]:
    """{adapter name: scale} of the LoRAs applied to `model`."""
    return {name: a.scale for name, a in getattr(model, _ATTR, {}).items()}


def set_lora_scale(model: nn.Module, scale: float, adapter_name: str | None = None) -> None:
    """Sets the scale of one adapter (or of every adapter when `adapter_name` is None)."""
    adapters: dict[str, _Adapter] = getattr(model, _ATTR, {})
    if adapter_name is not None and adapter_name not in adapters:
        raise HpruneError(f"no LoRA named {adapter_name!r} on this model (have: {sorted(adapters) or 'none'})")
    scale = check_scale(scale)
    for name, a in adapters.items():
        if adapter_name in (None, name):
            a.scale = float(scale)


def remove_lora(model: nn.Module, adapter_name: str | None = None) -> int:
    """Removes one adapter (or all): hooks and buffers go, the layers compute exactly what they
    did before. Returns the number of layers it was removed from."""
    adapters: dict[str, _Adapter] = dict(getattr(model, _ATTR, {}))
    if adapter_name is not None and adapter_name not in adapters:
        raise HpruneError(f"no LoRA named {adapter_name!r} on this model (have: {sorted(adapters) or 'none'})")
    n = 0
    for name in [adapter_name] if adapter_name is not None else list(adapters):
        a = adapters.pop(name)
        for h in a.handles:
            h.remove()
        for layer, names in a.modules:
            for b in names:
                del layer._buffers[b]
            n += 1
    object.__setattr__(model, _ATTR, adapters)
    if not adapters:
        _remove_call_hooks(model)
    return n



def enable_diffusers_lora(target: Any) -> Any:
    """Lets diffusers' LoRA calls reach hprune's layers (PEFT cannot wrap W4A16Linear / W4A8Linear
    or sliced layers, and FLUX's loader would re-widen shrunk ones):

    - on a pipeline: `pipe.load_lora_weights(src, adapter_name=None, scale=1.0)` runs `apply_lora`
      on its transformer (returning the report) and `pipe.unload_lora_weights()` runs `remove_lora`;
    - on a transformer: `load_lora_adapter` / `unload_lora`, what SD3 pipelines call after reading
      and converting the file, do the same (FLUX pipelines first reshape layers: use a pipeline from
      `hprune.load_pipeline`, or `apply_lora`).

    `hprune.load_compressed` and `hprune.load_pipeline` do this already. Returns `target`. The
    methods are bound to `target` (a deep copy gets its own)."""
    import types

    transformer = getattr(target, "transformer", None)
    if transformer is not None:
        enable_diffusers_lora(transformer)
        object.__setattr__(target, "load_lora_weights", types.MethodType(_pipe_load_lora_weights, target))
        object.__setattr__(target, "unload_lora_weights", types.MethodType(_pipe_unload_lora_weights, target))
    else:
        object.__setattr__(target, "load_lora_adapter", types.MethodType(_load_lora_adapter, target))
        object.__setattr__(target, "unload_lora", types.MethodType(_unload_lora, target))
    return target


def _pipe_load_lora_weights(pipe: Any, pretrained_model_name_or_path_or_dict: Any, adapter_name: str | None = None,
                            scale: float = 1.0, **_: Any) -> LoraReport:
    return _apply_source(pipe.transformer, pretrained_model_name_or_path_or_dict, scale, adapter_name or "default",
                         True, "pipe.load_lora_weights")


def _pipe_unload_lora_weights(pipe: Any) -> None:
    remove_lora(pipe.transformer)


def _load_lora_adapter(model: nn.Module, pretrained_model_name_or_path_or_dict: Any, prefix: str = "transformer",
                       network_alphas: Mapping[str, float] | None = None, adapter_name: str | None = None,
                       metadata: Mapping[str, Any] | None = None, **_: Any) -> None:
    name = adapter_name or "default"
    _check_name(model, name)
    if isinstance(pretrained_model_name_or_path_or_dict, Mapping):
        state, alphas, meta = (_check_mapping(pretrained_model_name_or_path_or_dict), network_alphas or {},
                               _own_metadata(metadata))
        check_lora_kind(state, "the LoRA state dict", get_adapter(model).family)
        check_lora_values(state, alphas, meta, "the LoRA state dict")
    else:
        state, alphas, meta = read_lora(pretrained_model_name_or_path_or_dict, get_adapter(model).family)
    _apply(model, state, alphas, meta, 1.0, name, warn=True, returned_by=None)


def _unload_lora(model: nn.Module) -> None:
    remove_lora(model)
