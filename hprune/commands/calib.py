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

from hprune.commands import (add_device_arguments, check_size, device_and_dtype, load_for_offload, offload_context,
                             read_prompts)

HELP = "capture a calibration set (transformer inputs over denoising steps)"
MAX_STEPS, MAX_PROMPTS = 1000, 100_000


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--prompts", help="text file, one prompt per line (pipeline folders only)")
    p.add_argument("--num-prompts", "--n", dest="n", type=int, default=8,
                   help="number of stand-in prompts when there is no text encoder (under torchrun spell it "
                        "--num-prompts: torchrun reads --n as one of its own options)")
    p.add_argument("--steps", type=int, default=8, help="denoising steps per prompt (default 8)")
    p.add_argument("--size", type=int, help="image size in pixels (default: the pipeline's); for a transformer "
                   "without its pipeline, pixels of the SD3/FLUX VAE (8 per latent pixel)")
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
    from hprune.models.registry import BUILTINS

    check_output(args.out, args.overwrite, kind="file")
    if args.steps < 1 or args.n < 1:
        raise HpruneError("--steps and --num-prompts must be at least 1")
    # bounds before allocating: a calibration set holds num-prompts x steps samples
    if args.steps > MAX_STEPS:
        raise HpruneError(f"--steps must be at most {MAX_STEPS} (the schedulers' training timesteps), got {args.steps}")
    if args.n > MAX_PROMPTS:
        raise HpruneError(f"--num-prompts must be at most {MAX_PROMPTS}, got {args.n}")
    if args.size is not None and not 1 <= args.size <= 16384:
        raise HpruneError(f"--size must be between 1 and 16384 pixels, got {args.size}")
    if not 0 <= args.seed < 2**63 - args.n:
        raise HpruneError(f"--seed must be between 0 and {2**63 - 1 - args.n}, got {args.seed}")
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
        check_size(pipe, args.size, only_max=True)
        cal = capture(pipe, prompts=prompts, num_steps=args.steps, seed=args.seed, guidance_scale=args.guidance,
                      height=args.size, width=args.size, meta={"source": "pipeline"})
        patch = 2 if cal.family == "flux" else int(getattr(pipe.transformer.config, "patch_size", 1) or 1)
        cal.record_size(int(pipe.vae_scale_factor), patch)  # the pipeline's own VAE
    else:
        if args.prompts:
            raise HpruneError(f"{args.model} has no text encoder; --prompts needs a pipeline folder "
                              f"(use --num-prompts for stand-in prompts)")

        if args.size is not None and args.model in BUILTINS and BUILTINS[args.model].calibration:
            raise HpruneError(f"--size does not apply to {args.model}: its calibration set uses its own image size")
        model, offload = load_for_offload(args.model, device, dtype, args.offload)
        if args.size is not None:
            from hprune.calib import size_vae_scale
            from hprune.pipelines import build_pipeline

            # the pipeline builtin_calibration runs, at the VAE scale it reads the size with
            check_size(build_pipeline(model), args.size, only_max=True, vae_scale=size_vae_scale(args.model))
        with offload_context(model, device, offload):
            cal = builtin_calibration(args.model, model, n_prompts=args.n, num_steps=args.steps, seed=args.seed,
                                      progress=True, size=args.size)
    if not main:
        return 0
    cal.save(args.out, overwrite=args.overwrite)
    print(f"wrote {args.out}: {len(cal)} samples from {int(cal.trajectory.max()) + 1} prompts x {cal.num_steps} steps")
    m = cal.meta
    if "vae_scale" in m:
        whose = ("its pipeline's VAE" if m.get("source") == "pipeline" else "the built-in's tiny VAE"
                 if args.model in BUILTINS else "assumed: the SD3/FLUX VAE, none beside this transformer")
        print(f"size: {m['image_size']}x{m['image_size']} px = {m['latent_size']}x{m['latent_size']} latents at VAE "
              f"scale {m['vae_scale']} ({whose}), {m['tokens']} image tokens per sample")
    return 0
