"""Benchmark: one optimizer step of SensitivityAdamW against torch's AdamW variants.

Parameter set shaped like SD3.5-Large's joint transformer blocks (hidden 2432, MLP 9728, AdaLN
6x hidden, 64-dim q/k RMSNorm weights; ~213 M parameters per block): 8 blocks = 1.7 B parameters
on a GPU. On the CPU (no GPU here) the same block structure at hidden 256 / MLP 1024.

Scales as Sensitivity-Guided Distillation sets them: the first 2 blocks frozen (s = 0), every
other (block, component) pair its own scale in (0, 1] (component = norm1, norm1_context, attn,
ff, ff_context), i.e. 30 distinct non-zero scales with 8 blocks. Variants timed per step:

    hprune-<backend>        SensitivityAdamW(backend=...): cuda / triton on a GPU, cpp / reference on the CPU
    torch-fused-1group      torch.optim.AdamW(fused=True), trained tensors, ONE lr (ignores the
                            scales: not the same update, the speed floor of torch's fastest kernel)
    torch-fused-per-scale   torch.optim.AdamW(fused=True), one param group per distinct scale (same update)
    torch-foreach-per-scale torch.optim.AdamW(foreach=True), one group per scale (same update)
    torch-single-per-scale  torch.optim.AdamW(foreach=False, fused=False) (CPU only; the default there)

Achieved bandwidth = bytes an ideal step moves / time, against a device-to-device copy measured in
the same run (bytes read + written / time). Ideal bytes per trained element: fp32 parameters
28 (read p, g, m, v; write p, m, v); bf16 parameters 22 for hprune (fp32 moments) and 14 for torch
(bf16 moments). Frozen tensors move nothing in any variant (torch variants never see them).
On a CPU the copy is not a ceiling: its destination lines are read before being written
(write-allocate), traffic the 2-bytes-per-byte count ignores, while AdamW writes only what it has
just read, so a CPU step can show more than 100% of copy. On a GPU the copy is the reference.
The CPU here is shared: `loadavg_before/after` in the JSON says how busy it was; `--threads 1`
is the steadier comparison there (one parallel region per tensor, as torch's CPU kernels use,
suffers most when threads get descheduled).

    python benchmarks/bench_optim.py                  # GPU if present, else the CPU set
    python benchmarks/bench_optim.py --blocks 4 --dtype bf16
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import bench, env_info, print_table, write_results  # noqa: E402
from hprune.kernels import dispatch  # noqa: E402
from hprune.kernels import scaled_adamw as sa  # noqa: E402
from hprune.optim import SensitivityAdamW  # noqa: E402

COMPONENTS = ("norm1", "norm1_context", "attn", "ff", "ff_context")


def block_shapes(hidden: int, mlp: int, head_dim: int = 64) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    """Parameter shapes of one SD3.5-Large JointTransformerBlock, by component."""
    lin = lambda name, o, i: [(f"{name}.weight", (o, i)), (f"{name}.bias", (o,))]  # noqa: E731
    attn = []
    for n in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out"):
        attn += lin(f"attn.{n}", hidden, hidden)
    attn += [(f"attn.{n}.weight", (head_dim,)) for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k")]
    return {
        "norm1": lin("norm1.linear", 6 * hidden, hidden),
        "norm1_context": lin("norm1_context.linear", 6 * hidden, hidden),
        "attn": attn,
        "ff": lin("ff.net.0.proj", mlp, hidden) + lin("ff.net.2", hidden, mlp),
        "ff_context": lin("ff_context.net.0.proj", mlp, hidden) + lin("ff_context.net.2", hidden, mlp),
    }


def build(blocks: int, hidden: int, mlp: int, frozen_blocks: int, dtype: torch.dtype, device: torch.device,
          seed: int = 0):
    """Parameters (with gradients) and their scales; scale 0 for the first `frozen_blocks` blocks."""
    g = torch.Generator().manual_seed(seed)
    shapes = block_shapes(hidden, mlp)
    names, params, scales = [], [], []
    for b in range(blocks):
        for comp in COMPONENTS:
            s = 0.0 if b < frozen_blocks else round(0.05 + 0.95 * torch.rand((), generator=g).item(), 4)
            for name, shape in shapes[comp]:
                p = torch.nn.Parameter(torch.empty(shape, dtype=dtype, device=device).normal_(0, 0.02))
                p.grad = torch.empty_like(p).normal_(0, 1e-3)
                names.append(f"transformer_blocks.{b}.{name}")
                params.append(p)
                scales.append(s)
    return names, params, scales


def per_scale_groups(params: list[torch.Tensor], scales: list[float], lr: float) -> list[dict[str, Any]]:
    distinct = sorted({s for s in scales if s > 0})
    return [{"params": [p for p, s in zip(params, scales) if s == sc], "lr": lr * sc} for sc in distinct]


def copy_gbps(device: torch.device, nbytes: int) -> float:
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), device, warmup=5, rep=20)
    del src, dst
    return 2 * nbytes / (ms * 1e-3) / 1e9


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--frozen-blocks", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=None, help="default 2432 on a GPU, 256 on the CPU")
    ap.add_argument("--mlp", type=int, default=None, help="default 4 x hidden")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--rep", type=int, default=None, help="timed steps per variant and round")
    ap.add_argument("--rounds", type=int, default=None, help="default 1 on a GPU, 5 on the CPU")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    hidden = args.hidden or (2432 if on_gpu else 256)
    mlp = args.mlp or 4 * hidden
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    rep = args.rep or (20 if on_gpu else 4)
    lr, wd = 1e-4, 0.01

    names, params, scales = build(args.blocks, hidden, mlp, args.frozen_blocks, dtype, device)
    trained = [p for p, s in zip(params, scales) if s > 0]
    n_trained = sum(p.numel() for p in trained)
    n_total = sum(p.numel() for p in params)
    esize = torch.finfo(dtype).bits // 8
    bytes_hprune = n_trained * (3 * esize + 16)  # read p, g, write p (param dtype); read+write m, v (fp32)
    bytes_torch = n_trained * 7 * esize  # the same, moments in the param dtype
    copy_bytes = (1 << 30) if on_gpu else (256 << 20)

    variants: list[tuple[str, Callable[[], torch.optim.Optimizer], int]] = []
    hprune_backends = [b for b in ("cuda", "triton", "cpp", "reference") if b in dispatch.available(sa.OP, device)]
    if on_gpu:
        hprune_backends = [b for b in hprune_backends if b != "reference"]
    for b in hprune_backends:
        variants.append((f"hprune-{b}", lambda b=b: SensitivityAdamW(
            list(zip(names, params)), lr=lr, weight_decay=wd, scales=dict(zip(names, scales)), backend=b),
            bytes_hprune))
    variants += [
        ("torch-fused-1group", lambda: torch.optim.AdamW(trained, lr=lr, weight_decay=wd, fused=True), bytes_torch),
        ("torch-fused-per-scale", lambda: torch.optim.AdamW(per_scale_groups(params, scales, lr), lr=lr,
                                                             weight_decay=wd, fused=True), bytes_torch),
        ("torch-foreach-per-scale", lambda: torch.optim.AdamW(per_scale_groups(params, scales, lr), lr=lr,
                                                               weight_decay=wd, foreach=True), bytes_torch),
    ]
    if not on_gpu:
        variants.append(("torch-single-per-scale", lambda: torch.optim.AdamW(
            per_scale_groups(params, scales, lr), lr=lr, weight_decay=wd, foreach=False, fused=False), bytes_torch))

    # A GPU is ours alone: variants run one after the other, each optimizer freed before the next
    # (their states would not fit together). The CPU here is shared with other jobs: all
    # optimizers live at once and the variants take turns for `rounds` rounds, copy included;
    # each number is the median over rounds, so a burst of foreign load hits every variant alike.
    rounds = args.rounds or (1 if on_gpu else 5)
    times: dict[str, list[float]] = {label: [] for label, _, _ in variants}
    errors: dict[str, str] = {}
    copies: list[float] = []
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None

    def timed(label: str, opt: torch.optim.Optimizer) -> None:
        times[label].append(bench(opt.step, device, warmup=2 if rounds > 1 else 3, rep=rep))

    if rounds == 1:
        copies.append(copy_gbps(device, copy_bytes))
        for label, make, _ in variants:
            try:
                timed(label, make())
            except Exception as exc:  # noqa: BLE001 - a torch variant that does not exist on this device
                errors[label] = f"{type(exc).__name__}: {exc}"
            free(device)
    else:
        opts = {}
        for label, make, _ in variants:
            try:
                opts[label] = make()
            except Exception as exc:  # noqa: BLE001
                errors[label] = f"{type(exc).__name__}: {exc}"
        for _ in range(rounds):
            copies.append(copy_gbps(device, copy_bytes))
            for label, opt in opts.items():
                timed(label, opt)
    copy = statistics.median(copies)

    rows = []
    for label, _, nbytes in variants:
        if label in errors:
            print(f"{label}: skipped ({errors[label]})", flush=True)
            rows.append({"variant": label, "error": errors[label]})
            continue
        ms = statistics.median(times[label])
        gbps = nbytes / (ms * 1e-3) / 1e9
        rows.append({"variant": label, "ms": ms, "ms_rounds": times[label], "GB_moved": nbytes / 1e9,
                     "GBps": gbps, "pct_of_copy": 100 * gbps / copy})

    same_update = [r for r in rows if "ms" in r and r["variant"] in
                   ("torch-fused-per-scale", "torch-foreach-per-scale", "torch-single-per-scale")]
    best_torch = min((r["ms"] for r in same_update), default=None)
    best_any_torch = min((r["ms"] for r in rows if "ms" in r and r["variant"].startswith("torch")), default=None)
    for r in rows:
        if "ms" in r and r["variant"].startswith("hprune") and best_torch:
            r["speedup_vs_best_torch_same_update"] = best_torch / r["ms"]
            r["speedup_vs_torch_fused_1group"] = best_any_torch / r["ms"] if best_any_torch else None

    info = env_info(device)
    config = {
        "blocks": args.blocks, "frozen_blocks": args.frozen_blocks, "hidden": hidden, "mlp": mlp,
        "dtype": args.dtype, "tensors": len(params), "tensors_trained": len(trained),
        "params_total": n_total, "params_trained": n_trained,
        "distinct_nonzero_scales": len({s for s in scales if s > 0}), "lr": lr, "weight_decay": wd,
        "copy_GBps": copy, "copy_GBps_rounds": copies, "copy_buffer_bytes": copy_bytes, "rep": rep,
        "rounds": rounds, "loadavg_before": load_before,
        "loadavg_after": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "torch_threads": torch.get_num_threads(),
    }
    title = (f"optimizer step, {info['device']}, {args.dtype}, {n_total / 1e9:.3f} B params "
             f"({n_trained / 1e9:.3f} B trained, {len(trained)}/{len(params)} tensors, "
             f"{config['distinct_nonzero_scales']} distinct scales); copy {copy:.1f} GB/s")
    table = print_table(rows, ["variant", "ms", "GBps", "pct_of_copy", "speedup_vs_best_torch_same_update"], title)
    payload = {"benchmark": "bench_optim", "env": info, "config": config, "results": rows, "table": table}
    name = "bench_optim" + ("" if args.dtype == "fp32" else f"-{args.dtype}") + (f"-t{args.threads}" if args.threads else "")
    write_results(name, payload, device, args.out_dir)
    return payload


if __name__ == "__main__":
    main()
