"""Calibration sets: the transformer inputs seen while a pipeline denoises calibration prompts.

A set is captured by a hook on `pipe.transformer` during real denoising runs (flow-matching Euler
over `num_steps` steps), so it holds exactly what the transformer consumes at each step:

    hidden_states           SD3: (N, C, H, W) latents; FLUX: (N, S, C*4) packed latents
    encoder_hidden_states   (N, T, joint_attention_dim)
    pooled_projections      (N, pooled_projection_dim)
    timestep                (N,) in the model's own scale (SD3: 0..1000, FLUX: 0..1)
    img_ids, txt_ids        FLUX only: (S, 3), (T, 3), shared by all samples
    guidance                FLUX-dev only: (N,)
and per sample: `t` (N,) flow time in [0, 1] (1 = pure noise), `step` (N,) the denoising step
index (0 = first, noisiest), `trajectory` (N,) which prompt/run it came from. `final` holds each
trajectory's denoised latent (n_traj, ...) in the transformer's input layout: the model's own
generation, which distillation re-noises at fresh timesteps.

Stored as one safetensors file; its metadata holds the format tag, the model family and dims
(checked against the model that uses the set) and the prompts. The built-in tiny models have no
text encoder: their sets use seeded stand-in prompt embeddings, through the same capture path.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn

from hprune.errors import CheckpointError, HpruneError

CALIB_FORMAT = "hprune.calib/1"
_SHARED = ("img_ids", "txt_ids")  # not per-sample


@dataclass
class CalibrationSet:
    family: str  # "sd3" | "flux"
    inputs: dict[str, torch.Tensor]  # transformer kwargs; per-sample tensors have N leading
    t: torch.Tensor  # (N,) float32 flow time in [0, 1]
    step: torch.Tensor  # (N,) int64 denoising step index
    trajectory: torch.Tensor  # (N,) int64
    num_steps: int
    meta: dict[str, Any] = field(default_factory=dict)
    final: torch.Tensor | None = None  # (n_traj, ...) denoised latents, transformer input layout

    def __len__(self) -> int:
        return int(self.t.shape[0])

    def fingerprint(self) -> str:
        """A content fingerprint of every tensor in the set (hprune.owned.tensor_digest): a resume
        with another calibration set of the same size is told apart."""
        from hprune.owned import tensor_digest

        named = [(f"inputs/{k}", v) for k, v in sorted(self.inputs.items())]
        named += [("t", self.t), ("step", self.step), ("trajectory", self.trajectory)]
        if self.final is not None:
            named.append(("final", self.final))
        return tensor_digest(named)

    # -- use ---------------------------------------------------------------------------------
    def batches(self, batch_size: int = 4, device: torch.device | str | None = None,
                dtype: torch.dtype | None = None, indices: Sequence[int] | None = None
                ) -> Iterator[dict[str, torch.Tensor]]:
        """Transformer kwargs in batches of `batch_size` samples (in order, or of `indices`)."""
        idx = torch.arange(len(self)) if indices is None else torch.as_tensor(list(indices))
        for s in range(0, len(idx), batch_size):
            sel = idx[s:s + batch_size]
            yield {k: _to(v if k in _SHARED else v[sel], device, dtype) for k, v in self.inputs.items()}

    def subset(self, indices: Sequence[int]) -> "CalibrationSet":
        """The samples `indices`. Trajectory ids are kept (they name each run's noise seed); `final`
        keeps the rows of the trajectories still present, so that row j stays the j-th trajectory
        in id order, as `prompt_embeddings` counts them."""
        sel = torch.as_tensor(list(indices), dtype=torch.long)
        traj = self.trajectory[sel]
        final = self.final
        if final is not None:
            ids = torch.unique(self.trajectory, sorted=True)
            final = final[torch.searchsorted(ids, torch.unique(traj, sorted=True))]
        return CalibrationSet(self.family, {k: v if k in _SHARED else v[sel] for k, v in self.inputs.items()},
                              self.t[sel], self.step[sel], traj, self.num_steps, dict(self.meta), final)

    def latent_size(self) -> int:
        """The side of the latent images, in latent pixels (SD3: the latents' width; FLUX: from
        the packed latents' ids, 2 latent pixels per token a side)."""
        if self.family == "sd3":
            return int(self.inputs["hidden_states"].shape[-1])
        return int(self.inputs["img_ids"][:, 2].max().item() + 1) * 2

    def image_tokens(self, patch_size: int) -> int:
        """Image tokens the transformer sees per sample: SD3 (latent side / `patch_size`)^2, FLUX
        the packed sequence length (its patches are packed before the transformer)."""
        x = self.inputs["hidden_states"]
        if self.family == "flux":
            return int(x.shape[1])
        return (int(x.shape[-2]) // patch_size) * (int(x.shape[-1]) // patch_size)

    def record_size(self, vae_scale: int, patch_size: int) -> None:
        """Records in `meta` the image size the set was captured at: vae_scale (pixels per latent
        pixel), image_size (px), latent_size and tokens (image tokens per sample)."""
        latent = self.latent_size()
        self.meta.update(vae_scale=int(vae_scale), image_size=latent * int(vae_scale), latent_size=latent,
                         tokens=self.image_tokens(patch_size))

    def prompt_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-trajectory conditioning, for re-running the denoising loop (e.g. on a partly pruned
        model): (n, T, D) prompt embeddings and (n, D_pooled) pooled ones, taken from each
        trajectory's first step (its last row: the conditional one under classifier-free guidance)."""
        emb, pooled = [], []
        for traj in torch.unique(self.trajectory, sorted=True):
            rows = torch.nonzero((self.trajectory == traj) & (self.step == 0)).flatten()
            r = int(rows[-1])
            emb.append(self.inputs["encoder_hidden_states"][r])
            pooled.append(self.inputs["pooled_projections"][r])
        return torch.stack(emb), torch.stack(pooled)

    def check_fits(self, model: nn.Module) -> None:
        """Raises HpruneError if the set was made for a different kind of model."""
        from hprune.models import get_adapter

        fam = get_adapter(model).family
        cfg = model.config
        if fam != self.family:
            raise HpruneError(f"calibration set is for a {self.family} model, not {fam}")
        want = {"joint_attention_dim": cfg.joint_attention_dim, "pooled_projection_dim": cfg.pooled_projection_dim,
                "in_channels": cfg.in_channels}
        got = {"joint_attention_dim": self.inputs["encoder_hidden_states"].shape[-1],
               "pooled_projection_dim": self.inputs["pooled_projections"].shape[-1],
               "in_channels": self.inputs["hidden_states"].shape[1 if fam == "sd3" else -1]}
        bad = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
        if bad:
            k, (g, w) = next(iter(bad.items()))
            raise HpruneError(f"calibration set does not fit the model: {k} is {g} in the set, {w} in the model")

    # -- files -------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        from hprune.io import check_output, save_safetensors

        if overwrite and os.path.exists(path):
            check_output(path, overwrite, kind="file")  # replaces only a file hprune wrote
        tensors = {f"in.{k}": v for k, v in self.inputs.items()}  # written a tensor at a time
        tensors.update({"t": self.t.float().cpu(), "step": self.step.long().cpu(),
                        "trajectory": self.trajectory.long().cpu()})
        if self.final is not None:
            tensors["final"] = self.final
        meta = {"format": CALIB_FORMAT, "family": self.family, "num_steps": str(self.num_steps),
                "meta": json.dumps(self.meta)}
        path = Path(path)
        save_safetensors(tensors, path, meta, overwrite=overwrite)  # the same set gives the same bytes
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CalibrationSet":
        from safetensors import safe_open

        from hprune.io import check_safetensors

        path = Path(path)
        header = check_safetensors(path)
        meta = header.get("__metadata__") or {}
        if meta.get("format") != CALIB_FORMAT:
            raise CheckpointError(f"{path}: not an hprune calibration set (format {meta.get('format')!r}, "
                                  f"expected {CALIB_FORMAT!r})")
        try:
            with safe_open(str(path), framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            extra = json.loads(meta.get("meta", "{}"))
            num_steps = int(meta["num_steps"])
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"{path}: corrupted calibration set ({exc})") from None
        inputs = {k[3:]: v for k, v in tensors.items() if k.startswith("in.")}
        for need in ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"):
            if need not in inputs:
                raise CheckpointError(f"{path}: corrupted calibration set (no {need!r})")
        return cls(meta["family"], inputs, tensors["t"], tensors["step"], tensors["trajectory"], num_steps, extra,
                   tensors.get("final"))


def _to(v: torch.Tensor, device: Any, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is not None and v.is_floating_point():
        v = v.to(dtype)
    return v.to(device) if device is not None else v


@torch.no_grad()
def check_image_size(pipe: Any, height: int | None, width: int | None) -> None:
    """Refuses an image size the pipeline cannot denoise: it must be a positive multiple of the
    VAE's downscale times the transformer's patch size (one latent patch per token)."""
    step = int(getattr(pipe, "vae_scale_factor", 1)) * int(getattr(pipe.transformer.config, "patch_size", 1) or 1)
    for name, v in (("height", height), ("width", width)):
        if v is not None and (v < 1 or v % step):
            raise HpruneError(f"image {name} {v} px: it must be a positive multiple of {step} for this model "
                              f"(VAE scale x patch size), e.g. {max(step, v // step * step)}")


def capture(pipe: Any, *, prompts: Sequence[str] | None = None, prompt_embeds: torch.Tensor | None = None,
            pooled_prompt_embeds: torch.Tensor | None = None, num_steps: int = 8, seed: int = 0,
            guidance_scale: float | None = None, height: int | None = None, width: int | None = None,
            progress: bool = True, meta: dict[str, Any] | None = None) -> CalibrationSet:
    """Runs `pipe` once per prompt and records every transformer call's inputs.

    Give either `prompts` (needs the pipeline's text encoders) or `prompt_embeds` (n, T, D) and
    `pooled_prompt_embeds` (n, D_pooled). Each prompt is its own trajectory with its own noise
    (seed + index). With classifier-free guidance the pipeline batches [uncond, cond]; both rows
    are kept (the transformer sees both).

    Under torchrun the prompts are dealt out (prompt i to rank i mod N) and the trajectories
    gathered: every rank returns the whole set, the same as one process captures. Collective:
    every rank must call it."""
    from hprune.report import tqdm

    from hprune import dist as hdist
    from hprune.models import get_adapter

    model = pipe.transformer
    fam = get_adapter(model).family
    if prompts is None and prompt_embeds is None:
        raise HpruneError("capture needs prompts or prompt embeddings")
    n = len(prompts) if prompts is not None else prompt_embeds.shape[0]
    check_image_size(pipe, height, width)
    records: list[dict[str, torch.Tensor]] = []

    def hook(_mod, _args, kwargs):
        records.append({k: v.detach().cpu().clone() for k, v in kwargs.items()
                        if isinstance(v, torch.Tensor) and k != "joint_attention_kwargs"})

    h = model.register_forward_pre_hook(hook, with_kwargs=True)
    runs: list[tuple[int, list[dict[str, torch.Tensor]], torch.Tensor]] = []  # (prompt, calls, final)
    mine = range(hdist.rank(), n, hdist.world_size())
    try:
        for i in tqdm(mine, desc="calibration", unit="prompt", disable=not (progress and hdist.rank() == 0)):
            records.clear()
            kw: dict[str, Any] = dict(num_inference_steps=num_steps, output_type="latent",
                                      generator=torch.Generator().manual_seed(seed + i))
            if guidance_scale is not None:
                kw["guidance_scale"] = guidance_scale
            if height is not None:
                kw["height"], kw["width"] = height, width or height
            if prompts is not None:
                kw["prompt"] = prompts[i]
            else:
                p = next(model.parameters())
                kw["prompt_embeds"] = prompt_embeds[i:i + 1].to(p.device, p.dtype)
                kw["pooled_prompt_embeds"] = pooled_prompt_embeds[i:i + 1].to(p.device, p.dtype)
                if fam == "sd3":  # used only if the pipeline applies classifier-free guidance
                    kw["negative_prompt_embeds"] = torch.zeros_like(kw["prompt_embeds"])
                    kw["negative_pooled_prompt_embeds"] = torch.zeros_like(kw["pooled_prompt_embeds"])
            final = pipe(**kw).images.detach().float().cpu()
            runs.append((i, list(records), final))
    finally:
        h.remove()
    if hdist.active():
        import torch.distributed as dist

        gathered: list[Any] = [None] * hdist.world_size()
        dist.all_gather_object(gathered, runs)
        runs = sorted((r for part in gathered for r in part), key=lambda r: r[0])
    rows: list[dict[str, torch.Tensor]] = []
    t_all, step_all, traj_all, finals = [], [], [], []
    scale = 1000.0 if fam == "sd3" else 1.0
    for i, calls, final in runs:
        finals.append(final)
        for s, rec in enumerate(calls):
            b = rec["hidden_states"].shape[0]
            rows.append(rec)
            t_all.append(rec["timestep"].float().reshape(-1).expand(b) / scale)
            step_all.append(torch.full((b,), s, dtype=torch.long))
            traj_all.append(torch.full((b,), i, dtype=torch.long))
    if not rows:
        raise HpruneError("the pipeline never called its transformer")
    # diffusers expands every per-sample input (timestep, guidance) to the batch; ids are shared
    inputs = {k: rows[0][k] if k in _SHARED else torch.cat([r[k] for r in rows]) for k in rows[0]}
    info = {"prompts": list(prompts) if prompts is not None else None, "seed": seed,
            "guidance_scale": guidance_scale, **(meta or {})}
    return CalibrationSet(fam, inputs, torch.cat(t_all), torch.cat(step_all), torch.cat(traj_all), num_steps, info,
                          torch.cat(finals))


def synthetic(model: nn.Module, n_prompts: int = 4, num_steps: int = 8, seed: int = 0, text_len: int = 16,
              latent_size: int | None = None, progress: bool = False, size: int | None = None,
              vae_scale: int | None = None) -> CalibrationSet:
    """A seeded calibration set for a model without text encoders (the built-in tiny models):
    stand-in prompt embeddings denoised by the model itself through a diffusers pipeline with a
    tiny VAE (latents only; nothing is decoded). `size` is the image size in pixels, `latent_size`
    the latent one (give at most one; default: the pipeline's). `vae_scale` is the pixels per
    latent pixel that `size` assumes: the model's real VAE (hprune.pipelines.FAMILY_VAE_SCALE for a
    real SD3/FLUX transformer); None: the stand-in VAE's own (the tiny models' VAE). The set's
    meta records vae_scale, image_size, latent_size and tokens (image tokens per sample)."""
    from hprune.pipelines import build_pipeline, stand_in_prompts

    pipe = build_pipeline(model)
    emb = stand_in_prompts(model, n_prompts, text_len=text_len, seed=seed)
    own = int(pipe.vae_scale_factor)
    scale = own if vae_scale is None else int(vae_scale)
    from hprune.models import get_adapter

    # FLUX packs 2x2 latent pixels per token (its config's patch_size is 1)
    patch = 2 if get_adapter(model).family == "flux" else int(getattr(model.config, "patch_size", 1) or 1)
    if size is not None and latent_size is None and scale != own:
        step = scale * patch
        if size < 1 or size % step:
            raise HpruneError(f"image size {size} px: it must be a positive multiple of {step} for this model "
                              f"(VAE scale {scale} x patch {patch}), e.g. {max(step, size // step * step)}")
        latent_size = size // scale
    if latent_size is not None:
        size = latent_size * own  # what the stand-in pipeline takes to make latents of that size
    cal = capture(pipe, prompt_embeds=emb["prompt_embeds"], pooled_prompt_embeds=emb["pooled_prompt_embeds"],
                  num_steps=num_steps, seed=seed, height=size, width=size, progress=progress,
                  meta={"source": "synthetic", "text_len": text_len})
    cal.record_size(scale, patch)
    return cal


def size_vae_scale(name: str) -> int | None:
    """The pixels per latent pixel that a `size` for model `name` assumes when calibrated without
    its pipeline: a tiny built-in's VAE is the stand-in (None: the stand-in pipeline's own), any
    other transformer's is the SD3 / FLUX one."""
    from hprune.models.registry import BUILTINS
    from hprune.pipelines import FAMILY_VAE_SCALE

    b = BUILTINS.get(name)
    return None if b is not None and b.tiny else FAMILY_VAE_SCALE


def builtin_calibration(name: str, model: nn.Module, n_prompts: int = 4, num_steps: int = 8, seed: int = 0,
                        **synthetic_kw: Any) -> CalibrationSet:
    """The calibration set a command makes for built-in `name` when none is given: the built-in's
    own (real prompts, e.g. the ShapesBench teacher's captions) where it has a calibration hook,
    else `synthetic` stand-in prompts."""
    from hprune.models.registry import BUILTINS, hook

    b = BUILTINS.get(name)
    if b is not None and b.calibration:
        return hook(b.calibration)(model, n_prompts=n_prompts, num_steps=num_steps, seed=seed)
    synthetic_kw.setdefault("vae_scale", size_vae_scale(name))
    return synthetic(model, n_prompts=n_prompts, num_steps=num_steps, seed=seed, **synthetic_kw)
