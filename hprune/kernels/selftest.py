"""Every kernel that can run on a device, checked against the reference there (`hprune selftest`).

The checks are those of the dispatch point's first-call self-test (`hprune.kernels.dispatch`):
each op's registered problems, each backend that runs on the device except the reference (the
oracle), each dtype the op lists. A backend is covered by registering it; nothing here names one.
With isolation (the default on CUDA; hprune.kernels.verdicts) each (op, backend) is checked in a
child process, the same child the first-call check runs: `python -m hprune.kernels.selftest
--child '<request JSON>'` answers with one line on stdout (verdicts.RESULT_MARK + JSON).
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import sys

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


def run_all(device: torch.device | str | None = None, ops: list[str] | None = None,
            isolate: bool | None = None, jobs: int = 1) -> list[dispatch.CheckResult]:
    """Runs the self-test of every (op, backend, dtype) that runs on `device` (default: the GPU if
    there is one, else the CPU) and returns the results; the first-call cache is updated too, so a
    backend that fails here is skipped by later automatic choices in this process. `isolate`
    (default: verdicts.isolation_on) runs each (op, backend, dtype) in a child process, `jobs` of
    them at a time, and stores each verdict in the on-disk cache the first-call checks read as
    soon as its child answers."""
    from concurrent.futures import ThreadPoolExecutor

    from hprune.kernels import verdicts

    _register_ops()
    device = torch.device(device) if device is not None else default_device()
    isolate = verdicts.isolation_on(device) if isolate is None else isolate
    tasks = []
    for op in ops or dispatch.selftest_ops():
        test = dispatch._SELFTESTS[op]  # noqa: SLF001 - same package
        for name in dispatch.available(op, device):
            if name != "reference":
                tasks += [(op, name, dtype) for dtype in test.dtypes]
    if not isolate:
        results = [dispatch.run_selftest(op, name, device, dtype) for op, name, dtype in tasks]
    else:
        env = verdicts.environment(device)

        def one(task: tuple) -> dispatch.CheckResult:
            op, name, dtype = task
            (res,) = dispatch.run_selftest_isolated(op, name, device, [dtype])
            verdicts.store(env, {dispatch._verdict_key(r): r.as_dict()  # noqa: SLF001
                                 for r in (res, *res.parts) if r is res or r.config})
            return res

        with ThreadPoolExecutor(max(1, jobs)) as pool:
            results = list(pool.map(one, tasks))
    for res in results:
        dispatch._record(res)  # noqa: SLF001
    return results


def _import_module(name: str, path: str) -> None:
    """Imports module `name` (registering what it registers), from `path` if not importable by name
    (a test module that pytest imported off sys.path)."""
    try:
        importlib.import_module(name)
        return
    except ImportError:
        if not path:
            raise
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {name} from {path}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)


def child_main(request_json: str) -> int:
    """The child process of an isolated check: runs the request's (op, backend) for each dtype and
    prints the verdicts as one line on stdout. A crash or hang here is what the parent reports."""
    from hprune.kernels import verdicts

    req = json.loads(request_json)
    _register_ops()
    for name, path in req.get("modules", []):
        _import_module(name, path)
    specs = req.get("specs")
    specs = None if specs is None else [tuple(s) if isinstance(s, list) else s for s in specs]
    results = [dispatch.run_selftest(req["op"], req["backend"], req["device"], getattr(torch, d), specs).as_dict()
               for d in req["dtypes"]]
    sys.stdout.write(verdicts.RESULT_MARK + json.dumps({"results": results}) + "\n")
    sys.stdout.flush()
    return 0


def as_rows(results: list[dispatch.CheckResult]) -> list[dict]:
    """Table rows (op, backend, dtype, result, max error, tolerance, ms, error)."""
    rows = []
    for r in results:
        rows.append({"op": r.op, "backend": r.backend, "dtype": str(r.dtype).replace("torch.", ""),
                     "result": r.status, "max error": "-" if r.max_error != r.max_error else f"{r.max_error:.2e}",
                     "tolerance": f"{r.tolerance:.1e}", "ms": f"{1000 * r.seconds:.1f}",
                     "configs": len([p for p in r.parts if p.config]), "error": r.error})
    return rows


__all__ = ["run_all", "known_ops", "as_rows", "default_device", "OP_MODULES", "child_main"]


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        sys.exit(child_main(sys.argv[2]))
    sys.exit("usage: python -m hprune.kernels.selftest --child '<request JSON>' (run by hprune itself; "
             "for the table run: hprune selftest)")
