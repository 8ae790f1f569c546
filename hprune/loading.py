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
from hprune.io import check_finite, header_tensors, load_safetensors
from hprune.models.registry import (BuiltinModel, load_diffusers_folder, read_config, build_from_config, hook,
                                    load_state_into, randomize_, resolve, weight_files)


def load_model(spec: str, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
               meta: bool | None = None, seed: int = 0, config: str | os.PathLike | None = None) -> nn.Module:
    """Loads a MODEL argument into a diffusers transformer (or a compressed one).

    - built-in tiny names: random weights from `seed`, float32 on the CPU unless told otherwise;
    - built-in real-size names: parameters on the meta device (for counting) unless `device` is
      a GPU, where they get random bf16 weights (for latency/memory benchmarks);
    - a diffusers model folder, a pipeline folder (its transformer/), or an hprune artifact;
    - a .safetensors file with its config (`config`, or a config.json beside the file).

    `meta=True` gives the structure only, on the meta device: for a folder, file or artifact its
    tensors take the shapes and dtypes of the safetensors headers and no tensor data is read
    (counting parameters and bytes of a 24 GB checkpoint reads a few kB; nothing is checked for
    NaN, since no value is used).
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
    if meta and kind != "builtin":
        model = _from_headers(kind, what, config)
        return (model.to(dtype) if dtype is not None else model).eval()
    if kind == "artifact":
        return load_compressed(what, device=device, dtype=dtype)
    if kind == "diffusers":
        return load_diffusers_folder(what, dtype, device).eval()
    # a lone .safetensors file
    cfg = _lone_file_config(what, config)
    state = load_safetensors(what, device=device)
    check_finite(state, str(what))
    model = build_from_config(cfg["_class_name"], cfg, meta=True)
    load_state_into(model, state, str(what))
    return (model.to(dtype) if dtype is not None else model).eval()


def _lone_file_config(what: Path, config: str | os.PathLike | None) -> dict[str, Any]:
    cfg_path = Path(config) if config else what.parent / "config.json"
    if not cfg_path.exists():
        raise ModelNotFoundError(f"{what}: no config for this weights file (put config.json beside it "
                                 f"or pass --config)")
    return read_config(cfg_path)


def _from_headers(kind: str, what: Path, config: str | os.PathLike | None) -> nn.Module:
    """The model of a folder, file or artifact on the meta device, its tensors of the stored
    shapes and dtypes (from the safetensors headers; names and shapes checked as a load would)."""
    state: dict[str, torch.Tensor] = {}
    if kind == "artifact":
        from hprune.artifacts import artifact_structure

        _, model, _, wfile = artifact_structure(what)
        files = [wfile]
    elif kind == "diffusers":
        cfg = read_config(what / "config.json")
        model = build_from_config(cfg["_class_name"], cfg, meta=True)
        files = weight_files(what)
    else:
        cfg = _lone_file_config(what, config)
        model = build_from_config(cfg["_class_name"], cfg, meta=True)
        files = [what]
    for f in files:
        state.update(header_tensors(f))
    return load_state_into(model, state, str(what), meta=True)


def load_pipeline(pipeline: str | os.PathLike, artifact: str | os.PathLike | None = None, *,
                  device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Any:
    """A diffusers pipeline with an hprune-compressed transformer in place.

    Args:
        pipeline: a diffusers pipeline folder: the base model's (then `artifact` is required), or
            one written by `save_compressed(..., as_pipeline=...)` (its transformer/ is the artifact);
            or a built-in tiny model's name (tiny-sd3, ...): hprune.pipelines.build_pipeline around
            the artifact (or the original without one): no text encoders, call it with prompt_embeds.
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
    from hprune.models.registry import BUILTINS

    base = Path(pipeline)
    if str(pipeline) in BUILTINS and not base.exists():
        return _builtin_pipeline(str(pipeline), artifact, device, dtype)
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


def _builtin_pipeline(name: str, artifact: str | os.PathLike | None, device: str | torch.device,
                      dtype: torch.dtype | None) -> Any:
    """load_pipeline for a built-in tiny model: its seeded tiny VAE, no text encoders."""
    from hprune.artifacts import check_pipeline_fits, find_artifact, read_recipe
    from hprune.errors import HpruneError
    from hprune.lora import enable_diffusers_lora
    from hprune.models.registry import BUILTINS, model_config
    from hprune.pipelines import build_pipeline

    if not BUILTINS[name].tiny:
        raise HpruneError(f"{name} is an architecture without weights here; give its diffusers pipeline folder")
    original = load_model(name, device=device, dtype=dtype)
    if artifact is None:
        return enable_diffusers_lora(build_pipeline(original))
    art = find_artifact(artifact)
    doc = read_recipe(art)
    check_pipeline_fits(type(original).__name__, model_config(original), doc["class_name"], doc["base_config"],
                        f"{artifact} (for {name})")
    return enable_diffusers_lora(build_pipeline(load_compressed(art, device=device, dtype=dtype)))


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
    from hprune.pipelines import require_prompt_embeds

    return require_prompt_embeds(pipe.to(device))
