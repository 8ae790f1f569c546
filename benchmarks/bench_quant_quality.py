"""Quality of 4-bit formats: output error of hprune INT4 (asymmetric / symmetric, groups 32, 64,
128) and hprune NF4 vs bitsandbytes NF4 / FP4 (blocksizes 64, 128, with and without double
quantisation), on Gaussian and heavy-tailed (Student-t) weights with realistic activations.
Method and definitions: hprune.quant.quality. Runs on the CPU (errors do not depend on the device).

    PYTHONPATH=. python benchmarks/bench_quant_quality.py [--n 1024 --k 1024 --m 256]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import env_info, print_table, write_results  # noqa: E402
from hprune.quant.quality import BNB_PAPER, HPRUNE_DEFAULT, WEIGHTS, quality_study  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1024, help="output features")
    ap.add_argument("--k", type=int, default=1024, help="input features")
    ap.add_argument("--m", type=int, default=256, help="tokens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    rows = quality_study(args.n, args.k, args.m, seed=args.seed)
    verdict = []
    for kind in WEIGHTS:
        sub = [r for r in rows if r["weights"] == kind]
        ref = next(r for r in sub if r["config"] == BNB_PAPER.name)
        for r in sub:
            r["err_vs_bnb_nf4_g64"] = r["rel_error"] / ref["rel_error"]
        print_table(sorted(sub, key=lambda r: r["bytes_per_param"]),
                    ["weights", "config", "bytes_per_param", "rel_error", "err_vs_bnb_nf4_g64"],
                    title=f"\n## {kind} weights ({args.n}x{args.k}), realistic activations (M={args.m}); bf16")
        ours = next(r for r in sub if r["config"] == HPRUNE_DEFAULT.name)
        ok = ours["rel_error"] <= ref["rel_error"] and ours["bytes_per_param"] <= ref["bytes_per_param"]
        verdict.append({"weights": kind, "hprune_default": HPRUNE_DEFAULT.name, "hprune_error": ours["rel_error"],
                        "hprune_bytes_per_param": ours["bytes_per_param"], "bnb": BNB_PAPER.name,
                        "bnb_error": ref["rel_error"], "bnb_bytes_per_param": ref["bytes_per_param"],
                        "no_worse_at_no_more_bytes": ok})
    print_table(verdict, ["weights", "hprune_error", "hprune_bytes_per_param", "bnb_error", "bnb_bytes_per_param",
                          "no_worse_at_no_more_bytes"],
                title=f"\n## claim: {HPRUNE_DEFAULT.name} vs {BNB_PAPER.name} (the paper's setting)")
    payload = {"benchmark": "quant_quality", "env": env_info("cpu"), "n": args.n, "k": args.k, "m": args.m,
               "seed": args.seed, "definition": "rel_error = ||y - x W^T|| / ||x W^T||, bf16 weights and "
                                                 "activations, each backend's own forward; see hprune.quant.quality",
               "rows": rows, "claim": verdict}
    write_results("bench_quant_quality", payload, "cpu", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
