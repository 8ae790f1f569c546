"""One-shot OBS-Diff pruning: unstructured, N:M (2:4, 4:8) or structured (attention heads and FFN
neurons, layers physically shrunk), with a timestep-aware Hessian gathered while the calibration
set's denoising runs are replayed on the model. Writes a compressed artifact that `load_model`
(and every hprune command) loads back.

MODEL is a built-in name, a local diffusers model or pipeline folder, a .safetensors file with
its config.json, or an hprune artifact. --calib is a calibration set (CalibrationSet.save) made
for this model; built-in models get one when it is omitted (synthetic stand-in prompts, or the
ShapesBench teacher's own captions). The printed
fidelity is how far the pruned model's velocity moves from the original's on calibration
inputs (relative MSE and cosine distance; 0 = identical).

--offload runs it block by block (as `quantize`): the weights stay on the host (memory-mapped),
one block at a time on --device, each block's Hessians from ONE pass over the calibration set's
stored inputs, the pruned block written back to the host (structured: its shrunk layers made
there). Automatic when the model does not fit the GPU, and for 16-bit weights on a CPU (computed
in float32). --groups is unused then (one block's Hessians are held at a time); --sequential
feeds each block the outputs of the already pruned blocks instead of the dense ones.

examples:
  hprune obs tiny-sd3 --sparsity 0.5 --out sd3-obs50
  hprune obs ./sd35-large --calib calib.safetensors --pattern 2:4 --groups 4 --out sd35-24
  hprune obs ./flux1-dev --calib calib.safetensors --pattern structured --sparsity 0.3 --offload --out flux-s30
  hprune obs tiny-flux --pattern structured --sparsity 0.3 --method wanda --out flux-s30
  torchrun --nproc-per-node 8 -m hprune obs ./sd35-large --calib calib.safetensors --out sd35-obs50
      (the calibration trajectories are dealt out to the ranks, their Hessians summed; rank 0 writes)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys

from hprune.commands import add_device_arguments, device_and_dtype, load_for_offload, offload_context

HELP = "OBS-Diff one-shot pruning (unstructured, 2:4/4:8, structured heads/neurons)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from hprune.obs.hessian import DEFAULT_WEIGHTING, WEIGHTINGS

    p.add_argument("model", metavar="MODEL")
    p.add_argument("--out", required=True, help="output artifact folder (must not exist unless --overwrite)")
    p.add_argument("--calib", metavar="FILE", help="calibration set (.safetensors written by CalibrationSet.save)")
    p.add_argument("--sparsity", type=float, default=None,
                   help="fraction of weights (unstructured, default 0.5) or of heads and FFN neurons per layer "
                        "(structured); N:M patterns imply 1 - N/M")
    p.add_argument("--pattern", default="unstructured", help="unstructured | 2:4 | 4:8 | N:M | structured")
    p.add_argument("--groups", type=int, default=1,
                   help="K of group-wise sequential pruning (default 1); Hessian memory is one group's, so use 4+ on "
                        "real-size models resident; unused block by block (--offload), which holds one block's")
    p.add_argument("--weighting", default=DEFAULT_WEIGHTING, choices=WEIGHTINGS,
                   help=f"timestep weights of the Hessian (default {DEFAULT_WEIGHTING})")
    p.add_argument("--alpha", type=float, nargs=2, default=(0.8, 1.2), metavar=("MIN", "MAX"),
                   help="range of the step weights (default 0.8 1.2)")
    p.add_argument("--method", default="obs", choices=["obs", "wanda", "magnitude"],
                   help="obs (default, with weight compensation) or a baseline mask")
    p.add_argument("--blocks", help="block indices to prune, e.g. '1-36' or '0,2,5-9' (default: all)")
    add_device_arguments(p)
    p.add_argument("--offload", action="store_true",
                   help="block by block: the weights stay on the host (memory-mapped), one block at a time on --device "
                        "(automatic when the model does not fit the GPU, and for 16-bit weights on a CPU, which then "
                        "computes in float32); the Hessians of one block at a time from ONE calibration pass")
    p.add_argument("--sequential", action=_Sequential,
                   help="block by block (implies --offload), each block calibrated on the outputs of the already "
                        "pruned blocks (what --groups does resident)")
    p.add_argument("--eval-samples", type=int, default=8,
                   help="calibration samples to measure fidelity on (0 = skip; default 8)")
    p.add_argument("--config", help="config.json for a lone .safetensors MODEL")
    p.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


class _Sequential(argparse.Action):
    """--sequential: a flag that also sets --offload (so --dry-run plans the block-by-block run)."""

    def __init__(self, option_strings, dest, **kw):
        super().__init__(option_strings, dest, nargs=0, default=False, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        namespace.sequential = namespace.offload = True


def parse_blocks(text: str | None) -> list[int] | None:
    """'1-3,7' -> [1, 2, 3, 7]; None -> None. HpruneError on bad syntax."""
    from hprune.errors import HpruneError

    if text is None:
        return None
    out: list[int] = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise HpruneError(f"--blocks: cannot read {part!r} (expected indices and ranges like '0,2,5-9')")
        a, b = int(m.group(1)), int(m.group(2) or m.group(1))
        if b < a:
            raise HpruneError(f"--blocks: empty range {part.strip()!r}")
        out += range(a, b + 1)
    return out


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hprune.errors import HpruneError
    from hprune.io import check_output
    from hprune.obs.hessian import step_weights
    from hprune.obs.patterns import parse_pattern, resolve_sparsity

    # Cheap checks first: nothing is loaded or computed for a command that cannot succeed.
    pat = parse_pattern(args.pattern)
    sparsity = resolve_sparsity(args.sparsity, pat)
    step_weights(args.weighting, 2, *args.alpha)
    if args.groups < 1:
        raise HpruneError(f"--groups must be >= 1, got {args.groups}")
    if args.groups > 1 and args.offload:
        raise HpruneError(f"--groups {args.groups} is for resident runs: block by block (--offload"
                          f"{', implied by --sequential' if args.sequential else ''}) each block's Hessians come "
                          f"from one pass; use --sequential there for later blocks to see the pruned earlier ones")
    if args.eval_samples < 0:
        raise HpruneError(f"--eval-samples must be >= 0, got {args.eval_samples}")
    blocks = parse_blocks(args.blocks)
    check_output(args.out, args.overwrite)
    if args.calib and not Path(args.calib).is_file():
        raise HpruneError(f"calibration set not found: {args.calib} (make one with `hprune calib {args.model} "
                          f"--out calib.safetensors`)")

    from hprune import dist
    from hprune.artifacts import save_compressed
    from hprune.commands import FidelityCheck, calibration_for
    from hprune.models.offload import Spill
    from hprune.models.stats import bytes_at
    from hprune.obs import obs_prune_model
    from hprune.owned import output_lock
    from hprune.report import format_table, human_bytes, human_count

    device, dtype = device_and_dtype(args)
    # under torchrun: calibration shared out (resident; block by block each rank streams it all), rank 0 writes
    main = dist.setup(device)[0] == 0
    model, offload = load_for_offload(args.model, device, dtype, args.offload, config=args.config, random_ok=True,
                                      hint="give a checkpoint folder, or run on a GPU for random weights")
    if offload and args.groups > 1:  # switched on by itself (the model's size or dtype)
        print(f"--groups {args.groups} is unused block by block: each block's Hessians come from one pass "
              f"over the calibration set", file=sys.stderr)
    with offload_context(model, device, offload):
        calib = (None if args.method == "magnitude" and not args.calib
                 else calibration_for(args.model, model, args.calib, what=f"method {args.method!r}"))
        check = FidelityCheck(model, calib, args.eval_samples)  # before the model changes
    bytes_before = bytes_at(model)

    # Block by block (unstructured / N:M), each block's pruned Linears live in a temporary file
    # beside --out (models.offload.Spill): file pages instead of private copies of the mapped
    # checkpoint, so the host holds one block's output, not the model's. The output's lock is held
    # from here to the save (the stale-temporary cleanup of another run cannot take the file).
    with contextlib.ExitStack() as held:
        spill = None
        if main and offload and pat.kind != "structured":
            held.enter_context(output_lock(args.out))
            spill = held.enter_context(Spill(args.out))
        report = obs_prune_model(model, calib, sparsity if pat.kind != "nm" else None, pat.name,
                                 groups=1 if offload else args.groups, weighting=args.weighting, method=args.method,
                                 blocks=blocks, alpha=tuple(args.alpha), progress=main,
                                 offload=device if offload else None, sequential=args.sequential, spill=spill)
        report["offload"] = report.get("offload", False)
        with offload_context(model, device, offload):
            fid = check.measure(model)
        if fid:
            report["fidelity"] = fid
        report["bytes_bf16_before"], report["bytes_bf16_after"] = bytes_before, bytes_at(model)
        if not main:
            return 0
        save_compressed(model, args.out, overwrite=args.overwrite, extra={"obs": report})

    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k not in ("layers",)}, indent=2))
        return 0
    rows = [
        {"": "parameters", "before": human_count(report["params_before"]), "after": human_count(report["params_after"])},
        {"": "bytes (bf16)", "before": human_bytes(bytes_before), "after": human_bytes(report["bytes_bf16_after"])},
    ]
    print(format_table(rows, ["", "before", "after"]))
    what = (f"{report['pruned_fraction']:.1%} of the pruned layers' weights are zero" if "pruned_fraction" in report
            else f"{len(report['sites'])} attention/FFN sites shrunk")
    how = (f"block by block{' (sequential)' if args.sequential else ''}" if offload else f"groups {args.groups}")
    print(f"{args.method} {pat.name} sparsity {sparsity:g}, {how}: {what}; {report['seconds']:.1f} s")
    if fid:
        print(f"fidelity on {fid['samples']} calibration samples: rel_mse {fid['rel_mse']:.4g}, "
              f"cosine distance {fid['cosine']:.4g}")
    print(f"wrote {args.out}")
    return 0
