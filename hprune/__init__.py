"""hprune: compression toolkit for large text-to-image diffusion transformers (SD3/SD3.5, FLUX.1).

Library entry points (imported lazily so `import hprune` stays cheap):
    load_model, save_compressed, load_compressed, load_pipeline, apply_lora, set_lora_scale,
    remove_lora, enable_diffusers_lora, PrunePlan, apply_plan, model_report,
    SensitivityAdamW
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

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
