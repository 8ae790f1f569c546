"""Make a prune plan from a sensitivity table: HierarchicalPrune's HPP (ΔP weighted by block
position, exp((i - |B|)/|B|), greedy until --ratio of the parameters is removed), or a baseline:
KOALA-style (most input/output-similar blocks), BK-SDM-style (ΔP alone), or manual (--blocks, or
the preset sd3.5-large-released)."""
from __future__ import annotations

import argparse

HELP = "make a prune plan (hpp, koala, bksdm or manual) from a sensitivity table"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sensitivity", help="sensitivity.json from `hprune probe`")
    p.add_argument("--ratio", type=float, help="fraction of transformer parameters to remove, in (0, 1)")
    p.add_argument("--method", default="hpp", choices=["hpp", "koala", "bksdm", "manual"])
    p.add_argument("--granularity", default="hybrid", choices=["block", "component", "hybrid"], help="hpp only")
    p.add_argument("--protect", type=int, help="leading blocks never pruned (hpp default: a quarter; baselines: 0)")
    p.add_argument("--no-positional", action="store_true", help="hpp without the positional weight")
    p.add_argument("--rank", default="per_param", choices=["per_param", "delta"], help="hpp ranking")
    p.add_argument("--blocks", help="manual: block list like 25-29,31-35, or a preset (sd3.5-large-released)")
    p.add_argument("--model", metavar="MODEL",
                   help="manual: the model the plan is for (its blocks are checked now); or give --sensitivity")
    p.add_argument("--out", required=True, help="output plan.json")
    p.add_argument("--overwrite", action="store_true")


def run(args: argparse.Namespace) -> int:
    from hprune.errors import HpruneError
    from hprune.hpp import plan_bksdm, plan_hpp, plan_koala, plan_manual
    from hprune.io import check_output
    from hprune.probe import SensitivityTable
    from hprune.report import format_table

    check_output(args.out, args.overwrite, kind="file")
    if args.method != "manual" and args.ratio is None:  # before reading the table
        raise HpruneError(f"--method {args.method} needs --ratio R, the share of the parameters to remove "
                          f"(e.g. --ratio 0.3)")
    table = SensitivityTable.load(args.sensitivity) if args.sensitivity else None
    if args.method == "manual":
        if not args.blocks:
            raise HpruneError("--method manual needs --blocks (e.g. 25-29,31-35 or sd3.5-large-released)")
        from hprune.hpp import PRESETS
        from hprune.loading import load_model
        from hprune.models.registry import BUILTINS

        model = None
        if args.model:
            meta = None if args.model in BUILTINS and BUILTINS[args.model].tiny else True  # the structure only
            model = load_model(args.model, meta=meta)
        elif table is None and args.blocks not in PRESETS:
            raise HpruneError("--method manual needs --model MODEL (or --sensitivity FILE) to check the block "
                              "indices against, so that a wrong plan fails now rather than at `hprune prune`")
        plan = plan_manual(args.blocks, model=model, table=table)
    else:
        if table is None:
            raise HpruneError(f"--method {args.method} needs --sensitivity FILE (from `hprune probe`)")
        if args.method == "hpp":
            plan = plan_hpp(table, args.ratio, granularity=args.granularity, protect=args.protect,
                            positional=not args.no_positional, rank=args.rank)
        else:
            fn = plan_koala if args.method == "koala" else plan_bksdm
            plan = fn(table, args.ratio, protect=args.protect or 0)
    plan.save(args.out, overwrite=args.overwrite)
    rows = [{"block": e.block, "piece": e.component, "score": e.score, "why": e.note} for e in plan.entries]
    print(format_table(rows, ["block", "piece", "score", "why"], title=f"{plan.method} plan"))
    if "achieved_ratio" in plan.meta:
        print(f"removes {plan.meta['achieved_ratio']:.1%} of the parameters (target {plan.meta['ratio']:.1%})")
    print(f"wrote {args.out}")
    return 0
