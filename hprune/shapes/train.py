"""Trains the ShapesBench teacher: an SD3Transformer2DModel in pixel space plus its text encoder,
with rectified-flow matching, seeded and reproducible (same seed, threads and versions -> the same
weights on the same machine, up to BLAS summation order: an fp16 ulp at most).

    python -m hprune.shapes.train --out my-teacher --steps 6000   # --overwrite to replace a folder

Recipe: x0 = 2 * image - 1 (B, 3, 32, 32) from freshly generated training-split samples,
t ~ sigmoid(N(logit_mean, logit_std²)) (logit-normal, as SD3; default N(0, 1)), x_t = (1 - t) x0 + t eps, target v = eps - x0, MSE.
Captions are dropped (all-zero conditioning) with probability `--cfg-drop` so the model also learns
the unconditional velocity used by classifier-free guidance. AdamW with linear warm-up and cosine
decay, gradient clipping, and an exponential moving average (EMA) of the weights, which is what is
shipped. The output folder holds the teacher in the layout hprune.shapes.checkpoint loads:

    transformer/config.json, transformer/diffusion_pytorch_model.safetensors   (fp16 weights)
    text_encoder.safetensors, text_encoder.json                               (fp16 weights, config, vocab)
    recipe.json   config, seed, steps, wall time, device, versions, loss curve, held-out score
    samples.png   held-out captions, EMA weights
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from hprune.errors import HpruneError


@dataclass
class TrainConfig:
    # transformer
    num_layers: int = 12
    num_heads: int = 3  # the shipped teacher: hidden 96
    head_dim: int = 32
    patch_size: int = 4
    text_dim: int = 64  # joint_attention_dim and pooled_projection_dim
    text_width: int = 64
    text_layers: int = 1
    # optimisation
    steps: int = 6000
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
    seed: int = 0
    templates: str = ""  # comma-separated caption templates to train on, in turn ("": the standard mix)
    threads: int = 2
    # evaluation at the end (and every eval_every steps; 0 = only at the end)
    eval_every: int = 0
    eval_captions: int = 96
    eval_steps: int = 20
    guidance: float = 4.0
    log_every: int = 50
    snapshot_every: int = 0  # write the EMA weights to <out>/snapshot every N steps (0: never)
    init: str = ""  # a teacher folder to start from (continued training); its recipe is kept

    def transformer_config(self) -> dict[str, Any]:
        hidden = self.num_heads * self.head_dim
        return dict(sample_size=32, patch_size=self.patch_size, in_channels=3, out_channels=3,
                    num_layers=self.num_layers, attention_head_dim=self.head_dim, num_attention_heads=self.num_heads,
                    joint_attention_dim=self.text_dim, caption_projection_dim=hidden,
                    pooled_projection_dim=self.text_dim, pos_embed_max_size=32 // self.patch_size,
                    dual_attention_layers=(), qk_norm=None)


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


def batch(step: int, cfg: TrainConfig, tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Training batch `step` (a pure function of seed and step): images in model space
    (B, 3, 32, 32) and token ids (B, T)."""
    from hprune.shapes.data import dataset

    samples = dataset(cfg.batch_size, seed=cfg.seed * 1_000_003 + step, split="train",
                      templates=_templates(cfg) or None)
    x0 = torch.from_numpy(np.stack([s.image() for s in samples])) * 2 - 1
    return x0, tokenizer.encode([s.caption for s in samples])


