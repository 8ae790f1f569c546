"""4-bit weights for the Linear layers of the transformer blocks, on their own: any model hprune
loads (a checkpoint, a built-in, or an artifact from `hprune prune` / `hprune obs`). Writes a
compressed artifact that every hprune command loads back, and prints how far the velocity moved
on calibration samples (relative MSE and cosine distance; 0 = identical).

--method gptq chooses the codes with each layer's timestep-aware input Hessian from the
calibration set's denoising loop (--calib; built-in models get one when it is omitted); rtn (the
default) rounds to nearest with a scale search and needs no data.

examples:
  hprune quantize tiny-sd3 --out sd3-int4
  hprune quantize shapes-teacher --method gptq --out st-gptq
  hprune quantize ./sd35-pruned --calib calib.safetensors --method gptq --act fp8 --out sd35-w4a8
"""
from __future__ import annotations

import argparse
import json

from hprune.commands import add_device_arguments, device_and_dtype, load_for_offload, offload_context

HELP = "4-bit weights (int4 / nf4; round-to-nearest or GPTQ), optionally FP8 activations"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--out", required=True, help="output artifact folder (must not exist unless --overwrite)")
    p.add_argument("--method", default="rtn", choices=["rtn", "gptq"],
                   help="rtn: round to nearest with a scale search (default); gptq: codes chosen with each "
                        "layer's input Hessian from --calib")
    p.add_argument("--calib", metavar="FILE", help="calibration set for gptq (.safetensors from `hprune calib`)")
    p.add_argument("--format", default="int4", choices=["int4", "int4_sym", "nf4"], help="4-bit format")
    p.add_argument("--group-size", type=int, default=64, help="weights per scale along K (a multiple of 32)")
    p.add_argument("--act", default=None, choices=["fp8"], help="fp8: FP8 e4m3 activations (W4A8)")
    p.add_argument("--groups", type=int, default=None,
                   help="gptq: sequential groups (default: as few as keep ~2 GiB of Hessians each)")
    p.add_argument("--natural-order", action="store_true",
                   help="gptq: round the columns left to right instead of by decreasing input energy (act-order)")
    p.add_argument("--skip", action="append", default=[], metavar="PATTERN",
                   help="fnmatch pattern of Linear names to keep dense (repeatable), e.g. '*.norm1.linear'")
    add_device_arguments(p)
    p.add_argument("--offload", action="store_true",
                   help="block by block: the weights stay on the host (memory-mapped), one block at a time on "
                        "--device (automatic when the model does not fit the GPU, and for 16-bit weights on a CPU, "
                        "which then computes in float32); gptq then needs ONE calibration pass")
    p.add_argument("--eval-samples", type=int, default=8,
                   help="calibration samples to measure fidelity on (0 = skip; default 8)")
    p.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    import contextlib
    import time
    from pathlib import Path

    from hprune.errors import HpruneError
    from hprune.io import check_output
    from hprune import formats as F
    from hprune.quant.linear import check_w4a8

    # Cheap checks first: nothing is loaded or computed for a command that cannot succeed.
    F.check_group_size(args.group_size)
    if args.act == "fp8":
        check_w4a8(args.format, args.group_size)
    if args.groups is not None and args.groups < 1:
        raise HpruneError(f"--groups must be >= 1, got {args.groups}")
    if args.eval_samples < 0:
        raise HpruneError(f"--eval-samples must be >= 0, got {args.eval_samples}")
    check_output(args.out, args.overwrite)
    if args.calib and not Path(args.calib).is_file():
        raise HpruneError(f"calibration set not found: {args.calib} (make one with `hprune calib {args.model} "
                          f"--out calib.safetensors`)")

    from hprune import dist
    from hprune.artifacts import save_compressed
    from hprune.commands import FidelityCheck, calibration_for
    from hprune.models.offload import Spill
    from hprune.models.registry import BUILTINS
    from hprune.models.stats import bytes_at
    from hprune.owned import output_lock
    from hprune.quant import quantize_model
    from hprune.report import format_table, human_bytes

    device, dtype = device_and_dtype(args)
    main = dist.setup(device)[0] == 0  # under torchrun: calibration shared out, rank 0 writes
    model, offload = load_for_offload(args.model, device, dtype, args.offload)
    from hprune.quant.model import linears_to_quantize

    linears_to_quantize(model, skip=args.skip)  # an already quantised model is refused before any work
    need = ("--method gptq" if args.method == "gptq" or args.calib else
            "the fidelity check" if args.eval_samples and args.model in BUILTINS and BUILTINS[args.model].tiny
            else None)  # rtn needs no data; without a calibration set there is no fidelity check
    # the context only when a forward runs: it holds the non-block modules in the compute dtype
    # (on a CPU, SD3.5's bf16 pos_embed in float32: 0.36-0.9 GB of anonymous memory)
    with offload_context(model, device, offload and need is not None):
        calib = calibration_for(args.model, model, args.calib, what=need) if need else None
        check = FidelityCheck(model, calib, args.eval_samples)  # before the model changes
    bytes_before = bytes_at(model)
    # Block by block, each block's packed layers go to a temporary file beside --out as soon as
    # they are made (models.offload.Spill): the host holds one block's output, not the model's
    # (SD3.5-Large: ~4.6 GB of INT4). The output's lock is held from here to the save, so the
    # stale-temporary cleanup of another run cannot take the file; it is removed in any case.
    with contextlib.ExitStack() as held:
        spill = None
        if main and offload:
            held.enter_context(output_lock(args.out))
            spill = held.enter_context(Spill(args.out))
        t = time.perf_counter()
        rep = quantize_model(model, group_size=args.group_size, fmt=args.format, act=args.act, skip=args.skip,
                             method=args.method, calib=calib if args.method == "gptq" else None, groups=args.groups,
                             act_order=not args.natural_order, progress=main, offload=device if offload else None,
                             spill=spill)
        report = {"method": args.method, **rep.to_dict(), "seconds": round(time.perf_counter() - t, 3),
                  "bytes_bf16_before": bytes_before, "bytes_bf16_after": bytes_at(model)}
        if args.method == "gptq":
            report["act_order"] = not args.natural_order
        report["offload"] = offload
        with offload_context(model, device, offload and bool(check.refs)):
            fid = check.measure(model)
        if fid:
            report["fidelity"] = fid
        if not main:
            return 0
        save_compressed(model, args.out, overwrite=args.overwrite, extra={"quantize": report})

    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k not in ("quantized", "skipped")}, indent=2))
        return 0
    print(format_table([{"": "bytes (bf16 floats)", "before": human_bytes(bytes_before),
                         "after": human_bytes(report["bytes_bf16_after"])}], ["", "before", "after"]))
    print(f"{rep} [{args.method}], {report['seconds']:.1f} s")
    if fid:
        print(f"fidelity on {fid['samples']} calibration samples: rel_mse {fid['rel_mse']:.4g}, "
              f"cosine distance {fid['cosine']:.4g}")
    print(f"wrote {args.out}")
    return 0
