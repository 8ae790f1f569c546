"""Loads the compiled extension `hprune._C` if it was built; the library works without it."""
from __future__ import annotations

import functools
import importlib
import os


@functools.lru_cache(maxsize=None)
def load_extension():
    """Returns the `hprune._C` module, or None when it is absent or disabled (HPRUNE_NO_EXT=1).

    Importing it registers its C++ ops under `torch.ops.hprune`."""
    from hprune.env import flag

    if flag("HPRUNE_NO_EXT"):  # 1 / true / yes / on
        return None
    try:
        import torch  # noqa: F401  - libtorch must be loaded before the extension
        _C = importlib.import_module("hprune._C")
    except ImportError as exc:  # not built, or built against another torch
        load_extension.error = str(exc)
        return None
    return _C


load_extension.error = None  # type: ignore[attr-defined]


@functools.lru_cache(maxsize=None)
def load_cutlass_extension():
    """Returns `hprune._C_cutlass` (the sm_90a CUTLASS kernels, built only with CUDA and the pinned
    nvidia-cutlass headers), or None. Importing it registers `torch.ops.hprune.w4a16_mm_cutlass`."""
    if load_extension() is None:
        return None
    try:
        _C_cutlass = importlib.import_module("hprune._C_cutlass")
    except ImportError as exc:
        load_cutlass_extension.error = str(exc)
        return None
    return _C_cutlass


load_cutlass_extension.error = None  # type: ignore[attr-defined]


def describe_build() -> str:
    """One line for `hprune info` / `hprune selftest`: whether hprune._C was built, with CUDA or
    not, and what runs without it."""
    info = build_info()
    if not info["available"]:
        return (f"compiled extension hprune._C: NOT built ({info.get('reason')}); the Triton / PyTorch paths "
                f"run instead (reinstall with torch present: pip install --no-build-isolation .)")
    kinds = "CPU C++" + (" + CUDA" if info.get("cuda") else "") + " kernels"
    extra = "" if info.get("cuda") else " (no CUDA kernels: built without a CUDA torch or nvcc)"
    if info.get("cuda"):
        extra += ("; CUTLASS module hprune._C_cutlass (sm_90a): "
                  + ("built" if load_cutlass_extension() is not None else "not built"))
    return f"compiled extension hprune._C: built, {kinds}, against torch {info.get('torch_version')}{extra}"


def build_info() -> dict:
    """What the compiled extension contains: {'available', 'cuda', 'openmp', ...}."""
    ext = load_extension()
    if ext is None:
        return {"available": False, "cuda": False, "reason": load_extension.error or "HPRUNE_NO_EXT=1 or not built"}
    info = dict(ext.build_info())
    info["available"] = True
    info["cutlass"] = load_cutlass_extension() is not None
    return info
