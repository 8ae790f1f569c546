"""Run the whole compression pipeline on a built-in tiny model on the CPU (about 1.5 CPU-minutes;
--quick: the same stages on less work, under half a CPU-minute; see docs/demo.md):
calibrate, probe ΔP, plan with HPP, prune, distill (PWP + SGDistill), quantise to 4 bits, save and
reload, then generate images with the original and the compressed model. Writes the artifact,
report.md / report.json, sensitivity.png, distill_loss.png and images.png to the output folder."""
from __future__ import annotations

import argparse

HELP = "run the whole pipeline on a built-in tiny model (CPU, minutes)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny-sd3", choices=["tiny-sd3", "tiny-sd35", "tiny-flux"])
    p.add_argument("--out", default="hprune-demo", help="output folder")
    # the defaults are `hprune compress`'s (tests/test_cli.py checks)
    p.add_argument("--ratio", type=float, default=0.3, help="fraction of transformer parameters to remove")
    p.add_argument("--steps", type=int, default=200, action=_Given,
                   help="distillation steps (default: 200; 30 with --quick)")
    p.add_argument("--quant", default="int4", choices=["int4", "int4-fp8", "bnb-nf4", "none"])
    p.add_argument("--quick", action="store_true",
                   help="the same stages on less work, to see them run (under a CPU-minute): 6 calibration "
                        "prompts x 4 steps, ΔP on 8 samples, 30 distillation steps, 2 images")
    p.add_argument("--overwrite", action="store_true", help="replace an output folder hprune wrote")


class _Given(argparse.Action):
    """Stores the value and notes that it was given (so --quick changes only what was not)."""

    def __call__(self, parser: argparse.ArgumentParser, ns: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        setattr(ns, self.dest, values)
        setattr(ns, f"{self.dest}_given", True)


def run(args: argparse.Namespace) -> int:
    from hprune.demo import run_demo
    from hprune.errors import HpruneError

    if not 0 < args.ratio < 1:
        raise HpruneError(f"--ratio must be in (0, 1), got {args.ratio}")
    steps = args.steps if (getattr(args, "steps_given", False) or not args.quick) else None
    run_demo(args.out, model_name=args.model, ratio=args.ratio, steps=steps, quant=args.quant,
             overwrite=args.overwrite, quick=args.quick, n_images=None)
    return 0
