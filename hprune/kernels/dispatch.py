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

Self-test (issues 15, 26): kernels that never ran on the user's GPU prove themselves there. An op
registers small random problems (`register_selftest`) that together reach every launch
configuration of every backend (a backend names its configuration for a problem: `register(...,
config=)`; tests/test_selftest_coverage.py checks the SD3.5 / FLUX shapes). The first time a
backend is chosen for a key (op, backend, device capability, dtype, configuration), `select(...,
dtype=, spec=)` runs it on the problems and compares it with the "reference" backend (in exact
fp32); a configuration the problems never reached is checked on a problem of the call's own spec.
On a GPU the check runs in a child process with a timeout (hprune.kernels.verdicts: a crash, a dead
CUDA context or a hang stays there) and its verdict is cached on disk per environment. A backend
that fails is disabled for the key with ONE warning naming op, backend, GPU and error, and the
next backend in `PREFERENCE` takes over (a forced backend that fails raises
`BackendUnavailableError` instead: forcing never falls back silently). Inside CUDA-graph capture
or torch.compile tracing nothing runs in this process: the child checks as usual, and without
isolation an unchecked kernel is refused there (the next checked backend runs), so nothing
unchecked enters a captured graph. `HPRUNE_SELFTEST=0` turns the first-call checks off, `=1` runs
them on every device; unset, they run on CUDA devices only (the CPU backends are tested in CI);
`HPRUNE_SELFTEST_ISOLATE` likewise for the child process. `hprune selftest` runs and prints them
all. A new backend is covered by its registration alone: the problems and tolerance belong to the
op.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
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
    # the launch configuration it picks for a problem: config(spec, dtype, DeviceInfo) -> label
    # (spec: the op's tensor-free description of the inputs, SelfTest.spec_of); None: one config
    config: Optional[Callable[[Any, torch.dtype, "DeviceInfo"], str]] = None


_REGISTRY: dict[str, dict[str, Backend]] = {}
_local = threading.local()


def _always(_device: torch.device) -> bool:
    return True


def register(op: str, name: str, *, supports: Callable[[torch.device], bool] = _always,
             auto: Callable[[torch.device], bool] | None = None,
             why_not: Callable[[torch.device], str] | None = None,
             config: Callable[[Any, torch.dtype, "DeviceInfo"], str] | None = None) -> Callable[[Callable], Callable]:
    """Decorator: registers `fn` as backend `name` of `op` (`config`: see `Backend.config`)."""
    if name not in PREFERENCE:
        raise ValueError(f"unknown backend {name!r}; expected one of {PREFERENCE}")

    def deco(fn: Callable) -> Callable:
        _REGISTRY.setdefault(op, {})[name] = Backend(
            name, fn, supports, auto or supports,
            why_not or (lambda d: f"backend {name!r} of {op} does not run on device {d}"), config)
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
           capability: tuple[int, int] | None = None, spec: Any = None) -> Backend:
    """Picks the backend that runs `op` on `device` (see module docstring for the rules).

    dtype: the inputs' dtype; when given, the chosen backend is self-tested on the first call of
        its key (see the module docstring) and skipped (automatic choice) if it failed.
    exclude: backends the automatic choice must skip for these inputs (e.g. a shape they reject).
    m: rows of the activation, for ROUTES; capability: the GPU's (major, minor), read from
        `device` when None (tests pass one to check the table without that GPU).
    spec: the op's description of these inputs (`SelfTest.spec_of`): the self-test key then holds
        the launch configuration the backend picks for them, checked on its first call."""
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
                failure = _checked(op, b, device, dtype, spec)
                if failure is not None:
                    raise BackendUnavailableError(failure)
            return b
        if strict:
            raise BackendUnavailableError(
                f"{op} has no {name!r} backend (it has: {', '.join(backends(op))})")
    routed = route(op, capability if capability is not None else device_capability(device), m)
    if (routed is not None and routed in regs and routed not in exclude and regs[routed].auto(device)
            and (dtype is None or _checked(op, regs[routed], device, dtype, spec) is None)):
        return regs[routed]
    only = _routed_only(op)
    for n in PREFERENCE:
        b = regs.get(n)
        if b is None or n in exclude or n in only or not b.auto(device):
            continue
        if dtype is not None and _checked(op, b, device, dtype, spec) is not None:
            continue  # failed its self-test here: warned once, the next backend takes over
        return b
    raise BackendUnavailableError(f"no backend of {op} runs on device {device}")


