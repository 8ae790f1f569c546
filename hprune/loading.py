"""Loading a MODEL argument: the one entry point above the model surgery, the stages and the
artifact format.

A MODEL is a built-in name (`hprune.models.BUILTINS`), a local diffusers model or pipeline folder,
a .safetensors file with its config, or an hprune artifact (`hprune.artifacts`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

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


def load_pipeline(pipeline: str | os.PathLike, artifact: str | os.PathLike | None = None, *,
                  device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Any:
    """A diffusers pipeline with an hprune-compressed transformer in place.

    Args:
        pipeline: a diffusers pipeline folder: the base model's (then `artifact` is required), or
            one written by `save_compressed(..., as_pipeline=...)` (its transformer/ is the artifact).
        artifact: the compressed transformer: an artifact folder, the folder `hprune compress`
            wrote, or a pipeline folder holding one. Must fit the base (same class and inputs).
        device, dtype: where the pipeline runs, and the dtype of its floating-point weights
            (default: as stored).
    Returns the pipeline (its own VAE, text encoders, tokenizers and scheduler). Its
    `load_lora_weights` / `unload_lora_weights` apply a LoRA to the compressed transformer
    (`hprune.apply_lora`; the report is returned)."""
    from hprune.artifacts import PIPELINE_INDEX, check_pipeline_fits, find_artifact, read_recipe
    from hprune.errors import HpruneError
    from hprune.io import read_json
    from hprune.lora import enable_diffusers_lora

    base = Path(pipeline)
    if not (base / PIPELINE_INDEX).is_file():
        raise ModelNotFoundError(f"{base}: not a diffusers pipeline folder (no {PIPELINE_INDEX})")
    if artifact is None:
        if not (base / "transformer" / "hprune.json").is_file():
            raise HpruneError(f"{base}: its transformer is not hprune-compressed; pass the artifact too: "
                              f"load_pipeline({str(base)!r}, ARTIFACT)")
        artifact = base / "transformer"
    art = find_artifact(artifact)
    doc = read_recipe(art)
    index = read_json(base / PIPELINE_INDEX, PIPELINE_INDEX)
    if not isinstance(index, dict):
        raise ModelNotFoundError(f"{base / PIPELINE_INDEX}: not a pipeline index")
    cfg_file = base / "transformer" / "config.json"
    if cfg_file.is_file():
        base_cls = (index.get("transformer") or [None, None])[1]
        check_pipeline_fits(base_cls, read_json(cfg_file, "base transformer config"), doc["class_name"],
                            doc["base_config"], str(base))
    transformer = load_compressed(art, device=device, dtype=dtype)
    return enable_diffusers_lora(open_pipeline(base, device=device, dtype=dtype, transformer=transformer))


def open_pipeline(folder: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                  **components: Any) -> Any:
    """`DiffusionPipeline.from_pretrained(folder, **components)` on `device`; components the folder
    saved as absent (e.g. no text encoders: prompt embeddings are passed in) stay absent."""
    from diffusers import DiffusionPipeline

    from hprune.artifacts import PIPELINE_INDEX
    from hprune.io import read_json

    from hprune.errors import CheckpointError

    index = read_json(Path(folder) / PIPELINE_INDEX, PIPELINE_INDEX)
    if not isinstance(index, dict):
        raise ModelNotFoundError(f"{Path(folder) / PIPELINE_INDEX}: not a pipeline index")
    absent = {k: None for k, v in index.items() if isinstance(v, list) and v and v[0] is None and k not in components}
    for name, v in index.items():  # a component the index names but the folder lacks: say which
        if (isinstance(v, list) and v and v[0] is not None and name not in components and name not in absent
                and not (Path(folder) / name).is_dir()):
            raise CheckpointError(f"{folder}: the pipeline index names a {name} ({v[-1]}) but there is no {name}/ "
                                  f"folder; copy the whole pipeline folder")
    try:
        pipe = DiffusionPipeline.from_pretrained(str(folder), **absent, **components,
                                                 **({"torch_dtype": dtype} if dtype is not None else {}))
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        # a corrupt or missing component config (scheduler_config.json ...) reaches diffusers' parsers
        detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{folder}: cannot load the pipeline ({detail})") from None
    return pipe.to(device)
