"""Trains the ShapesBench teacher: an SD3Transformer2DModel in pixel space plus its text encoder,
with rectified-flow matching, seeded and reproducible (same seed, device, threads and versions ->
the same weights, up to BLAS summation order: an fp16 ulp at most).

    python -m hprune.shapes.train --out my-teacher --steps 6000          # --overwrite to replace
    python -m hprune.shapes.train --out gpu/teacher --model-size medium --minutes 6.5 ...  # GPU (README)

Data: every step's scenes are drawn and rendered in torch on the training device
(hprune.shapes.scenes; no CPU data loader), from a generator seeded by (seed, step), so a step's
batch is a pure function of the seed, the step and the device, and a resumed run sees the batches
the uninterrupted one would have.

Recipe: x0 = 2 * image - 1 (B, 3, 32, 32) from training-split scenes, t ~ sigmoid(N(logit_mean,
logit_std²)) (logit-normal, as SD3), x_t = (1 - t) x0 + t eps, target v = eps - x0, MSE (per-sample
weight 1 + high_noise_weight * t, normalised over the batch). Captions are dropped (all-zero
conditioning) with probability `--cfg-drop` so the model also learns the unconditional velocity of
classifier-free guidance. AdamW with linear warm-up and cosine decay, gradient clipping, and an
exponential moving average (EMA) of the weights, which is what is shipped. bf16 autocast on CUDA
(`--amp`). With `--minutes N` the loop stops after N minutes of training and the cosine follows
the elapsed fraction of the budget (or of `--steps`, whichever is further along).

Options meant to make the model bind shape words (recorded in recipe.json; whether they work is
for a GPU run to show, README):
  --same-colour F    share of two-object captions (pair, relation) whose objects have one colour,
                     so only the shape words say which object is which (-1: the grammar's 2/17)
  --shape-twins F    share of each batch that comes in twin pairs: a scene and the same scene with
                     one object's shape (a count's shapes) changed, caption to match, with the same
                     noise, flow time and caption dropout; the two targets differ only by shape,
                     which only the caption can tell
  --high-noise-weight W, --logit-mean M   weight / draw high noise, where the caption (not the
                     image) decides the shape

The output folder holds the teacher in the layout hprune.shapes.checkpoint loads:

    transformer/config.json, transformer/diffusion_pytorch_model.safetensors   (fp16 weights)
    text_encoder.safetensors, text_encoder.json                               (fp16 weights, config, vocab)
    recipe.json   config, seed, steps, wall time, device, versions, loss curve, word sensitivity, held-out score
    samples.png   held-out captions, EMA weights

Snapshots (`--snapshot-every` steps, `--snapshot-minutes`) go to `--snapshot-dir` (default
`<out>-snapshot`): the EMA weights in the same layout (a loadable teacher, a valid `--init`) plus
train_state.pt (weights, EMA, optimiser, step, time), which `--resume DIR` continues from.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from hprune.errors import HpruneError

# Architectures by name (--model-size). "small" is the teacher shipped until issue 19 (12 blocks,
# hidden 96, patch 4: 3.98 M parameters, 7.6 MiB fp16). "medium" widens it to hidden 128 (4 heads)
# and gives the text encoder a second layer: 7.03 M parameters, 13.4 MiB fp16, ~1.8x the compute
# per image (what a CPU benchmark pays; on a GPU a model this small should be bound by kernel
# launches more than by width: expected, not measured). Patch 4 in both: patch 2 is 4x the tokens, in training and in every
# benchmark after it.
MODEL_SIZES: dict[str, dict[str, int]] = {
    "small": dict(num_layers=12, num_heads=3, head_dim=32, patch_size=4, text_width=64, text_layers=1),
    "medium": dict(num_layers=12, num_heads=4, head_dim=32, patch_size=4, text_width=64, text_layers=2),
}
_ARCH = tuple(MODEL_SIZES["small"])
# Options that may change between a snapshot and the run that resumes it (they do not change what
# the weights are trained on, only for how long, how often it is checked, and where it runs).
_RUN_ONLY = ("steps", "minutes", "resume", "snapshot_every", "snapshot_minutes", "snapshot_dir", "eval_every",
             "eval_captions", "eval_steps", "guidance", "log_every", "monitor_every", "monitor_captions", "threads",
             "device", "compare")


@dataclass
class TrainConfig:
    # transformer and text encoder: model_size fills the ones left at None (MODEL_SIZES)
    model_size: str = "small"
    num_layers: int | None = None
    num_heads: int | None = None
    head_dim: int | None = None
    patch_size: int | None = None
    text_width: int | None = None
    text_layers: int | None = None
    text_dim: int = 64  # joint_attention_dim and pooled_projection_dim
    # optimisation
    steps: int = 6000  # 0: no step limit (then --minutes sets the end)
    minutes: float = 0.0  # wall-clock budget of the training loop (0: none)
    batch_size: int = 32
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup: int = 200
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema: float = 0.999
    cfg_drop: float = 0.1
    logit_mean: float = 0.0  # flow time t = sigmoid(logit_mean + logit_std * z): > 0 trains high noise more
    logit_std: float = 1.0
    high_noise_weight: float = 0.0  # per-sample loss weight 1 + w * t (normalised over the batch)
    same_colour: float = -1.0  # share of pair / relation captions with one colour (-1: the grammar's)
    shape_twins: float = 0.0  # share of each batch in shape-twin pairs
    seed: int = 0
    templates: str = ""  # comma-separated caption templates to train on, in turn ("": the standard mix)
    device: str = "auto"  # auto: cuda if available, else cpu
    amp: str = "auto"  # auto: bf16 autocast on CUDA, none on the CPU; bf16; off
    threads: int = 2
    # evaluation at the end (and every eval_every steps; 0 = only at the end)
    eval_every: int = 0
    eval_captions: int = 96
    eval_steps: int = 20
    guidance: float = 4.0
    log_every: int = 50
    monitor_every: int = 500  # log the EMA weights' word sensitivity every N steps (0: only at the end)
    monitor_captions: int = 40  # held-out one-object images the word sensitivity is measured on
    snapshot_every: int = 0  # write a snapshot every N steps (0: never) ...
    snapshot_minutes: float = 0.0  # ... and / or every N minutes of training
    snapshot_dir: str = ""  # default: <out>-snapshot
    init: str = ""  # a teacher folder to start from (continued training); its recipe is kept
    resume: str = ""  # a snapshot folder to continue this run from (same options)
    compare: str = ""  # a teacher folder, or "shipped", scored on the same held-out captions at the end

    def __post_init__(self) -> None:
        if self.model_size not in MODEL_SIZES:
            raise HpruneError(f"--model-size: unknown size {self.model_size!r} (one of {', '.join(MODEL_SIZES)})")
        for k, v in MODEL_SIZES[self.model_size].items():
            if getattr(self, k) is None:
                setattr(self, k, v)

    def transformer_config(self) -> dict[str, Any]:
        hidden = self.num_heads * self.head_dim
        return dict(sample_size=32, patch_size=self.patch_size, in_channels=3, out_channels=3,
                    num_layers=self.num_layers, attention_head_dim=self.head_dim, num_attention_heads=self.num_heads,
                    joint_attention_dim=self.text_dim, caption_projection_dim=hidden,
                    pooled_projection_dim=self.text_dim, pos_embed_max_size=32 // self.patch_size,
                    dual_attention_layers=(), qk_norm=None)


def _check(cfg: TrainConfig) -> None:
    """Refuses a bad configuration before anything is built or written."""
    _templates(cfg)
    if cfg.steps < 0 or cfg.minutes < 0:
        raise HpruneError("--steps and --minutes must not be negative")
    if cfg.steps == 0 and cfg.minutes == 0:
        raise HpruneError("give --steps or --minutes (or both): with neither the run would never end")
    if cfg.batch_size < 1:
        raise HpruneError(f"--batch-size must be at least 1, got {cfg.batch_size}")
    if not (cfg.same_colour == -1.0 or 0.0 <= cfg.same_colour <= 1.0):
        raise HpruneError(f"--same-colour must lie in [0, 1] (or be -1: the grammar's share), got {cfg.same_colour}")
    if not 0.0 <= cfg.shape_twins <= 1.0:
        raise HpruneError(f"--shape-twins must lie in [0, 1], got {cfg.shape_twins}")
    if cfg.high_noise_weight < 0:
        raise HpruneError(f"--high-noise-weight must not be negative, got {cfg.high_noise_weight}")
    if cfg.amp not in ("auto", "bf16", "off"):
        raise HpruneError(f"--amp: one of auto, bf16, off, not {cfg.amp!r}")
    if cfg.compare and cfg.compare != "shipped":
        from hprune.shapes.checkpoint import teacher_dir

        teacher_dir(cfg.compare)
    _device(cfg)


def _device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(cfg.device)
    except RuntimeError:
        raise HpruneError(f"--device: not a device: {cfg.device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise HpruneError(f"--device {cfg.device}: CUDA is not available here")
    if dev.type not in ("cpu", "cuda"):
        raise HpruneError(f"--device: cpu or cuda, not {cfg.device!r}")
    return dev


def _amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    if cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.+)", f.read())
            if m:
                return m.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU: {cpu_name()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def build(cfg: TrainConfig) -> tuple[nn.Module, nn.Module]:
    """Fresh (transformer, text encoder), seeded by cfg.seed."""
    from diffusers import SD3Transformer2DModel

    from hprune.shapes.text import TextEncoder

    torch.manual_seed(cfg.seed)
    model = SD3Transformer2DModel(**cfg.transformer_config())
    text = TextEncoder(width=cfg.text_width, joint_dim=cfg.text_dim, pooled_dim=cfg.text_dim, layers=cfg.text_layers)
    return model, text


def batch(step: int, cfg: TrainConfig, table: Any) -> tuple[torch.Tensor, ...]:
    """Training batch `step`, drawn on the table's device from a generator seeded by (seed, step):
    (x0 (B, 3, 32, 32) images in model space, ids (B, T) token ids, eps (B, 3, 32, 32) noise,
    t (B,) flow times, drop (B,) bool caption dropout, twin (B,) bool rows that are shape twins).
    With shape twins, the last rows are twins of the first: same boxes, colours, noise, t, drop."""
    from hprune.shapes import scenes as S

    dev = table.device
    gen = torch.Generator(dev).manual_seed(cfg.seed * 1_000_003 + step)
    b = cfg.batch_size
    n_twin = round(b * cfg.shape_twins / 2)
    same = None if cfg.same_colour < 0 else cfg.same_colour
    sc = S.sample_scenes(table, b - n_twin, gen, split="train", templates=_templates(cfg), same_colour=same)
    eps = torch.randn((b - n_twin, 3, 32, 32), generator=gen, device=dev)
    t = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(b - n_twin, generator=gen, device=dev))
    drop = torch.rand(b - n_twin, generator=gen, device=dev) < cfg.cfg_drop
    img, ids = S.render(sc), sc.ids
    twin = torch.zeros(b, dtype=torch.bool, device=dev)
    if n_twin:
        first = S.Scenes(*(getattr(sc, f.name)[:n_twin] for f in fields(S.Scenes)))
        tw, ok = S.shape_twins(table, first, gen)
        img, ids = torch.cat([img, S.render(tw)]), torch.cat([ids, tw.ids])
        eps, t, drop = torch.cat([eps, eps[:n_twin]]), torch.cat([t, t[:n_twin]]), torch.cat([drop, drop[:n_twin]])
        twin[b - n_twin:] = ok
    return img * 2 - 1, ids, eps, t, drop, twin


def _templates(cfg: TrainConfig) -> tuple[str, ...]:
    from hprune.shapes.data import TEMPLATES

    names = tuple(t.strip() for t in cfg.templates.split(",") if t.strip())
    unknown = [t for t in names if t not in TEMPLATES]
    if unknown:
        raise HpruneError(f"--templates: unknown template {unknown[0]!r} (one of {', '.join(TEMPLATES)})")
    return names


def progress(step: int, seconds: float, cfg: TrainConfig) -> float:
    """How far the run is, in [0, 1+): the further of step / steps and seconds / budget."""
    p = step / cfg.steps if cfg.steps else 0.0
    return max(p, seconds / (60 * cfg.minutes)) if cfg.minutes else p


def lr_at(step: int, cfg: TrainConfig, seconds: float = 0.0) -> float:
    """Linear warm-up over `warmup` steps, then cosine from lr to min_lr_ratio * lr along the run's
    progress after the warm-up."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    p0 = progress(cfg.warmup, 0.0, cfg) if cfg.steps else 0.0
    p = min(max((progress(step, seconds, cfg) - p0) / max(1 - p0, 1e-9), 0.0), 1.0)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def save_teacher(out: Path, model: nn.Module, text: nn.Module, recipe: dict[str, Any]) -> None:
    """Writes the teacher folder (fp16 weights; loaded back as float32)."""
    import copy

    from safetensors.torch import save_file

    from hprune.io import write_json
    from hprune.shapes.text import VOCAB

    out.mkdir(parents=True, exist_ok=True)
    half = copy.deepcopy(model).cpu().to(torch.float16)
    half.save_pretrained(out / "transformer", safe_serialization=True)
    save_file({k: v.detach().cpu().to(torch.float16).contiguous() for k, v in text.state_dict().items()},
              str(out / "text_encoder.safetensors"))
    write_json(out / "text_encoder.json", {"config": text.config, "vocab": list(VOCAB)})
    write_json(out / "recipe.json", json.loads(json.dumps(recipe, default=str)))


