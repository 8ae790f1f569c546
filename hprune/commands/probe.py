"""Measure ΔP — the loss of fidelity to the unpruned model — of every block and removable
component, on a calibration set. Writes sensitivity.json (the table HPP plans from) and
sensitivity.png (block x component heatmap) to --out.

Runs on N processes with torchrun (the calibration batches are dealt out; rank 0 writes):
    torchrun --nproc-per-node 8 -m hprune probe ./sd35-large --calib calib.safetensors --out probe"""
from __future__ import annotations

import argparse
from pathlib import Path

from hprune.commands import add_device_arguments, device_and_dtype, load_for_offload, offload_context

DEFAULT_MAX_SAMPLES = 32  # hprune.probe.DEFAULT_MAX_SAMPLES, the cap compress uses (tests/test_cli.py checks)
HELP = "measure each block's and component's sensitivity (ΔP); writes a table and a heatmap"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--calib", help="calibration set from `hprune calib` (built-in tiny models: optional)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--metric", default="rel_mse", choices=["rel_mse", "cosine"])
    p.add_argument("--granularity", default="both", choices=["block", "component", "both"])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-samples", type=int, default=DEFAULT_MAX_SAMPLES,
                   help="probe an evenly spaced subset of this many calibration samples, as `hprune compress` "
                        "does (0: all)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--offload", action="store_true",
                   help="block by block: weights stay on the host, one block at a time on --device (automatic when "
                        "the model does not fit the GPU, and for 16-bit weights on a CPU, which computes in float32)")
    add_device_arguments(p)


def run(args: argparse.Namespace) -> int:
    from hprune import dist
    from hprune.calib import CalibrationSet, builtin_calibration
    from hprune.errors import HpruneError
    from hprune.io import atomic_dir, check_output
    from hprune.models.registry import BUILTINS
    from hprune.probe import probe_sensitivity
    from hprune.report import format_table

    if args.max_samples < 0:
        raise HpruneError(f"--max-samples must be >= 0 (0: all), got {args.max_samples}")
    check_output(args.out, args.overwrite)  # before the probe, not after it
    device, dtype = device_and_dtype(args)
    model, offload = load_for_offload(args.model, device, dtype, args.offload)
    if args.calib:
        cal = CalibrationSet.load(args.calib)
    elif args.model in BUILTINS:
        with offload_context(model, device, offload):
            cal = builtin_calibration(args.model, model, n_prompts=4, num_steps=8)
    else:
        raise HpruneError("--calib FILE is required for this model (make one with `hprune calib`)")
    main = dist.setup(device)[0] == 0
    cap = args.max_samples or None
    n = min(len(cal), cap or len(cal))
    if main:
        print(f"probing ΔP on {n} calibration samples" + (f" (of {len(cal)})" if n < len(cal) else ""))
    from hprune.models.offload import compute_dtype, storage_dtype

    with offload_context(model, device, offload):
        table = probe_sensitivity(model, cal, granularity=args.granularity, metric=args.metric,
                                  batch_size=args.batch_size, max_samples=cap, progress=main,
                                  device=device if offload else None,
                                  dtype=compute_dtype(storage_dtype(model), device) if offload else None)
    if not main:
        return 0
    with atomic_dir(args.out, overwrite=args.overwrite) as tmp:
        table.save(tmp / "sensitivity.json")
        table.heatmap(tmp / "sensitivity.png", title=f"{args.model}: ΔP ({args.metric})")
    cols = sorted({c for b in table.blocks for c in b["delta"]}, key=lambda c: (c != "block", c))
    rows = [{"#": b["index"], "kind": b["kind"], **{c: b["delta"].get(c) for c in cols},
             "similarity": round(b["similarity"], 5)} for b in table.blocks]
    print(format_table(rows, ["#", "kind"] + cols + ["similarity"], title=f"ΔP ({args.metric}), {table.seconds:.1f} s"))
    print(f"wrote {Path(args.out) / 'sensitivity.json'} and sensitivity.png")
    return 0
