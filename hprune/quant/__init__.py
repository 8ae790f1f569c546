"""4-bit weight quantisation (W4A16, and W4A8 with FP8 activations): formats and packing,
`W4A16Linear`, `W4A8Linear`, `quantize_linear`, `quantize_model` (hprune kernels, or bitsandbytes
Linear4bit for comparison), `set_activation_quant`.

    from hprune.quant import quantize_model
    report = quantize_model(transformer)            # int4, group 64, Linear layers of the blocks
    print(report)
    quantize_model(other, act="fp8")                # W4A8: the same weights, FP8 activations
    quantize_model(m, method="gptq", calib=calib)   # codes chosen with each layer's input Hessian

The "quantize" step is recorded in the model's recipe, so `hprune.save_compressed` /
`hprune.load_compressed` round-trip quantised models.

Names are imported lazily so that `import hprune.quant` (which registers the recipe ops) stays
cheap: the modules behind them import the kernels and, with them, Triton.
"""
from __future__ import annotations

import importlib
from typing import Any

import torch.nn as nn

from hprune import recipe

_LAZY = {
    "DEFAULT_FORMAT": "hprune.formats", "DEFAULT_GROUP_SIZE": "hprune.formats",
    "FORMATS": "hprune.formats", "NF4_CODE": "hprune.formats",
    "QuantizedWeight": "hprune.formats", "bytes_per_param": "hprune.formats",
    "dequantize": "hprune.formats", "pack_int4": "hprune.formats", "quantize": "hprune.formats",
    "unpack_int4": "hprune.formats", "from_bnb_4bit": "hprune.formats",
    "convert_bnb_model": "hprune.quant.model",
    "BLOCK_PREFIXES": "hprune.quant.linear", "QuantReport": "hprune.quant.model",
    "W4A16Linear": "hprune.quant.linear", "eligible_linears": "hprune.quant.model",
    "W4A8Linear": "hprune.quant.linear", "set_activation_quant": "hprune.quant.model",
    "quantize_linear": "hprune.quant.linear", "quantize_model": "hprune.quant.model",
    "QUANT_METHODS": "hprune.quant.linear",
    "gptq_quantize": "hprune.quant.gptq", "hessian_error": "hprune.quant.gptq",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hprune.quant' has no attribute {name!r}")


@recipe.register_op("quantize")
def _replay(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    from hprune.quant.model import replay_quantize

    return replay_quantize(model, spec)


@recipe.register_op("quant_act")
def _replay_act(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    from hprune.quant.model import replay_quant_act

    return replay_quant_act(model, spec)


__all__ = list(_LAZY)