def _eval_batch(device: torch.device) -> int:
    return 256 if device.type == "cuda" else 64


def evaluate_teacher(model: nn.Module, text: nn.Module, cfg: TrainConfig) -> dict[str, Any]:
    """Held-out score of (model, text) with the configured sampler settings, on their device."""
    from hprune.shapes.evaluate import evaluate

    dev = next(model.parameters()).device
    return evaluate(model, text, n_captions=cfg.eval_captions, steps=cfg.eval_steps, guidance=cfg.guidance,
                    batch_size=_eval_batch(dev))


def _load_state(folder: str, cfg: TrainConfig) -> dict[str, Any]:
    """A snapshot's training state, after checking it was made by a run with these options."""
    from hprune.errors import CheckpointError

    path = Path(folder) / "train_state.pt"
    if not path.is_file():
        raise CheckpointError(f"--resume {folder}: no train_state.pt there (a snapshot folder of a training run)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{path}: unreadable training state ({exc})") from None
    mine, theirs = asdict(cfg), state["config"]
    diff = sorted(k for k in mine if k not in _RUN_ONLY and json.dumps(mine[k]) != json.dumps(theirs.get(k)))
    if diff:
        raise HpruneError(f"--resume {folder}: the snapshot's run had other options ({', '.join(diff)}); "
                          f"resume with the options it was started with")
    return state


