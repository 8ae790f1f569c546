"""The one place that decides which implementation runs an op.

Every op registers named backends; the automatic choice first asks the table `ROUTES` (which
backend serves which op, GPU architecture and M range), then takes the first backend that can
run on the input's device in the order of `PREFERENCE`:

    cutlass    CUTLASS (sm_90a) kernels from `hprune._C_cutlass`: only where a row of ROUTES names them
    cuda       CUDA C++ from `hprune._C` (built only with a CUDA torch and nvcc)
    triton     Triton kernels (on a GPU; on the CPU only when forced, under TRITON_INTERPRET=1)
    cpp        CPU C++ from `hprune._C`
    reference  plain PyTorch: runs everywhere, and is the oracle the tests compare against

A backend can be forced, strongest first:
    1. the op's `backend=` argument,
    2. `with hprune.kernels.use_backend("triton"): ...` (this thread only),
    3. `HPRUNE_BACKEND_<OP>=name` (e.g. HPRUNE_BACKEND_W4A16_MM=triton), then `HPRUNE_BACKEND=name`.
A forced backend that cannot run raises `BackendUnavailableError` naming why; it never falls
back silently. (1) and the per-op variable in (3) are strict for ops that lack the backend too;
(2) and `HPRUNE_BACKEND` apply only to ops that have a backend of that name, so one setting can
force a family of ops without breaking the others.
"""
from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from hprune.errors import BackendUnavailableError

PREFERENCE = ("cutlass", "cuda", "triton", "cpp", "reference")


@dataclass(frozen=True)
class Backend:
    name: str
    fn: Callable
    supports: Callable[[torch.device], bool]  # can it run on this device at all
    auto: Callable[[torch.device], bool]  # may the automatic choice pick it there
    why_not: Callable[[torch.device], str]  # message when it cannot run


_REGISTRY: dict[str, dict[str, Backend]] = {}
_local = threading.local()


def _always(_device: torch.device) -> bool:
    return True


def register(op: str, name: str, *, supports: Callable[[torch.device], bool] = _always,
             auto: Callable[[torch.device], bool] | None = None,
             why_not: Callable[[torch.device], str] | None = None) -> Callable[[Callable], Callable]:
    """Decorator: registers `fn` as backend `name` of `op`."""
    if name not in PREFERENCE:
        raise ValueError(f"unknown backend {name!r}; expected one of {PREFERENCE}")

    def deco(fn: Callable) -> Callable:
        _REGISTRY.setdefault(op, {})[name] = Backend(
            name, fn, supports, auto or supports,
            why_not or (lambda d: f"backend {name!r} of {op} does not run on device {d}"))
        return fn

    return deco


def backends(op: str) -> list[str]:
    """Names of the backends registered for `op`, in preference order."""
    regs = _REGISTRY.get(op, {})
    return [n for n in PREFERENCE if n in regs]


