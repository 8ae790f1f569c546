"""The shipped ShapesBench teacher (hprune/shapes/teacher/, package data) and loading it.

    transformer/   a diffusers SD3Transformer2DModel folder (config.json + fp16 safetensors)
    text_encoder.safetensors, text_encoder.json
    recipe.json    how it was trained: config, seed, steps, wall time, device, versions, score

Built-in model name: `shapes-teacher` (hprune.models.registry), so every command can use it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from hprune.errors import CheckpointError

TEACHER_DIR = Path(__file__).resolve().parent / "teacher"
NAME = "shapes-teacher"


def teacher_dir(path: str | os.PathLike | None = None) -> Path:
    d = Path(path) if path is not None else TEACHER_DIR
    if not (d / "transformer" / "config.json").is_file():
        raise CheckpointError(f"{d}: no ShapesBench teacher here (expected transformer/config.json); "
                              f"train one with `python -m hprune.shapes.train --out {d}`")
    return d


def load_transformer(path: str | os.PathLike | None = None, *, dtype: torch.dtype | None = None,
                     device: str | torch.device = "cpu") -> nn.Module:
    """The teacher's SD3Transformer2DModel, float32 unless `dtype` (weights are stored as fp16)."""
    from hprune.models.registry import load_diffusers_folder

    model = load_diffusers_folder(teacher_dir(path) / "transformer", dtype or torch.float32, device)
    return model.eval()


def load_text_encoder(path: str | os.PathLike | None = None, *, device: str | torch.device = "cpu") -> nn.Module:
    """The teacher's TextEncoder (float32, eval mode). Checks the stored vocabulary against this
    version's tokenizer, since token ids index the embedding table."""
    from hprune.io import load_safetensors, read_json
    from hprune.shapes.text import VOCAB, TextEncoder

    d = teacher_dir(path)
    meta = read_json(d / "text_encoder.json", "text encoder config")
    if list(meta.get("vocab", [])) != list(VOCAB):
        raise CheckpointError(f"{d}: the text encoder's vocabulary differs from this hprune's tokenizer")
    enc = TextEncoder(**meta["config"])
    state = load_safetensors(d / "text_encoder.safetensors")
    own = enc.state_dict()
    if set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
        raise CheckpointError(f"{d}/text_encoder.safetensors does not match its config")
    enc.load_state_dict({k: v.float() for k, v in state.items()})
    return enc.to(device).eval()


def load_recipe(path: str | os.PathLike | None = None) -> dict[str, Any]:
    from hprune.io import read_json

    return read_json(teacher_dir(path) / "recipe.json", "teacher recipe")


def builtin_loader(dtype: torch.dtype | None, device: str | torch.device) -> nn.Module:
    """Loader hook of the `shapes-teacher` built-in (hprune.models.registry)."""
    return load_transformer(dtype=dtype, device=device)


def calibration_captions(n: int, seed: int = 0) -> list[str]:
    """`n` calibration captions from the training split (never held-out ones); every eighth is
    empty (the unconditional input), so that distillation on the set also matches the teacher's
    unconditional velocity, which classifier-free guidance uses at every step."""
    from hprune.shapes.data import dataset

    caps = [s.caption for s in dataset(n, seed=10_000 + seed, split="train")]
    return ["" if i % 8 == 7 else c for i, c in enumerate(caps)]


def is_caption(text: str) -> bool:
    """Whether `text` is a caption of the grammar or the empty (unconditional) caption."""
    from hprune.errors import HpruneError
    from hprune.shapes.data import parse_caption

    if not text.strip():
        return True
    try:
        parse_caption(text)
    except HpruneError:
        return False
    return True


def builtin_calibration(model: nn.Module, n_prompts: int = 10, num_steps: int = 8, seed: int = 0,
                        guidance: float | None = None) -> Any:
    """Calibration hook of the `shapes-teacher` built-in: `calibration_captions` denoised by
    `model` itself (see hprune.shapes.sample.calibration_set)."""
    from hprune.shapes.sample import calibration_set
    from hprune.shapes.text import encode_captions

    caps = calibration_captions(n_prompts, seed)
    enc, pooled = encode_captions(load_text_encoder(), caps)
    g = guidance if guidance is not None else default_guidance()
    return calibration_set(model, enc, pooled, captions=caps, steps=num_steps, guidance=g, seed=seed)


def default_guidance() -> float:
    """The guidance scale the teacher was evaluated with (recipe), else 4."""
    try:
        return float(load_recipe()["final_eval"]["guidance"])
    except Exception:  # noqa: BLE001
        return 4.0


def describe(path: str | os.PathLike | None = None) -> str:
    r = load_recipe(path)
    return json.dumps({k: r.get(k) for k in ("steps", "train_seconds", "device", "final")}, indent=1)
