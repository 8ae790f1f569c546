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

Self-test (issue 15): kernels that never ran on the user's GPU prove themselves there. An op
registers one small random problem (`register_selftest`); the first time a backend is chosen in a
process for a key (op, backend, device capability, dtype), `select(..., dtype=...)` runs that
backend on the problem and compares it with the "reference" backend. A backend that fails is
disabled for the key with ONE warning naming op, backend, GPU and error, and the next backend in
`PREFERENCE` takes over (a forced backend that fails raises `BackendUnavailableError` instead:
forcing never falls back silently). The check never runs inside CUDA-graph capture or
torch.compile tracing (the choice is made unchecked there and the key checked on the next eager
call). `HPRUNE_SELFTEST=0` turns the first-call checks off, `=1` runs them on every device;
unset, they run on CUDA devices only (the CPU backends are tested in CI). The cost is one small
problem per key, once per process; `hprune selftest` runs and prints them all. A new backend is
covered by its registration alone: the problem and tolerance belong to the op.
"""
from __future__ import annotations

import contextlib
import math
import os
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

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


def select(op: str, device: torch.device | str, backend: str | None = None, *,
           dtype: torch.dtype | None = None, exclude: Sequence[str] = (), m: int | None = None,
           capability: tuple[int, int] | None = None) -> Backend:
    """Picks the backend that runs `op` on `device` (see module docstring for the rules).

    dtype: the inputs' dtype; when given, the chosen backend is self-tested on the first call of
        its key (see the module docstring) and skipped (automatic choice) if it failed.
    exclude: backends the automatic choice must skip for these inputs (e.g. a shape they reject).
    m: rows of the activation, for ROUTES; capability: the GPU's (major, minor), read from
        `device` when None (tests pass one to check the table without that GPU)."""
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
            if dtype is not None:
                failure = _checked(op, b, device, dtype)
                if failure is not None:
                    raise BackendUnavailableError(failure)
            return b
        if strict:
            raise BackendUnavailableError(
                f"{op} has no {name!r} backend (it has: {', '.join(backends(op))})")
    routed = route(op, capability if capability is not None else device_capability(device), m)
    if (routed is not None and routed in regs and routed not in exclude and regs[routed].auto(device)
            and (dtype is None or _checked(op, regs[routed], device, dtype) is None)):
        return regs[routed]
    only = _routed_only(op)
    for n in PREFERENCE:
        b = regs.get(n)
        if b is None or n in exclude or n in only or not b.auto(device):
            continue
        if dtype is not None and _checked(op, b, device, dtype) is not None:
            continue  # failed its self-test here: warned once, the next backend takes over
        return b
    raise BackendUnavailableError(f"no backend of {op} runs on device {device}")


# ---- self-test: each kernel checked against the reference on the user's device ----------------

@dataclass(frozen=True)
class SelfTest:
    """How to check a backend of one op against its "reference" backend.

    make(device, dtype, generator) -> a list of problems, each the positional args of `Backend.fn`:
        small and random, with odd tails (fresh tensors on every call: in-place ops mutate them).
    outputs(args, returned) -> the tensors to compare (the return value, or the mutated inputs).
    tolerance(dtype) -> largest allowed max|got - ref| / max|ref| (relative to the output's scale).
    dtypes: the dtypes `hprune selftest` checks."""

    make: Callable[[torch.device, torch.dtype, torch.Generator], list[tuple]]
    outputs: Callable[[tuple, Any], Sequence[torch.Tensor]]
    tolerance: Callable[[torch.dtype], float]
    dtypes: tuple[torch.dtype, ...]


@dataclass(frozen=True)
class CheckResult:
    op: str
    backend: str
    device: str  # capability key: "sm_90", "cpu"
    dtype: torch.dtype
    status: str  # "ok", "FAIL" or "n/a" (the backend does not take this dtype / problem)
    max_error: float  # max|got - ref| / max|ref| over the outputs (nan when it did not run)
    tolerance: float
    seconds: float  # wall time of the check (backend + reference, including any compile)
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status != "FAIL"


_SELFTESTS: dict[str, SelfTest] = {}
_CHECKS: dict[tuple, CheckResult] = {}
_checks_lock = threading.RLock()
SELFTEST_SEED = 1234


def register_selftest(op: str, test: SelfTest) -> None:
    """Registers the self-test problem of `op` (one per op, shared by all its backends)."""
    _SELFTESTS[op] = test


def selftest_ops() -> list[str]:
    return sorted(_SELFTESTS)


def device_key(device: torch.device | str) -> str:
    """What a self-test result holds for: the compute capability ("sm_90") on CUDA, else the type."""
    device = torch.device(device)
    cap = device_capability(device)  # cached: this runs on every checked call
    if cap is not None:
        return f"sm_{cap[0]}{cap[1]}"
    return device.type


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({device_key(device)})"
    return device.type


def _first_call_checks_on(device: torch.device) -> bool:
    from hprune.env import flag

    if os.environ.get("HPRUNE_SELFTEST", "").strip() == "":  # unset: on GPUs only
        return device.type == "cuda"
    return flag("HPRUNE_SELFTEST")  # on (1 / true / yes / on): every device; off: none


def capturing_or_tracing(device: torch.device) -> bool:
    """True inside torch.compile tracing or CUDA-graph capture, where no check may run."""
    if torch.compiler.is_compiling():
        return True
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _rel_error(got: Sequence[torch.Tensor], ref: Sequence[torch.Tensor]) -> float:
    worst = 0.0
    if len(got) != len(ref):
        return math.inf
    for g, r in zip(got, ref):
        if g.shape != r.shape:
            return math.inf
        g32, r32 = g.detach().float(), r.detach().float()
        if not bool(torch.isfinite(g32).all()):
            return math.inf
        scale = float(r32.abs().max()) if r32.numel() else 0.0
        diff = float((g32 - r32).abs().max()) if r32.numel() else 0.0
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst


def run_selftest(op: str, backend: str, device: torch.device | str, dtype: torch.dtype) -> CheckResult:
    """Runs backend `backend` of `op` on the op's self-test problems and compares it with the
    reference backend on the same inputs. Problems the backend declines (ShapeError: a shape or
    format it does not serve) are skipped; one that declines them all is "n/a". Never raises for
    a failing kernel: the result says."""
    device = torch.device(device)
    test = _SELFTESTS[op]
    b = _REGISTRY[op][backend]
    ref = _REGISTRY[op]["reference"]
    tol = test.tolerance(dtype)
    key = device_key(device)
    start = time.perf_counter()

    def problems() -> list[tuple]:
        gen = torch.Generator().manual_seed(SELFTEST_SEED)  # own generator: the user's RNG is untouched
        return test.make(device, dtype, gen)

    from hprune.errors import ShapeError

    got: list[torch.Tensor] = []
    want: list[torch.Tensor] = []
    taken: list[int] = []  # the problems this backend takes (a ShapeError: not its shape / dtype)
    declined = ""
    try:
        with torch.no_grad():
            for i, args in enumerate(problems()):
                try:
                    out = b.fn(*args)
                except ShapeError as exc:
                    declined = declined or str(exc)
                    continue
                got += [t.clone() for t in test.outputs(args, out)]
                taken.append(i)
            if not taken:  # takes none of them (e.g. this dtype): nothing to check, not a failure
                return CheckResult(op, backend, key, dtype, "n/a", math.nan, tol, time.perf_counter() - start,
                                   declined)
            for i, args in enumerate(problems()):
                if i in taken:
                    want += list(test.outputs(args, ref.fn(*args)))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
    except Exception as exc:  # noqa: BLE001 - a crashing kernel is exactly what the check is for
        return CheckResult(op, backend, key, dtype, "FAIL", math.nan, tol, time.perf_counter() - start,
                           f"{type(exc).__name__}: {exc}".strip()[:300])
    err = _rel_error(got, want)
    ok = err <= tol
    return CheckResult(op, backend, key, dtype, "ok" if ok else "FAIL", err, tol, time.perf_counter() - start,
                       "" if ok else f"max error {err:.3g} > tolerance {tol:.3g} (relative to max|reference|)")


def _checked(op: str, b: Backend, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """None if backend `b` may run `op` on `device` with `dtype`, else why not (it failed its
    self-test; warned once). Runs the check on the key's first call (not under capture/tracing)."""
    if b.name == "reference" or op not in _SELFTESTS or not _first_call_checks_on(device):
        return None
    key = (op, b.name, device_key(device), dtype)
    res = _CHECKS.get(key)
    if res is None:
        if capturing_or_tracing(device):
            return None  # unchecked here; checked on the next eager call
        with _checks_lock:
            res = _CHECKS.get(key)
            if res is None:
                res = run_selftest(op, b.name, device, dtype)
                _CHECKS[key] = res
                if not res.ok:
                    warnings.warn(
                        f"hprune: the {b.name!r} kernel of {op} failed its self-test on {device_name(device)} "
                        f"with {str(dtype).replace('torch.', '')} ({res.error}); it is disabled for this "
                        f"process and the next backend runs instead. Please report this (hprune selftest "
                        f"prints the details).", RuntimeWarning, stacklevel=4)
    if res.ok:
        return None
    return (f"the {b.name!r} backend of {op} failed its self-test on {device_name(device)} with {dtype}: "
            f"{res.error}")


def check_results() -> list[CheckResult]:
    """The first-call checks run so far in this process."""
    return list(_CHECKS.values())


def reset_checks() -> None:
    """Forgets every first-call check (the next call of each key checks again)."""
    with _checks_lock:
        _CHECKS.clear()


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
