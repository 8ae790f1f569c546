"""Timestep-aware Hessians block by block (hprune.models.offload.BlockStream): the Hessians of ONE
block at a time from ONE pass over a calibration set's stored transformer inputs, for GPTQ
(hprune.quant.blockwise) and OBS-Diff (`obs_prune_model(offload=...)`).

The resident path re-runs the set's denoising loop (hessian.run_calibration_loop), once per group
of Hessians that fits memory. Here the set's own inputs are replayed call by call ([uncond, cond]
rows of one trajectory at one step together, as the pipeline batched them), each call weighted by
its step's α, so with the set captured on this model the Hessians are the resident ones with one
group (to float rounding; equal on the tiny models, tests/test_offload.py).
"""
from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn

from hprune.errors import HpruneError
from hprune.models.offload import BlockStream, StreamStep
from hprune.obs.hessian import HessianCollector


def calibration_batches(calib: Any) -> tuple[list[dict[str, torch.Tensor]], list[int]]:
    """The set's samples as the transformer calls that produced them (the rows of one trajectory at
    one step: [uncond, cond] under classifier-free guidance), in capture order, with each call's
    denoising step."""
    traj, step = calib.trajectory.tolist(), calib.step.tolist()
    groups: list[list[int]] = []
    for r in range(len(traj)):
        if groups and traj[groups[-1][0]] == traj[r] and step[groups[-1][0]] == step[r]:
            groups[-1].append(r)
        else:
            groups.append([r])
    batches = [next(calib.batches(len(g), indices=g)) for g in groups]
    return batches, [step[g[0]] for g in groups]


def block_hessians(model: nn.Module, calib: Any, device: torch.device | str,
                   sites: dict[int, dict[str, Sequence[nn.Linear]]], weights: Sequence[float], *,
                   activations: str = "auto", progress: bool = False, desc: str = "calibration",
                   writeback: bool = False) -> Iterator[tuple[StreamStep, dict[str, torch.Tensor]]]:
    """Streams `model` over the set block by block; for every block index in `sites` ({block:
    {site: Linears sharing one input}}) yields (step, {site: (in, in) float32 Hessian}) with the
    block on the device, after it ran on every call (its dense outputs feed the next block unless
    the consumer runs `step.run()` again, e.g. with the block's layers replaced)."""
    batches, steps = calibration_batches(calib)
    if max(steps, default=0) >= len(weights):
        raise HpruneError(f"the calibration set has {max(steps) + 1} steps, the step weights {len(weights)}")
    stream = BlockStream(model, batches, device, activations=activations, progress=progress, desc=desc,
                         writeback=writeback)
    for step in stream:
        here = sites.get(step.index)
        if not here:
            continue
        collector = HessianCollector(here, weights)
        alpha = [0.0]

        def before(k: int) -> None:
            alpha[0] = weights[steps[k]]

        def hook(site: str):
            def pre(_m: nn.Module, args: tuple) -> None:
                collector.add(site, args[0], alpha[0])
            return pre

        handles = [mods[0].register_forward_pre_hook(hook(name)) for name, mods in here.items()]
        try:
            step.run(before)
        finally:
            for h in handles:
                h.remove()
        hs = collector.hessians()
        # Only `hs` holds the Hessians: the consumer frees each as it goes, and none of this block's
        # stay alive while the next block's are collected.
        del collector
        missing = [s for s in here if s not in hs]
        if missing:
            raise HpruneError(f"layer {missing[0]} never ran on the calibration inputs")
        yield step, hs
        del hs
