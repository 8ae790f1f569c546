"""`hprune demo`: `hprune compress` on a built-in tiny model on the CPU, plus images.

The whole HierarchicalPrune pipeline runs as it would on a real model — calibrate (seeded
stand-in prompts denoised by the model itself) -> probe ΔP -> HPP plan -> prune -> distill with
PWP and SGDistill -> 4-bit quantisation -> save and reload — then the original and the compressed
transformer generate images from the same prompts and noise. Output folder: everything
`hprune compress` writes (see hprune.compress) plus images.png.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from hprune.calib import synthetic
from hprune.compress import CompressOptions, compress
from hprune.loading import load_model
from hprune.pipelines import build_pipeline, generate, stand_in_prompts
from hprune.plots import image_grid
from hprune.report import tqdm


# --quick: the same stages on less work (26 s of CPU instead of 86 s, measured: docs/demo.md)
QUICK = {"n_prompts": 6, "num_steps": 4, "steps": 30, "max_probe_samples": 8, "n_images": 2}


def run_demo(out: str | Path, model_name: str = "tiny-sd3", ratio: float = CompressOptions.ratio,
             steps: int | None = CompressOptions.steps, quant: str = CompressOptions.quant, n_images: int | None = 4,
             overwrite: bool = False, log=print, quick: bool = False) -> dict[str, Any]:
    """Runs the demo and writes its outputs to folder `out` (atomically). Returns the report.
    Every setting not given here is `hprune compress`'s default (CompressOptions): the demo is that
    command on a built-in model, with the calibration set compress makes for one (10 prompts x 8 steps).
    `quick`: every stage still runs, on QUICK's smaller calibration set, probe sample cap, number
    of distillation steps and of images (a `steps` / `n_images` given explicitly wins; None: the
    default of the mode)."""
    n_prompts, num_steps = (QUICK["n_prompts"], QUICK["num_steps"]) if quick else (10, 8)
    if steps is None:
        steps = QUICK["steps"] if quick else CompressOptions.steps
    if n_images is None:
        n_images = QUICK["n_images"] if quick else 4
    log(f"loading {model_name} and capturing a calibration set ({n_prompts} prompts x {num_steps} steps)"
        + (" [--quick]" if quick else ""))
    teacher = load_model(model_name)
    calib = synthetic(teacher, n_prompts=n_prompts, num_steps=num_steps, seed=0, progress=True)

    def add_images(folder: Path, student: torch.nn.Module, report: dict[str, Any]) -> None:
        log(f"generating {n_images} images with the original and the compressed model")
        prompts = stand_in_prompts(teacher, n_images, seed=7)
        bar = tqdm([("original", teacher), ("compressed", student)], desc="generating", unit="model")
        imgs = {label: generate(build_pipeline(m), **prompts, steps=8, seed=11) for label, m in bar}
        image_grid(imgs, folder / "images.png", title=f"{model_name}: original vs compressed (same noise)")
        report["image_rmse_vs_original"] = float(((imgs["original"] - imgs["compressed"]) ** 2).mean().sqrt())

    opts = CompressOptions(ratio=ratio, quant=quant, steps=steps)
    if quick:
        opts.max_probe_samples = QUICK["max_probe_samples"]
    _, report = compress(teacher, calib, opts, out, overwrite=overwrite, name=model_name, log=log,
                         extras=add_images)
    return report