# ---- self-test: each kernel checked against the reference on the user's device ----------------

@dataclass(frozen=True)
class DeviceInfo:
    """What a backend's launch heuristic reads off the device: its self-test key ("sm_90",
    "cpu"), compute capability (None off CUDA) and multiprocessor count."""
    key: str
    capability: tuple[int, int] | None
    sms: int


_infos: dict[str, DeviceInfo] = {}


def device_info(device: torch.device | str) -> DeviceInfo:
    """The DeviceInfo of `device` (cached; the CPU reads as an H100-like 132 SMs, the count the
    Triton heuristics assume under the interpreter)."""
    device = torch.device(device)
    name = str(device)
    info = _infos.get(name)
    if info is None:
        cap = device_capability(device)
        sms = 132
        if cap is not None:
            index = device.index if device.index is not None else torch.cuda.current_device()
            sms = torch.cuda.get_device_properties(index).multi_processor_count
        info = DeviceInfo(device_key(device), cap, sms)
        _infos[name] = info
    return info


@dataclass(frozen=True)
class SelfTest:
    """How to check a backend of one op against its "reference" backend.

    make(device, dtype, generator[, specs]) -> a list of problems, each the positional args of
        `Backend.fn`: small and random, with odd tails (fresh tensors on every call: in-place ops
        mutate them). With `specs`, one problem per spec (default: `specs` below).
    outputs(args, returned) -> the tensors to compare (the return value, or the mutated inputs).
    tolerance(dtype) -> largest allowed max|got - ref| / max|ref| (relative to the output's scale).
    dtypes: the dtypes `hprune selftest` checks.
    specs: the problems' tensor-free descriptions (JSON-able tuples), in `make`'s order. The set
        must reach every launch configuration of every backend (tests/test_selftest_coverage.py).
    spec_of(args) -> the spec of a call's arguments: the dispatch key holds the configuration the
        backend picks for it, and a configuration the specs never reached is checked on a random
        problem of the call's own spec before it runs."""

    make: Callable[..., list[tuple]]
    outputs: Callable[[tuple, Any], Sequence[torch.Tensor]]
    tolerance: Callable[[torch.dtype], float]
    dtypes: tuple[torch.dtype, ...]
    specs: tuple = ()
    spec_of: Optional[Callable[[tuple], Any]] = None


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
    config: str = ""  # the launch configuration this verdict holds for ("": every one checked)
    parts: tuple = ()  # per configuration reached: CheckResult each (config set)

    @property
    def ok(self) -> bool:
        return self.status != "FAIL"

    def as_dict(self) -> dict:
        return {"op": self.op, "backend": self.backend, "device": self.device,
                "dtype": str(self.dtype).replace("torch.", ""), "status": self.status,
                "max_error": None if self.max_error != self.max_error else self.max_error,
                "tolerance": self.tolerance, "seconds": self.seconds, "error": self.error, "config": self.config,
                "parts": [p.as_dict() for p in self.parts]}

    @staticmethod
    def from_dict(d: dict) -> "CheckResult":
        me = d.get("max_error")
        return CheckResult(d["op"], d["backend"], d["device"], getattr(torch, d["dtype"]), d["status"],
                           math.nan if me is None else float(me), float(d["tolerance"]), float(d["seconds"]),
                           d.get("error", ""), d.get("config", ""),
                           tuple(CheckResult.from_dict(p) for p in d.get("parts", ())))


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
    """True inside torch.compile tracing or CUDA-graph capture, where no check may run in this process."""
    if torch.compiler.is_compiling():
        return True
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """fp32 matrix products in full fp32 inside the block (no TF32, whatever the user enabled):
    the reference must not carry TF32's 1e-3 error into a check of a correct fp32 kernel. The
    user's settings are restored afterwards."""
    matmul = torch.backends.cuda.matmul
    prec = torch.get_float32_matmul_precision()
    new_api = getattr(matmul, "fp32_precision", None)  # torch >= 2.9 also has this setting
    try:
        torch.set_float32_matmul_precision("highest")
        if new_api is not None:
            matmul.fp32_precision = "ieee"
        yield
    finally:
        torch.set_float32_matmul_precision(prec)
        if new_api is not None:
            matmul.fp32_precision = new_api


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


