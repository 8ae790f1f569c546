"""Built-in model names, building a transformer from its config, reading diffusers weights, and
classifying a MODEL argument (`resolve`). Loading any MODEL argument, compressed artifacts
included, is `hprune.loading.load_model`, above this package."""
from __future__ import annotations

import contextlib
import glob
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn

from hprune.errors import CheckpointError, ModelNotFoundError

from hprune.models.adapters import MODEL_CLASSES, model_class_name


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    class_name: str
    config: dict[str, Any]
    tiny: bool  # CPU-fast, seeded random weights; otherwise real-size (meta, or random on a GPU)
    description: str
    sample: dict[str, Any] = field(default_factory=dict)  # shapes of a typical input (tokens etc.)
    # "module:function" hooks for built-ins with real weights and prompts (the ShapesBench teacher):
    # loader(dtype, device) -> model; calibration(model, n_prompts, num_steps, seed) -> CalibrationSet
    loader: str | None = None
    calibration: str | None = None


_TINY_SD3 = dict(sample_size=32, patch_size=2, in_channels=4, out_channels=4, num_layers=8, attention_head_dim=16,
                 num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=64, pooled_projection_dim=32,
                 pos_embed_max_size=32, dual_attention_layers=(), qk_norm=None)

_FLUX1 = dict(patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38, attention_head_dim=128,
              num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=False,
              axes_dims_rope=(16, 56, 56))

BUILTINS: dict[str, BuiltinModel] = {
    "tiny-sd3": BuiltinModel(
        "tiny-sd3", "SD3Transformer2DModel", _TINY_SD3, True,
        "SD3 MMDiT, 8 blocks, hidden 64 (random weights, seeded)",
        dict(text_len=16, latent_size=32)),
    "tiny-sd35": BuiltinModel(
        "tiny-sd35", "SD3Transformer2DModel",
        {**_TINY_SD3, "dual_attention_layers": (0, 1, 2), "qk_norm": "rms_norm"}, True,
        "SD3.5 MMDiT, 8 blocks (dual attention in 0-2, qk rms_norm), hidden 64 (random weights, seeded)",
        dict(text_len=16, latent_size=32)),
    "tiny-flux": BuiltinModel(
        "tiny-flux", "FluxTransformer2DModel",
        dict(patch_size=1, in_channels=16, out_channels=None, num_layers=2, num_single_layers=4,
             attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
             guidance_embeds=False, axes_dims_rope=(4, 4, 8)), True,
        "FLUX.1 MMDiT, 2 double + 4 single blocks, hidden 32 (random weights, seeded)",
        dict(text_len=16, latent_size=32)),
    "shapes-teacher": BuiltinModel(
        "shapes-teacher", "SD3Transformer2DModel",
        dict(sample_size=32, patch_size=4, in_channels=3, out_channels=3, num_layers=12, attention_head_dim=32,
             num_attention_heads=3, joint_attention_dim=64, caption_projection_dim=96, pooled_projection_dim=64,
             pos_embed_max_size=8, dual_attention_layers=(), qk_norm=None), True,
        "ShapesBench teacher: SD3 MMDiT, 12 blocks, hidden 96, trained in pixel space on coloured shapes "
        "(hprune eval)", dict(text_len=12, latent_size=32),
        loader="hprune.shapes.checkpoint:builtin_loader", calibration="hprune.shapes.checkpoint:builtin_calibration"),
    "sd3.5-large": BuiltinModel(
        "sd3.5-large", "SD3Transformer2DModel",
        dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38, attention_head_dim=64,
             num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
             pooled_projection_dim=2048, pos_embed_max_size=192, dual_attention_layers=(), qk_norm="rms_norm"),
        False, "Stable Diffusion 3.5 Large transformer (8.1B), architecture only",
        dict(text_len=333, latent_size=128)),
    "sd3.5-medium": BuiltinModel(
        "sd3.5-medium", "SD3Transformer2DModel",
        dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
             num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
             pooled_projection_dim=2048, pos_embed_max_size=384, dual_attention_layers=tuple(range(13)),
             qk_norm="rms_norm"),
        False, "Stable Diffusion 3.5 Medium transformer (2.2B), architecture only",
        dict(text_len=333, latent_size=128)),
    "flux.1-schnell": BuiltinModel(
        "flux.1-schnell", "FluxTransformer2DModel", _FLUX1, False,
        "FLUX.1-schnell transformer (11.9B), architecture only", dict(text_len=256, latent_size=128)),
    "flux.1-dev": BuiltinModel(
        "flux.1-dev", "FluxTransformer2DModel", {**_FLUX1, "guidance_embeds": True}, False,
        "FLUX.1-dev transformer (11.9B, guidance embedding), architecture only", dict(text_len=512, latent_size=128)),
}


