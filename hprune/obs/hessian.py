"""Timestep-aware Hessians: H = Σ_t α_t X_tᵀX_t for the inputs X_t of Linear layers, collected by
hooks while a calibration denoising loop runs, as a running weighted mean in float32.

Step weights (OBS-Diff): α_t = α_min + (α_max - α_min) · w(t) for steps t = 1..T (1 = the first,
noisiest step), with
    uniform          w = 1/2                  (all steps alike)
    linear-decrease  w = (T - t) / (T - 1)
    log-decrease     w = ln(T - t + 1) / ln T (default: early steps weigh more, because errors
                                               made early accumulate over the remaining steps)
    log-increase     w = ln t / ln T
Every token of a call at step t gets weight α_t; H is Σ α_t XᵀX / Σ α_t·(tokens), so its scale
does not depend on how many prompts or tokens were seen.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn as nn

from hprune.errors import HpruneError

WEIGHTINGS = ("uniform", "linear-decrease", "log-decrease", "log-increase")
DEFAULT_WEIGHTING = "log-decrease"


def step_weights(scheme: str, num_steps: int, alpha_min: float = 0.8, alpha_max: float = 1.2) -> list[float]:
    """α_t for t = 1..num_steps (index 0 = the first denoising step), see the module docstring."""
    if scheme not in WEIGHTINGS:
        raise HpruneError(f"unknown weighting {scheme!r}; choose from {', '.join(WEIGHTINGS)}")
    if num_steps < 1:
        raise HpruneError(f"num_steps must be >= 1, got {num_steps}")
    if not (0 <= alpha_min <= alpha_max and alpha_max > 0 and math.isfinite(alpha_max)):
        raise HpruneError(f"need 0 <= alpha_min <= alpha_max, alpha_max > 0; got [{alpha_min}, {alpha_max}]")
    T = num_steps
    out = []
    for t in range(1, T + 1):
        if scheme == "uniform":
            w = 0.5
        elif T == 1:
            w = 1.0
        elif scheme == "linear-decrease":
            w = (T - t) / (T - 1)
        elif scheme == "log-decrease":
            w = math.log(T - t + 1) / math.log(T)
        else:  # log-increase
            w = math.log(t) / math.log(T)
        out.append(alpha_min + (alpha_max - alpha_min) * w)
    return out


class HessianCollector:
    """Hooks that accumulate the weighted input second moment of Linear layers.

    `sites` maps a site name to the Linears that share one input (q/k/v of an attention read the
    same tensor: one Hessian serves all three; the hook sits on the first). While attached, a
    pre-hook on the transformer tracks the denoising step (a new timestep value = the next step;
    call `new_trajectory()` before each denoising run), and every Linear call adds α_step · XᵀX.

        collector = HessianCollector(sites, weights)
        with collector.attached(transformer):
            for run in runs: collector.new_trajectory(); pipe(...)
        H = collector.hessians()        # {site: (in, in) float32}
    """

    def __init__(self, sites: Mapping[str, Sequence[nn.Linear]], weights: Sequence[float]):
        self.sites = {name: list(mods) for name, mods in sites.items()}
        self.weights = [float(w) for w in weights]
        self._sum: dict[str, torch.Tensor] = {}
        self._mass: dict[str, float] = {}
        self._handles: list[Any] = []
        self.step = -1
        self._last_timestep: float | None = None
        self.calls = 0

    # -- step tracking -----------------------------------------------------------------------
    def new_trajectory(self) -> None:
        self.step = -1
        self._last_timestep = None

    def _on_transformer(self, _mod: nn.Module, args: tuple, kwargs: dict) -> None:
        ts = kwargs.get("timestep")
        if ts is None and len(args) > 3:
            ts = args[3]
        value = float(ts.flatten()[0]) if isinstance(ts, torch.Tensor) else float(ts) if ts is not None else None
        # One call per step normally; a second call at the same timestep (true CFG) is the same step.
        if value is None or value != self._last_timestep:
            self.step += 1
            self._last_timestep = value
        if self.step >= len(self.weights):
            raise HpruneError(f"the denoising loop ran more than the {len(self.weights)} steps the "
                              f"step weights were made for")

    def alpha(self) -> float:
        if self.step < 0:
            raise HpruneError("HessianCollector saw a layer call before any transformer call "
                              "(attach it to the transformer that owns the layers)")
        return self.weights[self.step]

    # -- accumulation ------------------------------------------------------------------------
    def add(self, site: str, x: torch.Tensor, alpha: float) -> None:
        """Adds tokens x (..., in) with weight alpha to `site`'s running weighted mean."""
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
        n = x.shape[0]
        if n == 0 or alpha == 0:
            return
        if site not in self._sum:
            self._sum[site] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
            self._mass[site] = 0.0
        old, new = self._mass[site], self._mass[site] + alpha * n
        H = self._sum[site]
        H.mul_(old / new)
        H.addmm_(x.t(), x, alpha=alpha / new)
        self._mass[site] = new

    def _hook(self, site: str):
        def pre_hook(_mod: nn.Module, args: tuple) -> None:
            self.calls += 1
            self.add(site, args[0], self.alpha())
        return pre_hook

    def attach(self, transformer: nn.Module) -> None:
        self.detach()
        self._handles.append(transformer.register_forward_pre_hook(self._on_transformer, with_kwargs=True))
        for site, mods in self.sites.items():
            self._handles.append(mods[0].register_forward_pre_hook(self._hook(site)))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def attached(self, transformer: nn.Module) -> "_Attached":
        return _Attached(self, transformer)

    def reduce(self) -> None:
        """Under torchrun: combines the ranks' running means (each weighted by its mass) so that
        every rank holds the Hessians of all the trajectories the ranks ran between them. Collective:
        every rank must call it, in the same state (each site reduced once)."""
        from hprune import dist as hdist

        if not hdist.active() or not self.sites:
            return
        sites = sorted(self.sites)  # the same order on every rank
        dev = self.sites[sites[0]][0].weight.device
        masses = hdist.total(torch.tensor([self._mass.get(s, 0.0) for s in sites], dtype=torch.float64, device=dev))
        for site, mass in zip(sites, masses.tolist()):
            k = self.sites[site][0].in_features
            H = self._sum.pop(site, None)
            H = torch.zeros(k, k, dtype=torch.float32, device=dev) if H is None else H.mul_(self._mass.get(site, 0.0))
            hdist.total_(H)  # Σ_ranks mass_r · H_r, in place (a Hessian can be GBs)
            if mass > 0:
                self._sum[site], self._mass[site] = H.div_(mass), mass
            else:
                self._mass.pop(site, None)

    def hessians(self) -> dict[str, torch.Tensor]:
        """{site: (in, in) float32}; sites whose layer never ran are missing."""
        return dict(self._sum)

    def mass(self, site: str) -> float:
        """Σ α·tokens accumulated for `site`."""
        return self._mass.get(site, 0.0)


