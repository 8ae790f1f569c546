"""Latency of OBS-Diff-pruned transformers against the dense model.

Variants, one transformer forward each (the cost of one denoising step):
  dense               the model as loaded
  2:4 masked          2:4 zeros in the block Linears, dense matmuls (what a mask alone gives)
  2:4 semi-structured the same weights on sparse tensor cores (hprune.obs.to_semi_structured)
  structured S        S of the heads and FFN neurons removed, layers physically smaller
plus the block Linears alone (one GEMM each at the model's token count), dense vs 2:4.

Latency does not depend on which weights were pruned, so the masks come from magnitude pruning
(no calibration needed); OBS picks other weights of the same shapes. On a GPU the real-size
architectures run with random bf16 weights at 1024x1024 (4096 image tokens);
--blocks N keeps the first N blocks when memory is tight. On the CPU the script runs the tiny
built-in models and says so: 2:4 sparse kernels exist only on CUDA.

    python -m benchmarks.bench_obs                      # GPU: sd3.5-medium, sd3.5-large, flux.1-dev
    python -m benchmarks.bench_obs --models sd3.5-large --blocks 12
"""
from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import bench, env_info, print_table, write_results  # noqa: E402


def build(name: str, device: torch.device, blocks: int | None) -> torch.nn.Module:
    """Built-in model `name`: real-size ones with random bf16 weights on the GPU (optionally only
    their first `blocks` blocks), tiny ones as they are (float32)."""
    from hprune.loading import load_model
    from hprune.models.registry import BUILTINS, build_from_config, randomize_

    b = BUILTINS[name]
    if b.tiny or blocks is None:
        return load_model(name, device=device)
    cfg = dict(b.config)
    if b.class_name == "FluxTransformer2DModel":  # keep the double/single proportion
        double = max(1, round(blocks * cfg["num_layers"] / (cfg["num_layers"] + cfg["num_single_layers"])))
        cfg["num_layers"], cfg["num_single_layers"] = double, max(1, blocks - double)
    else:
        cfg["num_layers"] = blocks
        cfg["dual_attention_layers"] = tuple(i for i in cfg.get("dual_attention_layers", ()) if i < blocks)
    model = build_from_config(b.class_name, cfg, meta="params")
    return randomize_(model, device, torch.bfloat16).eval()


def model_inputs(model: torch.nn.Module, name: str, resolution: int, batch: int, device: torch.device) -> dict:
    from hprune.models import sample_inputs
    from hprune.models.registry import BUILTINS

    b = BUILTINS[name]
    latent = resolution // 8 if not b.tiny else b.sample.get("latent_size", 32)
    p = next(model.parameters())
    return sample_inputs(model, batch=batch, latent_size=latent, text_len=b.sample.get("text_len", 16),
                         device=device, dtype=p.dtype)


