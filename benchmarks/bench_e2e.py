"""End to end: latency, peak memory and weight bytes of pruned + 4-bit SD3.5-Large and FLUX.1-schnell.

Rows (the same plan, inputs and execution mode for every row of a model):
  1  original            bf16
  2  pruned              bf16, per the plan: SD3.5-Large the released HierarchicalPrune plan
                         (blocks 25-29 and 31-35); FLUX an HPP plan at --ratio (default 0.2, below)
  3  pruned + bnb NF4    bitsandbytes Linear4bit, NF4, blocksize 64, fp32 absmax, no double
                         quantisation, bf16 compute: the paper's pipeline (diffusers' BitsAndBytesConfig)
  4  pruned + W4A16      hprune int4 (asymmetric, group 64) on the hprune W4A16 kernels
  5  pruned + W4A8       the same weights as row 4 with FP8 (e4m3) activations (hprune W4A8)
Rows 3-5 quantise the same layers: every nn.Linear inside the transformer blocks (embedders,
final norm and projection stay bf16).

GPU (the real figures): the real-size architectures with random bf16 weights (latency and memory
do not depend on the values), batch 1 at 1024x1024: SD3.5-Large 128x128 latents, patch 2 =
4096 image tokens + 333 text tokens (77 CLIP + 256 T5); FLUX.1-schnell 64x64 packed latents =
4096 image tokens + 256 text tokens. Per row: the median of CUDA-event timings of one denoising
step (one transformer forward) after warm-up, of an N-step generation (--steps, default 4: the
transformer plus the Euler update, no text encoders / VAE, no CFG: both are distilled few-step
models), peak memory (torch.cuda.max_memory_allocated over the timed runs: weights +
activations) and weight bytes (hprune.models.stats.weight_bytes: the state dict). --mode picks
the execution: "compile" (default: torch.compile of every transformer block, regional, so
compile time stays short), "eager", "cudagraph" (the whole step captured in one CUDA graph) or
"compile+cudagraph". A row whose mode fails is rerun eagerly and marked so. Each invocation
should stay under 10 minutes on an H100: split with --models / --rows; results are merged into
benchmarks/results/e2e-<gpu>.json (written after every row), with the GPU name and versions.

FLUX plan: HPP needs ΔP measured on the trained model, which random weights cannot give. The
plan is HPP's ranking on a synthetic sensitivity table with ΔP proportional to each block's
parameters, so the positional weight W_pos decides (the latest blocks go first) until --ratio of
the parameters is removed; latency depends on what is removed, not on which equal-sized block.
Pass --plan flux.1-schnell=plan.json for a real plan.

CPU (no GPU): (a) exact weight bytes of the REAL architectures, counted on the meta device, for
every row (NF4 by bitsandbytes' storage formula, checked against bitsandbytes in the tests), with
what stays bf16 and which (plan, format, group) combinations meet the 3.2 GB SD3.5-Large target;
(b) rows 1-5 run on width-shrunk configs of both architectures (real depth, so the same plans
apply; real text lengths; 256 image tokens), fp32, eager, one thread: timings of the reference
CPU paths (W4A8 is the PyTorch emulation), not GPU speed; plus each quantised row's output error
against the pruned bf16 row.

    python -m benchmarks.bench_e2e                                   # GPU: both models, rows 1-5
    python -m benchmarks.bench_e2e --models sd3.5-large --rows 1,2,3 --out $OUT
    python -m benchmarks.bench_e2e --models flux.1-schnell --rows 4,5 --mode eager
    python -m benchmarks.bench_e2e --device cpu                      # meta bytes + small configs
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import bench, env_info, print_table, results_path, write_results  # noqa: E402
from hprune.metrics import rel_l2  # noqa: E402

ROWS = {1: "original bf16", 2: "pruned bf16", 3: "pruned + bnb NF4", 4: "pruned + hprune W4A16",
        5: "pruned + hprune W4A8"}
MODES = ("compile", "eager", "cudagraph", "compile+cudagraph")
DEFAULT_MODELS = ("sd3.5-large", "flux.1-schnell")
GB = 1e9
GiB = 2 ** 30
TARGET_BYTES = 3.2e9  # the SD3.5-Large 4-bit target (the paper: 3.24 GB)
DEFAULT_GROUP = 64


# ---- plans ----------------------------------------------------------------------------------------

def synthetic_table(model: nn.Module):
    """A SensitivityTable for `model` (meta is fine) with ΔP(block) = its parameter count, so HPP's
    per-parameter ranking is W_pos alone: the latest blocks are removed first."""
    from hprune.models.adapters import get_adapter
    from hprune.probe import SensitivityTable, _model_info

    ad = get_adapter(model)
    blocks = []
    for info in ad.blocks(model):
        n = ad.component_params(model, info.index)["block"]
        blocks.append({"index": info.index, "name": info.name, "kind": info.kind, "removed": sorted(info.removed),
                       "similarity": 0.0, "delta": {"block": float(n)}, "params": {"block": n}})
    return SensitivityTable(model=_model_info(model), metric="synthetic (ΔP = block parameters)", blocks=blocks,
                            baseline=0.0)


def make_plan(name: str, model: nn.Module, ratio: float, plan_files: dict[str, str]):
    """(PrunePlan, description) for built-in `name`: a --plan file, the released SD3.5-Large plan,
    or HPP on the synthetic table at `ratio`."""
    from hprune.hpp import plan_hpp, plan_manual
    from hprune.models import PrunePlan
    from hprune.models.adapters import get_adapter

    if name in plan_files:
        return PrunePlan.load(plan_files[name]), f"plan file {plan_files[name]}"
    ad = get_adapter(model)
    if ad.family == "sd3" and ad.num_blocks(model) == 38:
        return plan_manual("sd3.5-large-released", model=model), "released HierarchicalPrune plan: blocks 25-29, 31-35"
    plan = plan_hpp(synthetic_table(model), ratio, granularity="block")
    blocks = sorted(e.block for e in plan.entries)
    return plan, (f"HPP at ratio {ratio:g} on a synthetic ΔP table (ΔP = block parameters: W_pos decides); "
                  f"removes blocks {blocks}")


# ---- bytes ----------------------------------------------------------------------------------------

def bnb_nf4_nbytes(out_features: int, in_features: int, bias: bool, blocksize: int = 64,
                   dtype_name: str = "bfloat16") -> int:
    """State-dict bytes of a bitsandbytes NF4 Linear4bit (no double quantisation): packed codes
    (N*K/2), one fp32 absmax per block of `blocksize` weights of the flattened weight, the 16-entry
    fp32 code map, the JSON quant-state record, and the bias in the compute dtype."""
    n = out_features * in_features
    record = json.dumps({"quant_type": "nf4", "blocksize": blocksize, "dtype": dtype_name,
                         "shape": [out_features, in_features]})
    return n // 2 + 4 * -(-n // blocksize) + 16 * 4 + len(record) + (2 * out_features if bias else 0)


def _bf16_breakdown(model: nn.Module, quantised: set[str]) -> dict[str, int]:
    """Bytes of everything that is not a quantised layer, grouped by top-level name."""
    out: dict[str, int] = {}
    for k, t in model.state_dict().items():
        if any(k.startswith(q + ".") for q in quantised):
            continue
        top = k.split(".")[0] if not k.startswith(("transformer_blocks.", "single_transformer_blocks.")) \
            else "norms in blocks (" + k.split(".")[0] + ")"
        out[top] = out.get(top, 0) + t.numel() * t.element_size()
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _quantised_meta(pruned: nn.Module, fmt: str, group: int, act: Optional[str]) -> nn.Module:
    from hprune.quant.model import eligible_linears, replay_quantize, set_activation_quant

    q = copy.deepcopy(pruned)
    names, _ = eligible_linears(q)
    replay_quantize(q, {"backend": "hprune", "fmt": fmt, "group_size": group, "modules": names})
    q.to(torch.bfloat16)  # scales / zeros / biases as quantize_model stores them for a bf16 model
    if act:
        set_activation_quant(q, act)
    return q


def meta_bytes(name: str, ratio: float, plan_files: dict[str, str], group: int = DEFAULT_GROUP) -> dict[str, Any]:
    """Exact weight bytes of the real architecture `name` per row, on the meta device."""
    from hprune.loading import load_model
    from hprune.models import apply_plan
    from hprune.models.stats import param_count, weight_bytes
    from hprune.quant.model import eligible_linears

    model = load_model(name, meta=True).to(torch.bfloat16)
    rows = [{"row": 1, "what": ROWS[1], "params": param_count(model), "bytes": weight_bytes(model)}]
    plan, desc = make_plan(name, model, ratio, plan_files)
    apply_plan(model, plan)
    pruned_bytes = weight_bytes(model)
    rows.append({"row": 2, "what": ROWS[2], "params": param_count(model), "bytes": pruned_bytes})
    names, _ = eligible_linears(model)
    lin_bf16 = sum(weight_bytes(model.get_submodule(n)) for n in names)
    nf4 = sum(bnb_nf4_nbytes(m.out_features, m.in_features, m.bias is not None)
              for m in (model.get_submodule(n) for n in names))
    rows.append({"row": 3, "what": ROWS[3] + " (storage formula)", "params": param_count(model),
                 "bytes": pruned_bytes - lin_bf16 + nf4})
    w16 = _quantised_meta(model, "int4", group, None)
    rows.append({"row": 4, "what": f"{ROWS[4]} (int4 g{group})", "params": param_count(w16),
                 "bytes": weight_bytes(w16)})
    w8 = _quantised_meta(model, "int4", group, "fp8")
    rows.append({"row": 5, "what": f"{ROWS[5]} (same weights)", "params": param_count(w8), "bytes": weight_bytes(w8)})
    for r in rows:
        r["GB"] = round(r["bytes"] / GB, 4)
        r["GiB"] = round(r["bytes"] / GiB, 4)
    return {"model": name, "plan": desc, "removed_blocks": sorted({e.block for e in plan.entries}),
            "quantised_layers": len(names), "rows": rows,
            "kept_bf16_bytes": _bf16_breakdown(w16, set(names))}


def sd35_target_variants(plan_files: dict[str, str]) -> list[dict[str, Any]]:
    """SD3.5-Large 4-bit weight bytes for a few (plan, format, group) choices vs the 3.2 GB target,
    with and without the stored sin-cos position table (pos_embed.pos_embed: a persistent buffer
    that diffusers computes from the config, 179 MB in bf16)."""
    from hprune.hpp import plan_hpp
    from hprune.loading import load_model
    from hprune.models import apply_plan
    from hprune.models.stats import weight_bytes

    base = load_model("sd3.5-large", meta=True).to(torch.bfloat16)
    plans = [("released (10 blocks)", make_plan("sd3.5-large", base, 0.0, plan_files)[0])]
    for r in (0.30, 0.35):
        plans.append((f"HPP-synthetic {r:g}", plan_hpp(synthetic_table(base), r, granularity="block")))
    out = []
    for pname, plan in plans:
        pruned = apply_plan(copy.deepcopy(base), plan)
        for fmt, group in (("int4", 64), ("int4", 128), ("int4_sym", 128)):
            q = _quantised_meta(pruned, fmt, group, None)
            b = weight_bytes(q)
            pe = q.state_dict()["pos_embed.pos_embed"]
            b_nope = b - pe.numel() * pe.element_size()
            out.append({"plan": pname, "blocks_removed": len({e.block for e in plan.entries}), "fmt": fmt,
                        "group": group, "GB": round(b / GB, 4), "meets_3.2GB": b <= TARGET_BYTES,
                        "GB_without_pos_table": round(b_nope / GB, 4),
                        "meets_without_pos_table": b_nope <= TARGET_BYTES})
    return out


# ---- building models ------------------------------------------------------------------------------

def real_inputs(model: nn.Module, name: str, resolution: int, batch: int, device: torch.device,
                dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from hprune.models import sample_inputs
    from hprune.models.registry import BUILTINS

    return sample_inputs(model, batch=batch, seed=0, t=1.0, latent_size=resolution // 8,
                         text_len=BUILTINS[name].sample["text_len"], device=device, dtype=dtype)


def build_gpu(name: str, device: torch.device, seed: int = 0) -> nn.Module:
    """Real-size built-in with random bf16 weights, materialised directly in bf16 on `device`."""
    from hprune.models.registry import BUILTINS, build_from_config, randomize_

    b = BUILTINS[name]
    model = build_from_config(b.class_name, b.config, meta="params").to(torch.bfloat16)
    return randomize_(model, device, torch.bfloat16, seed=seed).eval()


def shrunk_config(name: str) -> tuple[str, dict[str, Any]]:
    """The architecture of built-in `name` at its real depth, 64 wide (CPU runs)."""
    from hprune.models.registry import BUILTINS

    b = BUILTINS[name]
    cfg = dict(b.config)
    cfg.update(num_attention_heads=2, attention_head_dim=32, joint_attention_dim=64, pooled_projection_dim=64)
    if b.class_name == "SD3Transformer2DModel":
        cfg.update(caption_projection_dim=64, sample_size=32, pos_embed_max_size=32)
    else:
        cfg.update(axes_dims_rope=(8, 12, 12))
    return b.class_name, cfg


def build_cpu(name: str, seed: int = 0) -> nn.Module:
    from hprune.models.registry import build_from_config

    cls, cfg = shrunk_config(name)
    return build_from_config(cls, cfg, seed=seed).eval()


def quantise(model: nn.Module, row: int, group: int) -> dict[str, Any]:
    from hprune.quant import quantize_model, set_activation_quant

    t0 = time.perf_counter()
    if row == 3:
        rep = quantize_model(model, backend="bnb", fmt="nf4", group_size=64, compress_statistics=False)
    elif row == 4:
        rep = quantize_model(model, fmt="int4", group_size=group, refine=False)
    else:
        set_activation_quant(model, "fp8")
        return {"quantise_s": 0.0, "layers": None}
    return {"quantise_s": round(time.perf_counter() - t0, 2), "layers": len(rep.quantized)}


# ---- running a step -------------------------------------------------------------------------------

def compile_blocks(model: nn.Module) -> int:
    """torch.compile every block in place (regional compilation: one compile per block type)."""
    import torch._dynamo.config as dcfg

    for attr in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                 "accumulated_recompile_limit"):
        if hasattr(dcfg, attr):
            setattr(dcfg, attr, max(getattr(dcfg, attr), 256))
    n = 0
    for list_name in ("transformer_blocks", "single_transformer_blocks"):
        for blk in getattr(model, list_name, []):
            if any(True for _ in blk.parameters()):
                blk.compile()
                n += 1
    return n


class Stepper:
    """One denoising step `v = model(hidden, t)` in the chosen mode; with CUDA graphs the step is
    captured once (static inputs, static output) and replayed."""

    def __init__(self, model: nn.Module, inputs: dict[str, torch.Tensor], mode: str) -> None:
        self.model, self.mode = model, mode
        self.static = {k: v.clone() for k, v in inputs.items()}
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.out: Optional[torch.Tensor] = None
        if "compile" in mode:
            compile_blocks(model)

    @torch.no_grad()
    def _run(self) -> torch.Tensor:
        return self.model(**self.static, return_dict=False)[0]

    @torch.no_grad()
    def warm_up(self, n: int = 3) -> None:
        if "cudagraph" not in self.mode:
            for _ in range(n):
                self._run()
            return
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(n):
                self._run()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self._run()
        torch.cuda.synchronize()

    @torch.no_grad()
    def __call__(self, hidden: Optional[torch.Tensor] = None, t: Optional[torch.Tensor] = None) -> torch.Tensor:
        if hidden is not None and hidden is not self.static["hidden_states"]:
            self.static["hidden_states"].copy_(hidden)
        if t is not None:
            self.static["timestep"].copy_(t)
        if self.graph is not None:
            self.graph.replay()
            return self.out
        return self._run()


def make_generate(stepper: Stepper, inputs: dict[str, torch.Tensor], steps: int, timestep_scale: float
                  ) -> Callable[[], torch.Tensor]:
    """An N-step flow-matching Euler loop (t from 1 to 0) around `stepper`."""
    ts = torch.linspace(1.0, 0.0, steps + 1).tolist()
    dev, dt = inputs["timestep"].device, inputs["timestep"].dtype
    t_tensors = [torch.full_like(inputs["timestep"], t * timestep_scale, device=dev, dtype=dt) for t in ts[:-1]]
    lat0 = inputs["hidden_states"].clone()

    def generate() -> torch.Tensor:
        lat = lat0
        for i in range(steps):
            v = stepper(lat, t_tensors[i])
            lat = lat + (ts[i + 1] - ts[i]) * v
        return lat

    return generate


def measure(model: nn.Module, inputs: dict[str, torch.Tensor], mode: str, steps: int, rep: int, gen_rep: int,
            device: torch.device, timestep_scale: float) -> dict[str, Any]:
    """Latency of one step and of an N-step generation, peak memory of the timed runs."""
    t0 = time.perf_counter()
    stepper = Stepper(model, inputs, mode)
    stepper.warm_up()
    generate = make_generate(stepper, inputs, steps, timestep_scale)
    generate()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    warm_s = time.perf_counter() - t0
    out = stepper(inputs["hidden_states"], inputs["timestep"]).detach().float().cpu()
    step_ms = bench(lambda: stepper(), device, warmup=2, rep=rep)
    gen_ms = bench(generate, device, warmup=1, rep=gen_rep)
    res = {"mode": mode, "step_ms": round(step_ms, 3), f"gen{steps}_ms": round(gen_ms, 3),
           "warmup_s": round(warm_s, 1), "_out": out}
    if cuda:
        res["peak_GiB"] = round(torch.cuda.max_memory_allocated() / GiB, 3)
    return res


def _free(device: torch.device) -> None:
    import torch._dynamo

    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# ---- one model, all requested rows --------------------------------------------------------------

def run_model(name: str, args: argparse.Namespace, device: torch.device, emit: Callable[[dict], None]) -> None:
    """Rows 1, 2, 4, 5 on one model (pruned, then quantised, then switched to FP8 in place);
    row 3 on a fresh build. Each finished row goes to `emit`."""
    from hprune.models import apply_plan
    from hprune.models.adapters import get_adapter
    from hprune.models.stats import param_count, weight_bytes

    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    build = (lambda: build_gpu(name, device)) if gpu else (lambda: build_cpu(name))
    outs: dict[int, torch.Tensor] = {}

    def row_done(row: int, model: nn.Module, plan_desc: str, extra: dict[str, Any]) -> None:
        x = real_inputs(model, name, args.resolution if gpu else 256, args.batch, device, dtype)
        img_tokens = (x["hidden_states"].shape[1] if x["hidden_states"].ndim == 3 else
                      x["hidden_states"].shape[-1] * x["hidden_states"].shape[-2] // model.config.patch_size ** 2)
        rec: dict[str, Any] = {"model": name, "row": row, "what": ROWS[row], "plan": plan_desc if row > 1 else None,
                               "params": param_count(model), "weight_bytes": weight_bytes(model),
                               "batch": args.batch, "image_tokens": img_tokens,
                               "text_tokens": x["encoder_hidden_states"].shape[1],
                               "resolution": args.resolution if gpu else None, "steps": args.steps,
                               "dtype": str(dtype).replace("torch.", ""), **extra}
        if not gpu:
            rec["config"] = "width-shrunk (64 wide, real depth and text length, 256 image tokens)"
        ts_scale = get_adapter(model).timestep_scale
        try:
            m = measure(model, x, args.mode, args.steps, args.rep, args.gen_rep, device, ts_scale)
        except Exception as exc:  # noqa: BLE001 - record, then retry eagerly
            if args.mode == "eager":
                raise
            print(f"  {ROWS[row]}: mode {args.mode} failed ({type(exc).__name__}: {exc}); rerunning eager",
                  flush=True)
            traceback.print_exc()
            _free(device)
            m = measure(model, x, "eager", args.steps, args.rep, args.gen_rep, device, ts_scale)
            m["mode"] = f"eager ({args.mode} failed: {type(exc).__name__})"
        out = m.pop("_out")
        outs[row] = out
        if row >= 3 and 2 in outs:
            m["rel_err_vs_pruned_bf16"] = round(rel_l2(out, outs[2]), 5)
        if row == 5 and 4 in outs:
            m["rel_err_vs_w4a16"] = round(rel_l2(out, outs[4]), 5)
        rec.update(m)
        if gpu and row in (4, 5):
            rec["kernel_backend"] = _backend_note(row, device)
        emit(rec)
        _free(device)

    chain = [r for r in (1, 2, 4, 5) if r in args.rows]
    if chain:
        model = build()
        plan, desc = make_plan(name, model, args.ratio, args.plan_files)
        if 1 in chain:
            row_done(1, model, desc, {})
        if any(r > 1 for r in chain):
            apply_plan(model, plan)
            if 2 in chain:
                row_done(2, model, desc, {})
            if 4 in chain or 5 in chain:
                q = quantise(model, 4, args.group)
                if 4 in chain:
                    row_done(4, model, desc, q)
                if 5 in chain:
                    row_done(5, model, desc, {**q, **quantise(model, 5, args.group)})
        del model
        _free(device)
    if 3 in args.rows:
        model = build()
        plan, desc = make_plan(name, model, args.ratio, args.plan_files)
        apply_plan(model, plan)
        q = quantise(model, 3, args.group)
        row_done(3, model, desc, q)
        del model
        _free(device)


def _backend_note(row: int, device: torch.device) -> str:
    from hprune.kernels import dispatch

    op = "w4a16_mm" if row == 4 else "w4a8_mm"
    try:
        name = dispatch.select(op, device).name
    except Exception as exc:  # noqa: BLE001
        return f"{op}: {exc}"
    if row == 5:
        from hprune.kernels.w4a8 import fp8_supported

        if not fp8_supported(device):
            return "no FP8 tensor cores: W4A8Linear ran W4A16 (fallback)"
    return f"{op}: {name}"


# ---- tables and targets ---------------------------------------------------------------------------

def summarise(rows: list[dict[str, Any]], steps: int) -> list[dict[str, Any]]:
    """Adds speed-up / reduction vs row 1 and speed-up vs row 3 of the same model."""
    out = []
    for r in rows:
        r = dict(r)
        same = {x["row"]: x for x in rows if x["model"] == r["model"]}
        if 1 in same and r.get("step_ms"):
            r["reduction_vs_orig_%"] = round(100 * (1 - r["step_ms"] / same[1]["step_ms"]), 1)
        if 3 in same and r["row"] in (4, 5) and r.get("step_ms"):
            r["speedup_vs_bnb"] = round(same[3]["step_ms"] / r["step_ms"], 3)
        r["weight_GB"] = round(r["weight_bytes"] / GB, 3)
        out.append(r)
    return out


def target_lines(rows: list[dict[str, Any]], device: str) -> list[str]:
    """The issue's targets, evaluated only on measured rows."""
    lines = []
    by = {(r["model"], r["row"]): r for r in rows}
    for row in (4, 5):
        r = by.get(("sd3.5-large", row))
        if r:
            ok = r["weight_bytes"] <= TARGET_BYTES
            lines.append(f"SD3.5-Large {ROWS[row]} weights {r['weight_bytes'] / GB:.3f} GB "
                         f"(target <= 3.2 GB): {'met' if ok else 'MISSED'}")
    for model in sorted({r["model"] for r in rows}):
        for row in (4, 5):
            r = by.get((model, row))
            if r and "reduction_vs_orig_%" in r:
                ok = r["reduction_vs_orig_%"] >= 45
                lines.append(f"{model} {ROWS[row]} step latency -{r['reduction_vs_orig_%']:.1f}% vs original "
                             f"(target >= 45%): {'met' if ok else 'MISSED'}  [{device}]")
            if r and "speedup_vs_bnb" in r:
                ok = r["speedup_vs_bnb"] >= 1.2
                lines.append(f"{model} {ROWS[row]} {r['speedup_vs_bnb']:.2f}x the bitsandbytes row "
                             f"(target >= 1.2x): {'met' if ok else 'MISSED'}  [{device}]")
    return lines


