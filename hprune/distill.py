"""Distillation of a pruned student from its unpruned teacher (HierarchicalPrune stage 2).

Loss:  L = λ_out ‖v_s − v_t‖² + λ_feat · mean_i ‖h_s(i) − h_t(i)‖² + λ_task ‖v_s − (ε − x0)‖²
with v the predicted velocity, h(i) the image-stream output of block i (for every block the
student still has; indices match the teacher's because pruning keeps them stable), and the task
term the flow-matching target. Training inputs re-noise the teacher's own generations x0 (the
calibration set's final latents) at timesteps t ~ logit-normal, x_t = (1 − t) x0 + t ε, as in SD3
training; batch k is a pure function of (seed, k), so a resumed run sees the same data.

Which parameters train, and how fast (printed and saved as the *schedule*):
- **PWP** (Positional Weight Preservation): the blocks before the first pruned block, and the
  input embedders before them, are frozen.
- **SGDistill** (Sensitivity-Guided Distillation): every other block parameter's update is scaled
  by a normalised inverse of its sensitivity ΔP (its component's ΔP where the table has it, else
  its block's). `sgd_scale="inverse"` (the paper's ∝ 1/ΔP):
  s = (1/ΔP − 1/ΔP_max) / (1/ΔP_min − 1/ΔP_max); `sgd_scale="log"`, the same ordering and end
  points on a log axis: s = log(ΔP_max/ΔP) / log(ΔP_max/ΔP_min), which keeps the middle of a
  wide ΔP range training instead of pressing it towards 0. Either way the least sensitive unit
  trains at the full rate and the most sensitive is frozen (s = 0); scales below `sgd_floor` are
  frozen too. `sgd_budget="mean"` (the default) keeps the learning-rate budget of plain PWP: the
  rate of the sensitivity-scaled units is lr · s / s̄, with s̄ their parameter-weighted mean scale
  (the multiplier 1/s̄ capped at SGD_MAX_LR_SCALE), so SGDistill moves updates from sensitive to
  insensitive units instead of shrinking them all; every other trainable parameter keeps lr.
  `sgd_budget="fixed"` applies s to lr as it is, which on ShapesBench lowers the mean rate to
  0.15–0.4 lr and loses 13 % of the score where PWP alone loses 3 % (README, "Measuring quality").
  Applied through SensitivityAdamW (one fused step for all scales). On by default when more than
  `r_thres` = 25 % of the parameters were removed.

Robustness: atomic checkpoints every `checkpoint_every` steps (weights, optimizer moments and the
loss history in safetensors + JSON; no pickles), `resume=True` continues from the latest one and
ends with the same weights as an uninterrupted run; a non-finite loss stops the run with the step
and the loss terms. Distributed: under torchrun the student is sharded with FSDP2 and every rank
takes its slice of the same global batch, so N processes follow the 1-process loss trajectory.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from hprune import dist
from hprune.calib import CalibrationSet
from hprune.errors import HpruneError
from hprune.models.adapters import get_adapter, model_class_name
from hprune.models.blocks import RemovedBlock
from hprune.models.stats import param_count

# Parameters outside the blocks that feed the first block (frozen by PWP).
_INPUT_MODULES = ("pos_embed.", "x_embedder.", "time_text_embed.", "context_embedder.")
SGD_SCALES = ("inverse", "log")
SGD_BUDGETS = ("mean", "fixed")
SGD_MAX_LR_SCALE = 10.0  # so that a few outlier units cannot multiply the rate without bound
# Block submodule prefix -> component name in the sensitivity table.
_COMPONENT_OF = (("attn2.", "attn2"), ("attn.", "attn"), ("ff_context.", "context_ff"), ("ff.", "ff"),
                 ("proj_mlp.", "mlp"))


def _check_sgd_choices(scale: str, budget: str) -> None:
    if scale not in SGD_SCALES:
        raise HpruneError(f"sgd_scale must be one of {', '.join(SGD_SCALES)}, not {scale!r}")
    if budget not in SGD_BUDGETS:
        raise HpruneError(f"sgd_budget must be one of {', '.join(SGD_BUDGETS)}, not {budget!r}")


@dataclass
class DistillConfig:
    steps: int = 200
    batch_size: int = 4  # global batch (split across ranks)
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    lambda_out: float = 1.0
    lambda_feat: float = 0.1
    lambda_task: float = 0.0
    logit_mean: float = 0.0  # t = sigmoid(N(logit_mean, logit_std^2))
    logit_std: float = 1.0
    pwp: bool = True
    sgd: bool | str = "auto"  # True, False, or "auto": on when the removed ratio exceeds r_thres
    r_thres: float = 0.25
    sgd_floor: float = 0.0
    sgd_scale: str = "inverse"  # "inverse" (s ∝ 1/ΔP, min-max normalised) or "log" (see the module docstring)
    sgd_budget: str = "mean"  # "mean": lr is the units' mean rate; "fixed": lr · s as it is
    sgd_granularity: str = "component"  # or "block"
    grad_clip: float | None = 1.0
    autocast: bool | None = None  # bf16 autocast; default: on for CUDA, off on the CPU
    grad_checkpointing: bool = False
    checkpoint_every: int = 0
    checkpoint_dir: str | None = None
    keep_checkpoints: int = 2
    resume: bool = False
    seed: int = 0
    backend: str | None = None  # optimizer kernel backend (None: automatic)
    # "adamw": SensitivityAdamW (moments in the parameters' dtype, 8 bytes/param in fp32);
    # "adamw8bit": bitsandbytes AdamW8bit (8-bit moments, ~2 bytes/param), one group per scale
    optimizer: str = "adamw"

    def validate(self) -> None:
        if self.steps < 0 or self.batch_size < 1:
            raise HpruneError("steps must be >= 0 and batch_size >= 1")
        if not math.isfinite(self.lr) or self.lr <= 0:
            raise HpruneError(f"lr must be a positive number, got {self.lr}")
        for name in ("weight_decay", "eps", "lambda_out", "lambda_feat", "lambda_task", "logit_std", "r_thres",
                     "sgd_floor"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise HpruneError(f"{name} must be a finite number >= 0, got {v}")
        if self.checkpoint_every < 0:
            raise HpruneError(f"checkpoint_every must be >= 0 (0: no checkpoints), got {self.checkpoint_every}")
        if self.keep_checkpoints < 1:
            raise HpruneError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if self.sgd not in (True, False, "auto"):
            raise HpruneError(f"sgd must be True, False or 'auto', not {self.sgd!r}")
        _check_sgd_choices(self.sgd_scale, self.sgd_budget)
        if self.sgd_granularity not in ("component", "block"):
            raise HpruneError(f"sgd_granularity must be component or block, not {self.sgd_granularity!r}")
        if self.checkpoint_every and not self.checkpoint_dir:
            raise HpruneError("checkpoint_every needs checkpoint_dir")
        if self.resume and not self.checkpoint_dir:
            raise HpruneError("resume needs checkpoint_dir")
        if self.optimizer not in OPTIMIZERS:
            raise HpruneError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, not {self.optimizer!r}")
        if self.optimizer == "adamw8bit" and (self.checkpoint_every or self.resume):
            raise HpruneError("optimizer adamw8bit: its 8-bit states are not checkpointed (yet); use optimizer "
                              "adamw to checkpoint or resume")


OPTIMIZERS = ("adamw", "adamw8bit")


def adamw8bit(student: nn.Module, scales: dict[str, float], lr: float, betas: tuple[float, float], eps: float,
              weight_decay: float) -> torch.optim.Optimizer:
    """bitsandbytes' AdamW8bit for the student with SensitivityAdamW's semantics: parameter p
    steps with learning rate lr · s_p (weight decay included, as torch AdamW does per group) and
    s_p = 0 leaves p out. Moments are 8-bit (block-wise dynamic quantisation) for tensors of
    4096 values or more, fp32 below (bitsandbytes' min_8bit_size). Runs on CPU and CUDA."""
    try:
        import bitsandbytes as bnb
    except ImportError as exc:  # pragma: no cover - bitsandbytes is a dependency
        raise HpruneError(f"optimizer adamw8bit needs bitsandbytes ({exc})") from None
    groups: dict[float, list[nn.Parameter]] = {}
    for n, p in student.named_parameters():
        if scales.get(n, 0.0) > 0:
            groups.setdefault(float(scales[n]), []).append(p)
    return bnb.optim.AdamW8bit([{"params": ps, "lr": lr * s} for s, ps in sorted(groups.items())], lr=lr,
                               betas=betas, eps=eps, weight_decay=weight_decay)


@dataclass
class DistillResult:
    history: list[dict[str, float]]  # per step: step, loss, out, feat, task
    schedule: dict[str, Any]  # what trains at which scale (see training_schedule)
    seconds: float
    samples_per_s: float
    resumed_from: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# ---- data ---------------------------------------------------------------------------------------

class DistillData:
    """Training batches from a calibration set's final latents (the teacher's generations),
    re-noised at logit-normal timesteps. `batch(step, n)` is a pure function of (seed, step)."""

    def __init__(self, calib: CalibrationSet, seed: int = 0, logit_mean: float = 0.0, logit_std: float = 1.0):
        if calib.final is None:
            raise HpruneError("the calibration set has no final latents (captured by an older hprune?): "
                              "capture it again with `hprune calib`")
        self.calib, self.seed = calib, seed
        self.logit_mean, self.logit_std = logit_mean, logit_std
        self.x0 = calib.final
        self.emb, self.pooled = calib.prompt_embeddings()
        self.guidance = calib.inputs["guidance"][0].item() if "guidance" in calib.inputs else None
        self.scale = 1000.0 if calib.family == "sd3" else 1.0

    def batch(self, step: int, n: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Returns (transformer inputs, flow-matching target ε − x0) of global batch `step`."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        idx = torch.randint(self.x0.shape[0], (n,), generator=g)
        x0 = self.x0[idx]
        eps = torch.randn(x0.shape, generator=g)
        t = torch.sigmoid(self.logit_mean + self.logit_std * torch.randn(n, generator=g))
        tb = t.view(-1, *([1] * (x0.dim() - 1)))
        inputs = {"hidden_states": (1 - tb) * x0 + tb * eps, "encoder_hidden_states": self.emb[idx],
                  "pooled_projections": self.pooled[idx], "timestep": t * self.scale}
        for k in ("img_ids", "txt_ids"):
            if k in self.calib.inputs:
                inputs[k] = self.calib.inputs[k]
        if self.guidance is not None:
            inputs["guidance"] = torch.full((n,), self.guidance)
        return inputs, eps - x0


# ---- the student -------------------------------------------------------------------------------

def pruned_student(teacher: nn.Module, plan: Any, *, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None, share: bool = False) -> nn.Module:
    """A copy of `teacher` with `plan` (hprune.models.PrunePlan) applied, made without a full copy
    of the teacher: the copy first shares the teacher's tensors (new Parameter / tensor objects
    over the same storage), the planned pieces are removed from it (host surgery: whole
    submodules go; only a partly pruned block's AdaLN modulation rows are sliced into new, small
    tensors), and only then are the kept tensors copied, straight to
    `device` (default: where they are) and, for floating-point ones, `dtype` (default: as
    stored). Peak extra memory: the student's bytes, never the teacher's (a memory-mapped teacher
    is read, not duplicated).

    share=True skips the copy: the student keeps the teacher's storage for what it kept, which
    suits read-only use (block-by-block quantisation replaces layers, saving reads them) and
    costs no memory beyond the sliced modulation rows; training it, or changing it in place, would change the teacher.
    The teacher is left unchanged either way."""
    import copy

    from hprune.models import apply_plan

    memo: dict[int, Any] = {}
    for t in teacher.parameters():
        memo[id(t)] = nn.Parameter(t.detach(), requires_grad=t.requires_grad)
    for t in teacher.buffers():
        memo[id(t)] = t.detach()
    student = copy.deepcopy(teacher, memo)  # modules and small attributes copied, tensors shared
    apply_plan(student, plan)
    if share:
        return student
    done: dict[int, torch.Tensor] = {}  # by the shared object: tied tensors stay tied

    def own(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in done:
            new = t.detach().to(device=device if device is not None else t.device,
                                dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype, copy=True)
            done[id(t)] = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new
        return done[id(t)]

    with torch.no_grad():
        for m in student.modules():
            for group in (m._parameters, m._buffers):
                for name, t in group.items():
                    if t is not None:
                        group[name] = own(t)
    return student


def stored_like(student: nn.Module, teacher: nn.Module, device: torch.device | str | None = None) -> nn.Module:
    """Puts the student's floating-point tensors back in the dtype the teacher stores under the
    same name (the teacher's first floating dtype for a name it lacks), on `device` if given: a
    student trained in the compute dtype (fp32 on a CPU) is saved like its teacher. In place;
    returns `student`."""
    from hprune.models.offload import storage_dtype

    want = {n: t.dtype for n, t in teacher.state_dict().items()}
    default = storage_dtype(teacher)
    with torch.no_grad():
        for prefix, m in student.named_modules():
            for group in (m._parameters, m._buffers):
                for name, t in group.items():
                    if t is None:
                        continue
                    dt = want.get(f"{prefix}.{name}" if prefix else name, default) if t.is_floating_point() else t.dtype
                    if t.dtype != dt or (device is not None and t.device != torch.device(device)):
                        t.data = t.data.to(device=device if device is not None else t.device, dtype=dt)
    return student


# ---- what trains -------------------------------------------------------------------------------

def first_pruned_block(model: nn.Module) -> int | None:
    ad = get_adapter(model)
    pruned = [b.index for b in ad.blocks(model) if b.removed]
    return min(pruned) if pruned else None


def _component(rel_name: str) -> str:
    for prefix, comp in _COMPONENT_OF:
        if rel_name.startswith(prefix):
            return comp
    return "block"


def training_schedule(student: nn.Module, table: Any = None, *, pwp: bool = True, sgd: bool = False,
                      granularity: str = "component", floor: float = 0.0, scale: str = "inverse",
                      budget: str = "mean") -> dict[str, Any]:
    """Per-parameter update scales and a summary.

    Returns {"scales": {param name: s in [0, 1]}, "lr_scale": multiplier of the base lr, "rows": [per
    block/component: index, component, dP, scale, params, why]}, "first_pruned": i, ...}; a
    parameter's rate is lr · lr_scale · scales[name]. With `sgd` a SensitivityTable of the unpruned
    model is required; `scale` ("inverse" | "log") and `budget` ("mean" | "fixed") are the module
    docstring's sgd_scale and sgd_budget, with DistillConfig's defaults."""
    ad = get_adapter(student)
    first = first_pruned_block(student)
    frozen_before = first if (pwp and first is not None) else 0
    block_of: dict[str, tuple[int, str]] = {}
    for info in ad.blocks(student):
        for n, _ in ad.get_block(student, info.index).named_parameters():
            block_of[f"{info.name}.{n}"] = (info.index, _component(n) if granularity == "component" else "block")
    if sgd and table is None:
        raise HpruneError("SGDistill needs the sensitivity table (ΔP) of the unpruned model: pass table= "
                          "(hprune.probe.probe_sensitivity of the teacher; CLI: --sensitivity FILE from "
                          "`hprune probe`), or turn SGDistill off (sgd=False; CLI: --sgd off)")

    def delta(i: int, comp: str) -> float:
        d = table.blocks[i]["delta"]
        return d.get(comp, d.get("block", float("nan")))

    numel = dict((n, p.numel()) for n, p in student.named_parameters())
    scales: dict[str, float] = {}
    units: dict[tuple[int, str], list[str]] = {}
    for name, _ in student.named_parameters():
        if name in block_of:
            i, comp = block_of[name]
            if i < frozen_before:
                scales[name] = 0.0
            else:
                units.setdefault((i, comp), []).append(name)
                scales[name] = 1.0
        else:
            scales[name] = 0.0 if (pwp and first is not None and name.startswith(_INPUT_MODULES)) else 1.0
    unit_scale = {u: 1.0 for u in units}
    if sgd and units:
        _check_sgd_choices(scale, budget)
        d = {u: max(delta(*u), 1e-30) for u in units}
        inv = {u: (1.0 / v if scale == "inverse" else -math.log(v)) for u, v in d.items()}
        lo, hi = min(inv.values()), max(inv.values())
        for u in units:
            s = 1.0 if hi == lo else (inv[u] - lo) / (hi - lo)
            unit_scale[u] = 0.0 if s < floor else s
        for u, names in units.items():
            for n in names:
                scales[n] = unit_scale[u]
    lr_scale = 1.0
    if sgd and units and budget == "mean":
        size = {u: sum(numel[n] for n in names) for u, names in units.items()}
        mean = sum(unit_scale[u] * size[u] for u in units) / max(sum(size.values()), 1)
        if mean > 0:
            lr_scale = min(1.0 / mean, SGD_MAX_LR_SCALE)
            unit_names = {n for names in units.values() for n in names}
            for n, s in scales.items():  # the rest keeps the base rate
                if n not in unit_names and s > 0:
                    scales[n] = s / lr_scale
    rows = []
    for info in ad.blocks(student):
        if "block" in info.removed:
            continue
        comps = sorted({c for (i, c) in units if i == info.index}) or ["block"]
        for comp in comps:
            names = units.get((info.index, comp), [])
            if info.index < frozen_before:
                names = [n for n, (i, _) in block_of.items() if i == info.index]
                s, why = 0.0, "PWP: before the first pruned block"
            else:
                s = unit_scale.get((info.index, comp), 1.0)
                why = "SGDistill" if sgd else "trainable"
            rows.append({"index": info.index, "component": comp, "scale": s,
                         "dP": delta(info.index, comp) if table is not None else None,
                         "params": sum(numel[n] for n in names), "why": why})
            if info.index < frozen_before:
                break
    return {"scales": scales, "lr_scale": lr_scale, "rows": rows, "first_pruned": first,
            "trainable_params": sum(numel[n] for n, s in scales.items() if s > 0),
            "frozen_params": sum(numel[n] for n, s in scales.items() if s == 0)}


# ---- checkpoints ---------------------------------------------------------------------------------

def _latest_checkpoint(root: Path) -> Path | None:
    done = sorted(p for p in root.glob("step-*") if (p / "state.json").is_file())
    return done[-1] if done else None


def _save_checkpoint(root: Path, step: int, student: nn.Module, opt: torch.optim.Optimizer,
                     history: list[dict[str, float]], cfg: DistillConfig, keep: int,
                     identity: dict[str, str] | None = None) -> Path:
    """Writes checkpoint `step` into `root` (a folder claimed with hprune.owned.claim_folder) as a
    temporary folder renamed into place, recorded in root's manifest; removes the older ones beyond
    `keep` (only what hprune wrote). A full disk is an OutputError with no temporary left."""
    from hprune.io import save_safetensors, write_json
    from hprune.owned import add_to_manifest, remove_owned, write_error

    r, w = dist.rank(), dist.world_size()
    final, tmp = root / f"step-{step:07d}", root / f".step-{step:07d}.tmp"
    try:
        if r == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # a killed run's: hprune's own temporary name
            tmp.mkdir(parents=True)
        dist.barrier()
        tensors: dict[str, torch.Tensor] = {}
        for name, p in student.named_parameters():
            tensors[f"param/{name}"] = dist.local(p).detach().cpu().contiguous()
            st = opt.state.get(p)
            if st:
                for k in ("step", "exp_avg", "exp_avg_sq"):
                    tensors[f"optim/{name}/{k}"] = dist.local(st[k]).detach().cpu().contiguous()
        for name, b in student.named_buffers():
            tensors[f"buffer/{name}"] = dist.local(b).detach().cpu().contiguous()
        save_safetensors(tensors, tmp / f"rank{r}-of-{w}.safetensors")
        dist.barrier()
        if r == 0:
            write_json(tmp / "state.json", {"step": step, "world_size": w, "student": student_signature(student),
                                            "history": history, "config": _cfg_json(cfg), "identity": identity})
            if final.exists():
                remove_owned(root, under=final.name)
                if final.exists():
                    from hprune.errors import OutputError

                    raise OutputError(f"{final} holds files hprune did not write; move them and resume")
            add_to_manifest(root, {f"{final.name}/{f.name}": f for f in tmp.iterdir()}, dirs=[final.name])
            tmp.rename(final)
            older = sorted(p for p in root.glob("step-*") if p != final)
            for old in older[:max(len(older) - (keep - 1), 0)]:  # keep the newest `keep`, this one included
                remove_owned(root, under=old.name)
    except OSError as exc:
        if r == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        err = write_error(exc, f"checkpoint {final}")
        if err is None:
            raise
        raise err from None
    dist.barrier()
    return final


def _cfg_json(cfg: DistillConfig) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(cfg), default=str))


_RESUME_MUST_MATCH = ("batch_size", "lr", "weight_decay", "betas", "eps", "lambda_out", "lambda_feat", "lambda_task",
                      "logit_mean", "logit_std", "pwp", "sgd", "sgd_floor", "sgd_scale", "sgd_budget",
                      "sgd_granularity", "grad_clip", "seed")
# What a checkpoint written before a setting existed was trained with.
_SETTING_BEFORE_IT_EXISTED = {"sgd_scale": "inverse", "sgd_budget": "fixed"}


def student_signature(student: nn.Module) -> dict[str, Any]:
    """What a checkpoint's tensors fit: the student's parameter and buffer names and shapes (a
    digest), so a resume with another plan or ratio is refused before any tensor is read."""
    import hashlib

    h = hashlib.sha256()
    n = 0
    for name, t in list(student.named_parameters()) + list(student.named_buffers()):
        h.update(f"{name}:{tuple(t.shape)};".encode())
        n += t.numel()
    return {"digest": h.hexdigest()[:16], "numel": n}


def run_identity(teacher: nn.Module, data: "CalibrationSet | DistillData") -> dict[str, str]:
    """What a checkpoint's run was trained from: the teacher's weights and the calibration set's
    contents (content fingerprints), so that a resume with another teacher or set is refused."""
    from hprune.models.registry import weights_fingerprint

    calib = data.calib if isinstance(data, DistillData) else data
    return {"teacher": weights_fingerprint(teacher), "calib": calib.fingerprint()}


def check_checkpoint(path: Path, cfg: DistillConfig, student: nn.Module | None = None,
                     identity: dict[str, str] | None = None) -> dict[str, Any]:
    """Reads checkpoint `path`'s state.json and checks that `cfg` (and `student`, when given) can
    resume from it: same number of processes, same settings, a step in [1, cfg.steps], the same
    student structure. Returns the state; HpruneError naming the first mismatch. Cheap: callers run
    it before any work (hprune compress does, before probing)."""
    from hprune.io import read_json

    state = read_json(path / "state.json", "checkpoint state")
    if not isinstance(state, dict):
        raise HpruneError(f"{path}/state.json: corrupted checkpoint state (not a JSON object)")
    for key in ("step", "world_size", "history", "config"):
        if key not in state:
            raise HpruneError(f"{path}/state.json: corrupted checkpoint state (missing {key!r})")
    step, w = state["step"], dist.world_size()
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise HpruneError(f"{path}/state.json: corrupted checkpoint state (step {step!r}; a checkpoint is written "
                          f"after step 1 or later)")
    if step > cfg.steps:
        raise HpruneError(f"{path}: the checkpoint is at step {step}, past the run's {cfg.steps} steps; resume "
                          f"with steps >= {step}, or start afresh without resume")
    if state["world_size"] != w:
        raise HpruneError(f"{path}: checkpoint was written by {state['world_size']} processes; resume with the same number (now {w})")
    saved, now = state["config"], _cfg_json(cfg)
    was = {k: saved.get(k, _SETTING_BEFORE_IT_EXISTED.get(k)) for k in _RESUME_MUST_MATCH}
    bad = [k for k in _RESUME_MUST_MATCH if was[k] != now.get(k)]
    if bad:
        raise HpruneError(f"{path}: cannot resume with different settings: "
                          f"{', '.join(f'{k} {was[k]} -> {now.get(k)}' for k in bad)}")
    if identity is not None:
        was_id = state.get("identity") or {}
        for key, what in (("teacher", "teacher (its weights)"), ("calib", "calibration set (its contents)")):
            if was_id.get(key) != identity[key]:
                raise HpruneError(f"{path}: the checkpoint was trained with another {what}: resume with the run's "
                                  f"{key}, or start afresh without --resume")
    if student is not None and "student" in state and state["student"] != student_signature(student):
        raise HpruneError(f"{path}: the checkpoint was trained on another student ({state['student']['numel']} "
                          f"parameter values, this one has {student_signature(student)['numel']}): the plan or ratio "
                          f"differs; resume with the run's plan and ratio, or start afresh")
    return state


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under `root`, or None."""
    root = Path(root)
    return _latest_checkpoint(root) if root.is_dir() else None


def _load_checkpoint(path: Path, student: nn.Module, opt: torch.optim.Optimizer,
                     cfg: DistillConfig) -> tuple[int, list[dict[str, float]]]:
    from hprune.io import load_safetensors

    state = check_checkpoint(path, cfg, student)
    r, w = dist.rank(), dist.world_size()
    t = load_safetensors(path / f"rank{r}-of-{w}.safetensors")
    with torch.no_grad():
        for name, p in student.named_parameters():
            dist.local(p).copy_(t[f"param/{name}"])
            if f"optim/{name}/step" in t:
                st = opt.state[p]
                loc = dist.local(p)
                st["step"] = t[f"optim/{name}/step"].to(loc.device)
                for k in ("exp_avg", "exp_avg_sq"):
                    v = t[f"optim/{name}/{k}"].to(loc.device)
                    if hasattr(p, "device_mesh"):  # FSDP2 DTensor: rebuild the shard's DTensor
                        from torch.distributed.tensor import DTensor

                        v = DTensor.from_local(v, p.device_mesh, p.placements, run_check=False,
                                               shape=p.shape, stride=p.stride())
                    st[k] = v
        for name, b in student.named_buffers():
            dist.local(b).copy_(t[f"buffer/{name}"])
    return state["step"], state["history"]


# ---- the loop ------------------------------------------------------------------------------------

class _BlockOutputs:
    """Forward hooks keeping the image-stream output of the given blocks."""

    def __init__(self, model: nn.Module, indices: list[int]):
        ad = get_adapter(model)
        self.out: dict[int, torch.Tensor] = {}
        self.handles = [ad.get_block(model, i).register_forward_hook(self._hook(i)) for i in indices]

    def _hook(self, i: int) -> Callable:
        def fn(_m: nn.Module, _inp: Any, o: Any) -> None:
            self.out[i] = o[1]
        return fn

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _rebuild_unsharded(student: nn.Module) -> nn.Module:
    """After FSDP training: an ordinary model with the full weights (on every rank)."""
    from hprune import rebuild, recipe
    from hprune.models.registry import build_from_config, load_state_into

    state = dist.full_state_dict(student)
    fresh = build_from_config(model_class_name(student), dict(student.config), meta=True)
    fresh = rebuild.replay(fresh, recipe.get_recipe(student))
    return load_state_into(fresh, state, "distilled student")


def distill(teacher: nn.Module, student: nn.Module, data: CalibrationSet | DistillData,
            config: DistillConfig | None = None, *, table: Any = None, progress: bool = True,
            on_step: Callable[[int, dict[str, float]], None] | None = None,
            offload_teacher: bool = False) -> tuple[nn.Module, DistillResult]:
    """Trains `student` (a pruned copy of `teacher`) to match `teacher`. See the module docstring.

    Args:
        teacher, student: same architecture; the student pruned by hprune (block indices match).
            The student trains where its parameters are (the device of the run).
        data: a CalibrationSet with final latents (or a DistillData built from one).
        table: the SensitivityTable of the unpruned model (needed for SGDistill).
        on_step: called after every optimizer step with (step, losses); may raise to stop.
        offload_teacher: the teacher's weights stay where they are (the host, memory-mapped) and
            each of its forwards runs block by block on the student's device
            (hprune.models.offload.offloaded: its non-block modules resident there, one block at a
            time, 16-bit blocks computing in float32 on a CPU). The teacher is frozen, so nothing
            flows back; its weights leave the device peak. Same arithmetic as a resident teacher of
            the compute dtype (bit for bit on the tiny fp32 models, tests/test_distill.py).
    Returns (student, result). Under torchrun the returned student is unsharded (full weights)."""
    cfg = config or DistillConfig()
    cfg.validate()
    identity = run_identity(teacher, data) if (cfg.resume or cfg.checkpoint_every) else None
    if cfg.resume and (last := latest_checkpoint(cfg.checkpoint_dir)) is not None:
        check_checkpoint(last, cfg, student, identity)  # a mismatch stops here, before any work
    device = next(p for p in student.parameters()).device
    dist.setup(device)
    rank, world = dist.rank(), dist.world_size()
    if cfg.checkpoint_every and cfg.checkpoint_dir and rank == 0:
        from hprune.owned import claim_folder

        claim_folder(cfg.checkpoint_dir, "checkpoint folder")  # a user's folder of that name is refused
    if cfg.batch_size % world:
        raise HpruneError(f"batch_size {cfg.batch_size} must be divisible by the number of processes ({world})")
    if isinstance(data, CalibrationSet):
        data.check_fits(student)
        data = DistillData(data, seed=cfg.seed, logit_mean=cfg.logit_mean, logit_std=cfg.logit_std)
    ratio = 1 - param_count(student) / param_count(teacher)
    use_sgd = cfg.sgd if cfg.sgd != "auto" else ratio > cfg.r_thres
    schedule = training_schedule(student, table, pwp=cfg.pwp, sgd=bool(use_sgd), granularity=cfg.sgd_granularity,
                                 floor=cfg.sgd_floor, scale=cfg.sgd_scale, budget=cfg.sgd_budget)
    schedule.update({"removed_ratio": ratio, "sgd": bool(use_sgd), "pwp": cfg.pwp})
    scales = schedule["scales"]
    if not any(s > 0 for s in scales.values()):
        raise HpruneError("nothing to train: every parameter is frozen by PWP / SGDistill")

    from hprune.optim import SensitivityAdamW

    teacher_state = (teacher.training, [p.requires_grad for p in teacher.parameters()])  # restored at the end
    teacher.eval().requires_grad_(False)
    student.train()
    for n, p in student.named_parameters():
        p.requires_grad_(scales[n] > 0)
    if cfg.grad_checkpointing:
        student.enable_gradient_checkpointing()
    ad = get_adapter(student)
    matched = [i for i in range(ad.num_blocks(student)) if not isinstance(ad.get_block(student, i), RemovedBlock)
               and any(True for _ in ad.get_block(student, i).parameters())]
    if world > 1:
        dist.shard(student, device)
    if cfg.optimizer == "adamw8bit":
        if world > 1:
            raise HpruneError("optimizer adamw8bit does not run under torchrun (FSDP2 shards are DTensors, which "
                              "bitsandbytes' 8-bit optimizer does not take); use adamw")
        opt = adamw8bit(student, scales, cfg.lr * schedule["lr_scale"], cfg.betas, cfg.eps, cfg.weight_decay)
    else:
        opt = SensitivityAdamW(list(student.named_parameters()), lr=cfg.lr * schedule["lr_scale"], betas=cfg.betas,
                               eps=cfg.eps, weight_decay=cfg.weight_decay, scales=scales, backend=cfg.backend)
    trainable = [p for p in student.parameters() if p.requires_grad]

    start, history, resumed = 0, [], None
    root = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
    if cfg.resume and root is not None and (last := _latest_checkpoint(root)) is not None:
        start, history = _load_checkpoint(last, student, opt, cfg)
        resumed = start
    hs_t, hs_s = _BlockOutputs(teacher, matched), _BlockOutputs(student, matched)
    autocast = cfg.autocast if cfg.autocast is not None else device.type == "cuda"
    per_rank = cfg.batch_size // world
    from hprune.report import tqdm

    bar = tqdm(total=cfg.steps, initial=start, desc="distilling", disable=not progress or rank != 0, unit="step")
    t0, seen = time.perf_counter(), 0
    import contextlib

    streamed = contextlib.ExitStack()
    if offload_teacher:
        from hprune.models.offload import offloaded

        # the hooks stay for the whole loop: the teacher's non-block modules sit on the device, its
        # blocks come one at a time per forward (every step moves every teacher block once)
        streamed.enter_context(offloaded(teacher, device))
    try:
        for step in range(start, cfg.steps):
            x, target = data.batch(step, cfg.batch_size)
            sl = slice(rank * per_rank, (rank + 1) * per_rank)
            x = {k: (v if k in ("img_ids", "txt_ids") else v[sl]).to(device) for k, v in x.items()}
            target = target[sl].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                with torch.no_grad():
                    v_t = teacher(**x, return_dict=False)[0]
                v_s = student(**x, return_dict=False)[0]
                l_out = F.mse_loss(v_s.float(), v_t.float())
                l_feat = (torch.stack([F.mse_loss(hs_s.out[i].float(), hs_t.out[i].float()) for i in matched]).mean()
                          if matched and cfg.lambda_feat else torch.zeros((), device=device))
                l_task = F.mse_loss(v_s.float(), target.float()) if cfg.lambda_task else torch.zeros((), device=device)
                loss = cfg.lambda_out * l_out + cfg.lambda_feat * l_feat + cfg.lambda_task * l_task
            # one all-reduce and one sync per step for the log; a non-finite loss on any rank makes
            # the mean non-finite on every rank, so all of them stop together
            mean_loss, *means = dist.mean(torch.stack([loss, l_out, l_feat, l_task]).detach().float()).tolist()
            terms = dict(zip(("out", "feat", "task"), means))
            if not math.isfinite(mean_loss):
                raise HpruneError(f"non-finite loss at step {step} (output {terms['out']:.4g}, features "
                                  f"{terms['feat']:.4g}, task {terms['task']:.4g}); lower the learning rate"
                                  f"{' or disable autocast' if autocast else ''}")
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            rec = {"step": step, "loss": mean_loss, **terms}
            history.append(rec)
            seen += cfg.batch_size
            bar.set_postfix(loss=f"{rec['loss']:.4g}", samples_s=f"{seen / max(time.perf_counter() - t0, 1e-9):.1f}")
            bar.update(1)
            if root is not None and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
                _save_checkpoint(root, step + 1, student, opt, history, cfg, cfg.keep_checkpoints, identity)
            if on_step is not None:
                on_step(step, rec)
    finally:
        streamed.close()
        bar.close()
        hs_t.remove()
        hs_s.remove()
        teacher.train(teacher_state[0])
        for p, flag in zip(teacher.parameters(), teacher_state[1]):
            p.requires_grad_(flag)
    seconds = time.perf_counter() - t0
    if cfg.grad_checkpointing:
        student.disable_gradient_checkpointing()
    for p in student.parameters():
        p.requires_grad_(True)
    if world > 1:
        student = _rebuild_unsharded(student)
    student.eval()
    result = DistillResult(history, {k: v for k, v in schedule.items() if k != "scales"} | {"scales": scales},
                           seconds, seen / max(seconds, 1e-9), resumed)
    return student, result


def schedule_table(schedule: dict[str, Any]) -> str:
    """The schedule as a Markdown table (one row per block/component)."""
    from hprune.report import format_table, human_count

    mult = schedule.get("lr_scale", 1.0)
    rows = [{"block": r["index"], "component": r["component"], "ΔP": r["dP"], "scale": round(r["scale"], 4),
             "× lr": round(r["scale"] * mult, 4), "params": human_count(r["params"]), "why": r["why"]}
            for r in schedule["rows"]]
    head = (f"trainable {human_count(schedule['trainable_params'])}, frozen {human_count(schedule['frozen_params'])}; "
            f"PWP {'on' if schedule.get('pwp') else 'off'}, SGDistill {'on' if schedule.get('sgd') else 'off'} "
            f"(removed {schedule.get('removed_ratio', math.nan):.1%})"
            + (f"; SGDistill keeps the mean rate: the scaled units' lr x{mult:.2f}" if mult != 1 else ""))
    return format_table(rows, ["block", "component", "ΔP", "scale", "× lr", "params", "why"], title=head)
