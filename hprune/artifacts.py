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
                    extra: dict[str, Any] | None = None, as_pipeline: Any = None) -> Path:
    """Saves a (pruned / quantised) transformer to folder `path`.

    Args:
        model: an SD3Transformer2DModel / FluxTransformer2DModel, possibly modified by hprune
            (its structural changes are read from the recipe that hprune's stages record).
        path: output folder; must not exist unless `overwrite`.
        extra: JSON-able data stored under "extra" in hprune.json (reports, provenance).
        as_pipeline: a diffusers pipeline (folder or loaded pipeline) of the base model: `path`
            becomes a complete pipeline folder, the base's VAE, text encoders, tokenizers and
            scheduler with the artifact as transformer/ (open it with `hprune.load_pipeline(path)`).
    Returns the folder path. A LoRA applied with hprune.apply_lora is not saved (it is not part of
    the state dict): apply it again after loading.
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
    _warn_lora_not_saved(model)
    state = model.state_dict()
    meta = [k for k, v in state.items() if v.device.type == "meta"]
    if meta:
        raise HpruneError(f"cannot save a model whose weights are on the meta device (e.g. {meta[0]}); "
                          f"load or randomise real weights first")
    odd = [k for k, v in state.items() if type(v) is not torch.Tensor]
    if odd:
        raise HpruneError(f"cannot save {odd[0]}: it is a {type(state[odd[0]]).__name__}, not a plain tensor "
                          f"(e.g. a weight converted by hprune.obs.to_semi_structured); save before converting")
    # before anything is written: load_compressed would refuse it
    check_finite(state, "save_compressed", consequence="refusing to write a model that would give non-finite "
                                                       "outputs (a diverged run?)")
    # written tensor by tensor from the model's own memory (a GPU or non-contiguous tensor is copied
    # a chunk at a time): the save needs no second copy of the weights
    tensors = {k: v.detach() for k, v in state.items()}
    with atomic_dir(path, overwrite=overwrite) as out:
        tmp = out if as_pipeline is None else _write_pipeline_components(as_pipeline, out, class_name,
                                                                          model_config(model))
        wfile = tmp / WEIGHTS_FILE
        # the same tensors give the same bytes; hashed while written
        sha, nbytes = save_safetensors(tensors, wfile, metadata={"format": "pt", "producer": "hprune"})
        doc = {
            "format": ARTIFACT_FORMAT,
            "versions": _versions(),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "class_name": class_name,
            "base_config": model_config(model),
            "recipe": recipe.get_recipe(model),
            "weights": {"file": WEIGHTS_FILE, "sha256": sha, "bytes": nbytes,
                        "tensors": len(tensors)},
            "stats": {"params": param_count(model), "weight_bytes": weight_bytes(model)},
            "extra": extra or {},
        }
        write_json(tmp / RECIPE_FILE, doc)
    return Path(path)


def _warn_lora_not_saved(model: nn.Module) -> None:
    from hprune.lora import lora_adapters

    names = lora_adapters(model)
    if names:
        import warnings

        warnings.warn(f"save_compressed stores the model without its LoRA ({', '.join(names)}): apply it again "
                      f"after loading (hprune.apply_lora)", UserWarning, stacklevel=3)


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
    for key, kind in (("class_name", str), ("base_config", dict), ("recipe", list), ("weights", dict)):
        if key not in doc:
            raise CheckpointError(f"{path / RECIPE_FILE}: corrupted recipe (missing {key!r})")
        if not isinstance(doc[key], kind):
            raise CheckpointError(f"{path / RECIPE_FILE}: corrupted recipe ({key} is {type(doc[key]).__name__}, "
                                  f"expected {kind.__name__})")
    bad = next((i for i, st in enumerate(doc["recipe"]) if not isinstance(st, dict)), None)
    if bad is not None:
        raise CheckpointError(f"{path / RECIPE_FILE}: corrupted recipe (step {bad} is not an object)")
    weights_path(path, doc)
    return doc


# Config keys that count blocks: each block stores at least one tensor, so none can exceed the
# number of tensors in the weights file.
_LAYER_COUNTS = ("num_layers", "num_single_layers")
MIN_CONFIG_BOUND = 4096  # every other number may reach the largest tensor dimension, or this


def check_config_bounds(folder: Path, doc: dict[str, Any], header: dict[str, Any]) -> None:
    """CheckpointError for a base_config number the weights file cannot hold, before anything is
    built: a layer count above the file's tensor count, any other integer above its largest tensor
    dimension (or MIN_CONFIG_BOUND), a negative or non-finite number. An edited hprune.json with
    num_layers 1e9 would otherwise build for minutes."""
    import math

    entries = [e for k, e in header.items() if k != "__metadata__" and isinstance(e, dict)]
    n_tensors = len(entries)
    biggest = max([MIN_CONFIG_BOUND] + [int(d) for e in entries for d in e.get("shape", []) if isinstance(d, int)])
    where = folder / RECIPE_FILE

    def check(key: str, v: Any) -> None:
        if isinstance(v, bool) or v is None or isinstance(v, str):
            return
        if isinstance(v, (list, tuple)):
            if len(v) > biggest:
                raise CheckpointError(f"{where}: base_config {key} has {len(v)} entries (corrupted)")
            for x in v:
                check(key, x)
            return
        if isinstance(v, dict):
            for k2, x in v.items():
                check(f"{key}.{k2}", x)
            return
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            raise CheckpointError(f"{where}: base_config {key} is {v!r}, not a finite number (corrupted)")
        limit = n_tensors if key in _LAYER_COUNTS else biggest
        if v < 0 or v > limit:
            raise CheckpointError(f"{where}: base_config {key}={v!r} is out of range for this artifact "
                                  f"(0..{limit}: its weights file holds {n_tensors} tensors, the largest "
                                  f"dimension {biggest}); the recipe was edited or corrupted")

    for key, v in doc["base_config"].items():
        if not key.startswith("_"):
            check(key, v)


def weights_path(folder: Path, doc: dict[str, Any]) -> Path:
    """The weights file a recipe names, which must lie inside the artifact folder: an absolute path
    or one climbing out with `..` (or a link leading out) is refused."""
    weights = doc.get("weights")
    name = weights.get("file", WEIGHTS_FILE) if isinstance(weights, dict) else None
    if not isinstance(name, str) or not name or "\x00" in name:
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


def artifact_structure(path: str | os.PathLike) -> tuple[Path, nn.Module, dict[str, Any], Path]:
    """(the artifact folder (find_artifact: a temporary folder of a killed save is refused), its
    model on the meta device with the recipe replayed, the recipe, the weights file): every number
    of hprune.json checked against the weights file's header before anything is built, and a
    base_config that does not build refused in one line. What load_compressed and a header-only
    look (hprune info) both start from."""
    from hprune.models.registry import build_from_config

    path = find_artifact(path)
    doc = read_recipe(path)
    wfile = weights_path(path, doc)
    check_config_bounds(path, doc, check_safetensors(wfile))  # before anything is built
    try:
        model = build_from_config(doc["class_name"], doc["base_config"], meta=True)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, ZeroDivisionError, OverflowError,
            RuntimeError, AssertionError) as exc:
        raise CheckpointError(f"{path / RECIPE_FILE}: base_config does not build a {doc['class_name']} "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); the "
                              f"recipe was edited or corrupted") from None
    return path, rebuild.replay(model, doc["recipe"]), doc, wfile


def load_compressed(path: str | os.PathLike, *, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None, verify: bool = True) -> nn.Module:
    """Loads an artifact written by `save_compressed`; returns the transformer in eval mode.
    `path` is the artifact folder, the folder `hprune compress` wrote (its artifact/), or a pipeline
    folder from `save_compressed(..., as_pipeline=...)` (its transformer/).

    Args:
        device: where the weights go.
        dtype: cast floating-point weights to this dtype (packed integer weights are untouched).
        verify: check the weights file's SHA-256 against the recipe (detects corruption).
    Raises CheckpointError for a missing, truncated or corrupted artifact."""
    from hprune.lora import enable_diffusers_lora
    from hprune.models.registry import load_state_into

    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise HpruneError(f"load_compressed: dtype must be a floating-point torch dtype (float32, bfloat16, "
                          f"float16), got {dtype}")
    path, model, doc, wfile = artifact_structure(path)
    if verify and doc["weights"].get("sha256") and _sha256(wfile) != doc["weights"]["sha256"]:
        raise CheckpointError(f"{wfile}: checksum mismatch (the weights file is corrupted or was replaced)")
    state = load_safetensors(wfile, device=device)
    check_finite(state, str(wfile))
    check_dtypes(state, str(wfile))
    load_state_into(model, state, str(path))
    if dtype is not None:
        model = model.to(dtype)
    return enable_diffusers_lora(model.to(device).eval())


# -- where artifacts are, and pipeline folders around them -------------------------------------------
PIPELINE_INDEX = "model_index.json"
# config keys a base pipeline's transformer must share with the compressed one (its VAE latents,
# text encoders' widths, patching)
_PIPELINE_KEYS = ("in_channels", "out_channels", "patch_size", "joint_attention_dim", "pooled_projection_dim",
                  "guidance_embeds")


def find_artifact(path: str | os.PathLike) -> Path:
    """The artifact folder behind `path`: the folder itself, the artifact/ that `hprune compress`
    writes, or a pipeline folder's transformer/. CheckpointError names what is missing."""
    from hprune.models.registry import artifact_in

    from hprune.owned import is_temp_path

    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"artifact not found: {p}")
    # the folder itself (a folder inside one is how compress checks its artifact reloads before the rename)
    if is_temp_path(p) or is_temp_path(p.resolve()):
        raise CheckpointError(f"{p}: a temporary folder left by an interrupted hprune save, not an artifact "
                              f"(the next run on that output removes it)")
    art = artifact_in(p)
    if art is not None:
        return art
    if (p / PIPELINE_INDEX).is_file():
        raise CheckpointError(f"{p}: a diffusers pipeline folder whose transformer is not hprune-compressed "
                              f"(no transformer/{RECIPE_FILE}); put a compressed transformer in it with "
                              f"hprune.load_pipeline({str(p)!r}, ARTIFACT)")
    return p  # read_recipe names the problem


