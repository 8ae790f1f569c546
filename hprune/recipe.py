"""The structural recipe of a compressed model: the ordered list of operations that turn the
base architecture (its diffusers config) into the compressed one. Artifacts store it as JSON and
replay it on an empty (meta) model before loading the weights, so no modules are pickled.

Each stage that changes structure registers an op here (`prune` in hprune.models.surgery,
`quantize` in hprune.quant, ...) and records itself on the model when it runs. This module sits
below every stage and imports none of them: `hprune.rebuild` (above the stages) imports them all
and replays a recipe with every op known.
"""
from __future__ import annotations

import copy
from typing import Any, Callable

import torch.nn as nn

_OPS: dict[str, Callable[[nn.Module, dict[str, Any]], nn.Module]] = {}
_ATTR = "_hprune_recipe"


def register_op(name: str):
    """Decorator: `fn(model, spec) -> model` rebuilds the structure of op `name` from its spec."""

    def deco(fn: Callable[[nn.Module, dict[str, Any]], nn.Module]):
        _OPS[name] = fn
        return fn

    return deco


def record(model: nn.Module, op: str, spec: dict[str, Any]) -> None:
    """Appends a structural op to the model's recipe (call after the op has been applied)."""
    steps = list(getattr(model, _ATTR, []))
    steps.append({"op": op, **copy.deepcopy(spec)})
    object.__setattr__(model, _ATTR, steps)


def get_recipe(model: nn.Module) -> list[dict[str, Any]]:
    return copy.deepcopy(list(getattr(model, _ATTR, [])))


def replay(model: nn.Module, steps: list[dict[str, Any]]) -> nn.Module:
    """Applies a recorded recipe to a freshly built base model (typically on meta), with the ops
    registered so far. `hprune.rebuild.replay` first imports every stage that provides one."""
    from hprune.errors import CheckpointError, HpruneError

    for i, step in enumerate(steps):
        op = step.get("op") if isinstance(step, dict) else None
        if not isinstance(op, str) or op not in _OPS:
            raise CheckpointError(f"recipe step {i}: unknown operation {op!r} (this hprune knows {sorted(_OPS)}; "
                                  f"was the artifact written by a newer version?)")
        spec = {k: v for k, v in step.items() if k != "op"}
        try:
            model = _OPS[op](model, spec)
        except HpruneError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError, ZeroDivisionError,
                AssertionError, RuntimeError) as exc:
            # the spec comes from a file (an artifact's hprune.json): a field missing, of the wrong type or
            # out of range is a corrupted recipe, not a bug
            detail = str(exc).splitlines()[0][:200] if str(exc) else ""
            raise CheckpointError(f"recipe step {i} ({op}): corrupted or edited spec ({type(exc).__name__}"
                                  f"{': ' + detail if detail else ''})") from None
    return model
