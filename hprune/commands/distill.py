"""Distil a pruned student back towards its teacher: HierarchicalPrune's third stage on its own
(what `hprune compress` runs between prune and quantise). Loss: the velocity and every kept
block's image-stream output against the teacher's, on re-noised calibration latents. PWP freezes
the blocks before the first pruned one; SGDistill (on by default above 25 % removal) scales each
tensor's update by its ΔP, so it needs the teacher's sensitivity table (--sensitivity).

    hprune prune tiny-sd3 --plan plan.json --out pruned/
    hprune distill tiny-sd3 --student pruned/ --calib calib.safetensors --sensitivity probe/sensitivity.json --out distilled/
    hprune distill tiny-sd3 --plan plan.json ... --out distilled/          # prune on the fly instead

Checkpoints (--checkpoint-every N) go to OUT-checkpoints; --resume continues the latest one
(bit-identical to an uninterrupted run); they are removed when the run succeeds unless
--keep-checkpoints. The output is an artifact folder, like `hprune prune` writes."""
from __future__ import annotations

import argparse

from hprune.commands import add_device_arguments, device_and_dtype, load_weighted_model

HELP = "distil a pruned student towards its teacher (PWP + SGDistill), resumable"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="TEACHER", help="the unpruned model (built-in name, diffusers folder, artifact)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--student", help="the pruned artifact (`hprune prune`)")
    src.add_argument("--plan", help="plan.json: prune a copy of the teacher with it")
    p.add_argument("--calib", help="calibration set with final latents (`hprune calib`); built-in tiny models: optional")
    p.add_argument("--sensitivity", help="the teacher's sensitivity.json (`hprune probe`); SGDistill needs it")
    p.add_argument("--out", required=True, help="output artifact folder")
    p.add_argument("--steps", type=int, default=200, help="distillation steps")
    p.add_argument("--batch-size", type=int, default=4, help="global batch (split across torchrun processes)")
    p.add_argument("--lr", type=float, default=3e-4, help="learning rate")
    p.add_argument("--lambda-feat", type=float, default=0.1, help="weight of the block-output loss")
    p.add_argument("--no-pwp", action="store_true", help="do not freeze the blocks before the first pruned one")
    p.add_argument("--sgd", default="auto", choices=["auto", "on", "off"],
                   help="Sensitivity-Guided Distillation (auto: above 25%% removal)")
    p.add_argument("--sgd-scale", default="inverse", choices=["inverse", "log"], help="SGDistill update scale")
    p.add_argument("--sgd-budget", default="mean", choices=["mean", "fixed"],
                   help="mean: the scaled units keep lr as their mean rate; fixed: lr · s as it is")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw8bit"],
                   help="adamw: fp32 moments (8 bytes/param); adamw8bit: bitsandbytes 8-bit moments (~2 bytes/param; "
                        "no checkpoints, one process; default: %(default)s)")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute each student block's activations in the backward pass (less memory, ~1/3 more time)")
    p.add_argument("--checkpoint-every", type=int, default=0, help="checkpoint interval in steps (0: none)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in OUT-checkpoints")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep OUT-checkpoints after a successful run")
    p.add_argument("--eval-samples", type=int, default=8,
                   help="calibration samples to measure fidelity to the teacher on, before and after (0: skip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--offload", action="store_true",
                   help="stream the teacher block by block: its weights stay on the host, one block at a time on "
                        "--device; the student trains resident (automatic when the teacher does not fit the GPU, and "
                        "for 16-bit weights on a CPU, where the student then trains in float32)")
    add_device_arguments(p)
    p.add_argument("--overwrite", action="store_true", help="replace an output folder hprune wrote")


