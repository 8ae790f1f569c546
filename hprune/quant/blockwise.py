"""Quantisation block by block (hprune.models.offload): the model's weights stay on the host, each
transformer block is moved to the compute device once.

RTN: each block's Linears are rounded on the device and the packed layers come back to the host;
the same function on the same weights as the resident path, so the codes are identical.

GPTQ: the Hessians of ONE block at a time, from ONE pass over the calibration set's stored
transformer inputs (a BlockStream): block i's Linears see the outputs of blocks 0..i-1 on those
inputs. The resident path instead re-runs the denoising loop once per Hessian group
(gptq.auto_groups: 16 passes for SD3.5-Large, 31 for FLUX.1). With `sequential=False` (default)
the blocks before i are the unquantised ones, as in the resident path with one group: when the
set was captured on this model, the inputs are the ones the resident loop regenerates, so the
Hessians agree to float rounding (tests/test_offload.py). `sequential=True` feeds block i with
the already quantised blocks' outputs (GPTQModel / llm-compressor's sequential onloading).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from hprune.errors import HpruneError
from hprune.models.adapters import get_adapter
from hprune.models.offload import Spill, placed
from hprune.quant.linear import quantize_linear, set_module


def _by_block(model: nn.Module, names: list[str]) -> tuple[dict[int, list[str]], list[str]]:
    """Named Linears grouped by block index, and those outside every block."""
    infos = get_adapter(model).blocks(model)
    by: dict[int, list[str]] = {}
    outside = []
    for n in names:
        hit = next((b.index for b in infos if n.startswith(b.name + ".")), None)
        if hit is None:
            outside.append(n)
        else:
            by.setdefault(hit, []).append(n)
    return by, outside


def _to_host(module: nn.Module, host: torch.device) -> nn.Module:
    return module.to(host)


def rtn_blockwise(model: nn.Module, names: list[str], device: torch.device | str, *, progress: bool = False,
                  spill: Spill | None = None, **kw: Any) -> list[tuple[str, nn.Module]]:
    """The round-to-nearest replacement of each named nn.Linear, computed with one block at a time
    on `device` (the weights in their storage dtype, as the resident path sees them). kw: as
    quantize_linear. The model is unchanged; the new layers live where the model's weights do
    (spill: each block's new layers go to its file as soon as the block is done, see Spill)."""
    from hprune.report import tqdm

    host = next(model.parameters()).device
    by, outside = _by_block(model, names)
    new: dict[str, nn.Module] = {}
    ad = get_adapter(model)
    for i in tqdm(sorted(by), desc="RTN", unit="block", disable=not progress):
        with placed(ad.get_block(model, i), device):
            for n in by[i]:
                new[n] = _to_host(quantize_linear(model.get_submodule(n), **kw), host)
        if spill is not None:
            spill([new[n] for n in by[i]])
    for n in outside:
        lin = model.get_submodule(n)
        with placed(lin, device):
            new[n] = _to_host(quantize_linear(lin, **kw), host)
    if spill is not None and outside:
        spill([new[n] for n in outside])
    return [(n, new[n]) for n in names]


def gptq_blockwise(model: nn.Module, names: list[str], calib: Any, device: torch.device | str, *, group_size: int,
                   fmt: str, scale_dtype: torch.dtype | None, refine: bool, act: str | None,
                   weighting: str | None = None, act_order: bool = True, sequential: bool = False,
                   activations: str = "auto", progress: bool = False,
                   spill: Spill | None = None) -> list[tuple[str, nn.Module]]:
    """GPTQ replacement of each named nn.Linear with one block at a time on `device` and one pass
    over the calibration samples (see the module docstring). Linears outside the blocks and the
    AdaLN modulation Linears round to nearest, as in gptq.gptq_linears. The model is unchanged on
    return, also on error. spill: each block's new layers go to its file once on the host (Spill)."""
    from hprune.obs.blockwise import block_hessians
    from hprune.obs.hessian import DEFAULT_WEIGHTING, step_weights
    from hprune.obs.sequential import find_linear_units
    from hprune.quant.gptq import gptq_quantize

    calib.check_fits(model)
    host = next(model.parameters()).device
    wanted = set(names)
    units: dict[int, list[tuple[str, list[tuple[str, nn.Linear]]]]] = {}
    for u in find_linear_units(model):
        members = [(p, lin) for p, lin in u.linears if p in wanted]
        if members:
            units.setdefault(u.block, []).append((u.name, members))
    in_units = {p for us in units.values() for _, ms in us for p, _ in ms}
    kw = dict(group_size=group_size, fmt=fmt, scale_dtype=scale_dtype, refine=refine, act=act)
    new: dict[str, nn.Module] = dict(rtn_blockwise(model, [p for p in names if p not in in_units], device,
                                                     spill=spill, **kw))
    weights = step_weights(weighting or DEFAULT_WEIGHTING, calib.num_steps)
    sites = {b: {n: [l for _, l in ms] for n, ms in us} for b, us in units.items()}
    swapped: list[tuple[str, nn.Module]] = []
    try:
        for step, hs in block_hessians(model, calib, device, sites, weights, activations=activations,
                                       progress=progress, desc="GPTQ"):
            block_units = units[step.index]
            for name, members in block_units:
                for p, lin in members:  # lin is on the device, in its storage dtype
                    qw = gptq_quantize(lin.weight, hs[name].to(lin.weight.device), group_size, fmt,
                                       scale_dtype=scale_dtype, refine=refine, act_order=act_order)
                    new[p] = quantize_linear(lin, **kw, quantized=qw)
                del hs[name]
            if sequential:
                for _, members in block_units:
                    for p, lin in members:
                        swapped.append((p, lin))
                        set_module(model, p, new[p])
                step.run()
            for _, members in block_units:
                for p, _ in members:
                    new[p] = _to_host(new[p], host)
            if spill is not None:
                spill([new[p] for _, members in block_units for p, _ in members])
    finally:
        for p, lin in swapped:
            set_module(model, p, lin)
    return [(p, new[p]) for p in names]
