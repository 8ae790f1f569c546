"""hprune's GPTQ, OBS and RTN solvers against a maintained peer on one layer: time and error.

    python -m benchmarks.bench_solvers                          # the five shapes, 1 and all threads
    python -m benchmarks.bench_solvers --shapes 2432x2432 --threads 1 --methods gptq
    python -m benchmarks.bench_solvers --allocator              # RTN CPU time, default vs tuned glibc

The peer is llm-compressor (`pip install hprune[bench]`, which installs it without its own
dependencies; its solver imports also need compressed-tensors, loguru, datasets and a few of
theirs): GPTQ is `llmcompressor.modifiers.gptq.gptq_quantize.quantize_weight` with min-max group
scales from `compressed_tensors.quantization.utils.calculate_qparams` (its default weight observer:
memoryless min-max), int4 asymmetric, group 64, block 128, damping 0.01 (its "natural" order is
actorder=None, its "act-order" actorder="static"); SparseGPT is
`llmcompressor.modifiers.pruning.sparsegpt.sgpt_sparsify.sparsify_weight` (unstructured 50 % and
2:4); RTN is the same min-max scales with `compressed_tensors` fake_quantize. llm-compressor has
no structured OBS, so that row has no peer. Without llm-compressor the peer rows are skipped (said
in the output), nothing is re-implemented here.

Shapes are weights (N, K) = (out_features, in_features); the Hessian is H = XᵀX / S of S
calibration rows X (S, K) with correlated, unequal-energy columns (random: independent noise with
a log-normal scale per column plus a rank-64 common part), the same W and H for every solver.
Error: tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) = ||X ΔWᵀ||² / ||X Wᵀ||² (float64 accumulate), the layer-output
error. Times: wall clock and process CPU time (this machine is shared: the CPU time is the
steadier figure; both are upper bounds on a busy machine), one run each unless --repeat.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from typing import Any, Callable

import torch

from benchmarks.common import env_info, print_table, write_results

SHAPES = ((2432, 2432), (2432, 9728), (3072, 3072), (3072, 12288), (1536, 6144))
METHODS = ("gptq", "gptq_refine", "obs", "structured", "rtn")
GROUP, BLOCK, DAMP = 64, 128, 0.01


def peer_modules() -> tuple[Any, str] | tuple[None, str]:
    """(module namespace, version string) of llm-compressor's solver functions, or (None, why)."""
    try:
        import compressed_tensors
        import llmcompressor
        from compressed_tensors.quantization import QuantizationArgs, fake_quantize
        from compressed_tensors.quantization.utils import calculate_qparams
        from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight
        from llmcompressor.modifiers.pruning.sparsegpt.sgpt_sparsify import sparsify_weight
    except Exception as e:  # noqa: BLE001 - any import failure means "no peer here", said once
        return None, f"{type(e).__name__}: {e}"
    ns = argparse.Namespace(QuantizationArgs=QuantizationArgs, fake_quantize=fake_quantize,
                            calculate_qparams=calculate_qparams, quantize_weight=quantize_weight,
                            sparsify_weight=sparsify_weight)
    return ns, f"llmcompressor {llmcompressor.__version__}, compressed-tensors {compressed_tensors.__version__}"