_MAKE = {"calibration set": " (make one with `hprune calib`)", "sensitivity table": " (make one with `hprune probe`)",
         "plan": " (make one with `hprune plan`)", "student": " (make one with `hprune prune`)"}


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hprune import dist
    from hprune.artifacts import save_compressed
    from hprune.commands import FidelityCheck, calibration_for, load_for_offload, offload_context
    from hprune.distill import (DistillConfig, check_checkpoint, distill, latest_checkpoint, pruned_student,
                                schedule_table, stored_like)
    from hprune.errors import HpruneError
    from hprune.io import check_output
    from hprune.models import PrunePlan, param_count
    from hprune.models.offload import compute_dtype, storage_dtype
    from hprune.probe import SensitivityTable
    from hprune.report import human_count

    out = check_output(args.out, args.overwrite)
    ckpt = Path(str(out) + "-checkpoints")
    cfg = DistillConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, lambda_feat=args.lambda_feat,
                        pwp=not args.no_pwp, sgd={"auto": "auto", "on": True, "off": False}[args.sgd],
                        sgd_scale=args.sgd_scale, sgd_budget=args.sgd_budget,
                        checkpoint_every=args.checkpoint_every, checkpoint_dir=str(ckpt), resume=args.resume,
                        seed=args.seed, optimizer=args.optimizer, grad_checkpointing=args.grad_checkpointing)
    cfg.validate()
    if args.steps < 1:
        raise HpruneError(f"--steps must be at least 1, got {args.steps}")
    if args.eval_samples < 0:
        raise HpruneError(f"--eval-samples must be >= 0, got {args.eval_samples}")
    claimed = bool(args.checkpoint_every or args.resume)
    if claimed:  # before any work: a file or a user's folder named OUT-checkpoints is refused, never removed
        from hprune.owned import claim_folder

        claim_folder(ckpt, "checkpoint folder")
    last = latest_checkpoint(ckpt)
    if last is not None and not args.resume:
        raise HpruneError(f"{ckpt} holds checkpoints of an earlier run ({last.name}): pass --resume to continue it, "
                          f"or remove the folder to start afresh")
    if last is not None:
        check_checkpoint(last, cfg)  # settings, processes, steps: refused before anything loads
    for what, path in (("calibration set", args.calib), ("sensitivity table", args.sensitivity),
                       ("plan", args.plan), ("student", args.student)):
        if path and not Path(path).exists():
            raise HpruneError(f"{what} not found: {path}" + _MAKE.get(what, ""))
    table = SensitivityTable.load(args.sensitivity) if args.sensitivity else None
    plan = PrunePlan.load(args.plan) if args.plan else None

    device, dtype = device_and_dtype(args)
    main = dist.setup(device)[0] == 0
    teacher, offload = load_for_offload(args.model, device, dtype, args.offload)
    stored = storage_dtype(teacher)
    # with the teacher streamed, the student trains on the device in the compute dtype (fp32 on a CPU
    # for 16-bit weights) and is saved back in the teacher's dtype
    train_dtype = compute_dtype(stored, device) if offload else None
    if plan is not None:
        student = pruned_student(teacher, plan, device=device, dtype=train_dtype)  # no full copy of the teacher
    else:
        student = load_weighted_model(args.student, device, dtype)
        if train_dtype is not None:
            student = student.to(train_dtype)
    if type(student) is not type(teacher) or param_count(student) >= param_count(teacher):
        raise HpruneError(f"--student {args.student} is not a pruned copy of {args.model} "
                          f"({human_count(param_count(student))} parameters, the teacher has "
                          f"{human_count(param_count(teacher))})")
    removed = 1 - param_count(student) / param_count(teacher)
    if table is None and (cfg.sgd is True or (cfg.sgd == "auto" and removed > cfg.r_thres)):
        why = "--sgd on" if cfg.sgd is True else f"on by default above {cfg.r_thres:.0%} removal; this student " \
                                                  f"removes {removed:.0%}"
        raise HpruneError(f"SGDistill ({why}) needs the teacher's sensitivity table: pass --sensitivity "
                          f"sensitivity.json (from `hprune probe {args.model} --out probe/`), or --sgd off")
    if table is not None and table.model.get("fingerprint") not in (None, _fingerprint(teacher)):
        raise HpruneError(f"{args.sensitivity} was probed on another model, not {args.model}")
    with offload_context(teacher, device, offload):
        calib = calibration_for(args.model, teacher, args.calib, what="distillation")
        if calib.final is None:
            raise HpruneError("the calibration set has no final latents (captured by an older hprune?), which "
                              "distillation trains on: capture it again with `hprune calib`")
        check = FidelityCheck(teacher, calib, args.eval_samples)
    with offload_context(student, device, offload):  # the check's inputs are on the teacher's (host) device
        before = check.measure(student)
    student, res = distill(teacher, student, calib, cfg, table=table, progress=main, offload_teacher=offload)
    with offload_context(student, device, offload):
        after = check.measure(student)
    if offload:
        stored_like(student, teacher)
    if not main:
        return 0
    print(schedule_table(res.schedule))
    report = {"teacher": args.model, "student": args.student, "plan": args.plan, "steps": args.steps,
              "resumed_from": res.resumed_from, "seconds": round(res.seconds, 2),
              "fidelity_before": before, "fidelity_after": after, "history": res.history}
    save_compressed(student, out, overwrite=args.overwrite, extra={"distill": report})
    if before and after:
        print(f"velocity rel_mse vs the teacher on {after['samples']} calibration samples: "
              f"{before['rel_mse']:.4g} -> {after['rel_mse']:.4g}")
    print(f"distilled {args.steps} steps ({res.seconds:.1f} s); wrote {Path(args.out)}")
    if claimed and ckpt.is_dir():
        if args.keep_checkpoints:
            print(f"checkpoints kept in {ckpt}")
        else:
            print(remove_checkpoints(ckpt))
    return 0


def remove_checkpoints(ckpt) -> str:
    """Removes what hprune wrote in a checkpoint folder (hprune.owned.remove_owned); the line to print."""
    from hprune.owned import remove_owned

    left = remove_owned(ckpt)
    if left:
        return (f"removed hprune's checkpoints from {ckpt}; kept {len(left)} file(s) hprune did not write there "
                f"(e.g. {left[0]})")
    return f"removed the checkpoints ({ckpt}); keep them with --keep-checkpoints"


def _fingerprint(model) -> str:
    from hprune.models.registry import fingerprint

    return fingerprint(model)
