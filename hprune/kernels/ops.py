"""Importing this module registers every public op under `torch.ops.hprune` (`import hprune`
does): w4a16_mm, w4a8_mm and scaled_adamw_ (Python op definitions; ~40 ms once torch is loaded),
plus the compiled extension's ops when hprune._C was built."""
from __future__ import annotations

from hprune._ext import load_extension
from hprune.kernels import scaled_adamw, w4a8, w4a16  # noqa: F401 - each defines its op on import

load_extension()  # hprune._C's TORCH_LIBRARY ops (CUDA / CPU kernels); a missing build is not an error here
