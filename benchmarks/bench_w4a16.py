"""W4A16 matmul benchmark: bf16 F.linear (cuBLAS) vs bitsandbytes NF4 (matmul_4bit) vs hprune
Triton vs hprune CUDA vs hprune CUTLASS (Hopper), and W4A8 (FP8 activations) vs bf16 and vs the
FP8 ceiling `torch._scaled_mm`, over M and the (K, N) shapes of SD3.5-Large and FLUX.1 linears.

    PYTHONPATH=. python benchmarks/bench_w4a16.py                 # GPU if present, else CPU
    PYTHONPATH=. python benchmarks/bench_w4a16.py --quick         # fewer shapes / M
    PYTHONPATH=. python benchmarks/bench_w4a16.py --timing eager  # include launch overheads

GPU timing (default `--timing graph`): each method's calls are captured in a CUDA graph that
cycles through enough weight copies to exceed L2 (so weights stream from HBM as in a model),
the graph is replayed after warm-up, and the median over replays (CUDA events) / calls is
reported: GPU time without Python or launch overhead, for every method alike. `--timing eager`
times single calls with CUDA events (benchmarks.common.bench), launch overhead included.
Triton configurations are autotuned during warm-up (not timed).

On the CPU the GPU kernels cannot run: it times the reference path (the CPU path of the op),
bf16 F.linear and bitsandbytes' CPU NF4, on small shapes, and says so in the table and JSON.
Targets (H100/H200): >= 3x bf16 at M <= 16, >= 0.95x bf16 at M >= 1024, faster than
bitsandbytes at every M; W4A8 >= 1.5x bf16 at M >= 1024; the table marks each row.
Rows appear only where their backend runs: "hprune CUTLASS" needs an sm_90 GPU and
hprune._C_cutlass, W4A8 and the FP8 ceiling need FP8 tensor cores (sm_89+). "hprune auto" is the
op's automatic choice (dispatch.ROUTES), the backend it took in the note. The FP8 ceiling is
`torch._scaled_mm` on pre-quantised e4m3 operands with per-tensor scales: the GEMM alone, without
the per-token activation quantisation or group scales W4A8 does.

Each hprune row names its launch configuration (`config`: the backend's tile / split-K / K-tail
variant, the one the self-test key holds; "auto" rows the backend chosen too), and its error
(`max_rel_err`) is measured on the whole output of the call that was timed, against the
reference in exact fp32. The JSON is rewritten after every (shape, M), so a run stopped at its
time limit keeps every row it measured (`complete`: false until the end).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import Any, Callable

import torch
import torch.nn.functional as TF

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import bench, env_info, print_table, write_results  # noqa: E402
from hprune.kernels import cutlass_w4a16 as CW  # noqa: E402
from hprune.kernels import dispatch  # noqa: E402
from hprune.kernels.w4a8 import OP as OP_W4A8  # noqa: E402
from hprune.kernels.w4a8 import FORMATS as W4A8_FORMATS  # noqa: E402
from hprune.kernels.w4a8 import GROUP_MULTIPLE as W4A8_GROUP_MULTIPLE  # noqa: E402
from hprune.kernels.w4a8 import fp8_supported, w4a8_mm  # noqa: E402
from hprune.kernels.w4a16 import OP, chosen_backend, w4a16_mm  # noqa: E402
from hprune import formats as F  # noqa: E402

# (K, N) of SD3.5-Large (hidden 2432, MLP 9728) and FLUX.1 (hidden 3072, MLP 12288, single-block
# proj_out 15360 -> 3072) linears
SHAPES = [(2432, 2432), (2432, 9728), (9728, 2432), (3072, 3072), (3072, 12288), (12288, 3072), (15360, 3072)]
MS = [1, 16, 64, 256, 1024, 4096]
CPU_SHAPES = [(2432, 2432), (3072, 3072)]
CPU_MS = [1, 16, 64, 256]
L2_ROTATE_BYTES = 256 << 20  # weight copies per method span at least this much memory


def _bnb():
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bf
        return bnb, bf
    except Exception as exc:  # noqa: BLE001 - missing or without a backend for this device
        return None, str(exc)


LABELS = {"reference": "hprune reference", "triton": "hprune Triton", "cuda": "hprune CUDA",
          "cutlass": "hprune CUTLASS", "auto": "hprune auto"}
FP8_CEILING = "torch._scaled_mm FP8"


def make_methods(k: int, n: int, device: torch.device, dtype: torch.dtype, fmt: str, group: int,
                 copies_for: Callable[[int], int], backends: list[str],
                 w4a8_backends: list[str] = (), peers: bool = False) -> dict[str, dict[str, Any]]:
    """{method: {"make": x -> [callables over weight copies], "bytes": weight bytes, "note": str}}."""
    gen = torch.Generator(device=device).manual_seed(0)
    w = (torch.randn(n, k, generator=gen, device=device) * 0.02).to(dtype)
    bias = None
    methods: dict[str, dict[str, Any]] = {}

    nb = copies_for(w.numel() * w.element_size())
    ws = [w] + [w.clone() for _ in range(nb - 1)]
    methods["bf16 F.linear" if dtype == torch.bfloat16 else f"{str(dtype)[6:]} F.linear"] = {
        "make": lambda x: [lambda wi=wi: TF.linear(x, wi, bias) for wi in ws],
        "bytes": w.numel() * w.element_size(), "note": "cuBLAS" if device.type == "cuda" else "torch CPU"}

    q = F.quantize(w, group, fmt, refine=False)  # timing does not depend on the values
    qbytes = q.nbytes
    nq = copies_for(qbytes)
    qs = [(q.qweight, q.scales, q.zeros)] + [(q.qweight.clone(), q.scales.clone(),
                                             None if q.zeros is None else q.zeros.clone()) for _ in range(nq - 1)]
    for be in backends:
        if be != "auto" and be not in dispatch.available(OP, device):
            continue
        label = LABELS[be]
        if be == "cutlass":
            why = CW.cutlass_unsupported(torch.empty(1, k, dtype=dtype, device=device), q.qweight, q.scales, q.zeros,
                                         group, fmt)
            if why:
                methods[label] = {"error": f"not served: {why}"}
                continue
        methods[label] = {
            "make": lambda x, be=be: [lambda t=t: w4a16_mm(x, t[0], t[1], t[2], group, fmt,
                                                           backend=None if be == "auto" else be) for t in qs],
            "bytes": qbytes, "note": f"{fmt} g{group}", "backend": None if be == "auto" else be, "q": q,
            "op": OP}

    # W4A8: the same packed weight, FP8 (e4m3) activations quantised per token on the fly
    if fmt in W4A8_FORMATS and group % W4A8_GROUP_MULTIPLE == 0:
        for be in w4a8_backends:
            if be not in dispatch.available(OP_W4A8, device):
                continue
            methods[f"hprune W4A8 {LABELS[be].split()[-1]}"] = {
                "make": lambda x, be=be: [lambda t=t: w4a8_mm(x, t[0], t[1], t[2], group, fmt, backend=be) for t in qs],
                "bytes": qbytes, "note": f"{fmt} g{group}, e4m3 activations", "backend": be, "q": q, "op": OP_W4A8}
    # the FP8 ceiling: an e4m3 x e4m3 GEMM (cuBLASLt on a GPU), operands already in FP8
    if w4a8_backends and (device.type == "cpu" or fp8_supported(device)) and k % 16 == 0 and n % 16 == 0:
        w8 = (w.float() / w.float().abs().amax().clamp_min(1e-12) * 448).to(torch.float8_e4m3fn)
        n8 = copies_for(w8.numel())
        w8s = [w8] + [w8.clone() for _ in range(n8 - 1)]
        one = torch.ones((), device=device)

        def fp8_calls(x):
            x8 = x.to(torch.float8_e4m3fn)  # outside the timed calls: the GEMM alone
            return [lambda wi=wi: torch._scaled_mm(x8, wi.t(), scale_a=one, scale_b=one, out_dtype=dtype) for wi in w8s]

        methods[FP8_CEILING] = {"make": fp8_calls, "bytes": w8.numel(),
                                "note": "e4m3 GEMM only, per-tensor scales (W4A8's ceiling)"}

    if peers:
        methods.update(peer_methods(w, group, copies_for))
    bnb, bf = _bnb()
    if bnb is not None:
        try:
            packed, state = bf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
            bbytes = packed.numel() + state.absmax.numel() * state.absmax.element_size()
            nbb = copies_for(bbytes)
            bs = [(packed, state)] + [bf.quantize_4bit(w, blocksize=64, quant_type="nf4",
                                                       compress_statistics=False) for _ in range(nbb - 1)]
            methods["bnb NF4 matmul_4bit"] = {
                "make": lambda x: [lambda p=p, s=s: bnb.matmul_4bit(x, p.t(), quant_state=s) for p, s in bs],
                "bytes": bbytes, "note": "nf4 blocksize 64 (paper setting)"}
        except Exception as exc:  # noqa: BLE001
            methods["bnb NF4 matmul_4bit"] = {"error": f"bitsandbytes failed: {exc}"}
    else:
        methods["bnb NF4 matmul_4bit"] = {"error": f"bitsandbytes unavailable: {bf}"}
    return methods


def peer_methods(w: torch.Tensor, group: int, copies_for: Callable[[int], int]) -> dict[str, dict[str, Any]]:
    """The 4-bit weight-only kernels users would pick instead, where their packages are installed
    (carry their wheels: ../shared/tools/device-wheels.sh torchao gemlite): torchao's int4
    weight-only (tinygemm) and gemlite's A16W4. A peer that is missing or fails is a row with the
    reason, never a silent omission."""
    n, k = w.shape
    out: dict[str, dict[str, Any]] = {}

    def linear() -> torch.nn.Linear:
        lin = torch.nn.Linear(k, n, bias=False, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
        return lin

    try:
        from torchao.quantization import Int4WeightOnlyConfig, quantize_

        mods = []
        for _ in range(copies_for(w.numel() // 2)):
            lin = linear()
            quantize_(lin, Int4WeightOnlyConfig(group_size=group))
            mods.append(lin)
        out["torchao int4 weight-only"] = {"make": lambda x: [lambda m_=m_: m_(x) for m_ in mods],
                                           "bytes": w.numel() // 2, "note": f"tinygemm g{group}"}
    except Exception as exc:  # noqa: BLE001 - not installed or not working on this torch
        out["torchao int4 weight-only"] = {"error": f"torchao unavailable: {type(exc).__name__}: {str(exc)[:100]}"}
    try:
        from gemlite.helper import A16W4

        mods = [A16W4(device=str(w.device)).from_linear(linear()) for _ in range(copies_for(w.numel() // 2))]
        out["gemlite A16W4"] = {"make": lambda x: [lambda m_=m_: m_(x) for m_ in mods],
                                "bytes": w.numel() // 2, "note": "gemlite helper A16W4"}
    except Exception as exc:  # noqa: BLE001
        out["gemlite A16W4"] = {"error": f"gemlite unavailable: {type(exc).__name__}: {str(exc)[:100]}"}
    return out


def time_graph(calls: list[Callable[[], Any]], per_graph: int, replays: int) -> float:
    """Median ms per call: `per_graph` calls (cycling over `calls`) captured in one CUDA graph."""
    for c in calls:
        c()  # warm-up outside capture (Triton autotuning, lazy allocations, CUTLASS's once-per-weight reorder)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for c in calls[:3]:
            c()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(per_graph):
            calls[i % len(calls)]()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        graph.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / per_graph)
    del graph
    return statistics.median(times)


def check(method: dict[str, Any], timed_call: Callable[[], Any], x: torch.Tensor, group: int, fmt: str
          ) -> float | None:
    """Max |out - reference| / max |reference| over the whole output of the timed call (its first
    weight copy holds the values of `method["q"]`), the reference in exact fp32: guards against
    timing a wrong kernel."""
    if "op" not in method:
        return None
    q = method["q"]
    fn = w4a8_mm if method["op"] == OP_W4A8 else w4a16_mm
    out = timed_call()
    with dispatch.exact_fp32():
        ref = fn(x, q.qweight, q.scales, q.zeros, group, fmt, backend="reference")
    return float((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30))


def configuration(method: dict[str, Any], x: torch.Tensor, group: int, fmt: str) -> str | None:
    """The launch configuration a row ran: the backend's (dispatch.config_of: tile, split-K,
    K tail; for Triton the autotuned one when tuning ran), "auto" rows prefixed by the backend."""
    if "op" not in method:
        return None
    q = method["q"]
    m, k = x.shape
    n = q.qweight.shape[0]
    op = method["op"]
    be = method["backend"]
    if be is None:
        be = chosen_backend(x, q.qweight, q.scales, q.zeros, group, fmt)
    if be == "reference":
        return "reference"
    spec = (m, n, k, group, fmt, False)
    cfg = dispatch.config_of(op, be, spec, x.dtype, dispatch.device_info(x.device))
    if be == "triton" and op == OP:
        from hprune.kernels.triton_w4a16 import _TUNED, _m_bucket

        tuned = [c for key, c in _TUNED.items() if key[1:4] == (_m_bucket(m), n, k) and key[4] == x.dtype]
        if tuned:
            from hprune.kernels.triton_w4a16 import launch_label

            cfg = launch_label(tuned[0], k) + " (autotuned)"
    return f"{be}: {cfg}" if method["backend"] is None else (cfg or "-")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--fmt", default=F.DEFAULT_FORMAT, choices=F.FORMATS)
    ap.add_argument("--group", type=int, default=F.DEFAULT_GROUP_SIZE)
    ap.add_argument("--m", default=None, help="comma-separated M values")
    ap.add_argument("--shapes", default=None, help="comma-separated KxN, e.g. 2432x2432,3072x12288")
    ap.add_argument("--backends", default="reference,triton,cuda,cutlass,auto",
                    help="hprune W4A16 backends to time (those that run on the device; auto: the op's choice)")
    ap.add_argument("--w4a8-backends", default="triton,reference",
                    help="hprune W4A8 backends to time (GPU: triton; CPU: reference), plus the FP8 ceiling; "
                         "empty: no W4A8 rows")
    ap.add_argument("--timing", default="graph", choices=["graph", "eager"])
    ap.add_argument("--quick", action="store_true", help="first two shapes only")
    ap.add_argument("--peers", action="store_true", help="also time torchao int4 and gemlite A16W4 (GPU, if installed)")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    gpu = device.type == "cuda"
    shapes = ([tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes
              else (SHAPES if gpu else CPU_SHAPES))
    if args.quick:
        shapes = shapes[:2]
    ms = [int(v) for v in args.m.split(",")] if args.m else (MS if gpu else CPU_MS)
    backends = [b for b in args.backends.split(",") if b]
    w4a8_backends = [b for b in args.w4a8_backends.split(",") if b]
    if not gpu:
        backends = [b for b in backends if b == "reference"]  # Triton on CPU is the (slow) interpreter
        w4a8_backends = [b for b in w4a8_backends if b == "reference"]
    else:  # on a GPU the W4A8 reference is an emulation, not a candidate: time the kernels
        w4a8_backends = [b for b in w4a8_backends if b != "reference"]
    env = env_info(device)
    note = ("GPU: CUDA-graph timing over L2-exceeding weight copies" if gpu and args.timing == "graph"
            else "GPU: eager CUDA-event timing" if gpu
            else "CPU ONLY: no GPU here, so the Triton and CUDA kernels were not run; the rows time the "
                 "reference path (the op's CPU path), torch's CPU bf16 F.linear and bitsandbytes' CPU NF4 "
                 "on small shapes. These are not the GPU figures.")
    print(f"# W4A16 matmul on {env['device']} ({args.dtype}, hprune {args.fmt} g{args.group}); {note}", flush=True)
    copies_for = (lambda nbytes: max(2, min(64, -(-L2_ROTATE_BYTES // max(1, nbytes))))) if gpu else (lambda _: 1)

    rows: list[dict[str, Any]] = []
    if not gpu:  # CPU timings on a shared machine: record how busy it was
        payload_load = {"loadavg_1_5_15min": os.getloadavg(), "cpu_count": os.cpu_count()}
    else:
        payload_load = {}

    def save(complete: bool) -> None:
        payload = {"benchmark": "w4a16_mm", "env": {**env, **payload_load}, "note": note, "dtype": args.dtype,
                   "fmt": args.fmt, "group_size": args.group,
                   "timing": args.timing if gpu else "cpu wall clock (median)", "shapes": shapes, "ms": ms,
                   "complete": complete, "rows": rows, "routes": [vars(r) for r in dispatch.ROUTES]}
        if gpu and "triton" in backends:
            from hprune.kernels.triton_w4a16 import tuned_configs
            payload["triton_configs"] = tuned_configs()
        write_results("bench_w4a16", payload, device, args.out, quiet=not complete)

    for k, n in shapes:
        methods = make_methods(k, n, device, dtype, args.fmt, args.group, copies_for, backends, w4a8_backends,
                               peers=args.peers and gpu)
        for m in ms:
            x = (torch.randn(m, k, device=device) ).to(dtype)
            times: dict[str, float] = {}
            for name, meth in methods.items():
                row = {"K": k, "N": n, "M": m, "method": name}
                if "error" in meth:
                    row["note"] = meth["error"]
                    rows.append(row)
                    continue
                calls = meth["make"](x)
                try:
                    if gpu and args.timing == "graph":
                        per = max(len(calls), 20)
                        ms_ = time_graph(calls, per, replays=10 if m >= 1024 else 20)
                    else:
                        ms_ = bench(calls[0], device, warmup=3 if not gpu else 10, rep=5 if not gpu else 50)
                except Exception as exc:  # noqa: BLE001 - report and go on
                    row["note"] = f"failed: {type(exc).__name__}: {str(exc)[:120]}"
                    rows.append(row)
                    continue
                times[name] = ms_
                flops = 2.0 * m * n * k
                note = meth["note"]
                row.update(ms=ms_, us=ms_ * 1e3, tflops=flops / ms_ / 1e9, weight_gbps=meth["bytes"] / ms_ / 1e6,
                           note=note)
                try:
                    cfg = configuration(meth, x, args.group, args.fmt)
                    if cfg is not None:
                        row["config"] = cfg
                    # (on the CPU only at small sizes: there it is the reference against itself)
                    err = check(meth, calls[0], x, args.group, args.fmt) if gpu or m * n * k <= 2 ** 24 else None
                    if err is not None:
                        row["max_rel_err"] = err
                except Exception as exc:  # noqa: BLE001 - a failed check is a result too
                    row["note"] = f"{note}; check failed: {type(exc).__name__}: {str(exc)[:120]}"
                rows.append(row)
            base = next((t for nm, t in times.items() if "F.linear" in nm), None)
            bnb_t = times.get("bnb NF4 matmul_4bit")
            fp8_t = times.get(FP8_CEILING)
            for row in rows:
                if row["K"] == k and row["N"] == n and row["M"] == m and "ms" in row:
                    if base:
                        row["x_vs_bf16"] = base / row["ms"]
                    if bnb_t and row["method"].startswith("hprune") and "W4A8" not in row["method"]:
                        row["x_vs_bnb"] = bnb_t / row["ms"]
                    if fp8_t and "W4A8" in row["method"]:
                        row["x_vs_fp8"] = fp8_t / row["ms"]
                    if gpu and "W4A8" in row["method"] and m >= 1024:
                        row["targets"] = f">=1.5x bf16: {'ok' if row.get('x_vs_bf16', 0) >= 1.5 else 'MISS'}"
                    if gpu and row["method"] in ("hprune Triton", "hprune CUDA", "hprune CUTLASS", "hprune auto"):
                        tgt = []
                        if m <= 16:
                            tgt.append(f">=3x bf16: {'ok' if row.get('x_vs_bf16', 0) >= 3 else 'MISS'}")
                        if m >= 1024:
                            tgt.append(f">=0.95x bf16: {'ok' if row.get('x_vs_bf16', 0) >= 0.95 else 'MISS'}")
                        if bnb_t:
                            tgt.append(f">bnb: {'ok' if row['x_vs_bnb'] > 1 else 'MISS'}")
                        row["targets"] = "; ".join(tgt)
            print_table([r for r in rows if r["K"] == k and r["N"] == n and r["M"] == m],
                        ["K", "N", "M", "method", "us", "tflops", "weight_gbps", "x_vs_bf16", "x_vs_bnb",
                         "x_vs_fp8", "max_rel_err", "config", "targets", "note"])
            save(complete=False)  # every (shape, M) measured so far survives a stop
    save(complete=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