def time_forward(model: torch.nn.Module, x: dict, device: torch.device, rep: int, min_time_s: float = 0.0) -> float:
    """Median ms of one transformer forward."""
    @torch.no_grad()
    def step() -> None:
        model(**x, return_dict=False)

    return bench(step, device, warmup=max(2, rep // 5), rep=rep, min_time_s=min_time_s)


def linear_microbench(model: torch.nn.Module, tokens: int, device: torch.device, rep: int) -> list[dict[str, Any]]:
    """Each distinct block Linear shape once: dense GEMM vs 2:4 semi-structured, M = tokens."""
    from hprune.obs import find_linear_units
    from hprune.obs.sparse24 import SemiStructuredLinear, _shape_fits

    shapes = sorted({tuple(l.weight.shape) for u in find_linear_units(model) for _, l in u.linears})
    rows = []
    for out_f, in_f in shapes:
        w = torch.randn(out_f, in_f, device=device, dtype=torch.bfloat16)
        w = w * torch.tensor([1, 1, 0, 0], device=device, dtype=w.dtype).repeat(in_f // 4)
        x = torch.randn(tokens, in_f, device=device, dtype=torch.bfloat16)
        dense = bench(lambda: torch.nn.functional.linear(x, w), device, warmup=5, rep=rep)
        row = {"out": out_f, "in": in_f, "tokens": tokens, "dense_ms": round(dense, 4)}
        if _shape_fits(w):
            lin = SemiStructuredLinear(in_f, out_f, bias=False, device=device, dtype=torch.bfloat16)
            lin.weight = torch.nn.Parameter(torch.sparse.to_sparse_semi_structured(w), requires_grad=False)
            sparse = bench(lambda: lin(x), device, warmup=5, rep=rep)
            row.update(sparse_ms=round(sparse, 4), speedup=round(dense / sparse, 3))
        rows.append(row)
    return rows


def _tokens(model: torch.nn.Module, x: dict) -> int:
    hs = x["hidden_states"]
    img = hs.shape[1] if hs.ndim == 3 else hs.shape[-1] * hs.shape[-2] // model.config.patch_size ** 2
    return img + x["encoder_hidden_states"].shape[1]


def run_model_cpu(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Tiny model on the CPU: the variants are timed in alternating rounds, so load from other
    processes on a shared machine hits them alike; the median over rounds is reported."""
    import copy
    import statistics

    from hprune.models.stats import param_count
    from hprune.obs import obs_prune_model

    device = torch.device("cpu")
    dense = build(name, device, None)
    x = model_inputs(dense, name, args.resolution, args.batch, device)
    masked = copy.deepcopy(dense)
    obs_prune_model(masked, None, pattern="2:4", method="magnitude")
    structured = copy.deepcopy(dense)
    obs_prune_model(structured, None, args.structured, "structured", method="magnitude")
    variants = {"dense": dense, "2:4 masked (dense matmuls)": masked, f"structured {args.structured:g}": structured}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        for k, m in variants.items():
            times[k].append(time_forward(m, x, device, args.rep, min_time_s=0.0))
    base = statistics.median(times["dense"])
    rows = []
    for k, m in variants.items():
        ms = statistics.median(times[k])
        rows.append({"variant": k, "ms": round(ms, 3), "speedup": round(base / ms, 3), "params": param_count(m)})
    rows.insert(2, {"variant": "2:4 semi-structured", "ms": None, "speedup": None,
                    "note": "needs CUDA (torch.sparse.to_sparse_semi_structured)"})
    return {"model": name, "blocks": None, "batch": args.batch, "tokens": _tokens(dense, x), "resolution": None,
            "rounds": args.rounds, "rows": rows, "linears": []}


def _release(device: torch.device) -> None:
    """Return the memory of a model just dropped, so the next variant starts clean."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_model(name: str, device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """Real-size model on the GPU: dense, then 2:4 in place (masked, then converted), then a
    fresh copy pruned structurally (one model in memory at a time)."""
    from hprune.models.stats import param_count
    from hprune.obs import obs_prune_model, to_semi_structured

    rows: list[dict[str, Any]] = []
    model = build(name, device, args.blocks)
    x = model_inputs(model, name, args.resolution, args.batch, device)
    tokens = _tokens(model, x)
    dense = time_forward(model, x, device, args.rep)
    rows.append({"variant": "dense", "ms": round(dense, 3), "speedup": 1.0, "params": param_count(model)})

    obs_prune_model(model, None, pattern="2:4", method="magnitude")
    masked = time_forward(model, x, device, args.rep)
    rows.append({"variant": "2:4 masked (dense matmuls)", "ms": round(masked, 3),
                 "speedup": round(dense / masked, 3), "params": param_count(model)})
    converted = to_semi_structured(model)
    sparse = time_forward(model, x, device, args.rep)
    rows.append({"variant": f"2:4 semi-structured ({len(converted)} Linears)", "ms": round(sparse, 3),
                 "speedup": round(dense / sparse, 3), "params": param_count(model)})
    del model
    _release(device)

    model = build(name, device, args.blocks)
    obs_prune_model(model, None, args.structured, "structured", method="magnitude")
    structured = time_forward(model, x, device, args.rep)
    rows.append({"variant": f"structured {args.structured:g}", "ms": round(structured, 3),
                 "speedup": round(dense / structured, 3), "params": param_count(model)})
    del model
    _release(device)
    micro = linear_microbench(build(name, device, 1), tokens * args.batch, device, args.rep)
    return {"model": name, "blocks": args.blocks, "batch": args.batch, "tokens": tokens,
            "resolution": args.resolution, "rows": rows, "linears": micro}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=None,
                   help="built-in names (default: sd3.5-medium sd3.5-large flux.1-dev on a GPU, tiny-sd3 "
                        "tiny-flux on the CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--resolution", type=int, default=1024, help="image size in pixels (GPU; default 1024)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--blocks", type=int, default=None, help="keep only the first N blocks (memory)")
    p.add_argument("--structured", type=float, default=0.3, help="structured sparsity (default 0.3)")
    p.add_argument("--rep", type=int, default=20, help="timed repetitions per measurement")
    p.add_argument("--rounds", type=int, default=7, help="CPU: alternating rounds over the variants")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type != "cuda":
        print("NOTE: no GPU: timing the tiny built-in models on the CPU. These numbers say nothing about "
              "real-size latency, and 2:4 sparse kernels need CUDA.", flush=True)
    models = args.models or (["sd3.5-medium", "sd3.5-large", "flux.1-dev"] if device.type == "cuda"
                             else ["tiny-sd3", "tiny-flux"])
    env = env_info(device)
    print(f"device: {env['device']}", flush=True)
    results = []
    for name in models:
        r = run_model(name, device, args) if device.type == "cuda" else run_model_cpu(name, args)
        results.append(r)
        title = (f"{name}" + (f" (first {args.blocks} blocks)" if args.blocks else "")
                 + f", batch {args.batch}, {r['tokens']} tokens, {env['device']}")
        print_table(r["rows"], ["variant", "ms", "speedup", "params", "note"], title=title)
        if r["linears"]:
            print_table(r["linears"], ["out", "in", "tokens", "dense_ms", "sparse_ms", "speedup"],
                        title=f"{name}: block Linears alone (bf16 GEMM vs 2:4)")
    write_results("obs", {"env": env, "args": vars(args), "torch_threads": torch.get_num_threads(),
                          "results": results}, device, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