def train(cfg: TrainConfig, out: Path, log: Any = print, overwrite: bool = False) -> dict[str, Any]:
    """Trains and writes the teacher folder `out` (atomically, at the end). An existing `out` is
    refused before training unless `overwrite`; so is a bad option."""
    from hprune.io import check_output
    from hprune.shapes.scenes import SceneTable

    _check(cfg)
    out = check_output(out, overwrite)
    device = _device(cfg)
    amp = _amp_dtype(cfg, device)
    torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    model, text = build(cfg)
    init_recipe = None
    if cfg.init and not cfg.resume:  # continue from a previous run's (EMA, fp16-rounded) weights
        from hprune.shapes.checkpoint import load_recipe, load_text_encoder, load_transformer

        init_recipe = load_recipe(cfg.init)
        want, have = cfg.transformer_config(), init_recipe.get("transformer_config", {})
        diff = sorted(k for k in want if json.dumps(want[k]) != json.dumps(have.get(k)))
        if diff or text.config != init_recipe.get("text_encoder_config"):
            raise HpruneError(f"--init {cfg.init}: its architecture differs from this run's "
                              f"({', '.join(diff) or 'text encoder'}); give the same model options it was trained with")
        model.load_state_dict(load_transformer(cfg.init).state_dict())
        text.load_state_dict(load_text_encoder(cfg.init).state_dict())
    state = _load_state(cfg.resume, cfg) if cfg.resume else None
    if state is not None:
        model.load_state_dict(state["model"])
        text.load_state_dict(state["text"])
        init_recipe = state.get("init_recipe")
    model.to(device).train()
    text.to(device).train()
    params = list(model.parameters()) + list(text.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99),
                            fused=device.type == "cuda")
    step, done_s = 0, 0.0
    history: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    monitor: list[dict[str, Any]] = []
    if state is not None:
        with torch.no_grad():
            for e, v in zip(ema, state["ema"]):
                e.copy_(v)
        opt.load_state_dict(state["optimizer"])
        step, done_s = state["step"], state["seconds"]
        history, evals, monitor = state["history"], state["evals"], state["monitor"]
        log(f"resumed {cfg.resume} at step {step} ({done_s / 60:.1f} min trained)")
    table = SceneTable(device, max_len=text.config["max_len"])
    snap_dir = Path(cfg.snapshot_dir) if cfg.snapshot_dir else out.with_name(out.name + "-snapshot")
    n_params = sum(p.numel() for p in model.parameters())
    log(f"transformer {n_params / 1e6:.2f}M parameters ({cfg.model_size}: {cfg.num_layers} blocks, hidden "
        f"{cfg.num_heads * cfg.head_dim}, patch {cfg.patch_size}), text encoder "
        f"{sum(p.numel() for p in text.parameters()) / 1e6:.3f}M; {device_description(device)}; "
        f"autocast {amp or 'off'}; batch {cfg.batch_size}; until "
        + " or ".join(([f"{cfg.steps} steps"] if cfg.steps else []) + ([f"{cfg.minutes} min"] if cfg.minutes else [])))

    def ema_models() -> tuple[nn.Module, nn.Module]:
        return _ema_copies(model, text, ema)

    def run_info(seconds: float) -> dict[str, Any]:
        return {"step": step, "steps": step, "train_seconds": round(seconds, 1), "config": asdict(cfg),
                "transformer_config": cfg.transformer_config(), "text_encoder_config": text.config,
                "device": device_description(device), **_lineage(init_recipe, step, seconds)}

    t0 = time.perf_counter()
    last_snap = done_s
    run_loss = torch.zeros((), device=device)
    run_n, seen_at_log, t_log = 0, step, t0
    while progress(step, done_s + time.perf_counter() - t0, cfg) < 1:
        lr = lr_at(step, cfg, done_s + time.perf_counter() - t0)
        x0, ids, eps, t, drop, _ = batch(step, cfg, table)
        tb = t.view(-1, 1, 1, 1)
        xt = (1 - tb) * x0 + tb * eps
        with torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            enc, pooled = text(ids)
            keep = (~drop).to(enc.dtype)
            enc, pooled = enc * keep.view(-1, 1, 1), pooled * keep.view(-1, 1)
            v = model(hidden_states=xt, encoder_hidden_states=enc, pooled_projections=pooled, timestep=t * 1000,
                      return_dict=False)[0]
        per_sample = (v.float() - (eps - x0)).pow(2).mean((1, 2, 3))
        w = 1 + cfg.high_noise_weight * t
        loss = (w * per_sample).sum() / w.sum()
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        decay = min(cfg.ema, (1 + step) / (10 + step))  # short EMA early, so it tracks the fast start
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        run_loss += loss.detach()
        run_n += 1
        step += 1
        seconds = done_s + time.perf_counter() - t0
        finished = progress(step, seconds, cfg) >= 1
        if step % cfg.log_every == 0 or finished:
            now = time.perf_counter()
            rec = {"step": step, "loss": float(run_loss) / run_n, "lr": lr, "seconds": round(seconds, 1)}
            history.append(rec)
            rate = (step - seen_at_log) * cfg.batch_size / max(now - t_log, 1e-9)
            left = max(1 - progress(step, seconds, cfg), 0.0) / max(progress(step, seconds, cfg), 1e-9) * seconds
            log(f"step {step} loss {rec['loss']:.4f} lr {lr:.2e} {rate:.0f} samples/s "
                f"elapsed {seconds / 60:.1f} min left {left / 60:.1f} min")
            run_loss.zero_()
            run_n, seen_at_log, t_log = 0, step, now
        if cfg.monitor_every and step % cfg.monitor_every == 0 and not finished:
            ws = _word_sensitivity(*ema_models(), cfg.monitor_captions)
            monitor.append({"step": step, **ws})
            log(f"  word sensitivity at step {step} (EMA): {_ws_line(ws)}")
        if cfg.eval_every and step % cfg.eval_every == 0 and not finished:
            ev = _eval_ema(ema_models(), cfg)
            evals.append({"step": step, **ev})
            log(f"  eval at step {step}: score {ev['score']:.3f} {json.dumps(ev['attributes'])}")
        seconds = done_s + time.perf_counter() - t0
        if ((cfg.snapshot_every and step % cfg.snapshot_every == 0)
                or (cfg.snapshot_minutes and seconds - last_snap >= 60 * cfg.snapshot_minutes)):
            _snapshot(snap_dir, *ema_models(), {**run_info(seconds), "snapshot": True},
                      {"model": model.state_dict(), "text": text.state_dict(), "ema": ema,
                       "optimizer": opt.state_dict(), "step": step, "seconds": seconds, "history": history,
                       "evals": evals, "monitor": monitor, "config": asdict(cfg), "init_recipe": init_recipe})
            last_snap = seconds
    train_s = done_s + time.perf_counter() - t0
    stopped_by = "steps" if cfg.steps and step >= cfg.steps else "minutes"
    with torch.no_grad():  # ship the EMA weights
        for p, e in zip(params, ema):
            p.copy_(e)
    model.eval()
    text.eval()
    # score what is shipped: the fp16-rounded weights, (as loaded back) float32
    for mod in (model, text):
        with torch.no_grad():
            for p in mod.parameters():
                p.copy_(p.to(torch.float16).float())
    t1 = time.perf_counter()
    final = evaluate_teacher(model, text, cfg)
    final["word_sensitivity"] = _word_sensitivity(model, text, cfg.monitor_captions)
    eval_s = time.perf_counter() - t1
    log(f"final held-out score {final['score']:.4f} ({final['n']} captions, {cfg.eval_steps} steps, "
        f"guidance {cfg.guidance}): {json.dumps(final['attributes'])}; "
        f"word sensitivity {_ws_line(final['word_sensitivity'])} ({eval_s:.0f} s)")
    import diffusers

    recipe = {
        "what": "ShapesBench teacher: SD3Transformer2DModel in pixel space + word-level text encoder, "
                "rectified flow matching with caption dropout (classifier-free guidance)",
        "command": "python -m hprune.shapes.train " + " ".join(sys.argv[1:]),
        "config": asdict(cfg), "transformer_config": cfg.transformer_config(),
        "text_encoder_config": text.config, "seed": cfg.seed,
        "data": "scenes drawn and rendered in torch on the training device (hprune.shapes.scenes)",
        "steps": step, "samples_seen": step * cfg.batch_size, "stopped_by": stopped_by,
        "train_seconds": round(train_s, 1), "eval_seconds": round(eval_s, 1),
        "device": device_description(device), "autocast": str(amp) if amp is not None else "off",
        "torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version(),
        "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "params": {"transformer": n_params, "text_encoder": sum(p.numel() for p in text.parameters())},
        "weights_dtype": "float16 (trained in float32; the score below is of the fp16-rounded weights)",
        "loss_history": history, "evals": evals, "word_sensitivity_history": monitor,
        "final": {k: final[k] for k in ("score", "exact", "attributes", "templates", "n", "word_sensitivity")},
        "final_eval": {"captions": cfg.eval_captions, "steps": cfg.eval_steps, "guidance": cfg.guidance,
                       "split": "heldout", "seed": 0},
    }
    if cfg.compare:  # the keep-or-not decision: the other teacher on the same captions, noise and device
        from hprune.shapes import checkpoint as C

        where = None if cfg.compare == "shipped" else cfg.compare
        other = evaluate_teacher(C.load_transformer(where, device=device), C.load_text_encoder(where, device=device),
                                 cfg)
        better = final["score"] >= other["score"]
        recipe["compared_with"] = {"teacher": cfg.compare, "n": other["n"], "score": other["score"],
                                   "attributes": other["attributes"], "templates": other["templates"],
                                   "this_score": final["score"], "this_meets_or_beats_it": better}
        log(f"{cfg.compare} teacher on the same {other['n']} captions: score {other['score']:.4f} "
            f"{json.dumps(other['attributes'])}; this one {final['score']:.4f}: "
            + ("meets or beats it" if better else "scores LOWER: do not ship it"))
    if cfg.resume:
        recipe["resumed_from"] = {"snapshot": cfg.resume, "step": state["step"]}
    recipe.update(_lineage(init_recipe, step, train_s))
    from hprune.io import atomic_dir

    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_teacher(tmp, model, text, recipe)
        _grid(model, text, tmp / "samples.png")
    log(f"wrote {out}")
    return recipe


