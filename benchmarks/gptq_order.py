"""GPTQ column order on real calibration Hessians: round-to-nearest vs GPTQ left to right
(natural order) vs GPTQ by decreasing input energy (act-order, hprune's default).

For each built-in MODEL the timestep-aware Hessians of every block Linear are gathered from the
model's own calibration set (hprune.obs.run_calibration_loop, the Hessians GPTQ uses), and each
Linear is quantised three ways. Reported per format: the mean over layers of the Hessian-weighted
relative error tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) (what GPTQ minimises; the layer's relative output error
on its calibration inputs), the ratio act-order / natural order, and the share of layers where
act-order is lower. AdaLN modulation Linears are left out (GPTQ keeps them round-to-nearest).

    python -m benchmarks.gptq_order                     # shapes-teacher and tiny-sd3, int4 and nf4
    python -m benchmarks.gptq_order tiny-flux --formats int4 --group 32
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import env_info, print_table, write_results  # noqa: E402


def layer_errors(name: str, formats: list[str], group: int, prompts: int, steps: int) -> list[dict[str, Any]]:
    from hprune.calib import builtin_calibration
    from hprune.loading import load_model
    from hprune.obs import HessianCollector, find_linear_units, run_calibration_loop, step_weights
    from hprune import formats as F
    from hprune.quant.gptq import gptq_quantize, hessian_error

    model = load_model(name)
    cal = builtin_calibration(name, model, n_prompts=prompts, num_steps=steps)
    units = find_linear_units(model)  # the block Linears, AdaLN modulation left out
    collector = HessianCollector({u.name: [lin for _, lin in u.linears] for u in units},
                                 step_weights("log-decrease", cal.num_steps))
    run_calibration_loop(model, cal, collector)
    hs = collector.hessians()
    rows = []
    for fmt in formats:
        errs: dict[str, list[float]] = {"rtn": [], "natural": [], "act": []}
        for u in units:
            for _, lin in u.linears:
                w, h = lin.weight.detach(), hs[u.name]
                errs["rtn"].append(hessian_error(w, F.quantize(w, group, fmt), h))
                errs["natural"].append(hessian_error(w, gptq_quantize(w, h, group, fmt, act_order=False), h))
                errs["act"].append(hessian_error(w, gptq_quantize(w, h, group, fmt, act_order=True), h))
        ratios = [a / b for a, b in zip(errs["act"], errs["natural"]) if b > 0]
        rows.append({"model": name, "format": fmt, "group": group, "layers": len(errs["rtn"]),
                     "rtn": statistics.fmean(errs["rtn"]), "gptq_natural": statistics.fmean(errs["natural"]),
                     "gptq_act_order": statistics.fmean(errs["act"]),
                     "act/natural (of means)": statistics.fmean(errs["act"]) / statistics.fmean(errs["natural"]),
                     "act/natural (median layer)": statistics.median(ratios),
                     "act lower in": sum(a < b for a, b in zip(errs["act"], errs["natural"])) / len(ratios)})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", default=["shapes-teacher", "tiny-sd3"])
    p.add_argument("--formats", default="int4,nf4")
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--prompts", type=int, default=16, help="calibration trajectories")
    p.add_argument("--steps", type=int, default=10, help="denoising steps per trajectory")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    rows = [r for m in args.models for r in layer_errors(m, args.formats.split(","), args.group, args.prompts,
                                                          args.steps)]
    cols = ["model", "format", "layers", "rtn", "gptq_natural", "gptq_act_order", "act/natural (of means)",
            "act/natural (median layer)", "act lower in"]
    print_table(rows, cols, title="GPTQ column order: Hessian-weighted relative error tr(ΔW H ΔWᵀ)/tr(W H Wᵀ), "
                                  "mean over layers")
    write_results("gptq_order", {"env": env_info("cpu"), "settings": vars(args), "rows": rows,
                                 "seconds": round(time.perf_counter() - t0, 1)}, "cpu", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
