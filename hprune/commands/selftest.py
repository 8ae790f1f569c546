"""Check every kernel that runs on this machine against the plain PyTorch reference: each op
(w4a16_mm, w4a8_mm, scaled_adamw_), each backend that runs on the device (CUDA, Triton, C++) and
each dtype, on a small random problem with odd shapes. Prints a table (result, max error relative
to the output's scale, the bound, time including any compile) and exits non-zero if a kernel fails.

The same check runs automatically the first time a kernel is used in a process on a GPU, and a
kernel that fails it is disabled with one warning (HPRUNE_SELFTEST=0 turns that off). On a GPU each
(op, backend, dtype) is checked in a child process (a crash or hang there is a FAIL row, not a dead
process) and the verdicts are stored in the cache the first-call checks read (--in-process: check
in this process; HPRUNE_SELFTEST_ISOLATE=1 isolates on the CPU too). On a machine
without a GPU the C++ CPU kernels are checked, and the Triton kernels too (in Triton's slow
interpreter) when TRITON_INTERPRET=1 is set."""
from __future__ import annotations

import argparse
import json

HELP = "check every kernel that runs here against the reference (table; non-zero exit on failure)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="device to check (default: cuda if present, else cpu)")
    p.add_argument("--op", action="append", help="check only this op (repeatable; default: all)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--jobs", type=int, default=1,
                   help="child checks at a time (each (op, backend, dtype) is one child process)")
    p.add_argument("--in-process", action="store_true",
                   help="check in this process instead of one child process per (op, backend, dtype)")


def run(args: argparse.Namespace) -> int:
    import torch

    from hprune._ext import build_info, describe_build
    from hprune.errors import BackendUnavailableError
    from hprune.kernels import dispatch, selftest
    from hprune.report import format_table

    try:
        device = torch.device(args.device) if args.device else selftest.default_device()
    except RuntimeError as exc:
        raise BackendUnavailableError(f"--device {args.device!r} is not a device: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError(f"--device {args.device} needs a CUDA GPU; this torch sees none")
    known = selftest.known_ops()
    for op in args.op or []:
        if op not in known:
            raise BackendUnavailableError(f"--op {op!r}: no such op with a self-test (known: {', '.join(known)})")
    if args.jobs < 1:
        raise BackendUnavailableError(f"--jobs {args.jobs}: give a number >= 1")
    results = selftest.run_all(device, ops=args.op, isolate=False if args.in_process else None, jobs=args.jobs)
    if not results:
        # nothing ran: "0 of 0 passed" with exit 0 would read as success in a CI log
        raise BackendUnavailableError(f"nothing to check on {dispatch.device_name(device)}: no kernel besides the "
                                      f"reference runs here for {', '.join(args.op or known)} (build the extension, "
                                      f"or set TRITON_INTERPRET=1 to check the Triton kernels on the CPU)")
    rows = selftest.as_rows(results)
    failed = [r for r in results if not r.ok]
    if args.json:
        print(json.dumps({"device": dispatch.device_name(device), "extension": build_info(), "results": rows},
                         indent=2, default=str))
    else:
        print(describe_build())
        cols = ["op", "backend", "dtype", "result", "max error", "tolerance", "configs", "ms"]
        print(format_table(rows, cols, title=f"hprune selftest on {dispatch.device_name(device)}"))
        for r in rows:
            if r["error"]:
                print(f"  {r['op']} {r['backend']} {r['dtype']}: {r['result']}: {r['error']}")
        if not results:
            print("no kernel besides the reference runs on this device")
        print(f"{len(results) - len(failed)} of {len(results)} checks passed" if not failed
              else f"{len(failed)} of {len(results)} checks FAILED")
    return 1 if failed else 0