# ---- main -----------------------------------------------------------------------------------------

def _parse_rows(spec: str) -> list[int]:
    try:
        rows = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        raise SystemExit(f"--rows: expected e.g. 1,2,3,4,5, got {spec!r}") from None
    bad = [r for r in rows if r not in ROWS]
    if bad or not rows:
        raise SystemExit(f"--rows: rows are 1-5 ({ROWS}), got {spec!r}")
    return rows


def _key(r: dict[str, Any]) -> tuple:
    return (r["model"], r["row"], r.get("resolution"), r.get("batch"), r.get("steps"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated built-in names")
    p.add_argument("--rows", default="1,2,3,4,5", help="which rows (1-5)")
    p.add_argument("--steps", type=int, default=4, help="denoising steps of the generation timing (default 4)")
    p.add_argument("--mode", choices=MODES, default="compile", help="execution mode of every row (default compile)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--resolution", type=int, default=1024, help="GPU: image size in pixels (default 1024)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--ratio", type=float, default=0.2, help="HPP ratio for models without a released plan")
    p.add_argument("--plan", action="append", default=[], metavar="MODEL=PLAN.json", help="use this plan for MODEL")
    p.add_argument("--group", type=int, default=DEFAULT_GROUP, help="hprune int4 group size (default 64)")
    p.add_argument("--rep", type=int, default=None, help="timed steps (default 20 GPU, 5 CPU)")
    p.add_argument("--gen-rep", type=int, default=None, help="timed generations (default 5 GPU, 2 CPU)")
    p.add_argument("--no-autotune", action="store_true", help="heuristic Triton configs (no tuning)")
    p.add_argument("--no-meta", action="store_true", help="CPU: skip the real-architecture byte counts")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--threads", type=int, default=1, help="CPU: torch threads (default 1)")
    args = p.parse_args(argv)
    args.rows = _parse_rows(args.rows)
    args.plan_files = dict(s.split("=", 1) for s in args.plan)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU here")
    if not gpu:
        torch.set_num_threads(args.threads)
        if args.mode != "eager":
            print(f"NOTE: CPU run: mode {args.mode} -> eager (compiling 38-57 blocks on the CPU would dominate)")
            args.mode = "eager"
    if args.no_autotune:
        os.environ["HPRUNE_TRITON_AUTOTUNE"] = "0"
    args.rep = args.rep or (20 if gpu else 5)
    args.gen_rep = args.gen_rep or (5 if gpu else 2)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    from hprune.models.registry import BUILTINS

    for m in models:
        if m not in BUILTINS or BUILTINS[m].tiny:
            real = [k for k, b in BUILTINS.items() if not b.tiny]
            raise SystemExit(f"--models: {m!r} is not a real-size built-in ({real})")

    env = env_info(device)
    print(f"device: {env['device']}", flush=True)
    prev = results_path("e2e", device)
    payload: dict[str, Any] = {"benchmark": "e2e", "env": env, "rows": []}
    if prev.exists():  # merge with earlier invocations on this device
        try:
            old = json.loads(prev.read_text())
            payload.update({k: v for k, v in old.items() if k not in ("env", "rows")})
            payload["rows"] = old.get("rows", [])
            payload["env_earlier"] = old.get("env")
        except (OSError, ValueError):
            pass
    payload["env"] = env
    payload["args"] = {k: v for k, v in vars(args).items()}
    if not gpu:
        payload["cpu_load_avg_1_5_15"] = list(os.getloadavg())
    t_start = time.perf_counter()

    def save() -> None:
        write_results("e2e", payload, device, args.out, quiet=True)

    if not gpu and not args.no_meta:
        print("\n== weight bytes of the real architectures (meta device, exact) ==", flush=True)
        metas = []
        for m in models:
            mb = meta_bytes(m, args.ratio, args.plan_files, args.group)
            metas.append(mb)
            print_table(mb["rows"], ["row", "what", "params", "bytes", "GB", "GiB"], f"{m}: {mb['plan']}")
            print("kept in bf16 (bytes):", json.dumps(mb["kept_bf16_bytes"]), flush=True)
        payload["meta_bytes"] = metas
        if "sd3.5-large" in models:
            tv = sd35_target_variants(args.plan_files)
            payload["sd35_target_variants"] = tv
            print_table(tv, ["plan", "blocks_removed", "fmt", "group", "GB", "meets_3.2GB", "GB_without_pos_table",
                             "meets_without_pos_table"], "SD3.5-Large 4-bit weight bytes vs the 3.2 GB target")
        save()

    for m in models:
        print(f"\n== {m}: rows {args.rows}, mode {args.mode} ==", flush=True)

        def emit(rec: dict[str, Any]) -> None:
            payload["rows"] = [r for r in payload["rows"] if _key(r) != _key(rec)] + [rec]
            payload["rows"].sort(key=lambda r: (r["model"], r["row"]))
            save()
            print(f"  row {rec['row']} {rec['what']}: step {rec['step_ms']:.2f} ms, gen{args.steps} "
                  f"{rec[f'gen{args.steps}_ms']:.2f} ms, peak {rec.get('peak_GiB', 'n/a')} GiB, weights "
                  f"{rec['weight_bytes'] / GB:.3f} GB  [{rec['mode']}; {time.perf_counter() - t_start:.0f} s]",
                  flush=True)

        run_model(m, args, device, emit)

    rows = summarise([r for r in payload["rows"] if r.get("steps") == args.steps], args.steps)
    payload["summary"] = rows
    cols = ["model", "row", "what", "dtype", "mode", "step_ms", f"gen{args.steps}_ms", "reduction_vs_orig_%",
            "speedup_vs_bnb", "peak_GiB", "weight_GB", "rel_err_vs_pruned_bf16", "rel_err_vs_w4a16"]
    title = f"e2e: {env['device']}, torch {env['torch']}, triton {env['triton']}"
    if not gpu:
        title += (" -- CPU reference paths on width-shrunk configs, fp32 (rows named bf16 run fp32 here): "
                  f"NOT GPU speed; load average {os.getloadavg()[0]:.1f}")
    print()
    print_table(rows, cols, title)
    lines = target_lines(rows, env["device"]) if gpu else []
    for line in lines:
        print(line)
    payload["targets"] = lines
    path = write_results("e2e", payload, device, args.out)
    print(f"total {time.perf_counter() - t_start:.0f} s; {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
