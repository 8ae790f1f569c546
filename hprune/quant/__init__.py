"""4-bit weight quantisation (W4A16): formats and packing, `W4A16Linear`, `quantize_linear`,
`quantize_model` (hprune kernels, or bitsandbytes Linear4bit for comparison).

    from hprune.quant import quantize_model
    report = quantize_model(transformer)            # int4, group 64, Linear layers of the blocks
    print(report)

The "quantize" step is recorded in the model's recipe, so `hprune.save_compressed` /
`hprune.load_compressed` round-trip quantised models.
"""
from typing import Any

import torch.nn as nn

from hprune import recipe
from hprune.quant.formats import (DEFAULT_FORMAT, DEFAULT_GROUP_SIZE, FORMATS, NF4_CODE, QuantizedWeight,
                                  bytes_per_param, dequantize, pack_int4, quantize, unpack_int4)
from hprune.quant.linear import (BLOCK_PREFIXES, QuantReport, W4A16Linear, eligible_linears, quantize_linear,
                                 quantize_model, replay_quantize)


@recipe.register_op("quantize")
def _replay(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    return replay_quantize(model, spec)


__all__ = [
    "DEFAULT_FORMAT", "DEFAULT_GROUP_SIZE", "FORMATS", "NF4_CODE", "QuantizedWeight", "bytes_per_param",
    "dequantize", "pack_int4", "quantize", "unpack_int4", "BLOCK_PREFIXES", "QuantReport", "W4A16Linear",
    "eligible_linears", "quantize_linear", "quantize_model",
]