def check_pipeline_fits(base_class: str | None, base_config: dict[str, Any], class_name: str,
                        config: dict[str, Any], where: str) -> None:
    """HpruneError unless a base pipeline's transformer (class, config) can be replaced by the
    compressed one: same class and the same inputs / outputs."""
    if base_class and base_class != class_name:
        raise HpruneError(f"{where}: the pipeline's transformer is a {base_class}, the compressed model a {class_name}")
    # inputs / outputs first (the clearest message), then every other architecture key: an artifact
    # of another variant (SD3.5 on SD3: other layers, norms) would run silently wrong
    keys = list(_PIPELINE_KEYS) + sorted(k for k in base_config if not k.startswith("_") and k not in _PIPELINE_KEYS)
    for key in keys:
        if key in base_config and key in config and _plain(base_config[key]) != _plain(config[key]):
            raise HpruneError(f"{where}: the pipeline's transformer has {key}={base_config[key]!r}, the compressed "
                              f"model {key}={config[key]!r} (a different base model?)")


def _plain(v: Any) -> Any:
    """Config values as JSON has them (tuples are lists)."""
    import json

    return json.loads(json.dumps(v, default=list))


def _write_pipeline_components(base: Any, out: Path, class_name: str, config: dict[str, Any]) -> Path:
    """Writes the base pipeline's components except its transformer into `out` (hard links where
    the filesystem allows, else copies) and a model_index.json naming `class_name` as the
    transformer. Returns out/transformer (created, empty) for the artifact."""
    import shutil

    if isinstance(base, (str, os.PathLike)):
        src = Path(base)
        index = read_json(src / PIPELINE_INDEX, f"base pipeline index ({PIPELINE_INDEX})")
        if not isinstance(index, dict) or "transformer" not in index:
            raise HpruneError(f"{src}: not a diffusers pipeline folder with a transformer")
        cfg_file = src / "transformer" / "config.json"
        base_cfg = read_json(cfg_file, "base transformer config") if cfg_file.is_file() else {}
        base_cls = (index["transformer"] or [None, None])[1]
        check_pipeline_fits(base_cls, base_cfg, class_name, config, str(src))
        for entry in src.iterdir():
            if entry.name in ("transformer", PIPELINE_INDEX) or entry.name.startswith("."):
                continue
            if entry.is_dir():
                shutil.copytree(entry, out / entry.name, copy_function=_link_or_copy)
            else:
                _link_or_copy(entry, out / entry.name)
    else:
        if not hasattr(base, "save_pretrained") or getattr(base, "transformer", None) is None:
            raise HpruneError(f"as_pipeline must be a diffusers pipeline (or its folder) with a transformer, "
                              f"got {type(base).__name__}")
        own = base.transformer
        check_pipeline_fits(type(own).__name__, dict(own.config), class_name, config, type(base).__name__)
        import logging

        base.register_modules(transformer=None)
        # diffusers logs "self.transformer=None ... cannot be saved." for the slot left empty on purpose
        log = logging.getLogger("diffusers.pipelines.pipeline_utils")
        level = log.level
        log.setLevel(logging.ERROR)
        try:
            base.save_pretrained(out, safe_serialization=True)
        finally:
            log.setLevel(level)
            base.register_modules(transformer=own)
        index = read_json(out / PIPELINE_INDEX, PIPELINE_INDEX)
    index["transformer"] = ["diffusers", class_name]
    write_json(out / PIPELINE_INDEX, index)
    (out / "transformer").mkdir(exist_ok=True)
    return out / "transformer"


def _link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> str:
    import shutil

    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return str(dst)
