"""Rebuilds a compressed model's structure from its recipe, with every structural op hprune has.

`hprune.recipe` is the registry at the bottom (stages register their ops there on import); this
module sits above the stages that provide ops (model surgery, OBS-Diff, quantisation) and imports
them, so a replay never misses an op because its stage was not imported yet.
"""
from __future__ import annotations

from typing import Any

import torch.nn as nn

import hprune.models.surgery  # noqa: F401  op "prune"
import hprune.obs.sequential  # noqa: F401  ops "sparsity" and "shrink"
import hprune.quant  # noqa: F401  ops "quantize" and "quant_act"
from hprune import recipe


def known_ops() -> list[str]:
    """Names of every structural op a recipe may contain."""
    return sorted(recipe._OPS)


def replay(model: nn.Module, steps: list[dict[str, Any]]) -> nn.Module:
    """Applies a recorded recipe (`hprune.recipe.get_recipe`) to a freshly built base model
    (typically on meta); raises CheckpointError for an op this version does not know."""
    return recipe.replay(model, steps)