def _templates(cfg: TrainConfig) -> tuple[str, ...]:
    from hprune.shapes.data import TEMPLATES

    names = tuple(t.strip() for t in cfg.templates.split(",") if t.strip())
    unknown = [t for t in names if t not in TEMPLATES]
    if unknown:
        raise HpruneError(f"--templates: unknown template {unknown[0]!r} (one of {', '.join(TEMPLATES)})")
    return names


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    p = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def save_teacher(out: Path, model: nn.Module, text: nn.Module, recipe: dict[str, Any]) -> None:
    """Writes the teacher folder (fp16 weights; loaded back as float32)."""
    import copy

    from safetensors.torch import save_file

    from hprune.io import write_json
    from hprune.shapes.text import VOCAB

    out.mkdir(parents=True, exist_ok=True)
    half = copy.deepcopy(model).to(torch.float16)
    half.save_pretrained(out / "transformer", safe_serialization=True)
    save_file({k: v.detach().to(torch.float16).contiguous() for k, v in text.state_dict().items()},
              str(out / "text_encoder.safetensors"))
    write_json(out / "text_encoder.json", {"config": text.config, "vocab": list(VOCAB)})
    write_json(out / "recipe.json", json.loads(json.dumps(recipe, default=str)))


def evaluate_teacher(model: nn.Module, text: nn.Module, cfg: TrainConfig) -> dict[str, Any]:
    """Held-out score of (model, text) with the configured sampler settings."""
    from hprune.shapes.evaluate import evaluate

    return evaluate(model, text, n_captions=cfg.eval_captions, steps=cfg.eval_steps, guidance=cfg.guidance)


