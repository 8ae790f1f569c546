"""Capture a calibration set: the transformer inputs seen while the model denoises calibration
prompts over a spread of timesteps (flow-matching Euler, --steps steps per prompt).

With a local pipeline folder (model_index.json + text encoders) the real prompts from --prompts
(one per line) are encoded by the pipeline. Built-in tiny models and transformer-only folders have
no text encoder: they use seeded stand-in prompt embeddings (--num-prompts of them).

Runs on N processes with torchrun (prompt i on rank i mod N; rank 0 writes the whole set):
    torchrun --nproc-per-node 8 -m hprune calib ./sd35-large-pipeline --prompts prompts.txt --out calib.safetensors"""
from __future__ import annotations

import argparse
from pathlib import Path

from hprune.commands import add_device_arguments, device_and_dtype, load_for_offload, offload_context, read_prompts

HELP = "capture a calibration set (transformer inputs over denoising steps)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--prompts", help="text file, one prompt per line (pipeline folders only)")
    p.add_argument("--num-prompts", "--n", dest="n", type=int, default=8,
                   help="number of stand-in prompts when there is no text encoder (under torchrun spell it "
                        "--num-prompts: torchrun reads --n as one of its own options)")
    p.add_argument("--steps", type=int, default=8, help="denoising steps per prompt (default 8)")
    p.add_argument("--size", type=int, help="image size in pixels (default: the pipeline's)")
    p.add_argument("--guidance", type=float, help="guidance scale (default: the pipeline's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--offload", action="store_true",
                   help="transformer-only folders and built-ins: run the transformer block by block (weights on the "
                        "host; automatic when it does not fit the GPU, and for 16-bit weights on a CPU)")
    add_device_arguments(p)


def run(args: argparse.Namespace) -> int:
    from hprune import dist
    from hprune.calib import builtin_calibration, capture
    from hprune.errors import HpruneError
    from hprune.io import check_output
    from hprune.models import resolve

    check_output(args.out, args.overwrite, kind="file")
    if args.steps < 1 or args.n < 1:
        raise HpruneError("--steps and --num-prompts must be at least 1")
    device, dtype = device_and_dtype(args)
    main = dist.setup(device)[0] == 0  # under torchrun: the prompts are dealt out, rank 0 writes
    kind, what = resolve(args.model)
    pipeline_dir = Path(what).parent if kind == "diffusers" and (Path(what).parent / "model_index.json").exists() else None
    if pipeline_dir is not None:
        if not args.prompts:
            raise HpruneError("a pipeline folder needs --prompts FILE (one prompt per line)")
        prompts = read_prompts(args.prompts)
        from diffusers import DiffusionPipeline

        try:
            kw = {"torch_dtype": dtype} if dtype is not None else {}
            pipe = DiffusionPipeline.from_pretrained(str(pipeline_dir), local_files_only=True, **kw).to(device)
        except Exception as exc:  # noqa: BLE001 - diffusers raises many kinds
            raise HpruneError(f"cannot load the pipeline in {pipeline_dir}: {exc}") from None
        pipe.set_progress_bar_config(disable=True)
        cal = capture(pipe, prompts=prompts, num_steps=args.steps, seed=args.seed, guidance_scale=args.guidance,
                      height=args.size, width=args.size, meta={"source": "pipeline"})
    else:
        if args.prompts:
            raise HpruneError(f"{args.model} has no text encoder; --prompts needs a pipeline folder "
                              f"(use --num-prompts for stand-in prompts)")
        from hprune.models.registry import BUILTINS

        if args.size is not None and args.model in BUILTINS and BUILTINS[args.model].calibration:
            raise HpruneError(f"--size does not apply to {args.model}: its calibration set uses its own image size")
        model, offload = load_for_offload(args.model, device, dtype, args.offload)
        with offload_context(model, device, offload):
            cal = builtin_calibration(args.model, model, n_prompts=args.n, num_steps=args.steps, seed=args.seed,
                                      progress=True, size=args.size)
    if not main:
        return 0
    cal.save(args.out, overwrite=args.overwrite)
    print(f"wrote {args.out}: {len(cal)} samples from {int(cal.trajectory.max()) + 1} prompts x {cal.num_steps} steps")
    return 0
