"""Where the CUTLASS headers for csrc/cuda/cutlass come from: the pinned `nvidia-cutlass` wheel.

No vendored copy: the build (setup.py, which loads this file by path) and the compile-check tests
take `cutlass_library/source/include` from the installed wheel, and only from the pinned version,
since the kernel was compiled and checked against exactly that one
(`pip install nvidia-cutlass==4.2.0.0`). HPRUNE_CUTLASS_INCLUDE=/path/to/cutlass/include overrides
the lookup (another checkout at your own risk). Standard library only: no torch, no hprune imports.
"""
from __future__ import annotations

import importlib.util
import os
from importlib import metadata
from typing import Optional

CUTLASS_VERSION = "4.2.0.0"
CUTLASS_REQUIREMENT = f"nvidia-cutlass=={CUTLASS_VERSION}"

# nvcc flags of the CUTLASS module (setup.py) and of its compile test; sm_90a only. torch's
# extension build puts -D__CUDA_NO_HALF_OPERATORS__ and its siblings first (COMMON_NVCC_FLAGS);
# CUTLASS's half / bfloat16 code expects the CUDA operators and conversions, so they are undone.
NVCC_FLAGS = [
    "-O3", "-std=c++17", "--expt-relaxed-constexpr", "-DNDEBUG", "-lineinfo",
    "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-U__CUDA_NO_HALF2_OPERATORS__",
    "-gencode=arch=compute_90a,code=sm_90a",
]


def _is_include_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "cutlass", "cutlass.h")) and os.path.isfile(
        os.path.join(path, "cute", "tensor.hpp"))


def cutlass_include() -> tuple[Optional[str], str]:
    """(include directory or None, why not / where from)."""
    override = os.environ.get("HPRUNE_CUTLASS_INCLUDE")
    if override:
        if _is_include_dir(override):
            return override, f"HPRUNE_CUTLASS_INCLUDE={override}"
        return None, f"HPRUNE_CUTLASS_INCLUDE={override} has no cutlass/cutlass.h and cute/tensor.hpp"
    try:
        version = metadata.version("nvidia-cutlass")
    except metadata.PackageNotFoundError:
        return None, f"nvidia-cutlass is not installed (pip install {CUTLASS_REQUIREMENT})"
    if version != CUTLASS_VERSION:
        return None, f"nvidia-cutlass {version} is installed; the kernels are pinned to {CUTLASS_REQUIREMENT}"
    spec = importlib.util.find_spec("cutlass_library")  # locates the package without running it
    for root in (spec.submodule_search_locations or []) if spec else []:
        inc = os.path.join(root, "source", "include")
        if _is_include_dir(inc):
            return inc, f"{CUTLASS_REQUIREMENT} ({inc})"
    return None, f"{CUTLASS_REQUIREMENT} is installed but cutlass_library/source/include is missing"
