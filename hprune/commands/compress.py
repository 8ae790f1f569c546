"""Compress a model end to end: calibrate, probe ΔP, plan (HPP), prune, distill with PWP and
SGDistill, quantise to 4 bits, save. Writes the artifact and a report (JSON + Markdown:
parameters, bytes, fidelity after each stage, time per stage) to --out.

Runs on N processes with torchrun (the student is sharded with FSDP2):
    torchrun --nproc-per-node 8 -m hprune compress ./sd35-large --calib calib.safetensors ..."""
from __future__ import annotations

import argparse

from hprune.commands import add_device_arguments, device_and_dtype, load_for_offload, offload_context

HELP = "probe -> plan -> prune -> distill -> quantise -> save, with a report"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--ratio", type=float, default=0.3, help="fraction of transformer parameters to remove")
    p.add_argument("--quant", default="int4", choices=["int4", "int4-fp8", "bnb-nf4", "none"],
                   help="int4: hprune W4A16; int4-fp8: the same weights with FP8 activations (W4A8); "
                        "bnb-nf4: bitsandbytes NF4; none")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--calib", help="calibration set (`hprune calib`); built-in tiny models make one")
    p.add_argument("--method", default="hpp", choices=["hpp", "koala", "bksdm"])
    p.add_argument("--protect", type=int, help="leading blocks never pruned")
    p.add_argument("--steps", type=int, default=200, help="distillation steps (0: none)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--no-pwp", action="store_true", help="do not freeze the blocks before the first pruned one")
    p.add_argument("--sgd", default="auto", choices=["auto", "on", "off"],
                   help="Sensitivity-Guided Distillation (auto: above 25%% removal)")
    p.add_argument("--sgd-scale", default="inverse", choices=["inverse", "log"],
                   help="SGDistill update scale: inverse (the paper's, s ∝ 1/ΔP) or log (flatter over a wide "
                        "ΔP range)")
    p.add_argument("--sgd-budget", default="mean", choices=["mean", "fixed"],
                   help="mean: the scaled units keep lr as their mean rate; fixed: lr · s as it is (lowers the mean)")
    p.add_argument("--group-size", type=int, default=64, help="4-bit group size")
    p.add_argument("--quant-method", default="auto", choices=["auto", "gptq", "rtn"],
                   help="int4 codes: gptq (chosen with each layer's timestep-aware input Hessian from the "
                        "calibration set) or rtn (round to nearest with a scale search, the paper's); auto "
                        "(default): gptq for int4 / int4-fp8")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw8bit"],
                   help="adamw: fp32 moments (8 bytes/param); adamw8bit: bitsandbytes 8-bit moments (~2 bytes/param; "
                        "no checkpoints, one process; default: %(default)s)")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute each student block's activations in the backward pass (less memory, ~1/3 more time)")
    p.add_argument("--checkpoint-every", type=int, default=0, help="distillation checkpoint interval (steps)")
    p.add_argument("--resume", action="store_true",
                   help="resume distillation from the latest checkpoint in OUT-checkpoints, reusing the ΔP table "
                        "and plan recorded there (no probe)")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep OUT-checkpoints after a successful run (default: removed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--offload", action="store_true",
                   help="block by block: the teacher's weights stay on the host, one block at a time on --device for "
                        "the probe, the fidelity checks, distillation (the student trains resident) and quantisation "
                        "(automatic when the model does not fit the GPU, and for 16-bit weights on a CPU)")
    add_device_arguments(p)
    p.add_argument("--max-probe-samples", type=int, default=32,
                   help="calibration samples the ΔP probe runs on, evenly spaced (0: all)")
    p.add_argument("--overwrite", action="store_true", help="replace an output folder hprune wrote")


def run(args: argparse.Namespace) -> int:
    from hprune.calib import CalibrationSet, builtin_calibration
    from hprune.compress import CompressOptions, compress
    from hprune.errors import HpruneError
    from hprune.io import check_output
    from hprune.models.registry import BUILTINS

    opts = CompressOptions(ratio=args.ratio, quant=args.quant, group_size=args.group_size,
                           quant_method=args.quant_method, method=args.method,
                           protect=args.protect, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                           pwp=not args.no_pwp, sgd={"auto": "auto", "on": True, "off": False}[args.sgd],
                           sgd_scale=args.sgd_scale, sgd_budget=args.sgd_budget,
                           checkpoint_every=args.checkpoint_every, resume=args.resume,
                           max_probe_samples=args.max_probe_samples or None,
                           keep_checkpoints=args.keep_checkpoints, seed=args.seed, optimizer=args.optimizer,
                           grad_checkpointing=args.grad_checkpointing)
    opts.validate()
    check_output(args.out, args.overwrite)
    device, dtype = device_and_dtype(args)
    teacher, offload = load_for_offload(args.model, device, dtype, args.offload)
    if args.calib:
        calib = CalibrationSet.load(args.calib)
    elif args.model in BUILTINS and BUILTINS[args.model].tiny:
        with offload_context(teacher, device, offload):
            calib = builtin_calibration(args.model, teacher, n_prompts=10, num_steps=8, seed=args.seed)
    else:
        raise HpruneError("--calib FILE is required for this model (make one with `hprune calib`)")
    compress(teacher, calib, opts, args.out, overwrite=args.overwrite, name=args.model,
             offload=device if offload else None)
    return 0