def _lineage(init_recipe: dict[str, Any] | None, steps: int, seconds: float) -> dict[str, Any]:
    """For a continued run: the earlier stage's recipe (its own lineage inside) and the totals."""
    if init_recipe is None:
        return {}
    return {"init_from": init_recipe,
            "total_steps": steps + init_recipe.get("total_steps", init_recipe["steps"]),
            "total_train_seconds": round(seconds + init_recipe.get("total_train_seconds",
                                                                   init_recipe["train_seconds"]), 1)}


def _ema_copies(model: nn.Module, text: nn.Module, ema: list[torch.Tensor]) -> tuple[nn.Module, nn.Module]:
    """Copies of the transformer and text encoder holding the EMA weights (`ema`: the transformer's
    parameters, then the text encoder's), in eval mode; training goes on undisturbed."""
    import copy

    m, t = copy.deepcopy(model).eval(), copy.deepcopy(text).eval()
    with torch.no_grad():
        for p, e in zip(list(m.parameters()) + list(t.parameters()), ema):
            p.copy_(e)
    return m, t


def _snapshot(folder: Path, model: nn.Module, text: nn.Module, info: dict[str, Any], state: dict[str, Any]) -> None:
    """Writes the EMA weights (model, text) in the teacher layout and the training state that
    --resume reads, replacing the last snapshot in one step."""
    from hprune.io import atomic_dir

    with atomic_dir(folder, overwrite=True) as tmp:
        save_teacher(tmp, model, text, {**info, "final_eval": {"guidance": info["config"]["guidance"]}})
        torch.save(_to_cpu(state), tmp / "train_state.pt")


