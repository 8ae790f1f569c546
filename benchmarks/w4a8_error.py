"""Output error of W4A8 (FP8 activations) against W4A16 on the same 4-bit weights, for any MODEL.

For each MODEL (a built-in name, a diffusers folder, a .safetensors file or an hprune artifact):
the model as loaded is the reference; a copy is quantised with hprune int4 (W4A16, --fmt /
--group), and the same weights are switched to W4A8 (`set_activation_quant(model, "fp8")`).
On the inputs the transformer sees while denoising (a calibration set given with --calib, else
a synthetic one: stand-in prompts denoised by the model itself, --steps per trajectory), reports

  rel_l2(a, b) = ||v_a - v_b|| / ||v_b||  of the predicted velocity, and the cosine distance,
  for W4A16 vs the reference, W4A8 vs the reference and W4A8 vs W4A16;
  per quantised layer, the relative error of W4A8 vs W4A16 on that layer's real inputs
  (median / max over layers, and the worst layer).

On the CPU both run the PyTorch references (W4A8 emulates the FP8 rounding exactly), so the
numbers are the kernels' numerics, not an approximation of them. Random-weight models (the tiny
built-ins) show the size of the effect; a trained model (e.g. the ShapesBench teacher) is what
says how much it matters:

    python -m benchmarks.w4a8_error                                  # tiny-sd3 tiny-sd35 tiny-flux
    python -m benchmarks.w4a8_error path/to/teacher --calib calib.safetensors
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import env_info, print_table, write_results  # noqa: E402
from hprune.metrics import cosine_distance, rel_l2  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def calibration_batches(model: nn.Module, spec: str, args: argparse.Namespace) -> list[dict[str, torch.Tensor]]:
    from hprune.calib import CalibrationSet, builtin_calibration

    if args.calib:
        calib = CalibrationSet.load(args.calib)
        calib.check_fits(model)
    else:  # a built-in's own prompts where it has them (the ShapesBench teacher), else synthetic
        calib = builtin_calibration(spec, model, n_prompts=args.prompts, num_steps=args.steps, seed=0)
    return list(calib.batches(args.batch_size, device="cpu", dtype=torch.float32))


@torch.no_grad()
def layer_errors(model16: nn.Module, batch: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """Per W4A16Linear: relative error of W4A8 vs W4A16 on the inputs it receives for `batch`."""
    from hprune.kernels.w4a8 import w4a8_mm
    from hprune.kernels.w4a16 import w4a16_mm
    from hprune.quant import W4A16Linear

    seen: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(mod: nn.Module, inp: tuple, out: torch.Tensor) -> None:
            seen.setdefault(name, inp[0].detach())
        return hook

    hooks = [m.register_forward_hook(keep(n)) for n, m in model16.named_modules() if type(m) is W4A16Linear]
    model16(**batch, return_dict=False)
    for h in hooks:
        h.remove()
    rows = []
    for name, x in seen.items():
        m = model16.get_submodule(name)
        if m.fmt not in ("int4", "int4_sym") or m.group_size % 64:
            continue
        y16 = w4a16_mm(x, m.qweight, m.scales, m.zeros, m.group_size, m.fmt, bias=m.bias)
        y8 = w4a8_mm(x, m.qweight, m.scales, m.zeros, m.group_size, m.fmt, bias=m.bias)
        rows.append({"layer": name, "rel_l2": rel_l2(y8, y16), "tokens": x.numel() // x.shape[-1]})
    return rows


@torch.no_grad()
def evaluate(spec: str, dtype: torch.dtype, args: argparse.Namespace) -> dict[str, Any]:
    import hprune
    from hprune.quant import quantize_model, set_activation_quant

    t0 = time.perf_counter()
    ref = hprune.load_model(spec).float().eval()
    batches = calibration_batches(ref, spec, args)
    ref = ref.to(dtype)
    m16 = copy.deepcopy(ref)
    rep = quantize_model(m16, fmt=args.fmt, group_size=args.group)
    m8 = copy.deepcopy(m16)
    set_activation_quant(m8, "fp8")
    sums: dict[str, list[float]] = {k: [] for k in ("w4a16_vs_ref", "w4a8_vs_ref", "w4a8_vs_w4a16",
                                                   "cos_w4a16_vs_ref", "cos_w4a8_vs_ref", "cos_w4a8_vs_w4a16")}
    for b in batches:
        x = {k: v.to(dtype) if v.is_floating_point() else v for k, v in b.items()}
        y, y16, y8 = (m(**x, return_dict=False)[0].float() for m in (ref, m16, m8))
        sums["w4a16_vs_ref"].append(rel_l2(y16, y))
        sums["w4a8_vs_ref"].append(rel_l2(y8, y))
        sums["w4a8_vs_w4a16"].append(rel_l2(y8, y16))
        sums["cos_w4a16_vs_ref"].append(cosine_distance(y16, y))
        sums["cos_w4a8_vs_ref"].append(cosine_distance(y8, y))
        sums["cos_w4a8_vs_w4a16"].append(cosine_distance(y8, y16))
    first = {k: v.to(dtype) if v.is_floating_point() else v for k, v in batches[0].items()}
    layers = layer_errors(m16, first)
    errs = [r["rel_l2"] for r in layers]
    worst = max(layers, key=lambda r: r["rel_l2"]) if layers else None
    return {"model": spec, "dtype": str(dtype).replace("torch.", ""), "quant": f"{args.fmt} g{args.group}",
            "layers": len(rep.quantized), "samples": sum(b["hidden_states"].shape[0] for b in batches),
            **{k: round(statistics.mean(v), 6) for k, v in sums.items()},
            "layer_median": round(statistics.median(errs), 5) if errs else None,
            "layer_max": round(max(errs), 5) if errs else None, "worst_layer": worst["layer"] if worst else None,
            "seconds": round(time.perf_counter() - t0, 1), "per_layer": layers}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", default=["tiny-sd3", "tiny-sd35", "tiny-flux"], help="MODEL specs")
    p.add_argument("--calib", default=None, help="calibration set (hprune calib); default: synthetic trajectories")
    p.add_argument("--prompts", type=int, default=2, help="synthetic: stand-in prompts (default 2)")
    p.add_argument("--steps", type=int, default=4, help="synthetic: denoising steps per prompt (default 4)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--dtypes", default="float32,bfloat16", help="activation dtypes to run (default float32,bfloat16)")
    p.add_argument("--fmt", default="int4", choices=["int4", "int4_sym"])
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtypes = [DTYPES[d.strip()] for d in args.dtypes.split(",") if d.strip()]
    env = env_info("cpu")
    results = [evaluate(spec, dt, args) for spec in args.models for dt in dtypes]
    cols = ["model", "dtype", "quant", "samples", "w4a16_vs_ref", "w4a8_vs_ref", "w4a8_vs_w4a16",
            "cos_w4a8_vs_w4a16", "layer_median", "layer_max", "worst_layer"]
    print_table(results, cols, "W4A8 vs W4A16 (relative L2 of the predicted velocity; per-layer W4A8 vs W4A16)")
    write_results("w4a8_error", {"benchmark": "w4a8_error", "env": env, "args": vars(args), "results": results},
                  "cpu", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