def make_problem(n: int, k: int, samples: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W (n, k) float32, calibration rows X (samples, k) and H = XᵀX / samples (k, k) float32."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.randn(k, generator=gen) * 0.7)
    X = torch.randn(samples, k, generator=gen) * scale
    X += torch.randn(samples, 64, generator=gen) @ (torch.randn(64, k, generator=gen) * scale * 0.3)
    H = X.t() @ X / samples
    W = torch.randn(n, k, generator=gen) * 0.02
    return W, X, H


def output_error(W: torch.Tensor, Wq: torch.Tensor, X: torch.Tensor) -> float:
    """||X (Wq - W)ᵀ||² / ||X Wᵀ||² = tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) for H = XᵀX / S."""
    d = (X @ (Wq.float() - W).t()).double().square().sum()
    return float(d / (X @ W.t()).double().square().sum())


def timed(fn: Callable[[], torch.Tensor], repeat: int) -> tuple[float, float, torch.Tensor]:
    """(best wall s, CPU s of that run, result) of `fn`."""
    best = None
    for _ in range(repeat):
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn()
        t, c = time.perf_counter() - t0, time.process_time() - c0
        if best is None or t < best[0]:
            best = (t, c, out)
    return best


def solvers(W: torch.Tensor, H: torch.Tensor, peer: Any, methods: set[str],
            orders: tuple[str, ...] = ("natural", "act-order"), patterns: tuple[str, ...] = ("unstructured", "2:4")
            ) -> list[tuple[str, str, Callable]]:
    """(row, implementation, fn -> dequantised / pruned weight (n, k)) of every solver to run."""
    from hprune import formats as F
    from hprune.obs.patterns import parse_pattern
    from hprune.obs.solver import obs_prune
    from hprune.quant.gptq import gptq_quantize

    n, k = W.shape
    rows: list[tuple[str, str, Callable]] = []

    def hp_gptq(order: bool, refine: bool) -> Callable:
        return lambda: gptq_quantize(W, H, GROUP, "int4", torch.float32, refine=refine, blocksize=BLOCK,
                                     percdamp=DAMP, act_order=order).dequantize(torch.float32)

    def peer_gptq(actorder: str | None) -> Callable:
        def run() -> torch.Tensor:
            qa = peer.QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group",
                                       group_size=GROUP, actorder=actorder)
            wg = W.view(n, k // GROUP, GROUP)
            s, zp = peer.calculate_qparams(wg.amin(-1), wg.amax(-1), qa)
            q, _, _ = peer.quantize_weight(W[None].clone(), H[None].clone(), s[None], zp[None], None, qa,
                                           blocksize=BLOCK, percdamp=DAMP)
            return q[0]
        return run

    def peer_sgpt(n_: int, m_: int) -> Callable:
        def run() -> torch.Tensor:
            lin = torch.nn.Linear(k, n, bias=False)
            lin.weight.data = W.clone()
            _, Wp = peer.sparsify_weight(lin, {lin: H.clone()}, 0.5, n_, m_, BLOCK, DAMP, False)
            return Wp
        return run

    for order, name in ((False, "natural"), (True, "act-order")):
        if name not in orders:
            continue
        if "gptq" in methods:
            rows.append((f"GPTQ int4 g{GROUP} {name}", "hprune", hp_gptq(order, False)))
        if "gptq_refine" in methods:
            rows.append((f"GPTQ int4 g{GROUP} {name} +refine", "hprune", hp_gptq(order, True)))
        if peer is not None and methods & {"gptq", "gptq_refine"}:
            rows.append((f"GPTQ int4 g{GROUP} {name}", "llm-compressor", peer_gptq(None if not order else "static")))
    if "obs" in methods:
        for pat, (pn, pm) in (("unstructured", (0, 0)), ("2:4", (2, 4))):
            if pat not in patterns:
                continue
            rows.append((f"OBS {pat} 50%", "hprune",
                         lambda pat=pat: obs_prune(W, H, 0.5, parse_pattern(pat), BLOCK, DAMP)[0]))
            if peer is not None:
                rows.append((f"OBS {pat} 50%", "llm-compressor", peer_sgpt(pn, pm)))
    if "structured" in methods:
        rows.append(("OBS structured 50% (64-col groups)", "hprune", lambda: structured(W, H)))
    if "rtn" in methods:
        rows.append((f"RTN int4 g{GROUP} +refine", "hprune",
                     lambda: F.quantize(W, GROUP, "int4", torch.float32).dequantize(torch.float32)))
        rows.append((f"RTN int4 g{GROUP}", "hprune",
                     lambda: F.quantize(W, GROUP, "int4", torch.float32, refine=False).dequantize(torch.float32)))
        if peer is not None:
            def peer_rtn() -> torch.Tensor:
                qa = peer.QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=GROUP)
                wg = W.view(n, k // GROUP, GROUP)
                s, zp = peer.calculate_qparams(wg.amin(-1), wg.amax(-1), qa)
                return peer.fake_quantize(W, s, zp, qa)
            rows.append((f"RTN int4 g{GROUP}", "llm-compressor", peer_rtn))
    return rows


def structured(W: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """hprune's structured OBS on one consumer: removes half of its 64-column groups (heads)."""
    from hprune.obs.structured import ColumnOBS, greedy_obs_removal

    st = ColumnOBS(W, H, DAMP)
    cols = torch.arange(W.shape[1]).view(-1, 64)
    greedy_obs_removal([st], [cols], cols.shape[0] // 2)
    return st.W.float()


def run_shape(n: int, k: int, threads: int, args: argparse.Namespace, peer: Any) -> list[dict[str, Any]]:
    torch.set_num_threads(threads)
    W, X, H = make_problem(n, k, args.samples)
    out = []
    for row, impl, fn in solvers(W, H, peer, set(args.methods), tuple(args.orders.split(",")),
                                 tuple(args.patterns.split(","))):
        if row.startswith("OBS structured") and k > args.structured_max_k:
            continue
        with torch.no_grad():
            wall, cpu, Wq = timed(fn, args.repeat)
        rec = {"shape": f"{n}x{k}", "threads": threads, "solver": row, "impl": impl, "wall_s": round(wall, 3),
               "cpu_s": round(cpu, 3), "error": output_error(W, Wq, X)}
        if row.startswith("RTN"):
            rec["M_weights_per_cpu_s"] = round(n * k / cpu / 1e6, 2)
        print(f"  {rec['shape']} t{threads} {row:<40} {impl:<15} {wall:8.2f} s wall {cpu:8.2f} s CPU  "
              f"error {rec['error']:.5g}", flush=True)
        out.append(rec)
    # hprune / peer for the same solver row
    peer_of = {(r["solver"].replace(" +refine", ""), r["threads"]): r for r in out if r["impl"] != "hprune"}
    for r in out:
        p = peer_of.get((r["solver"].replace(" +refine", ""), r["threads"]))
        if r["impl"] == "hprune" and p is not None:
            r["time_vs_peer"] = round(r["wall_s"] / p["wall_s"], 3)
            r["cpu_vs_peer"] = round(r["cpu_s"] / p["cpu_s"], 3)
            r["error_vs_peer"] = round(r["error"] / p["error"], 4)
    return out


ALLOC_SNIPPET = """
import resource, time, torch
torch.set_num_threads(1)
from hprune import formats as F
W = (torch.randn(1536, 6144, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
F.quantize(W[:64])
r0 = resource.getrusage(resource.RUSAGE_SELF)
qw = F.quantize(W)
r1 = resource.getrusage(resource.RUSAGE_SELF)
print(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime, r1.ru_minflt - r0.ru_minflt)
"""


def allocator_check() -> dict[str, Any]:
    """RTN (1536×6144 bf16, refine on, one thread) CPU time and minor page faults with glibc's
    default allocator settings and with MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ raised."""
    res = {}
    for name, extra in (("default", {}), ("tuned", {"MALLOC_MMAP_THRESHOLD_": str(1 << 30),
                                                    "MALLOC_TRIM_THRESHOLD_": str(1 << 31)})):
        env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
        for key in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
            if key not in extra:
                env.pop(key, None)
        runs = []
        for _ in range(3):
            out = subprocess.run([sys.executable, "-c", ALLOC_SNIPPET], env=env, capture_output=True, text=True,
                                 check=True).stdout.split()
            runs.append((float(out[0]), int(out[1])))
        cpu, faults = min(runs)
        res[name] = {"cpu_s": round(cpu, 3), "minor_faults": faults}
        print(f"  RTN allocator {name:<8} {cpu:.3f} s CPU, {faults} minor page faults", flush=True)
    res["default_over_tuned"] = round(res["default"]["cpu_s"] / res["tuned"]["cpu_s"], 3)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES),
                    help="comma-separated NxK weight shapes (out x in)")
    ap.add_argument("--threads", default=f"1,{torch.get_num_threads() or os.cpu_count()}",
                    help="comma-separated CPU thread counts")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
    ap.add_argument("--orders", default="natural,act-order", help="GPTQ column orders to run")
    ap.add_argument("--patterns", default="unstructured,2:4", help="OBS patterns to run")
    ap.add_argument("--samples", type=int, default=2048, help="calibration rows S for H = XᵀX / S")
    ap.add_argument("--repeat", type=int, default=1, help="runs per solver (best wall time kept)")
    ap.add_argument("--structured-max-k", type=int, default=3072,
                    help="skip structured OBS above this K (float64 H⁻¹ updates: slow at 12288)")
    ap.add_argument("--allocator", action="store_true", help="also the RTN allocator check (issue 32)")
    ap.add_argument("--name", default="bench_solvers")
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        ap.error(f"unknown methods {bad}; choose from {METHODS}")
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",") if s]
    threads = [int(t) for t in args.threads.split(",") if t]
    peer, peer_version = peer_modules()
    print(f"peer: {peer_version if peer is not None else 'not available (' + peer_version + ')'}", flush=True)
    rows: list[dict[str, Any]] = []
    payload = {"env": env_info("cpu"), "peer": peer_version if peer is not None else None,
               "config": {"group_size": GROUP, "blocksize": BLOCK, "percdamp": DAMP, "samples": args.samples,
                          "orders": args.orders, "patterns": args.patterns, "methods": args.methods,
                          "repeat": args.repeat, "load_average_at_start": os.getloadavg()},
               "results": rows}
    for t in threads:
        for n, k in shapes:
            rows += run_shape(n, k, t, args, peer)
            # written after every shape: a long run stopped part-way keeps what it measured
            payload["complete"] = False
            write_results(args.name, payload, "cpu", args.out_dir, quiet=True)
    payload["complete"] = True
    if args.allocator:
        payload["rtn_allocator"] = allocator_check()
    cols = ["shape", "threads", "solver", "impl", "wall_s", "cpu_s", "error", "time_vs_peer", "cpu_vs_peer",
            "error_vs_peer", "M_weights_per_cpu_s"]
    print_table(rows, cols, "solvers: hprune vs llm-compressor")
    write_results(args.name, payload, "cpu", args.out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