def _to_cpu(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().clone()
    if isinstance(x, dict):
        return {k: _to_cpu(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to_cpu(v) for v in x)
    return x


def _eval_ema(models: tuple[nn.Module, nn.Module], cfg: TrainConfig) -> dict[str, Any]:
    """Scores the EMA weights on a smaller held-out set (on the training device)."""
    from hprune.shapes.evaluate import evaluate

    m, t = models
    ev = evaluate(m, t, n_captions=max(cfg.eval_captions // 3, 10), steps=cfg.eval_steps, guidance=cfg.guidance,
                  batch_size=_eval_batch(next(m.parameters()).device))
    return {k: ev[k] for k in ("score", "exact", "attributes", "templates")}


def _word_sensitivity(model: nn.Module, text: nn.Module, n: int = 40) -> dict[str, float]:
    """Velocity change on swapping the colour / shape word or dropping the caption, mean over flow
    times 0.7-0.9, and how often the x0-prediction from t = 0.5 has the image's shape under the
    true / swapped shape word (hprune.shapes.evaluate.word_sensitivity): is the shape word read?"""
    from hprune.shapes.evaluate import word_sensitivity

    ws = word_sensitivity(model, text, n=n, times=(0.5, 0.7, 0.8, 0.9), shape_times=(0.5,))
    out = {k: round(float(np.mean([ws[k][t] for t in (0.7, 0.8, 0.9)])), 6) for k in ("colour", "shape", "caption")}
    out.update({k: round(ws[k][0.5], 4) for k in ("image_shape", "image_shape_swapped")})
    return out


def _ws_line(ws: dict[str, float]) -> str:
    ratio = ws["shape"] / ws["colour"] if ws["colour"] > 0 else float("nan")
    return (f"colour {ws['colour']:.3g} shape {ws['shape']:.3g} (shape/colour {ratio:.2f}) caption "
            f"{ws['caption']:.3g}; x0 shape at t=0.5 {ws['image_shape']:.2f}, word swapped "
            f"{ws['image_shape_swapped']:.2f}")


def _grid(model: nn.Module, text: nn.Module, path: Path, n: int = 20) -> None:
    from hprune.shapes.evaluate import evaluate, save_grid

    ev = evaluate(model, text, n_captions=n, steps=20, keep_images=True)
    save_grid({"teacher": ev["images"], "ground truth": ev["ground_truth"]}, path, captions=ev["captions"])


_HELP = {
    "model_size": "architecture by name (small: today's teacher; medium: wider, 2-layer text encoder); "
                  "explicit --num-layers etc. override it",
    "steps": "training steps (0: no step limit; then --minutes ends the run)",
    "minutes": "wall-clock budget of the training loop in minutes (0: none); the cosine follows it",
    "same_colour": "share of two-object captions whose objects share a colour (-1: the grammar's 2/17)",
    "shape_twins": "share of each batch in shape-twin pairs (same scene, one object's shape changed)",
    "high_noise_weight": "per-sample loss weight 1 + W * t (normalised over the batch)",
    "device": "auto (cuda if available), cpu or cuda[:N]",
    "amp": "auto (bf16 autocast on CUDA only), bf16 or off",
    "monitor_every": "log the EMA weights' word sensitivity every N steps (0: only at the end)",
    "snapshot_every": "write a snapshot (EMA teacher + train_state.pt) every N steps",
    "snapshot_minutes": "write a snapshot every N minutes of training",
    "snapshot_dir": "snapshot folder (default: <out>-snapshot)",
    "init": "a teacher folder to start a new run from (same architecture)",
    "resume": "a snapshot folder to continue its run from (same options)",
    "compare": "a teacher folder, or 'shipped', to score on the same held-out captions at the end",
}


def _option_type(f: Any) -> type:
    kind = str(f.type).split("|")[0].strip()
    return {"int": int, "float": float, "str": str}[kind]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hprune.shapes.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (the teacher layout)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    for f in fields(TrainConfig):
        extra = {"choices": list(MODEL_SIZES)} if f.name == "model_size" else {}
        p.add_argument("--" + f.name.replace("_", "-"), type=_option_type(f), default=f.default,
                       help=_HELP.get(f.name), **extra)
    args = p.parse_args(argv)
    out = Path(args.out)
    try:
        cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
        _check(cfg)
    except HpruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / (out.name + ".log"), "a") as logf:

        def log(msg: str) -> None:
            line = f"[{time.strftime('%H:%M:%S')}] {msg}"
            print(line, flush=True)
            logf.write(line + "\n")
            logf.flush()

        try:
            train(cfg, out, log, overwrite=args.overwrite)
        except HpruneError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
