"""Sampling ShapesBench images with a (compressed) SD3 transformer in pixel space, and calibration
sets made from those runs.

The model works directly on images: x = 2 * image - 1, (B, 3, 32, 32). Denoising is diffusers'
FlowMatchEulerDiscreteScheduler (flow time 1 = noise) with classifier-free guidance against
all-zero conditioning, computed exactly as StableDiffusion3Pipeline does: each step runs the
batch [unconditional rows; conditional rows] and mixes v = v_u + g (v_c - v_u). The noise of
caption i is `torch.randn((1, 3, H, W), generator=Generator().manual_seed(seed + i))`, which is
what the pipeline draws for a one-prompt call with that seed, so a calibration set recorded here
replays through hprune's pipeline-based loops (OBS-Diff Hessians) on the same trajectories.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from hprune.calib import CalibrationSet
from hprune.errors import HpruneError


def noise_for(n: int, seed: int, size: int = 32, channels: int = 3) -> torch.Tensor:
    """(n, channels, size, size) float32: row i drawn from a generator seeded with seed + i."""
    return torch.cat([torch.randn((1, channels, size, size), generator=torch.Generator().manual_seed(seed + i))
                      for i in range(n)])


def to_image(x: torch.Tensor) -> torch.Tensor:
    """Model space [-1, 1] -> image [0, 1] (clamped), same shape."""
    return ((x.float() + 1) / 2).clamp(0, 1)


def to_model(image: torch.Tensor) -> torch.Tensor:
    return image.float() * 2 - 1


@torch.no_grad()
def sample(model: nn.Module, enc: torch.Tensor, pooled: torch.Tensor, noise: torch.Tensor, *, steps: int = 20,
           guidance: float = 4.0, batch_size: int = 64, record: list[dict[str, torch.Tensor]] | None = None
           ) -> torch.Tensor:
    """Denoises `noise` (B, 3, H, W) under conditioning enc (B, T, D) / pooled (B, P); returns the
    final samples (B, 3, H, W) in model space. With `record` (a list), every transformer call's
    inputs are appended per chunk of `batch_size` captions (rows [uncond; cond] under guidance)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if steps < 1:
        raise HpruneError(f"sampling needs at least one step, got {steps}")
    if not (enc.shape[0] == pooled.shape[0] == noise.shape[0]):
        raise HpruneError(f"batch sizes differ: enc {enc.shape[0]}, pooled {pooled.shape[0]}, noise {noise.shape[0]}")
    p = next(model.parameters())
    dtype = p.dtype if p.is_floating_point() else torch.float32
    outs = []
    for s in range(0, noise.shape[0], batch_size):
        sched = FlowMatchEulerDiscreteScheduler()
        sched.set_timesteps(steps, device=p.device)
        x = noise[s:s + batch_size].to(p.device, torch.float32)
        e = enc[s:s + batch_size].to(p.device, dtype)
        pl = pooled[s:s + batch_size].to(p.device, dtype)
        cfg = guidance > 1
        if cfg:
            e = torch.cat([torch.zeros_like(e), e])
            pl = torch.cat([torch.zeros_like(pl), pl])
        for t in sched.timesteps:
            inp = torch.cat([x, x]) if cfg else x
            kw = dict(hidden_states=inp.to(dtype), encoder_hidden_states=e, pooled_projections=pl,
                      timestep=t.expand(inp.shape[0]))
            if record is not None:
                record.append({k: v.detach().float().cpu().clone() for k, v in kw.items()})
            v = model(**kw, return_dict=False)[0].float()
            if cfg:
                vu, vc = v.chunk(2)
                v = vu + guidance * (vc - vu)
            x = sched.step(v, t, x, return_dict=False)[0]
        outs.append(x.cpu())
    return torch.cat(outs)


def calibration_set(model: nn.Module, enc: torch.Tensor, pooled: torch.Tensor, *, captions: Sequence[str],
                    steps: int = 10, guidance: float = 4.0, seed: int = 0) -> CalibrationSet:
    """A CalibrationSet of the model's own denoising runs for `captions` (one trajectory each, noise
    seed + i), laid out as hprune.calib.capture lays out a pipeline's: per trajectory and step the
    rows [uncond, cond] under guidance, flow time t, step index, trajectory index, and each
    trajectory's final sample."""
    n = len(captions)
    noise = noise_for(n, seed, model.config.sample_size, model.config.in_channels)
    rec: list[dict[str, torch.Tensor]] = []
    final = sample(model, enc, pooled, noise, steps=steps, guidance=guidance, batch_size=n, record=rec)
    cfg = guidance > 1
    rows: dict[str, list[torch.Tensor]] = {k: [] for k in rec[0]}
    t_all, step_all, traj_all = [], [], []
    for i in range(n):
        for s, r in enumerate(rec):
            sel = [i, n + i] if cfg else [i]
            for k, v in r.items():
                rows[k].append(v[sel])
            t_all.append(r["timestep"][sel] / 1000.0)
            step_all.append(torch.full((len(sel),), s, dtype=torch.long))
            traj_all.append(torch.full((len(sel),), i, dtype=torch.long))
    inputs = {k: torch.cat(v) for k, v in rows.items()}
    meta = {"prompts": list(captions), "seed": seed, "guidance_scale": guidance,
            "source": "shapes"}
    return CalibrationSet("sd3", inputs, torch.cat(t_all).float(), torch.cat(step_all), torch.cat(traj_all), steps,
                          meta, final)
