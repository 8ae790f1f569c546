"""`hprune demo`: the compression pipeline, end to end, on a built-in tiny model on the CPU.

Stages run in order and each adds a row to the report: load -> calibrate (seeded stand-in
prompts denoised by the model) -> probe ΔP of every block and component -> HPP plan -> prune ->
save the artifact -> load it back (bit-identical check) -> generate images with the original and
the compressed transformer from the same noise. Fidelity is measured on held-out inputs.
Output folder:
    report.md, report.json   the table, with sizes, fidelity and time per stage
    sensitivity.json/.png    the ΔP table and its block x component heatmap
    plan.json                the HPP plan, each choice with its score
    images.png               original vs compressed images, same prompts and noise
    artifact/                the compressed model (hprune.json + model.safetensors)
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from hprune.artifacts import load_compressed, save_compressed
from hprune.calib import synthetic
from hprune.hpp import plan_hpp
from hprune.io import atomic_dir, write_json
from hprune.metrics import fidelity, predict
from hprune.models import apply_plan, load_model, sample_inputs
from hprune.probe import probe_sensitivity
from hprune.models.stats import bytes_at, param_count
from hprune.pipelines import build_pipeline, generate, stand_in_prompts
from hprune.plots import image_grid
from hprune.report import format_table, human_bytes, human_count


def run_demo(out: str | Path, model_name: str = "tiny-sd3", ratio: float = 0.25, n_images: int = 4,
             steps: int = 8, overwrite: bool = False, log=print) -> dict[str, Any]:
    """Runs the demo and writes its outputs to folder `out` (atomically). Returns the report."""
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    with atomic_dir(out, overwrite=overwrite) as tmp:
        log(f"[1/6] loading {model_name}")
        teacher = load_model(model_name)
        student = load_model(model_name)
        eval_batches = [sample_inputs(teacher, batch=2, seed=100 + k, t=t) for k, t in enumerate((0.2, 0.5, 0.8))]

        def stage(name: str, model: torch.nn.Module, seconds: float, fid: dict[str, float] | None) -> None:
            rows.append({"stage": name, "params": param_count(model), "bytes_bf16": bytes_at(model),
                         "rel_mse": None if fid is None else fid["rel_mse"],
                         "cosine_dist": None if fid is None else fid["cosine"], "seconds": round(seconds, 2)})

        stage("original", teacher, time.perf_counter() - t0, {"rel_mse": 0.0, "cosine": 0.0})

        log("[2/6] calibrating and probing the sensitivity (ΔP) of every block and component")
        t = time.perf_counter()
        calib = synthetic(teacher, n_prompts=4, num_steps=8, seed=0)
        table = probe_sensitivity(teacher, calib, max_samples=16, progress=True)
        table.save(tmp / "sensitivity.json")
        table.heatmap(tmp / "sensitivity.png", title=f"{model_name}: ΔP per block and component")
        probe_s = time.perf_counter() - t

        log(f"[3/6] HPP plan removing {ratio:.0%} of the parameters; pruning")
        t = time.perf_counter()
        plan = plan_hpp(table, ratio)
        plan.save(tmp / "plan.json")
        apply_plan(student, plan)
        stage("pruned (HPP)", student, probe_s + time.perf_counter() - t, fidelity(teacher, student, eval_batches))

        log("[4/6] saving and reloading the compressed artifact")
        t = time.perf_counter()
        art = save_compressed(student, tmp / "artifact", extra={"demo": model_name})
        loaded = load_compressed(art)
        identical = all(torch.equal(predict(student, x), predict(loaded, x)) for x in eval_batches)
        if not identical:
            raise RuntimeError("reloaded artifact does not reproduce the model's outputs bit for bit")
        stage("saved+reloaded", loaded, time.perf_counter() - t, fidelity(teacher, loaded, eval_batches))

        log(f"[5/6] generating {n_images} images with each model ({steps} steps)")
        t = time.perf_counter()
        prompts = stand_in_prompts(teacher, n_images, seed=7)
        imgs = {label: generate(build_pipeline(m), **prompts, steps=steps, seed=11)
                for label, m in (("original", teacher), ("compressed", loaded))}
        image_grid(imgs, tmp / "images.png", title=f"{model_name}: original vs compressed (same noise)")
        img_err = float(((imgs["original"] - imgs["compressed"]) ** 2).mean().sqrt())
        gen_s = time.perf_counter() - t

        log("[6/6] writing the report")
        report = {
            "model": model_name, "ratio": ratio, "plan": plan.to_dict(), "stages": rows,
            "reload_bit_identical": identical, "image_rmse_vs_original": img_err,
            "generation_seconds": round(gen_s, 2), "total_seconds": round(time.perf_counter() - t0, 2),
        }
        summary = format_table([{**r, "params": human_count(r["params"]), "bytes_bf16": human_bytes(r["bytes_bf16"])}
                              for r in rows], ["stage", "params", "bytes_bf16", "rel_mse", "cosine_dist", "seconds"])
        write_json(tmp / "report.json", report)
        (tmp / "report.md").write_text(
            f"# hprune demo: {model_name}\n\n{summary}\n\nRemoved (block, piece): "
            f"{[(e.block, e.component) for e in plan.entries]}. Reload bit-identical: {identical}. "
            f"Image RMSE vs original: {img_err:.4f}.\n")
        report["table"] = summary
    log(summary)
    log(f"outputs in {out}/ (report.md, report.json, sensitivity.png, plan.json, images.png, artifact/)")
    return report
