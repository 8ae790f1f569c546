"""Loading a MODEL argument: the one entry point above the model surgery, the stages and the
artifact format.

A MODEL is a built-in name (`hprune.models.BUILTINS`), a local diffusers model or pipeline folder,
a .safetensors file with its config, or an hprune artifact (`hprune.artifacts`).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from hprune.artifacts import load_compressed
from hprune.errors import ModelNotFoundError
from hprune.io import check_finite, load_safetensors
from hprune.models.registry import (BuiltinModel, load_diffusers_folder, read_config, build_from_config, hook,
                                    load_state_into, randomize_, resolve)


def load_model(spec: str, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
               meta: bool | None = None, seed: int = 0, config: str | os.PathLike | None = None) -> nn.Module:
    """Loads a MODEL argument into a diffusers transformer (or a compressed one).

    - built-in tiny names: random weights from `seed`, float32 on the CPU unless told otherwise;
    - built-in real-size names: parameters on the meta device (for counting) unless `device` is
      a GPU, where they get random bf16 weights (for latency/memory benchmarks);
    - a diffusers model folder, a pipeline folder (its transformer/), or an hprune artifact;
    - a .safetensors file with its config (`config`, or a config.json beside the file).
    """
    kind, what = resolve(spec)
    device = torch.device(device)
    if kind == "builtin":
        b: BuiltinModel = what
        if b.loader and not meta:
            return hook(b.loader)(dtype, device)
        if b.tiny and not meta:
            model = build_from_config(b.class_name, b.config, seed=seed, dtype=dtype)
            return model.to(device)
        if meta is None:
            meta = device.type != "cuda"
        if meta:
            model = build_from_config(b.class_name, b.config, meta=True)
            return model if dtype is None else model.to(dtype)
        model = build_from_config(b.class_name, b.config, meta="params")
        return randomize_(model, device, dtype or torch.bfloat16, seed=seed)
    if kind == "artifact":
        return load_compressed(what, device=device, dtype=dtype)
    if kind == "diffusers":
        return load_diffusers_folder(what, dtype, device).eval()
    # a lone .safetensors file
    cfg_path = Path(config) if config else what.parent / "config.json"
    if not cfg_path.exists():
        raise ModelNotFoundError(f"{what}: no config for this weights file (put config.json beside it "
                                 f"or pass --config)")
    cfg = read_config(cfg_path)
    state = load_safetensors(what, device=device)
    check_finite(state, str(what))
    model = build_from_config(cfg["_class_name"], cfg, meta=True)
    load_state_into(model, state, str(what))
    return (model.to(dtype) if dtype is not None else model).eval()
