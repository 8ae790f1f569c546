"""hprune: compression toolkit for large text-to-image diffusion transformers (SD3/SD3.5, FLUX.1).

Importing hprune registers its ops under `torch.ops.hprune` (w4a16_mm, w4a8_mm, scaled_adamw_),
so any project can call them after `import hprune`; the library entry points below are imported
lazily, so `import hprune` costs little more than `import torch`:
    load_model, save_compressed, load_compressed, load_pipeline, apply_lora, set_lora_scale,
    remove_lora, enable_diffusers_lora, PrunePlan, apply_plan, model_report,
    SensitivityAdamW
"""
from __future__ import annotations

import importlib
from typing import Any

from hprune._version import __version__

_LAZY = {
    "load_model": "hprune.loading",
    "PrunePlan": "hprune.models",
    "apply_plan": "hprune.models",
    "model_report": "hprune.models",
    "get_adapter": "hprune.models",
    "save_compressed": "hprune.artifacts",
    "load_compressed": "hprune.artifacts",
    "load_pipeline": "hprune.loading",
    "apply_lora": "hprune.lora",
    "set_lora_scale": "hprune.lora",
    "remove_lora": "hprune.lora",
    "enable_diffusers_lora": "hprune.lora",
    "HpruneError": "hprune.errors",
    "SensitivityAdamW": "hprune.optim",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hprune' has no attribute {name!r}")


__all__ = list(_LAZY) + ["__version__"]


def _drop_known_noise() -> None:
    """bitsandbytes logs a warning on every import on CPUs with AVX-512 BF16 when the optional
    `kernels` package is absent ("Failed to load CPU gemm_4bit_forward from kernels-community");
    hprune does not use that kernel, so that one message is dropped (every other bitsandbytes
    message still shows)."""
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda record: "kernels-community" not in str(record.msg))


def _register_ops() -> None:
    try:
        import torch  # noqa: F401
    except ImportError:  # installed without torch (e.g. only to read its metadata): no ops to register
        return
    import hprune.kernels.ops  # noqa: F401


_drop_known_noise()
_register_ops()
