"""Kernels: Triton and compiled ops behind one dispatch point (`hprune.kernels.dispatch`)."""
from hprune.kernels.dispatch import available, backends, select, use_backend

__all__ = ["available", "backends", "select", "use_backend"]