def model_class(class_name: str) -> type:
    import diffusers

    if class_name not in MODEL_CLASSES:
        raise ModelNotFoundError(f"unsupported transformer class {class_name!r}; hprune supports {MODEL_CLASSES}")
    return getattr(diffusers, class_name)


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Creates module parameters on the meta device (no memory, no init cost) while buffers stay
    real, since some (positional embeddings) are computed from the config in __init__."""
    original = nn.Module.register_parameter

    def register(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(self, name, param)
        if param is not None and param.device.type != "meta":
            self._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def build_from_config(class_name: str, config: dict[str, Any], *, meta: bool | str = False,
                      dtype: torch.dtype | None = None, seed: int | None = 0) -> nn.Module:
    """Instantiates a diffusers transformer from a config dict.

    meta=True: every tensor on the meta device (instant; for counting, or before loading a state
    dict, see `load_state_into`); meta="params": parameters on meta, buffers computed for real;
    meta=False: random-initialised on the CPU with `seed`."""
    cls = model_class(class_name)
    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    try:
        if meta == "params":
            with params_on_meta():
                model = cls.from_config(cfg)
        elif meta:
            with torch.device("meta"):
                model = cls.from_config(cfg)
        else:
            with torch.random.fork_rng(devices=[]):
                if seed is not None:
                    torch.manual_seed(seed)
                model = cls.from_config(cfg)
    except TypeError as exc:
        raise CheckpointError(f"config does not fit {class_name}: {exc}") from None
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def randomize_(model: nn.Module, device: torch.device | str, dtype: torch.dtype = torch.bfloat16,
               seed: int = 0, std: float = 0.02) -> nn.Module:
    """Materialises a meta-parameter model on `device` with random weights (for latency and
    memory measurements, which do not depend on the values). Buffers are kept."""
    bufs = {n: b.detach().clone() for n, b in model.named_buffers()}
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, std, generator=gen)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)
        for n, b in bufs.items():
            mod, _, attr = n.rpartition(".")
            model.get_submodule(mod).register_buffer(attr, b.to(device))
    return model.to(dtype)


def read_config(path: Path) -> dict[str, Any]:
    from hprune.io import read_json

    cfg = read_json(path, "model config")
    if not isinstance(cfg, dict) or cfg.get("_class_name") not in MODEL_CLASSES:
        raise ModelNotFoundError(
            f"{path}: not a supported transformer config (_class_name must be one of {MODEL_CLASSES}, "
            f"got {cfg.get('_class_name') if isinstance(cfg, dict) else type(cfg).__name__!r})")
    return cfg


def _dtype_clash(want: torch.dtype, got: torch.dtype) -> bool:
    """Integer / bool tensors (packed codes, indices) must keep their dtype exactly; floating-point
    ones may come in any float dtype the kernels take (the model takes the stored one)."""
    if want.is_floating_point:
        return got not in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    return got != want


def load_state_into(model: nn.Module, state: dict[str, torch.Tensor], source: str, meta: bool = False) -> nn.Module:
    """Loads `state` into a (possibly meta) model, strictly, with a clear error on mismatch.
    `meta`: the state is meta tensors (stored shapes and dtypes, no data) on purpose."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    kind = [k for k in own if k in state and k not in wrong and _dtype_clash(own[k].dtype, state[k].dtype)]
    if kind:
        k = kind[0]
        raise CheckpointError(f"{source}: tensor {k} is stored as {str(state[k].dtype).replace('torch.', '')}, the "
                              f"model needs {str(own[k].dtype).replace('torch.', '')}")
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} with the wrong shape (e.g. {k}: {tuple(state[k].shape)} vs "
                         f"{tuple(own[k].shape)})")
        raise CheckpointError(f"{source}: weights do not match the model: " + "; ".join(parts))
    model.load_state_dict(state, strict=True, assign=True)
    if meta:
        return model
    # SD3/FLUX keep no non-persistent buffers, so nothing may be left on meta.
    left = [n for n, t in model.state_dict(keep_vars=True).items() if t.device.type == "meta"]
    left += [n for n, b in model.named_buffers() if b.device.type == "meta"]
    if left:
        raise CheckpointError(f"{source}: {left[0]} was not loaded (unsupported model layout)")
    return model


