"""Compressed-model artifacts: a folder with the weights (safetensors) and `hprune.json`, the
recipe that rebuilds the structure (base diffusers config + the ordered structural ops: prune
plan, quantisation, ...). No modules are pickled.

    out/
      model.safetensors   every tensor of the compressed transformer's state dict
      hprune.json         format, versions, class, base config, recipe, checksum, stats

Loading builds the base model with its parameters on the meta device, replays the recipe, then
assigns the stored tensors, so a saved model loads back bit for bit. Writes are atomic: the
folder appears complete or not at all.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from hprune import rebuild, recipe
from hprune.errors import CheckpointError, HpruneError
from hprune.io import (atomic_dir, check_finite, check_safetensors, load_safetensors, read_json, save_safetensors,
                       write_json)

ARTIFACT_FORMAT = "hprune.artifact/1"
WEIGHTS_FILE = "model.safetensors"
RECIPE_FILE = "hprune.json"


def _sha256(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _versions() -> dict[str, str]:
    import diffusers

    from hprune._version import __version__

    return {"hprune": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__}


def save_compressed(model: nn.Module, path: str | os.PathLike, *, overwrite: bool = False,
                    extra: dict[str, Any] | None = None) -> Path:
    """Saves a (pruned / quantised) transformer to folder `path`.

    Args:
        model: an SD3Transformer2DModel / FluxTransformer2DModel, possibly modified by hprune
            (its structural changes are read from the recipe that hprune's stages record).
        path: output folder; must not exist unless `overwrite`.
        extra: JSON-able data stored under "extra" in hprune.json (reports, provenance).
    Returns the folder path.
    """
    from hprune.models.adapters import model_class_name
    from hprune.models.registry import model_config
    from hprune.models.stats import param_count, weight_bytes

    class_name = model_class_name(model)
    if class_name is None:
        raise HpruneError(f"save_compressed expects a diffusers SD3/FLUX transformer, got {type(model).__name__}")
    if any(st.get("op") == "quantize" and st.get("backend") == "bnb" for st in recipe.get_recipe(model)):
        raise HpruneError("bitsandbytes-quantised layers (backend='bnb') cannot be stored in an hprune artifact; "
                          "convert them first with hprune.quant.convert_bnb_model(model) (exact for NF4)")
    state = model.state_dict()
    meta = [k for k, v in state.items() if v.device.type == "meta"]
    if meta:
        raise HpruneError(f"cannot save a model whose weights are on the meta device (e.g. {meta[0]}); "
                          f"load or randomise real weights first")
    odd = [k for k, v in state.items() if type(v) is not torch.Tensor]
    if odd:
        raise HpruneError(f"cannot save {odd[0]}: it is a {type(state[odd[0]]).__name__}, not a plain tensor "
                          f"(e.g. a weight converted by hprune.obs.to_semi_structured); save before converting")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    with atomic_dir(path, overwrite=overwrite) as tmp:
        wfile = tmp / WEIGHTS_FILE
        save_safetensors(tensors, wfile, metadata={"format": "pt", "producer": "hprune"})  # same tensors, same bytes
        doc = {
            "format": ARTIFACT_FORMAT,
            "versions": _versions(),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "class_name": class_name,
            "base_config": model_config(model),
            "recipe": recipe.get_recipe(model),
            "weights": {"file": WEIGHTS_FILE, "sha256": _sha256(wfile), "bytes": wfile.stat().st_size,
                        "tensors": len(tensors)},
            "stats": {"params": param_count(model), "weight_bytes": weight_bytes(model)},
            "extra": extra or {},
        }
        write_json(tmp / RECIPE_FILE, doc)
    return Path(path)


def read_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """Reads and checks an artifact's hprune.json."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"artifact not found: {path}")
    if not path.is_dir():
        raise CheckpointError(f"{path}: an hprune artifact is a folder (with {RECIPE_FILE} and {WEIGHTS_FILE})")
    doc = read_json(path / RECIPE_FILE, f"artifact recipe ({RECIPE_FILE})")
    if not isinstance(doc, dict) or doc.get("format") != ARTIFACT_FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise CheckpointError(f"{path / RECIPE_FILE}: not an hprune artifact recipe (format {got!r}, "
                              f"expected {ARTIFACT_FORMAT!r})")
    for key in ("class_name", "base_config", "recipe", "weights"):
        if key not in doc:
            raise CheckpointError(f"{path / RECIPE_FILE}: corrupted recipe (missing {key!r})")
    weights_path(path, doc)
    return doc


def weights_path(folder: Path, doc: dict[str, Any]) -> Path:
    """The weights file a recipe names, which must lie inside the artifact folder: an absolute path
    or one climbing out with `..` (or a link leading out) is refused."""
    weights = doc.get("weights")
    name = weights.get("file", WEIGHTS_FILE) if isinstance(weights, dict) else None
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{folder / RECIPE_FILE}: corrupted recipe (weights.file is {name!r})")
    root = folder.resolve()
    target = (folder / name).resolve()
    if os.path.isabs(name) or root not in target.parents:
        raise CheckpointError(f"{folder / RECIPE_FILE}: weights.file {name!r} leaves the artifact folder; an "
                              f"artifact's weights must be a file inside it")
    return folder / name


def check_dtypes(state: dict[str, torch.Tensor], source: str) -> None:
    """Refuses floating-point weights of mixed dtypes (one layer in float64 or float16 among float32
    ones would only fail inside the forward). Packed 4-bit scales and zeros are exempt: the kernels
    read them in the activation dtype. Integer tensors are checked against the model (load_state_into)."""
    dtypes: dict[torch.dtype, str] = {}
    for name, t in state.items():
        if t.is_floating_point() and not name.endswith((".scales", ".zeros")):
            dtypes.setdefault(t.dtype, name)
    if len(dtypes) > 1:
        (a, na), (b, nb) = list(dtypes.items())[:2]
        raise CheckpointError(f"{source}: weights in mixed dtypes ({na} is {str(a).replace('torch.', '')}, {nb} "
                              f"is {str(b).replace('torch.', '')}); an artifact stores one floating-point dtype")


def load_compressed(path: str | os.PathLike, *, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None, verify: bool = True) -> nn.Module:
    """Loads an artifact written by `save_compressed`; returns the transformer in eval mode.

    Args:
        device: where the weights go.
        dtype: cast floating-point weights to this dtype (packed integer weights are untouched).
        verify: check the weights file's SHA-256 against the recipe (detects corruption).
    Raises CheckpointError for a missing, truncated or corrupted artifact."""
    from hprune.models.registry import build_from_config, load_state_into

    path = Path(path)
    doc = read_recipe(path)
    wfile = weights_path(path, doc)
    check_safetensors(wfile)
    if verify and doc["weights"].get("sha256") and _sha256(wfile) != doc["weights"]["sha256"]:
        raise CheckpointError(f"{wfile}: checksum mismatch (the weights file is corrupted or was replaced)")
    model = build_from_config(doc["class_name"], doc["base_config"], meta=True)
    model = rebuild.replay(model, doc["recipe"])
    state = load_safetensors(wfile, device=device)
    check_finite(state, str(wfile))
    check_dtypes(state, str(wfile))
    load_state_into(model, state, str(path))
    if dtype is not None:
        model = model.to(dtype)
    return model.to(device).eval()
