"""The `--dry-run` plan (hprune.models.memory) against measurement, stage by stage, on the CPU.

Each case (a transformer shape and dtype) runs in a fresh process: the model is built in memory,
its first calls made (imports and one-time kernel workspaces are not a stage's), a calibration set
captured, and then each stage runs with its peak host memory measured (benchmarks/peak_memory.py:
VmHWM reset through /proc/self/clear_refs; MALLOC_MMAP_THRESHOLD_ so freed big blocks go back to the
OS) and its CPU time. A stage's measured peak = the bytes of the tensors it starts with (the model,
the calibration set: counted, not sampled) + the peak above the reset; that is what the plan
predicts (its host peak of a model built in memory, device = host on a CPU).

Stages, as the CLI runs them on a CPU (16-bit weights run block by block in float32,
hprune.commands.load_for_offload):
  calib           hprune.calib.synthetic (the capture of `hprune calib` on a built-in)
  fidelity        hprune.commands.FidelityCheck, 8 samples, before and after
  probe           hprune.probe.probe_sensitivity, batch 4, granularity "both", PROBE_SAMPLES samples
  obs             obs_prune_model(..., 0.5): resident unstructured, one group
  obs-structured  obs_prune_model(..., 0.05, "structured") (its peak does not depend on the sparsity)
  obs-offload     obs_prune_model(..., 0.5, offload="cpu"): one block's Hessians at a time
  obs-structured-offload  the structured one block by block (offload="cpu")
  prune           hprune.models.surgery.apply_plan: block 1 and block 0's FFN removed

    python benchmarks/stage_peaks.py [--cases sd3-tiny,...]   # table + JSON under benchmarks/results/
Used by tests/test_memory_plan.py (the ±25 % check). Times: plan vs CPU seconds, not tested.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PROMPTS, STEPS, TEXT_LEN = 2, 2, 16  # the calibration set: PROMPTS x STEPS transformer calls
PROBE_SAMPLES = 4  # one probe batch
SD3_TINY = dict(sample_size=64, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=32,
                num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=64, pooled_projection_dim=32,
                pos_embed_max_size=64)  # activation-bound: 1,040 tokens, hidden 64
SD3_MEDIUM = dict(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=4, attention_head_dim=64,
                  num_attention_heads=6, joint_attention_dim=64, caption_projection_dim=384, pooled_projection_dim=64,
                  pos_embed_max_size=16)  # weight-bound: ~20 M parameters, hidden 384, 80 tokens
FLUX_MEDIUM = dict(patch_size=1, in_channels=16, out_channels=None, num_layers=1, num_single_layers=2,
                   attention_head_dim=64, num_attention_heads=6, joint_attention_dim=64, pooled_projection_dim=64,
                   guidance_embeds=False, axes_dims_rope=(8, 28, 28))  # 1 double + 2 single blocks, hidden 384
# name: (class, config, dtype, latent size, stages)
CASES: dict[str, tuple[str, dict, str, int, list[str]]] = {
    "sd3-tiny-fp32": ("SD3Transformer2DModel", SD3_TINY, "float32", 64,
                      ["calib", "fidelity", "probe", "obs", "obs-structured", "obs-offload",
                       "obs-structured-offload"]),
    "sd3-medium-bf16": ("SD3Transformer2DModel", SD3_MEDIUM, "bfloat16", 16,
                        ["calib", "fidelity", "probe", "obs-offload"]),
    "sd3-medium-fp32": ("SD3Transformer2DModel", SD3_MEDIUM, "float32", 16, ["obs", "prune"]),  # structured: FLUX
    "flux-medium-fp32": ("FluxTransformer2DModel", FLUX_MEDIUM, "float32", 16,
                         ["calib", "fidelity", "probe", "obs", "obs-structured", "obs-offload",
                          "obs-structured-offload", "prune"]),
}
OBS = {"obs": (0.5, "unstructured", False), "obs-structured": (0.05, "structured", False),
       "obs-offload": (0.5, "unstructured", True), "obs-structured-offload": (0.05, "structured", True)}


def measure(case: str) -> list[dict[str, Any]]:
    """[{stage, peak, start, cpu}] of `case`'s stages, measured in a fresh process."""
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'benchmarks'}", OMP_NUM_THREADS="1",
               MALLOC_MMAP_THRESHOLD_="65536")  # big blocks go back to the OS when freed: no reuse hides a peak
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", case], env=env,
                         capture_output=True, text=True, timeout=900, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{case}: the measuring child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def predict(case: str, stage: str):
    """The plan's StagePlan of `stage` for `case` (a model built in memory, on the CPU)."""
    from hprune.models import memory as M

    cls, cfg, dtype, lat, _ = CASES[case]
    store = 2 if dtype in ("bfloat16", "float16") else 4
    shape = M.config_shape(cls, cfg, store_bytes=store, latent_size=lat, text_len=TEXT_LEN)
    _, pattern, offload = OBS.get(stage, (0.5, "unstructured", False))
    o = M.Options(device="cpu", threads=1, offload=offload or store == 2, calib_samples=PROMPTS * STEPS,
                  probe_samples=PROBE_SAMPLES, probe_batch=4, eval_samples=8, pattern=pattern)
    return M.plan_stage("obs" if stage in OBS else stage, shape, o)