class _Attached:
    def __init__(self, collector: HessianCollector, transformer: nn.Module):
        self.c, self.t = collector, transformer

    def __enter__(self) -> HessianCollector:
        self.c.attach(self.t)
        return self.c

    def __exit__(self, *exc: Any) -> None:
        self.c.detach()


# -- the calibration denoising loop -----------------------------------------------------------------
def calibration_schedule(calib: Any) -> list[float]:
    """The flow times (sigmas) of the set's denoising steps, read from its first trajectory, so a
    re-run follows the same schedule whatever scheduler config captured it."""
    first = int(calib.trajectory.min())
    sig = []
    for s in range(calib.num_steps):
        rows = torch.nonzero((calib.trajectory == first) & (calib.step == s)).flatten()
        if len(rows) == 0:
            raise HpruneError(f"calibration set has no step {s} for trajectory {first}: not a full denoising run")
        sig.append(float(calib.t[rows[0]]))
    return sig


def negative_embeddings(calib: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-trajectory unconditional embeddings when the set was captured with classifier-free
    guidance (two rows per step: [uncond, cond]); None otherwise."""
    emb, pooled = [], []
    for traj in torch.unique(calib.trajectory, sorted=True):
        rows = torch.nonzero((calib.trajectory == traj) & (calib.step == 0)).flatten()
        if len(rows) < 2:
            return None
        r = int(rows[0])
        emb.append(calib.inputs["encoder_hidden_states"][r])
        pooled.append(calib.inputs["pooled_projections"][r])
    return torch.stack(emb), torch.stack(pooled)


def _image_size(calib: Any, family: str, vae_scale_factor: int) -> int:
    if family == "sd3":
        return int(calib.inputs["hidden_states"].shape[-1]) * vae_scale_factor
    ids = calib.inputs["img_ids"]
    return int(ids[:, 2].max().item() + 1) * 2 * vae_scale_factor


@torch.no_grad()
def run_calibration_loop(model: nn.Module, calib: Any, collector: HessianCollector, *, pipe: Any = None,
                         trajectories: Iterable[int] | None = None, progress: bool = False,
                         desc: str = "calibration") -> None:
    """Re-runs the set's denoising trajectories on `model` (its current, possibly partly pruned
    state) with `collector` attached: same prompt embeddings, noise seeds, schedule, guidance and
    size as when the set was captured, so the hooks see the trajectory of the current model.

    Runs a diffusers StableDiffusion3Pipeline / FluxPipeline around `model` with
    output_type="latent": nothing is decoded, so the tiny VAE of `build_pipeline` serves real
    checkpoints too (only its scale factor is used, to turn the latent size into pixels).

    Under torchrun the trajectories are dealt out (trajectory k to rank k mod N) and the Hessians
    combined at the end (`HessianCollector.reduce`): N ranks calibrate ~N x faster and all end
    with the same Hessians. Collective: every rank must call it."""
    from hprune.report import tqdm

    from hprune import dist as hdist
    from hprune.models import get_adapter
    from hprune.pipelines import build_pipeline

    fam = get_adapter(model).family
    p = next(model.parameters())
    if pipe is None:
        pipe = build_pipeline(model)
        pipe.vae.to(p.device)  # the pipeline picks its execution device from its modules
    emb, pooled = calib.prompt_embeddings()
    traj_ids = [int(t) for t in torch.unique(calib.trajectory, sorted=True)]  # row j of emb = traj_ids[j]
    neg = negative_embeddings(calib) if fam == "sd3" else None
    sigmas = calibration_schedule(calib)
    size = _image_size(calib, fam, pipe.vae_scale_factor)
    seed = int(calib.meta.get("seed", 0) or 0)
    guidance = calib.meta.get("guidance_scale")
    ids = list(range(emb.shape[0]) if trajectories is None else trajectories)
    ids = ids[hdist.rank()::hdist.world_size()]
    with collector.attached(model):
        for i in tqdm(ids, desc=desc, unit="trajectory", disable=not progress, leave=False):
            collector.new_trajectory()
            kw: dict[str, Any] = dict(prompt_embeds=emb[i:i + 1].to(p.device, p.dtype),
                                      pooled_prompt_embeds=pooled[i:i + 1].to(p.device, p.dtype),
                                      sigmas=sigmas, num_inference_steps=len(sigmas), output_type="latent",
                                      height=size, width=size, generator=torch.Generator().manual_seed(seed + traj_ids[i]))
            if guidance is not None:
                kw["guidance_scale"] = guidance
            if fam == "sd3":  # only read when the pipeline applies classifier-free guidance
                if neg is not None:
                    kw["negative_prompt_embeds"] = neg[0][i:i + 1].to(p.device, p.dtype)
                    kw["negative_pooled_prompt_embeds"] = neg[1][i:i + 1].to(p.device, p.dtype)
                else:
                    kw["negative_prompt_embeds"] = torch.zeros_like(kw["prompt_embeds"])
                    kw["negative_pooled_prompt_embeds"] = torch.zeros_like(kw["pooled_prompt_embeds"])
            pipe(**kw)
    collector.reduce()