def available(op: str, device: torch.device | str) -> list[str]:
    """Backends of `op` that can run on `device` (forced or not), in preference order."""
    device = torch.device(device)
    regs = _REGISTRY.get(op, {})
    return [n for n in PREFERENCE if n in regs and regs[n].supports(device)]


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Forces backend `name` for every op that has it, inside the block (None: no forcing)."""
    prev = getattr(_local, "forced", None)
    _local.forced = name
    try:
        yield
    finally:
        _local.forced = prev


def _forced(op: str, explicit: str | None) -> tuple[str | None, bool]:
    """Returns (backend name, strict) of the strongest forcing that applies to `op`."""
    if explicit:
        return explicit, True
    ctx = getattr(_local, "forced", None)
    if ctx:
        return ctx, False
    per_op = os.environ.get(f"HPRUNE_BACKEND_{op.upper()}")
    if per_op:
        return per_op, True
    glob = os.environ.get("HPRUNE_BACKEND")
    if glob:
        return glob, False
    return None, False


# ---- which backend serves which sizes ------------------------------------------------------------

@dataclass(frozen=True)
class Route:
    """`backend` serves `op` on GPUs of compute capability arch_min..arch_max for M (rows of the
    activation) in m_min..m_max (None: no upper bound)."""
    op: str
    backend: str
    arch_min: tuple[int, int]
    arch_max: tuple[int, int]
    m_min: int = 1
    m_max: int | None = None


# The one table of size- and architecture-dependent choices; the first matching row wins. A backend
# named here runs automatically only where its rows say; whatever no row covers goes to the first
# backend in PREFERENCE order that runs on the device (cuda, else triton, ...; reference on the CPU).
ROUTES: tuple[Route, ...] = (
    # w4a16_mm on Hopper from one full 128-row tile of x up: CUTLASS's wgmma + TMA mixed-input
    # GEMM (128 x 128 tiles) is compute-bound there, where the mma.sync kernel is capped well
    # below Hopper's tensor-core peak. Below 128 rows the 128-wide tile is mostly idle and the
    # weights' memory traffic dominates: the split-K CUDA kernel (16-row tiles) keeps M < 128.
    # sm_90 only: sm_90a code does not run on other architectures. Inputs the kernel does not
    # take (nf4, fp32 activations, group_size % 64, N % 128, K % 64) fall through to cuda / triton
    # (hprune/kernels/cutlass_w4a16.py says why). The boundary awaits an H100/H200 benchmark.
    Route("w4a16_mm", "cutlass", (9, 0), (9, 0), m_min=128),
    # w4a8_mm: no CUTLASS row (its mixed-input path would round q * scale to FP8): Triton serves it.
)


def route(op: str, capability: tuple[int, int] | None, m: int | None) -> str | None:
    """The backend ROUTES names for `op` at this compute capability (None: not a GPU) and M, or None."""
    if capability is None or m is None:
        return None
    for r in ROUTES:
        if r.op == op and r.arch_min <= tuple(capability) <= r.arch_max and m >= r.m_min and (
                r.m_max is None or m <= r.m_max):
            return r.backend
    return None


def _routed_only(op: str) -> set[str]:
    return {r.backend for r in ROUTES if r.op == op}


_capabilities: dict[int, tuple[int, int]] = {}


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """(major, minor) of a CUDA device (cached), None for other devices."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _capabilities:
        _capabilities[index] = torch.cuda.get_device_capability(index)
    return _capabilities[index]


def select(op: str, device: torch.device | str, backend: str | None = None, *, m: int | None = None,
           capability: tuple[int, int] | None = None) -> Backend:
    """Picks the backend that runs `op` on `device` (see module docstring for the rules). `m`: rows
    of the activation, for ROUTES; `capability`: the GPU's (major, minor), read from `device` when
    None (tests pass one to check the table without that GPU)."""
    device = torch.device(device)
    regs = _REGISTRY.get(op)
    if not regs:
        raise KeyError(f"no backends registered for op {op!r}")
    name, strict = _forced(op, backend)
    if name is not None and name != "auto":
        if name not in PREFERENCE:
            raise BackendUnavailableError(f"unknown backend {name!r} for {op}; choose from {PREFERENCE}")
        if name in regs:
            b = regs[name]
            if not b.supports(device):
                raise BackendUnavailableError(b.why_not(device))
            return b
        if strict:
            raise BackendUnavailableError(
                f"{op} has no {name!r} backend (it has: {', '.join(backends(op))})")
    routed = route(op, capability if capability is not None else device_capability(device), m)
    if routed is not None and routed in regs and regs[routed].auto(device):
        return regs[routed]
    only = _routed_only(op)
    for n in PREFERENCE:
        b = regs.get(n)
        if b is not None and n not in only and b.auto(device):
            return b
    raise BackendUnavailableError(f"no backend of {op} runs on device {device}")


# ---- capability probes shared by the ops -------------------------------------------------------

def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 - missing or broken install
        return False
    return True


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_supports(device: torch.device) -> bool:
    """Triton runs on CUDA devices, and on the CPU in interpreter mode (slow; tests only)."""
    if not triton_importable():
        return False
    if device.type == "cuda":
        return not triton_interpret()
    return device.type == "cpu" and triton_interpret()


def triton_auto(device: torch.device) -> bool:
    return device.type == "cuda" and triton_supports(device)


def triton_why_not(device: torch.device) -> str:
    if not triton_importable():
        return "triton is not installed"
    if device.type == "cpu":
        return "triton runs on the CPU only in interpreter mode: set TRITON_INTERPRET=1 before importing triton"
    return f"triton does not run on device {device}"


def ext_op(name: str):
    """The compiled op `torch.ops.hprune.<name>` or None when hprune._C lacks it."""
    from hprune._ext import load_extension

    if load_extension() is None:
        return None
    return getattr(torch.ops.hprune, name, None) if hasattr(torch.ops, "hprune") else None


def ext_has(name: str) -> bool:
    try:
        return ext_op(name) is not None
    except (AttributeError, RuntimeError):
        return False