def _child(case: str) -> None:
    import contextlib
    import copy
    import gc
    import resource

    import torch
    from peak_memory import peak_during

    from hprune.calib import synthetic
    from hprune.models.adapters import sample_inputs
    from hprune.models.offload import HALF, offloaded
    from hprune.models.registry import build_from_config

    cls, cfg, dtype_name, lat, stages = CASES[case]
    dtype = getattr(torch, dtype_name)
    model = build_from_config(cls, cfg, dtype=dtype)
    off = dtype in HALF  # as load_for_offload on a CPU: block by block, float32 compute

    def ctx(m):
        return offloaded(m, "cpu") if off else contextlib.nullcontext()

    def nbytes(tensors) -> int:
        return sum({t.data_ptr(): t.numel() * t.element_size() for t in tensors}.values())

    def calibrate(m):
        with ctx(m):
            return synthetic(m, n_prompts=PROMPTS, num_steps=STEPS, latent_size=lat, text_len=TEXT_LEN)

    with torch.no_grad(), ctx(model):  # first calls of each shape allocate once (kernel workspaces)
        for b in (1, 2, 4):
            x = sample_inputs(model, batch=b, latent_size=lat, text_len=TEXT_LEN)
            model(**{k: v.to(dtype) if v.is_floating_point() else v for k, v in x.items()}, return_dict=False)
    with ctx(model):  # the pipeline's imports and first-call allocations
        synthetic(model, n_prompts=1, num_steps=1, latent_size=lat, text_len=TEXT_LEN)
    cal = calibrate(model)
    cal_bytes = nbytes(list(cal.inputs.values()) + [cal.final, cal.t, cal.step, cal.trajectory])
    rows = []
    for stage in stages:
        m = copy.deepcopy(model) if stage in OBS or stage == "prune" else model  # both change the model
        start = nbytes(list(m.parameters()) + list(m.buffers())) + (0 if stage == "calib" else cal_bytes)

        def work(stage: str = stage, m=m):
            if stage == "calib":
                return calibrate(m)
            if stage == "fidelity":
                from hprune.commands import FidelityCheck

                with ctx(m):
                    return FidelityCheck(m, cal, 8).measure(m)
            if stage == "probe":
                from hprune.probe import probe_sensitivity

                with ctx(m):
                    return probe_sensitivity(m, cal, batch_size=4, max_samples=PROBE_SAMPLES, progress=False,
                                             device="cpu" if off else None,
                                             dtype=torch.float32 if off else None)
            if stage == "prune":
                from hprune.models import PrunePlan, apply_plan

                return apply_plan(m, PrunePlan.manual({0: ["ff"], 1: ["block"]}, m))
            from hprune.obs import obs_prune_model

            sparsity, pattern, offload = OBS[stage]
            return obs_prune_model(m, cal, sparsity, pattern, offload="cpu" if offload else None)

        gc.collect()
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        peak, _ = peak_during(work)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        rows.append({"stage": stage, "peak": peak, "start": start,
                     "cpu": round(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime, 3)})
        m = None  # the copy goes before the next stage
    print(json.dumps(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args()
    if args.child:
        return _child(args.child)
    import torch

    from benchmarks.common import env_info, write_results
    from hprune.report import format_table

    rows = []
    for case in args.cases.split(","):
        for r in measure(case):
            p = predict(case, r["stage"])
            got = r["start"] + r["peak"]
            rows.append({"case": case, "stage": r["stage"], "predicted MB": round(p.host_bytes / 1e6, 1),
                         "measured MB": round(got / 1e6, 1), "ratio": round(p.host_bytes / got, 2),
                         "start MB": round(r["start"] / 1e6, 1), "plan s": round(p.seconds, 2), "CPU s": r["cpu"],
                         "plan / CPU time": round(p.seconds / max(r["cpu"], 1e-3), 1)})
    print(format_table(rows, list(rows[0])))
    doc = {"env": env_info("cpu"), "torch_threads": torch.get_num_threads(), "calib": [PROMPTS, STEPS, TEXT_LEN],
           "cases": {k: {"class": v[0], "config": v[1], "dtype": v[2], "latent": v[3]} for k, v in CASES.items()},
           "rows": rows}
    write_results("stage_peaks", doc, "cpu", args.out)


if __name__ == "__main__":
    main()
