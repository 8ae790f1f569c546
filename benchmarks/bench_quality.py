"""The HierarchicalPrune ablation on a real, trained model: the ShapesBench teacher.

    python benchmarks/bench_quality.py                       # ~20 min on 2 CPU cores
    python benchmarks/bench_quality.py --distill-steps 50 --captions 16 --calib 8   # a quick look

Every variant is built with hprune's own stages from the shipped teacher and one calibration set of
its own denoising runs on training-split captions (hprune.shapes.checkpoint.calibration_captions):

    original                      the teacher
    int4                          quantize_model on the teacher alone
    hpp20 / hpp30                 probe_sensitivity -> plan_hpp(ratio) -> apply_plan   ("HPP only")
    +pwp                          distill(pwp=True, sgd=False)
    +sgd                          distill(pwp=True, sgd=True)   (SGDistill; 30 % only, above r_thres)
    +sgd-fixed                    the same with sgd_budget="fixed": lr · s as it is (lowers the mean rate)
    +int4                         quantize_model (hprune int4, group 64) on top
    +int4-gptq                    the same with GPTQ codes (method="gptq", Hessians from the
                                  calibration set's denoising loop on the model being quantised;
                                  act-order unless --gptq-natural-order)
    +w4a8                         the same 4-bit weights with FP8 e4m3 activations (set_activation_quant)
    koala20/30, bksdm20/30        the baseline planners at the same ratios, pruned only and with
                                  plain distillation (+kd: no PWP, no SGDistill, all weights train)
    obs50, obs2:4, obs-s30        OBS-Diff: 50 % unstructured, 2:4, 30 % structured (heads + neurons)

Each variant generates images for the same held-out captions from the same noise, scored by
hprune.shapes.score (GenEval-style attributes) and compared with the teacher's images (PSNR).
Bytes: floating tensors at 2 bytes (bf16), packed 4-bit weights as stored; unstructured and 2:4
sparsity are stored dense (the 2:4 row also gives the semi-structured size: half the values plus
2 bits of index each). Writes benchmarks/results/quality-<device>.json, quality-grid-*.png and prints
the Markdown table.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS, env_info, print_table, write_results  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default=None, help="teacher folder (default: the shipped one)")
    p.add_argument("--captions", type=int, default=64, help="held-out captions scored per variant")
    p.add_argument("--steps", type=int, default=20, help="sampling steps")
    p.add_argument("--guidance", type=float, default=None, help="default: the teacher's")
    p.add_argument("--calib", type=int, default=32, help="calibration trajectories (training-split captions)")
    p.add_argument("--calib-steps", type=int, default=10)
    p.add_argument("--probe-samples", type=int, default=96)
    p.add_argument("--distill-steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--sgd-scale", default="inverse", choices=["inverse", "log"],
                   help="SGDistill's update scale (hprune.distill; inverse: the paper's s ∝ 1/ΔP)")
    p.add_argument("--seed", type=int, default=0, help="distillation seed (batches and timesteps)")
    p.add_argument("--sgd-budget", default="mean", choices=["mean", "fixed"],
                   help="SGDistill's learning-rate budget (hprune.distill; fixed: lr · s as the paper states it)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", default=None, help="comma-separated variant names (default: all)")
    p.add_argument("--gptq-natural-order", action="store_true",
                   help="GPTQ rows: columns left to right (as before act-order became the default)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--tag", default="", help="suffix of the result file names")
    p.add_argument("--resummarise", metavar="JSON", default=None,
                   help="recompute the derived columns of an existing results file and print its table")
    args = p.parse_args(argv)
    if args.resummarise:
        return resummarise(Path(args.resummarise))
    torch.set_num_threads(args.threads)

    from hprune.distill import DistillConfig, distill
    from hprune.hpp import plan_bksdm, plan_hpp, plan_koala
    from hprune.metrics import fidelity
    from hprune.models import apply_plan
    from hprune.models.stats import bytes_at, param_count
    from hprune.obs import obs_prune_model
    from hprune.probe import probe_sensitivity
    from hprune.quant import quantize_model, set_activation_quant
    from hprune.shapes import checkpoint as T
    from hprune.shapes.evaluate import evaluate, save_grid
    from hprune.shapes.sample import calibration_set
    from hprune.shapes.text import encode_captions

    t_start = time.perf_counter()
    teacher = T.load_transformer(args.teacher)
    text = T.load_text_encoder(args.teacher)
    recipe = T.load_recipe(args.teacher)
    guidance = args.guidance if args.guidance is not None else float(recipe["final_eval"]["guidance"])
    ev_kw = dict(n_captions=args.captions, steps=args.steps, guidance=guidance, seed=0)

    log(f"teacher: {param_count(teacher) / 1e6:.2f}M parameters; scoring on {args.captions} held-out captions")
    t = time.perf_counter()
    base = evaluate(teacher, text, keep_images=True, **ev_kw)
    ref = base["images"]
    log(f"teacher score {base['score']:.4f} ({time.perf_counter() - t:.0f} s)")

    log(f"calibration: {args.calib} trajectories x {args.calib_steps} steps (+ 8 more for velocity fidelity)")

    def cal_set(n: int, seed: int) -> Any:
        caps = T.calibration_captions(n, seed=seed)
        enc, pooled = encode_captions(text, caps)
        return calibration_set(teacher, enc, pooled, captions=caps, steps=args.calib_steps, guidance=guidance,
                               seed=seed)

    train_cal = cal_set(args.calib, 0)
    held_cal = cal_set(8, 1)  # other captions and noise: velocity fidelity off the training inputs
    fid_batches = list(held_cal.batches(8, indices=range(0, len(held_cal), max(1, len(held_cal) // 32))))

    t = time.perf_counter()
    table = probe_sensitivity(teacher, train_cal, max_samples=args.probe_samples, progress=False)
    probe_s = time.perf_counter() - t
    log(f"ΔP probe: {probe_s:.0f} s")

    rows: list[dict[str, Any]] = []
    details: dict[str, Any] = {}
    images: dict[str, torch.Tensor] = {}
    plans: dict[str, Any] = {}
    only = set(args.only.split(",")) if args.only else None
    orig_bytes = bytes_at(teacher, torch.bfloat16)

    def record(name: str, model: nn.Module, what: str, seconds: float, extra: dict[str, Any] | None = None) -> None:
        t0 = time.perf_counter()
        ev = base if model is teacher else evaluate(model, text, reference=ref, keep_images=True, **ev_kw)
        eval_s = time.perf_counter() - t0
        fid = fidelity(teacher, model, fid_batches) if model is not teacher else {"rel_mse": 0.0}
        nbytes = bytes_at(model, torch.bfloat16)
        row = {"variant": name, "what": what, "params": param_count(model), "bytes": nbytes,
               "bytes_pct": 100 * nbytes / orig_bytes, "score": ev["score"],
               "drop_pct": 100 * (1 - ev["score"] / base["score"]) if base["score"] else float("nan"), "exact": ev["exact"],
               "colour": ev["attributes"].get("colour"), "shape": ev["attributes"].get("shape"),
               "position": ev["attributes"].get("position"), "count": ev["attributes"].get("count"),
               "psnr": ev.get("psnr", float("inf")) if model is not teacher else None,
               "rel_mse": fid["rel_mse"], "build_s": round(seconds, 1), "eval_s": round(eval_s, 1)}
        if extra:
            row.update(extra)
        rows.append(row)
        details[name] = {"attributes": ev["attributes"], "templates": ev["templates"],
                         "per_caption_scores": [c["score"] for c in ev["per_caption"]], **(extra or {})}
        images[name] = ev["images"]
        log(f"{name:22s} score {ev['score']:.4f} (drop {row['drop_pct']:+.1f} %) bytes {row['bytes_pct']:.1f} % "
            f"PSNR {row['psnr'] if row['psnr'] is not None else float('nan'):.2f} rel_mse {row['rel_mse']:.4f}")
        _save(args, rows, details, plans, base, recipe, guidance, table, time.perf_counter() - t_start)

    def want(name: str) -> bool:
        return only is None or name in only

    def pruned(method: str, ratio: float) -> nn.Module:
        key = f"{method}{int(round(ratio * 100))}"
        plan = {"hpp": lambda: plan_hpp(table, ratio), "koala": lambda: plan_koala(table, ratio),
                "bksdm": lambda: plan_bksdm(table, ratio)}[method]()
        plans[key] = plan.to_dict()
        m = copy.deepcopy(teacher)
        apply_plan(m, plan)
        return m

    def distilled(student: nn.Module, pwp: bool, sgd: bool,
                  budget: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
        cfg = DistillConfig(steps=args.distill_steps, batch_size=args.batch_size, lr=args.lr, pwp=pwp, sgd=sgd,
                            sgd_scale=args.sgd_scale, sgd_budget=budget or args.sgd_budget, seed=args.seed)
        s, res = distill(teacher, copy.deepcopy(student), train_cal, cfg, table=table, progress=False)
        h = res.history
        k = max(1, len(h) // 10)
        return s, {"distill_s": round(res.seconds, 1),
                   "loss_first": sum(r["loss"] for r in h[:k]) / k, "loss_last": sum(r["loss"] for r in h[-k:]) / k,
                   "trainable": res.schedule.get("trainable_params"), "frozen": res.schedule.get("frozen_params"),
                   "lr_scale": res.schedule.get("lr_scale")}

    def int4(model: nn.Module, gptq: bool = False) -> tuple[nn.Module, float]:
        t0 = time.perf_counter()
        m = copy.deepcopy(model)
        quantize_model(m, group_size=64, fmt="int4", method="gptq" if gptq else "rtn",
                       calib=train_cal if gptq else None, act_order=not args.gptq_natural_order)
        return m, time.perf_counter() - t0

    record("original", teacher, "the teacher", 0.0)
    if want("int4"):
        m, s = int4(teacher)
        record("int4", m, "teacher, INT4 weights (group 64)", s)
    if want("int4-gptq"):
        m, s = int4(teacher, gptq=True)
        record("int4-gptq", m, "teacher, INT4 weights, GPTQ", s)

    sgd_variants = ("+pwp+sgd", "+pwp+sgd+int4", "+pwp+sgd+int4-gptq", "+pwp+sgd+w4a8", "+pwp+sgd-fixed",
                    "+pwp+sgd-fixed+int4")
    for ratio in (0.2, 0.3):
        r = int(round(ratio * 100))
        with_sgd = ratio > DistillConfig().r_thres  # SGDistill is for removal above r_thres, as in the paper
        if not any(want(f"hpp{r}{x}") for x in ("", "+pwp", "+pwp+int4", "+pwp+int4-gptq")
                   + (sgd_variants if with_sgd else ())):
            continue
        t0 = time.perf_counter()
        hp = pruned("hpp", ratio)
        prune_s = time.perf_counter() - t0 + probe_s
        record(f"hpp{r}", hp, "HPP only", prune_s)
        t0 = time.perf_counter()
        pw, info = distilled(hp, pwp=True, sgd=False)
        record(f"hpp{r}+pwp", pw, "HPP + distillation with PWP", time.perf_counter() - t0, info)
        if want(f"hpp{r}+pwp+int4"):
            q, s = int4(pw)
            record(f"hpp{r}+pwp+int4", q, "HPP + PWP + INT4", s)
        if want(f"hpp{r}+pwp+int4-gptq"):
            q, s = int4(pw, gptq=True)
            record(f"hpp{r}+pwp+int4-gptq", q, "HPP + PWP + INT4 (GPTQ)", s)
        if with_sgd and any(want(f"hpp{r}+pwp+sgd{x}") for x in ("", "+int4", "+w4a8", "+int4-gptq")):
            t0 = time.perf_counter()
            sg, info = distilled(hp, pwp=True, sgd=True)
            record(f"hpp{r}+pwp+sgd", sg, "HPP + PWP + SGDistill", time.perf_counter() - t0, info)
            q, s = int4(sg)
            record(f"hpp{r}+pwp+sgd+int4", q, "HPP + PWP + SGDistill + INT4 (full method)", s)
            if want(f"hpp{r}+pwp+sgd+int4-gptq"):
                qg, s = int4(sg, gptq=True)
                record(f"hpp{r}+pwp+sgd+int4-gptq", qg, "full method, INT4 by GPTQ", s)
            if want(f"hpp{r}+pwp+sgd+w4a8"):  # the same 4-bit weights with FP8 (e4m3) activations
                w8 = copy.deepcopy(q)
                set_activation_quant(w8, "fp8")
                record(f"hpp{r}+pwp+sgd+w4a8", w8, "full method, FP8 activations (W4A8)", 0.0)
        if with_sgd and any(want(f"hpp{r}+pwp+sgd-fixed{x}") for x in ("", "+int4")):
            # SGDistill's scales applied to lr as they are (sgd_budget="fixed"): the mean rate drops
            t0 = time.perf_counter()
            sf, info = distilled(hp, pwp=True, sgd=True, budget="fixed")
            record(f"hpp{r}+pwp+sgd-fixed", sf, "HPP + PWP + SGDistill, fixed budget (lr · s)",
                   time.perf_counter() - t0, info)
            q, s = int4(sf)
            record(f"hpp{r}+pwp+sgd-fixed+int4", q, "the same + INT4", s)

    for method in ("koala", "bksdm"):
        for ratio in (0.2, 0.3):
            r = int(round(ratio * 100))
            name = f"{method}{r}"
            if not (want(name) or want(name + "+kd")):
                continue
            t0 = time.perf_counter()
            m = pruned(method, ratio)
            record(name, m, f"{method.upper()}-style plan, pruned only", time.perf_counter() - t0 + probe_s)
            t0 = time.perf_counter()
            d, info = distilled(m, pwp=False, sgd=False)
            record(name + "+kd", d, f"{method.upper()}-style plan + plain distillation", time.perf_counter() - t0,
                   info)

    for name, pattern, sparsity in (("obs50", "unstructured", 0.5), ("obs2:4", "2:4", None),
                                    ("obs-s30", "structured", 0.3)):
        if not want(name):
            continue
        t0 = time.perf_counter()
        m = copy.deepcopy(teacher)
        rep = obs_prune_model(m, train_cal, sparsity=sparsity, pattern=pattern)
        extra: dict[str, Any] = {"obs_pruned_fraction": rep.get("pruned_fraction")}
        if pattern == "2:4":  # semi-structured storage: half of the values + 2-bit indices
            dense = sum(lyr["shape"][0] * lyr["shape"][1] for lyr in rep["layers"])
            extra["bytes_2to4_storage"] = bytes_at(m, torch.bfloat16) - dense * 2 + dense // 2 * 2 + dense // 2 // 4
        record(name, m, f"OBS-Diff {pattern}" + (f" {sparsity:.0%}" if sparsity else ""), time.perf_counter() - t0,
               extra)

    total = time.perf_counter() - t_start
    _save(args, rows, details, plans, base, recipe, guidance, table, total)
    out = Path(args.out)
    grid_rows = {"ground truth": base["ground_truth"], **{k: v for k, v in images.items()}}
    caps_shown = base["captions"]
    ablation = [k for k in grid_rows if k == "ground truth" or k == "original" or k.startswith(("hpp", "int4"))]
    others = [k for k in grid_rows if k not in ablation or k in ("ground truth", "original")]
    tag = f"-{args.tag}" if args.tag else ""
    save_grid({k: grid_rows[k] for k in ablation}, out / f"quality-grid-hpp{tag}.png", captions=caps_shown,
              title="ShapesBench: teacher and the HierarchicalPrune ablation (same noise per column)")
    save_grid({k: grid_rows[k] for k in others}, out / f"quality-grid-baselines{tag}.png", captions=caps_shown,
              title="ShapesBench: KOALA / BK-SDM-style plans and OBS-Diff (same noise per column)")
    table.heatmap(out / f"quality-sensitivity{tag}.png", title="shapes-teacher: ΔP per block and component")
    log(f"total {total / 60:.1f} min")
    print_table([_fmt(r) for r in rows], COLUMNS,
                title=f"ShapesBench ablation ({args.captions} held-out captions, {args.steps} steps, "
                      f"guidance {guidance:g}, distillation {args.distill_steps} steps x {args.batch_size})")
    return 0


def paired_drop_se(base: list[float], scores: list[float]) -> float:
    """Standard error (in % of the teacher's score) of a variant's score drop, paired by caption:
    both are scored on the same captions from the same noise, so the caption-to-caption spread
    cancels and what is left is the variant's own noise. A drop within ~2 SE of 0 is not a
    measured difference."""
    import statistics

    if len(base) != len(scores) or len(base) < 2:
        return float("nan")
    d = [a - b for a, b in zip(base, scores)]
    mean_base = sum(base) / len(base)
    return 100 * statistics.stdev(d) / len(d) ** 0.5 / mean_base if mean_base else float("nan")


def add_uncertainty(rows: list[dict[str, Any]], details: dict[str, Any]) -> None:
    """Sets row["drop_se_pct"] from the per-caption scores in `details` (see paired_drop_se)."""
    base = details.get("original", {}).get("per_caption_scores")
    for r in rows:
        sc = details.get(r["variant"], {}).get("per_caption_scores")
        r["drop_se_pct"] = paired_drop_se(base, sc) if base and sc and r["variant"] != "original" else None


COLUMNS = ["variant", "what", "params", "bytes", "bytes_pct", "score", "drop_pct", "drop_se_pct", "exact", "colour",
           "shape", "position", "count", "psnr", "rel_mse"]


def _fmt(r: dict[str, Any]) -> dict[str, Any]:
    from hprune.report import human_bytes, human_count

    f = dict(r)
    f["params"] = human_count(r["params"])
    f["bytes"] = human_bytes(r["bytes"])
    for k in ("bytes_pct", "drop_pct", "drop_se_pct", "psnr"):
        if f.get(k) is not None:
            f[k] = round(f[k], 1) if k != "psnr" else round(f[k], 2)
    for k in ("score", "exact", "colour", "shape", "position", "count"):
        if f.get(k) is not None:
            f[k] = round(f[k], 3)
    f["rel_mse"] = float(f"{r['rel_mse']:.3g}")
    return f


def _save(args: argparse.Namespace, rows: list[dict[str, Any]], details: dict[str, Any], plans: dict[str, Any],
          base: dict[str, Any], recipe: dict[str, Any], guidance: float, table: Any, seconds: float) -> None:
    add_uncertainty(rows, details)
    payload = {
        "env": env_info("cpu"), "load_average": list(__import__("os").getloadavg()),
        "settings": {k: getattr(args, k) for k in ("captions", "steps", "calib", "calib_steps", "probe_samples",
                                                   "distill_steps", "batch_size", "lr", "sgd_scale", "sgd_budget",
                                                   "seed", "threads")}
        | {"guidance": guidance, "gptq_act_order": not args.gptq_natural_order},
        "teacher": {k: recipe.get(k) for k in ("steps", "train_seconds", "device", "final")},
        "rows": rows, "details": details, "plans": plans, "sensitivity": table.to_dict(),
        "captions": base["captions"], "seconds": round(seconds, 1),
    }
    name = "quality" + (f"-{args.tag}" if args.tag else "")
    write_results(name, json.loads(json.dumps(payload, default=str)), "cpu", args.out)


def resummarise(path: Path) -> int:
    """Recomputes the uncertainty columns of a results file in place (atomically) and prints it."""
    from hprune.io import write_json

    data = json.loads(path.read_text())
    add_uncertainty(data["rows"], data["details"])
    write_json(path, data)
    st = data["settings"]
    print_table([_fmt(r) for r in data["rows"]], COLUMNS,
                title=f"ShapesBench ablation ({st['captions']} held-out captions, {st['steps']} steps, guidance "
                      f"{st['guidance']:g}, distillation {st['distill_steps']} steps x {st['batch_size']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