def weight_files(folder: Path) -> list[str]:
    """The .safetensors files of a diffusers model folder, each checked (its header; no data read)."""
    from hprune.io import check_safetensors

    files = sorted(glob.glob(str(folder / "*.safetensors")))
    if not files:
        if glob.glob(str(folder / "*.bin")):
            raise CheckpointError(f"{folder}: only .bin (pickle) weights found; hprune reads safetensors only")
        raise CheckpointError(f"{folder}: no .safetensors weights next to config.json")
    for f in files:
        check_safetensors(f)
    return files


def load_diffusers_folder(folder: Path, dtype: torch.dtype | None, device: str | torch.device) -> nn.Module:
    from hprune.io import check_finite, load_safetensors

    cfg = read_config(folder / "config.json")
    files = weight_files(folder)
    state: dict[str, torch.Tensor] = {}
    for f in files:
        part = load_safetensors(f, device=device)
        check_finite(part, f)
        state.update(part)
    model = build_from_config(cfg["_class_name"], cfg, meta=True)
    load_state_into(model, state, str(folder))
    return model.to(dtype) if dtype is not None else model


def artifact_in(folder: Path) -> Path | None:
    """The hprune artifact in `folder`: the folder itself, the artifact/ that `hprune compress`
    writes, or a compressed pipeline's transformer/ (the first with an hprune.json), else None."""
    for art in (folder, folder / "artifact", folder / "transformer"):
        if (art / "hprune.json").is_file():
            return art
    return None


def resolve(spec: str) -> tuple[str, Any]:
    """Classifies a MODEL argument: ('builtin', BuiltinModel) | ('artifact', Path) |
    ('diffusers', Path) | ('safetensors', Path). Raises ModelNotFoundError with the options."""
    if spec in BUILTINS:
        return "builtin", BUILTINS[spec]
    p = Path(spec)
    if not p.exists():
        if os.sep not in spec and not spec.endswith(".safetensors"):
            raise ModelNotFoundError(f"unknown model {spec!r}: not a built-in name ({', '.join(BUILTINS)}) "
                                     f"and no such path")
        raise ModelNotFoundError(f"model path not found: {spec}")
    if p.is_dir():
        art = artifact_in(p)
        if art is not None:
            return "artifact", art
        if (p / "model_index.json").exists():
            if not (p / "transformer").is_dir():
                raise ModelNotFoundError(f"{p}: pipeline folder without a transformer/ subfolder")
            return "diffusers", p / "transformer"
        if (p / "config.json").exists():
            return "diffusers", p
        if (p / "transformer" / "config.json").exists():
            return "diffusers", p / "transformer"
        raise ModelNotFoundError(f"{p}: not a diffusers model or pipeline folder (no config.json, "
                                 f"model_index.json or hprune.json)")
    if p.suffix == ".safetensors":
        return "safetensors", p
    raise ModelNotFoundError(f"{p}: expected a folder or a .safetensors file")


def hook(spec: str) -> Any:
    """The function named by a "package.module:function" hook of a built-in."""
    import importlib

    mod, _, fn = spec.partition(":")
    return getattr(importlib.import_module(mod), fn)


def fingerprint(model: nn.Module) -> str:
    """Identifies an architecture and its structure: class, base config (without diffusers'
    bookkeeping keys) and the structural recipe hprune applied."""
    import hashlib

    from hprune import recipe

    cfg = {k: v for k, v in model_config(model).items() if not k.startswith("_")}
    doc = {"class": model_class_name(model), "config": cfg, "recipe": recipe.get_recipe(model)}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def weights_fingerprint(model: nn.Module) -> str:
    """Identifies a model's weights, not only its structure: fingerprint(model) plus a content
    digest of every tensor of its state dict (hprune.owned.tensor_digest: sampled elements and
    each tensor's sum, cheap at any size). Two checkpoints of one architecture differ here."""
    from hprune.owned import tensor_digest

    return fingerprint(model) + "-" + tensor_digest(model.state_dict().items())


def model_config(model: nn.Module) -> dict[str, Any]:
    """The diffusers config of a transformer as plain JSON-able data (tuples become lists)."""
    cfg = dict(model.config)
    return json.loads(json.dumps(cfg, default=list))
