"""Apply a prune plan to a model and write the compressed artifact (weights + recipe)."""
from __future__ import annotations

import argparse

HELP = "apply a plan to a model and save the pruned artifact"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--plan", required=True, help="plan.json from `hprune plan`")
    p.add_argument("--out", required=True, help="output artifact folder")
    p.add_argument("--overwrite", action="store_true")


def run(args: argparse.Namespace) -> int:
    from hprune.artifacts import save_compressed
    from hprune.commands import load_weighted_model
    from hprune.io import check_output
    from hprune.models import PrunePlan, apply_plan, param_count
    from hprune.report import human_count

    check_output(args.out, args.overwrite)
    plan = PrunePlan.load(args.plan)
    model = load_weighted_model(args.model)
    before = param_count(model)
    apply_plan(model, plan)
    after = param_count(model)
    save_compressed(model, args.out, overwrite=args.overwrite, extra={"plan_file": str(args.plan)})
    print(f"pruned {args.model}: {human_count(before)} -> {human_count(after)} parameters "
          f"({1 - after / before:.1%} removed); wrote {args.out}")
    return 0