def train(cfg: TrainConfig, out: Path, log: Any = print, overwrite: bool = False) -> dict[str, Any]:
    """Trains and writes the teacher folder `out` (atomically, at the end; EMA snapshots go to the
    sibling `<out>-snapshot`). An existing `out` is refused before training unless `overwrite`."""
    from hprune.io import check_output
    from hprune.shapes.text import Tokenizer

    _templates(cfg)  # refused before anything is written
    out = check_output(out, overwrite)
    torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, text = build(cfg)
    init_recipe = None
    if cfg.init:  # continue from a previous run's (EMA, fp16-rounded) weights
        from hprune.shapes.checkpoint import load_recipe, load_text_encoder, load_transformer

        init_recipe = load_recipe(cfg.init)
        want, have = cfg.transformer_config(), init_recipe.get("transformer_config", {})
        diff = sorted(k for k in want if json.dumps(want[k]) != json.dumps(have.get(k)))
        if diff or text.config != init_recipe.get("text_encoder_config"):
            raise HpruneError(f"--init {cfg.init}: its architecture differs from this run's "
                              f"({', '.join(diff) or 'text encoder'}); give the same model options it was trained with")
        model.load_state_dict(load_transformer(cfg.init).state_dict())
        text.load_state_dict(load_text_encoder(cfg.init).state_dict())
    model.to(device).train()
    text.to(device).train()
    ema_model = [p.detach().clone() for p in model.parameters()]
    ema_text = [p.detach().clone() for p in text.parameters()]
    params = list(model.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    tok = Tokenizer(max_len=text.config["max_len"])
    gen = torch.Generator().manual_seed(cfg.seed)
    history: list[dict[str, float]] = []
    evals: list[dict[str, Any]] = []
    n_params = sum(p.numel() for p in model.parameters())
    log(f"transformer {n_params / 1e6:.2f}M parameters, text encoder "
        f"{sum(p.numel() for p in text.parameters()) / 1e6:.3f}M; {device_description(device)}")
    t0 = time.perf_counter()
    run_loss, run_n = 0.0, 0
    for step in range(cfg.steps):
        x0, ids = batch(step, cfg, tok)
        b = x0.shape[0]
        eps = torch.randn(x0.shape, generator=gen)
        t = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(b, generator=gen))
        drop = torch.rand(b, generator=gen) < cfg.cfg_drop
        x0, eps, t, ids, drop = (v.to(device) for v in (x0, eps, t, ids, drop))
        tb = t.view(-1, 1, 1, 1)
        xt = (1 - tb) * x0 + tb * eps
        enc, pooled = text(ids)
        keep = (~drop).to(enc.dtype)
        enc, pooled = enc * keep.view(-1, 1, 1), pooled * keep.view(-1, 1)
        v = model(hidden_states=xt, encoder_hidden_states=enc, pooled_projections=pooled, timestep=t * 1000,
                  return_dict=False)[0]
        loss = F.mse_loss(v, eps - x0)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        decay = min(cfg.ema, (1 + step) / (10 + step))  # short EMA early, so it tracks the fast start
        with torch.no_grad():
            torch._foreach_lerp_(ema_model, [p.detach() for p in model.parameters()], 1 - decay)
            torch._foreach_lerp_(ema_text, [p.detach() for p in text.parameters()], 1 - decay)
        run_loss += loss.item()
        run_n += 1
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            el = time.perf_counter() - t0
            rec = {"step": step + 1, "loss": run_loss / run_n, "lr": lr_at(step, cfg), "seconds": round(el, 1)}
            history.append(rec)
            run_loss, run_n = 0.0, 0
            eta = el / (step + 1) * (cfg.steps - step - 1)
            log(f"step {step + 1}/{cfg.steps} loss {rec['loss']:.4f} lr {rec['lr']:.2e} "
                f"{(step + 1) * b / el:.1f} samples/s elapsed {el / 60:.1f} min eta {eta / 60:.1f} min")
        if cfg.snapshot_every and (step + 1) % cfg.snapshot_every == 0:  # loadable, and a valid --init
            el = round(time.perf_counter() - t0, 1)
            _snapshot(out.with_name(out.name + "-snapshot"), model, text, ema_model, ema_text,
                      {"step": step + 1, "steps": step + 1, "train_seconds": el, "config": asdict(cfg),
                       "transformer_config": cfg.transformer_config(), "text_encoder_config": text.config,
                       "device": device_description(device), **_lineage(init_recipe, step + 1, el)})
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            ev = _eval_ema(model, text, ema_model, ema_text, cfg)
            evals.append({"step": step + 1, **ev})
            log(f"  eval at step {step + 1}: score {ev['score']:.3f} {json.dumps(ev['attributes'])} "
                f"word sensitivity {json.dumps(ev['word_sensitivity'])}")
    train_s = time.perf_counter() - t0
    with torch.no_grad():  # ship the EMA weights
        for p, e in zip(model.parameters(), ema_model):
            p.copy_(e)
        for p, e in zip(text.parameters(), ema_text):
            p.copy_(e)
    model.eval()
    text.eval()
    # score what is shipped: the fp16-rounded weights, loaded back as float32
    for mod in (model, text):
        with torch.no_grad():
            for p in mod.parameters():
                p.copy_(p.to(torch.float16).float())
    t1 = time.perf_counter()
    final = evaluate_teacher(model.cpu(), text.cpu(), cfg)
    final["word_sensitivity"] = _word_sensitivity(model.cpu(), text.cpu())
    eval_s = time.perf_counter() - t1
    log(f"final held-out score {final['score']:.4f} ({final['n']} captions, {cfg.eval_steps} steps, "
        f"guidance {cfg.guidance}): {json.dumps(final['attributes'])}; "
        f"word sensitivity {json.dumps(final['word_sensitivity'])}")
    import diffusers

    recipe = {
        "what": "ShapesBench teacher: SD3Transformer2DModel in pixel space + word-level text encoder, "
                "rectified flow matching with caption dropout (classifier-free guidance)",
        "command": "python -m hprune.shapes.train " + " ".join(sys.argv[1:]),
        "config": asdict(cfg), "transformer_config": cfg.transformer_config(),
        "text_encoder_config": text.config, "seed": cfg.seed,
        "steps": cfg.steps, "samples_seen": cfg.steps * cfg.batch_size,
        "train_seconds": round(train_s, 1), "eval_seconds": round(eval_s, 1),
        "device": device_description(device), "torch": torch.__version__, "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "params": {"transformer": n_params, "text_encoder": sum(p.numel() for p in text.parameters())},
        "weights_dtype": "float16 (trained in float32; the score below is of the fp16-rounded weights)",
        "loss_history": history, "evals": evals,
        "final": {k: final[k] for k in ("score", "exact", "attributes", "templates", "n", "word_sensitivity")},
        "final_eval": {"captions": cfg.eval_captions, "steps": cfg.eval_steps, "guidance": cfg.guidance,
                       "split": "heldout", "seed": 0},
    }
    recipe.update(_lineage(init_recipe, cfg.steps, train_s))
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


