"""Every kernel that can run on a device, checked against the reference there (`hprune selftest`).

The checks are those of the dispatch point's first-call self-test (`hprune.kernels.dispatch`):
each op's registered problem, each backend that runs on the device except the reference (the
oracle), each dtype the op lists. A backend is covered by registering it; nothing here names one.
"""
from __future__ import annotations

import importlib

import torch

from hprune.kernels import dispatch

# the modules whose import registers the ops' backends and self-test problems
OP_MODULES = ("hprune.kernels.w4a16", "hprune.kernels.w4a8", "hprune.kernels.scaled_adamw")


def _register_ops() -> None:
    for mod in OP_MODULES:
        importlib.import_module(mod)


def known_ops() -> list[str]:
    """The ops that have a self-test problem."""
    _register_ops()
    return dispatch.selftest_ops()


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def run_all(device: torch.device | str | None = None, ops: list[str] | None = None) -> list[dispatch.CheckResult]:
    """Runs the self-test of every (op, backend, dtype) that runs on `device` (default: the GPU if
    there is one, else the CPU) and returns the results; the first-call cache is updated too, so a
    backend that fails here is skipped by later automatic choices in this process."""
    _register_ops()
    device = torch.device(device) if device is not None else default_device()
    results = []
    for op in ops or dispatch.selftest_ops():
        test = dispatch._SELFTESTS[op]  # noqa: SLF001 - same package
        for name in dispatch.available(op, device):
            if name == "reference":
                continue
            for dtype in test.dtypes:
                res = dispatch.run_selftest(op, name, device, dtype)
                dispatch._CHECKS[(op, name, res.device, dtype)] = res  # noqa: SLF001
                results.append(res)
    return results


def as_rows(results: list[dispatch.CheckResult]) -> list[dict]:
    """Table rows (op, backend, dtype, result, max error, tolerance, ms, error)."""
    rows = []
    for r in results:
        rows.append({"op": r.op, "backend": r.backend, "dtype": str(r.dtype).replace("torch.", ""),
                     "result": r.status, "max error": "-" if r.max_error != r.max_error else f"{r.max_error:.2e}",
                     "tolerance": f"{r.tolerance:.1e}", "ms": f"{1000 * r.seconds:.1f}", "error": r.error})
    return rows


__all__ = ["run_all", "known_ops", "as_rows", "default_device", "OP_MODULES"]