def agrees(op: str, dtype: torch.dtype, got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> bool:
    """Is `got` within the op's self-test tolerance of `want` (relative to max|want|)? Used by the
    autotuners: a candidate configuration must agree with the self-tested heuristic one on the
    call's own inputs before it may be timed and chosen."""
    return _rel_error(got, want) <= _SELFTESTS[op].tolerance(dtype)


def config_of(op: str, backend: str, spec: Any, dtype: torch.dtype, info: DeviceInfo) -> Optional[str]:
    """The launch configuration backend `backend` of `op` picks for a problem of `spec` ("" when
    the backend has a single one or the spec is unknown; None when it declines such a problem)."""
    b = _REGISTRY[op][backend]
    if b.config is None or spec is None:
        return ""
    return b.config(spec, dtype, info)


def selftest_configs(op: str, backend: str, dtype: torch.dtype, info: DeviceInfo) -> set[str]:
    """The configurations the op's self-test problems reach for this backend, dtype and device."""
    return {c for c in (config_of(op, backend, s, dtype, info) for s in _SELFTESTS[op].specs) if c is not None}


def run_selftest(op: str, backend: str, device: torch.device | str, dtype: torch.dtype,
                 specs: Optional[Sequence] = None) -> CheckResult:
    """Runs backend `backend` of `op` on the op's self-test problems (or on problems of `specs`)
    and compares it with the reference backend (in exact fp32) on the same inputs, in this
    process. Problems the backend declines (ShapeError: a shape or format it does not serve) are
    skipped; one that declines them all is "n/a". Never raises for a failing kernel: the result
    says, overall and (`parts`) per launch configuration reached."""
    device = torch.device(device)
    test = _SELFTESTS[op]
    b = _REGISTRY[op][backend]
    ref = _REGISTRY[op]["reference"]
    tol = test.tolerance(dtype)
    key = device_key(device)
    start = time.perf_counter()
    problem_specs = list(specs) if specs is not None else list(test.specs)

    def problems() -> list[tuple]:
        gen = torch.Generator().manual_seed(SELFTEST_SEED)  # own generator: the user's RNG is untouched
        if specs is not None:
            return test.make(device, dtype, gen, list(specs))
        return test.make(device, dtype, gen)

    from hprune.errors import ShapeError

    got: dict[int, list[torch.Tensor]] = {}
    declined = ""
    try:
        with torch.no_grad():
            for i, args in enumerate(problems()):
                try:
                    out = b.fn(*args)
                except ShapeError as exc:
                    declined = declined or str(exc)
                    continue
                got[i] = [t.clone() for t in test.outputs(args, out)]
            if not got:  # takes none of them (e.g. this dtype): nothing to check, not a failure
                return CheckResult(op, backend, key, dtype, "n/a", math.nan, tol, time.perf_counter() - start,
                                   declined)
            want: dict[int, list[torch.Tensor]] = {}
            with exact_fp32():
                for i, args in enumerate(problems()):
                    if i in got:
                        want[i] = list(test.outputs(args, ref.fn(*args)))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
    except Exception as exc:  # noqa: BLE001 - a crashing kernel is exactly what the check is for
        return CheckResult(op, backend, key, dtype, "FAIL", math.nan, tol, time.perf_counter() - start,
                           f"{type(exc).__name__}: {exc}".strip()[:300])
    seconds = time.perf_counter() - start
    info = device_info(device)
    by_config: dict[str, float] = {}
    for i in got:
        spec = problem_specs[i] if i < len(problem_specs) else None
        cfg = config_of(op, backend, spec, dtype, info) or ""
        by_config[cfg] = max(by_config.get(cfg, 0.0), _rel_error(got[i], want[i]))

    def verdict(err: float, cfg: str, parts: tuple = ()) -> CheckResult:
        ok = err <= tol
        return CheckResult(op, backend, key, dtype, "ok" if ok else "FAIL", err, tol, seconds,
                           "" if ok else f"max error {err:.3g} > tolerance {tol:.3g} (relative to max|reference|)"
                           + (f" at configuration {cfg}" if cfg else ""), cfg, parts)

    parts = tuple(verdict(err, cfg) for cfg, err in sorted(by_config.items()))
    worst = max(by_config.values())
    failed = [p.config for p in parts if not p.ok and p.config]
    whole = verdict(worst, "", parts)
    if failed:
        whole = CheckResult(op, backend, key, dtype, "FAIL", worst, tol, seconds,
                            f"max error {worst:.3g} > tolerance {tol:.3g} (relative to max|reference|) at "
                            f"configuration {', '.join(failed)}", "", parts)
    return whole


def _module_files(op: str, backend: str) -> list[list[str]]:
    """(module, file) of the code the child must import to know this backend and the op's test."""
    test = _SELFTESTS[op]
    mods = []
    for fn in (test.make, _REGISTRY[op][backend].fn, _REGISTRY[op]["reference"].fn):
        name = getattr(fn, "__module__", None)
        mod = sys.modules.get(name) if name else None
        if mod is not None and [name, getattr(mod, "__file__", "") or ""] not in mods:
            mods.append([name, getattr(mod, "__file__", "") or ""])
    return mods


def run_selftest_isolated(op: str, backend: str, device: torch.device | str, dtypes: Sequence[torch.dtype],
                          specs: Optional[Sequence] = None, timeout: Optional[float] = None) -> list[CheckResult]:
    """`run_selftest` of each dtype in a child process (hprune.kernels.verdicts): a crash, a hang
    or a dead CUDA context stays there. A child that gives no answer fails every dtype asked."""
    from hprune.kernels import verdicts

    device = torch.device(device)
    request = {"op": op, "backend": backend, "device": str(device),
               "dtypes": [str(d).replace("torch.", "") for d in dtypes],
               "specs": None if specs is None else [list(s) if isinstance(s, tuple) else s for s in specs],
               "modules": _module_files(op, backend)}
    start = time.perf_counter()
    answer, why = verdicts.run_child(request, timeout)
    if answer is not None:
        try:
            return [CheckResult.from_dict(d) for d in answer["results"]]
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            why = f"the check's answer was unreadable ({exc})"
    key = device_key(device)
    tol = _SELFTESTS[op].tolerance
    return [CheckResult(op, backend, key, d, "FAIL", math.nan, tol(d), time.perf_counter() - start, why)
            for d in dtypes]


def _record(res: CheckResult) -> None:
    """Files a verdict under its keys: the whole problem set, and each configuration it reached."""
    _CHECKS[(res.op, res.backend, res.device, res.dtype, res.config)] = res
    for p in res.parts:
        if p.config:
            _CHECKS[(p.op, p.backend, p.device, p.dtype, p.config)] = p


def _verdict_key(res_or_key: Any) -> str:
    if isinstance(res_or_key, CheckResult):
        r = res_or_key
        return f"{r.op}|{r.backend}|{r.device}|{str(r.dtype).replace('torch.', '')}|{r.config}"
    op, backend, dev, dtype, cfg = res_or_key
    return f"{op}|{backend}|{dev}|{str(dtype).replace('torch.', '')}|{cfg}"


def _check_key(op: str, backend: str, device: torch.device, dtype: torch.dtype, config: str,
               isolate: bool, spec: Any = None) -> CheckResult:
    """Checks one key: (config "") the op's problem set, else the one configuration (the spec of
    the call that reached it). In a child process and cached on disk when `isolate`."""
    specs = None if not config else [spec]
    if not isolate:
        res = run_selftest(op, backend, device, dtype, specs)
        if config:  # a check of the call's own problem: file it under its configuration
            res = CheckResult(res.op, res.backend, res.device, res.dtype, res.status, res.max_error, res.tolerance,
                              res.seconds, res.error, config)
        _record(res)
        return res
    from hprune.kernels import verdicts

    env = verdicts.environment(device)
    key = (op, backend, device_key(device), dtype, config)
    cached = verdicts.load(env).get(_verdict_key(key))
    if cached is not None:
        res = CheckResult.from_dict(cached)
        _record(res)
        return res
    (res,) = run_selftest_isolated(op, backend, device, [dtype], specs)
    if config:
        res = CheckResult(res.op, res.backend, res.device, res.dtype, res.status, res.max_error, res.tolerance,
                          res.seconds, res.error, config)
    _record(res)
    verdicts.store(env, {_verdict_key(r): r.as_dict() for r in (res, *res.parts) if r is res or r.config})
    return res


def _checked(op: str, b: Backend, device: torch.device, dtype: torch.dtype, spec: Any = None) -> Optional[str]:
    """None if backend `b` may run `op` on `device` with `dtype` (and the launch configuration it
    picks for `spec`), else why not (it failed its self-test: warned once; or it is unchecked
    and cannot be checked now). The key's first call runs the op's problem set, then, if the
    call's configuration was not among those the set reached, a problem of the call's spec.

    Inside CUDA-graph capture or torch.compile tracing nothing may run in this process: with
    isolation (the default on CUDA) the child checks as usual, since it touches no stream of
    this process; without it an unchecked kernel is refused there (the next checked backend,
    or the reference, runs instead) so that nothing unchecked enters a captured graph."""
    if b.name == "reference" or op not in _SELFTESTS or not _first_call_checks_on(device):
        return None
    from hprune.kernels import verdicts

    info = device_info(device)
    cfg = config_of(op, b.name, spec, dtype, info) if spec is not None else ""
    isolate = verdicts.isolation_on(device)
    # the whole problem set first (it files every configuration it reaches), then, if the call's
    # configuration is not among them, that configuration on a problem of the call's spec
    for config in ("", cfg) if cfg else ("",):
        key = (op, b.name, info.key, dtype, config)
        res = _CHECKS.get(key)
        if res is None:
            if not isolate and capturing_or_tracing(device):
                return (f"the {b.name!r} backend of {op} is not checked yet for {dtype}"
                        + (f" at configuration {config}" if config else "")
                        + " and cannot be checked inside CUDA-graph capture or torch.compile tracing here (call "
                          "the op once outside it, or check in a child process: HPRUNE_SELFTEST_ISOLATE=1)")
            with _checks_lock:
                res = _CHECKS.get(key)
                if res is None:
                    res = _check_key(op, b.name, device, dtype, config, isolate, spec)
                    if not res.ok:
                        warnings.warn(
                            f"hprune: the {b.name!r} kernel of {op} failed its self-test on {device_name(device)} "
                            f"with {str(dtype).replace('torch.', '')} ({res.error}); it is disabled for this "
                            f"process and the next backend runs instead. Please report this (hprune selftest "
                            f"prints the details).", RuntimeWarning, stacklevel=5)
        if not res.ok:
            return (f"the {b.name!r} backend of {op} failed its self-test on {device_name(device)} with {dtype}: "
                    f"{res.error}")
    return None


def check_results() -> list[CheckResult]:
    """The first-call checks run so far in this process (per problem set and per configuration)."""
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