def _ema_copies(model: nn.Module, text: nn.Module, ema_model: list[torch.Tensor],
                ema_text: list[torch.Tensor]) -> tuple[nn.Module, nn.Module]:
    """Copies of the transformer and text encoder holding the EMA weights (eval mode); training
    goes on undisturbed with its own."""
    import copy

    m, t = copy.deepcopy(model).eval(), copy.deepcopy(text).eval()
    with torch.no_grad():
        for p, e in zip(m.parameters(), ema_model):
            p.copy_(e)
        for p, e in zip(t.parameters(), ema_text):
            p.copy_(e)
    return m, t


def _snapshot(folder: Path, model: nn.Module, text: nn.Module, ema_model: list[torch.Tensor],
              ema_text: list[torch.Tensor], info: dict[str, Any]) -> None:
    """Writes the current EMA weights in the teacher layout (no evaluation), replacing the last one."""
    from hprune.io import atomic_dir

    m, t = _ema_copies(model, text, ema_model, ema_text)
    with atomic_dir(folder, overwrite=True) as tmp:
        save_teacher(tmp, m.cpu(), t.cpu(), {**info, "final_eval": {"guidance": info["config"]["guidance"]},
                                             "snapshot": True})


def _eval_ema(model: nn.Module, text: nn.Module, ema_model: list[torch.Tensor], ema_text: list[torch.Tensor],
              cfg: TrainConfig) -> dict[str, Any]:
    """Scores the EMA weights on a smaller held-out set without disturbing training."""
    m, t = _ema_copies(model, text, ema_model, ema_text)
    from hprune.shapes.evaluate import evaluate

    ev = evaluate(m.cpu(), t.cpu(), n_captions=max(cfg.eval_captions // 3, 10), steps=cfg.eval_steps,
                  guidance=cfg.guidance)
    return {**{k: ev[k] for k in ("score", "exact", "attributes", "templates")},
            "word_sensitivity": _word_sensitivity(m.cpu(), t.cpu())}


def _word_sensitivity(model: nn.Module, text: nn.Module) -> dict[str, float]:
    """Velocity change on swapping the colour / shape word or dropping the caption, mean over flow
    times 0.7-0.9 (hprune.shapes.evaluate.word_sensitivity): is the shape word being learnt?"""
    from hprune.shapes.evaluate import word_sensitivity

    ws = word_sensitivity(model, text, times=(0.7, 0.8, 0.9))
    return {k: round(float(np.mean(list(ws[k].values()))), 6) for k in ("colour", "shape", "caption")}


def _grid(model: nn.Module, text: nn.Module, path: Path, n: int = 20) -> None:
    from hprune.shapes.evaluate import evaluate, save_grid

    ev = evaluate(model, text, n_captions=n, steps=20, keep_images=True)
    save_grid({"teacher": ev["images"], "ground truth": ev["ground_truth"]}, path, captions=ev["captions"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hprune.shapes.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (the teacher layout)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    for f in TrainConfig.__dataclass_fields__.values():
        kind = {"int": int, "float": float, "str": str}.get(str(f.type), None)
        if kind is None:
            kind = int if isinstance(f.default, int) else float
        p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default)
    args = p.parse_args(argv)
    cfg = TrainConfig(**{k: getattr(args, k) for k in TrainConfig.__dataclass_fields__})
    out = Path(args.out)
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
