"""Run the compression pipeline end to end on a built-in tiny model on the CPU (a few minutes):
prune, measure fidelity, save and reload the artifact, generate images with the original and the
compressed model, and write report.md / report.json / images.png to the output folder."""
from __future__ import annotations

import argparse

HELP = "run the whole pipeline on a built-in tiny model (CPU, minutes)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny-sd3", choices=["tiny-sd3", "tiny-sd35", "tiny-flux"])
    p.add_argument("--out", default="hprune-demo", help="output folder (default: hprune-demo)")
    p.add_argument("--ratio", type=float, default=0.25, help="fraction of transformer parameters to remove (default 0.25)")
    p.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")


def run(args: argparse.Namespace) -> int:
    from hprune.demo import run_demo
    from hprune.errors import HpruneError

    if not 0 < args.ratio < 1:
        raise HpruneError(f"--ratio must be in (0, 1), got {args.ratio}")
    run_demo(args.out, model_name=args.model, ratio=args.ratio, overwrite=args.overwrite)
    return 0
