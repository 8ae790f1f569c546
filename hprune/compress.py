"""`hprune compress`: the whole HierarchicalPrune pipeline on one model.

    calibrate -> probe ΔP -> plan (HPP) -> prune -> distill (PWP + SGDistill) -> quantise -> save

Each stage is timed and the compressed model's fidelity to the original is measured after it on
held-out inputs (calibration trajectories kept out of probing and training). The output folder
(written atomically) holds:

    artifact/                 the compressed transformer (hprune.json + model.safetensors)
    report.json, report.md    parameters, bytes, fidelity and seconds per stage; the schedule
    sensitivity.json/.png     the ΔP table and its heatmap
    plan.json                 the prune plan, each choice with its score
    distill_loss.png          the distillation losses
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from hprune import dist
from hprune.calib import CalibrationSet
from hprune.errors import HpruneError
from hprune.metrics import fidelity, predict
from hprune.models.stats import bytes_at, param_count, weight_bytes
from hprune.probe import DEFAULT_MAX_SAMPLES

QUANT_CHOICES = ("int4", "int4-fp8", "bnb-nf4", "none")
HPRUNE_INT4 = ("int4", "int4-fp8")  # the choices quantised by hprune (GPTQ applies to these)
METHODS = ("hpp", "koala", "bksdm")
BNB_BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)


@dataclass
class CompressOptions:
    ratio: float = 0.3
    quant: str = "int4"  # int4 (hprune W4A16) | int4-fp8 (hprune W4A8) | bnb-nf4 (bitsandbytes, the paper's) | none
    group_size: int = 64
    # int4 codes: gptq (hprune.quant.gptq; Hessians from the calibration set) | rtn (round to nearest)
    # | auto: gptq for the hprune int4 formats, rtn for bnb-nf4 (bitsandbytes rounds to nearest)
    quant_method: str = "auto"
    method: str = "hpp"
    protect: int | None = None
    steps: int = 200  # distillation steps (0: no distillation)
    batch_size: int = 4
    lr: float = 3e-4
    pwp: bool = True
    sgd: bool | str = "auto"
    sgd_scale: str = "inverse"  # hprune.distill: "inverse" (the paper's 1/ΔP) or "log"
    sgd_budget: str = "mean"  # "mean": SGDistill redistributes lr; "fixed": it only lowers it
    lambda_feat: float = 0.1
    max_probe_samples: int | None = DEFAULT_MAX_SAMPLES  # None: every calibration sample
    holdout: float = 0.2  # fraction of calibration trajectories kept for evaluation
    checkpoint_every: int = 0
    checkpoint_dir: str | None = None
    resume: bool = False
    keep_checkpoints: bool = False  # keep OUT-checkpoints after a successful run (a given checkpoint_dir is kept)
    seed: int = 0
    optimizer: str = "adamw"  # distillation: "adamw" | "adamw8bit" (hprune.distill.DistillConfig)
    grad_checkpointing: bool = False  # distillation: recompute the student's block activations

    @property
    def resolved_quant_method(self) -> str:
        """"gptq" or "rtn": what quantisation does with these options ("auto" resolved)."""
        if self.quant_method != "auto":
            return self.quant_method
        return "gptq" if self.quant in HPRUNE_INT4 else "rtn"

    def validate(self) -> None:
        if not 0 < self.ratio < 1:
            raise HpruneError(f"ratio must be in (0, 1), got {self.ratio}")
        if self.quant not in QUANT_CHOICES:
            raise HpruneError(f"quant must be one of {QUANT_CHOICES}, not {self.quant!r}")
        from hprune import formats as F

        F.check_group_size(self.group_size)  # a positive multiple of 32
        if self.quant == "bnb-nf4" and self.group_size not in BNB_BLOCKSIZES:
            raise HpruneError(f"--quant bnb-nf4 takes a bitsandbytes blocksize {BNB_BLOCKSIZES} as the group size, "
                              f"not {self.group_size}")
        if self.max_probe_samples is not None and self.max_probe_samples < 1:
            raise HpruneError(f"max_probe_samples must be >= 1 (or None: all), got {self.max_probe_samples}")
        if self.protect is not None and self.protect < 0:
            raise HpruneError(f"protect must be >= 0, got {self.protect}")
        if self.quant == "int4-fp8" and self.group_size % 64:
            raise HpruneError(f"--quant int4-fp8 (W4A8) needs a group size that is a multiple of 64, "
                              f"not {self.group_size}")
        from hprune.quant.linear import QUANT_METHODS

        if self.quant_method not in ("auto",) + QUANT_METHODS:
            raise HpruneError(f"quant_method must be one of {('auto',) + QUANT_METHODS}, not {self.quant_method!r}")
        if self.quant_method == "gptq" and self.quant not in HPRUNE_INT4:
            raise HpruneError(f"quant_method 'gptq' chooses hprune int4 codes; it does not apply to "
                              f"--quant {self.quant}")
        if self.method not in METHODS:
            raise HpruneError(f"method must be one of {METHODS}, not {self.method!r}")
        if not 0 <= self.holdout < 1:
            raise HpruneError(f"holdout must be in [0, 1), got {self.holdout}")
        from hprune.distill import DistillConfig

        # the distillation settings fail here, before the probe, not after it
        DistillConfig(steps=self.steps, batch_size=self.batch_size, lr=self.lr, pwp=self.pwp, sgd=self.sgd,
                      sgd_scale=self.sgd_scale, sgd_budget=self.sgd_budget, lambda_feat=self.lambda_feat,
                      checkpoint_every=self.checkpoint_every, checkpoint_dir=self.checkpoint_dir or "checkpoints",
                      resume=self.resume, seed=self.seed, optimizer=self.optimizer,
                      grad_checkpointing=self.grad_checkpointing).validate()


RUN_FORMAT = "hprune.run/1"
RUN_FILE = "run.json"
# What the probe, the plan and hence the student depend on: a resume must not change them.
_RUN_MUST_MATCH = ("ratio", "method", "protect", "max_probe_samples", "holdout", "seed")


def _run_key(opts: CompressOptions, teacher_fp: str, calib: CalibrationSet) -> dict[str, Any]:
    """What a resume must match: the options the student depends on, the teacher's weights (a
    content fingerprint, hprune.models.registry.weights_fingerprint) and the calibration set's contents."""
    return {**{k: getattr(opts, k) for k in _RUN_MUST_MATCH}, "teacher": teacher_fp, "calib_samples": len(calib),
            "calib": calib.fingerprint()}


def read_run_record(root: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """The ΔP table and plan a checkpointed run recorded in `root/run.json`, checked against this
    run's key (options the student depends on, the teacher, the calibration set); None when there
    is no record. HpruneError naming every mismatch."""
    from hprune.io import read_json

    path = root / RUN_FILE
    if not path.is_file():
        return None
    doc = read_json(path, "run record")
    if not isinstance(doc, dict) or doc.get("format") != RUN_FORMAT or not {"key", "table", "plan"} <= set(doc):
        raise HpruneError(f"{path}: corrupted run record; remove {path.parent} to start afresh")
    was = doc["key"]
    bad = [k for k in key if was.get(k) != key[k]]
    if bad:
        raise HpruneError(f"{root}: cannot resume with a different run: "
                          + ", ".join(f"{k} {was.get(k)} -> {key[k]}" for k in bad)
                          + " (resume with the run's options, or start afresh without --resume)")
    return doc


def split_holdout(calib: CalibrationSet, fraction: float) -> tuple[CalibrationSet, CalibrationSet]:
    """(training part, held-out part) by whole trajectories; with one trajectory both are it."""
    trajs = torch.unique(calib.trajectory, sorted=True).tolist()
    n_out = min(len(trajs) - 1, math.ceil(fraction * len(trajs))) if fraction > 0 else 0
    if n_out <= 0:
        return calib, calib
    out_t = set(trajs[-n_out:])
    traj = calib.trajectory.tolist()
    keep = [i for i, t in enumerate(traj) if t not in out_t]
    held = [i for i, t in enumerate(traj) if t in out_t]
    train, test = calib.subset(keep), calib.subset(held)
    return train, test


def compress(teacher: nn.Module, calib: CalibrationSet, opts: CompressOptions, out: str | Path, *,
             overwrite: bool = False, name: str = "model", progress: bool = True,
             log: Callable[[str], None] = print,
             extras: Callable[[Path, nn.Module, dict[str, Any]], None] | None = None,
             offload: torch.device | str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Runs the pipeline on `teacher` (left unchanged) and writes the output folder `out`.
    Returns (compressed model, report); the report is also in report.json. Under torchrun only
    rank 0 writes. `extras(folder, model, report)` may add files to the folder before it is
    committed (the demo adds images).

    offload: a device (e.g. "cuda"): every stage runs block by block there while the teacher's
    weights stay where they are (the host, memory-mapped; hprune.models.offload). The probe and
    the fidelity checks run the models per call with one block at a time on the device; pruning
    is host surgery on a copy that shares the teacher's tensors (hprune.distill.pruned_student);
    distillation trains the student resident on the device (in the compute dtype: float32 on a
    CPU for 16-bit weights) with the teacher streamed block by block, then stores it back on the
    host in the teacher's dtype; hprune int4 quantisation runs quantize_model(offload=device).
    Without distillation the returned model shares the tensors it kept with the teacher (nothing
    is copied); clone it before changing it in place. Same results as the resident path where
    the arithmetic is the same (tiny fp32 models, RTN: bit for bit); GPTQ then takes its Hessians
    from the set's stored inputs (hprune.quant.blockwise), not from a new denoising loop."""
    from hprune.artifacts import load_compressed, save_compressed
    from hprune.distill import DistillConfig, distill, schedule_table
    from hprune.hpp import plan_bksdm, plan_hpp, plan_koala
    from hprune.io import atomic_dir, check_output, write_json
    from hprune.distill import check_checkpoint, latest_checkpoint, pruned_student, stored_like
    from hprune.models import PrunePlan
    from hprune.models.offload import compute_dtype, storage_dtype
    from hprune.models.registry import weights_fingerprint
    from hprune.plots import line_plot
    from hprune.probe import SensitivityTable
    from hprune.probe import probe_sensitivity
    from hprune.report import format_table, human_bytes, human_count

    opts.validate()
    from hprune.models import get_adapter

    n_blocks = get_adapter(teacher).num_blocks(teacher)
    if opts.protect is not None and not 0 <= opts.protect < n_blocks:
        raise HpruneError(f"protect must be between 0 and {n_blocks - 1} (the model has {n_blocks} blocks), "
                          f"got {opts.protect}: the ratio cannot be met with every block protected")
    off = torch.device(offload) if offload is not None else None
    rank = dist.setup(off or next(teacher.parameters()).device)[0]
    main = rank == 0
    check_output(out, overwrite)
    calib.check_fits(teacher)
    if opts.steps > 0 and calib.final is None:  # say so before probing, not after it
        raise HpruneError("the calibration set has no final latents (captured by an older hprune?), which "
                          "distillation trains on: capture it again with `hprune calib`, or pass steps=0")
    train_cal, eval_cal = split_holdout(calib, opts.holdout)
    ckpt = opts.checkpoint_dir or (str(Path(out)) + "-checkpoints" if opts.checkpoint_every or opts.resume else None)
    cfg = DistillConfig(steps=opts.steps, batch_size=opts.batch_size, lr=opts.lr, pwp=opts.pwp, sgd=opts.sgd,
                        sgd_scale=opts.sgd_scale, sgd_budget=opts.sgd_budget,
                        lambda_feat=opts.lambda_feat, checkpoint_every=opts.checkpoint_every,
                        checkpoint_dir=ckpt, resume=opts.resume, seed=opts.seed, optimizer=opts.optimizer,
                        grad_checkpointing=opts.grad_checkpointing)
    run_key = _run_key(opts, weights_fingerprint(teacher), train_cal)
    record = None
    last = latest_checkpoint(ckpt) if ckpt and opts.steps > 0 else None
    if ckpt and opts.steps > 0 and (opts.checkpoint_every or opts.resume) and main:
        from hprune.owned import claim_folder

        claim_folder(ckpt, "checkpoint folder")  # a file or a user's folder of that name: refused, never removed
    if last is not None and not opts.resume:
        raise HpruneError(f"{Path(ckpt)} holds checkpoints of an earlier run ({last.name}): pass --resume to "
                          f"continue it, or remove the folder to start afresh")
    if last is not None:
        # every mismatch is refused here, before the probe: settings, processes, steps, the run itself
        check_checkpoint(last, cfg)
        record = read_run_record(Path(ckpt), run_key)
    p0 = next(teacher.parameters())
    eval_batches = list(eval_cal.batches(4, device=p0.device, dtype=p0.dtype if p0.is_floating_point() else None,
                                         indices=_spread(len(eval_cal), 8)))
    say = log if main else (lambda _m: None)
    rows: list[dict[str, Any]] = []
    t_all = time.perf_counter()

    def streamed(*models: nn.Module) -> contextlib.ExitStack:
        """With offload: the models run block by block on the device (per call), else as they are."""
        stack = contextlib.ExitStack()
        if off is not None:
            from hprune.models.offload import offloaded

            for m in models:
                stack.enter_context(offloaded(m, off))
        return stack

    def stage(label: str, model: nn.Module, seconds: float) -> None:
        with streamed(teacher, model):
            fid = fidelity(teacher, model, eval_batches)
        rows.append({"stage": label, "params": param_count(model), "bytes": bytes_at(model, torch.bfloat16),
                     "rel_mse": fid["rel_mse"], "cosine_dist": fid["cosine"], "seconds": round(seconds, 2)})

    rows.append({"stage": "original", "params": param_count(teacher), "bytes": bytes_at(teacher, torch.bfloat16),
                 "rel_mse": 0.0, "cosine_dist": 0.0, "seconds": 0.0})

    t = time.perf_counter()
    if record is not None:
        say(f"[1/5] resuming: the ΔP table and plan recorded in {Path(ckpt) / RUN_FILE} (no probe)")
        table = SensitivityTable.from_dict(record["table"])
    else:
        n_probe = min(len(train_cal), opts.max_probe_samples or len(train_cal))
        say(f"[1/5] probing ΔP of every block and component on {n_probe} calibration samples"
            + (f" (of {len(train_cal)})" if n_probe < len(train_cal) else ""))
        with streamed(teacher):
            table = probe_sensitivity(teacher, train_cal, max_samples=opts.max_probe_samples, progress=progress and main,
                                      device=off, dtype=compute_dtype(storage_dtype(teacher), off) if off else None)
    probe_s = time.perf_counter() - t

    say(f"[2/5] {opts.method} plan removing {opts.ratio:.0%} of the parameters; pruning")
    t = time.perf_counter()
    if record is not None:
        plan = PrunePlan.from_dict(record["plan"])
    elif opts.method == "hpp":
        plan = plan_hpp(table, opts.ratio, protect=opts.protect)
    else:
        plan = (plan_koala if opts.method == "koala" else plan_bksdm)(table, opts.ratio, protect=opts.protect or 0)
    if ckpt and opts.steps > 0 and main and record is None:  # what a resume reuses instead of probing again
        from hprune.owned import add_to_manifest

        write_json(Path(ckpt) / RUN_FILE, {"format": RUN_FORMAT, "key": run_key, "table": table.to_dict(),
                                           "plan": plan.to_dict()})
        add_to_manifest(ckpt, [RUN_FILE])
    stored = storage_dtype(teacher)
    if off is None:
        student = pruned_student(teacher, plan)  # copies only what the student keeps
    elif opts.steps > 0:  # it trains resident on the device, in the compute dtype
        student = pruned_student(teacher, plan, device=off, dtype=compute_dtype(stored, off))
    else:  # host surgery only: it shares the teacher's (mapped) tensors until quantisation replaces them
        student = pruned_student(teacher, plan, share=True)
    stage("pruned", student, probe_s + time.perf_counter() - t)

    history: list[dict[str, float]] = []
    schedule: dict[str, Any] | None = None
    if opts.steps > 0:
        say(f"[3/5] distilling {opts.steps} steps (batch {opts.batch_size})")
        t = time.perf_counter()
        student, res = distill(teacher, student, train_cal, cfg, table=table, progress=progress and main,
                               offload_teacher=off is not None)
        if off is not None:  # back to the host, in the teacher's dtypes: the device holds one block at a time again
            student = stored_like(student, teacher, p0.device)
        history, schedule = res.history, res.schedule
        say(schedule_table(schedule))
        stage("distilled", student, time.perf_counter() - t)
    else:
        say("[3/5] distillation skipped (steps = 0)")

    quant_report = None
    if opts.quant != "none":
        gptq = opts.resolved_quant_method == "gptq"
        say(f"[4/5] quantising the block Linears ({opts.quant}, group {opts.group_size}" + (", GPTQ)" if gptq else ")"))
        t = time.perf_counter()
        from hprune.quant import convert_bnb_model, quantize_model

        if opts.quant in HPRUNE_INT4:
            fp8 = opts.quant == "int4-fp8"
            quant_report = quantize_model(student, group_size=opts.group_size, fmt="int4", act="fp8" if fp8 else None,
                                          method="gptq" if gptq else "rtn", calib=train_cal if gptq else None,
                                          progress=progress and main, offload=off)
            stage("quantised (hprune int4" + (", GPTQ" if gptq else "") + (", fp8 activations)" if fp8 else ")"),
                  student, time.perf_counter() - t)
        else:
            quant_report = quantize_model(student, group_size=opts.group_size, backend="bnb", fmt="nf4")
            stage("quantised (bitsandbytes nf4)", student, time.perf_counter() - t)
            convert_bnb_model(student)  # identical NF4 numbers in hprune modules, which artifacts can store
    else:
        say("[4/5] quantisation skipped (--quant none)")

    say("[5/5] saving the artifact and checking it reloads bit for bit")
    report: dict[str, Any] = {
        "model": name, "options": asdict(opts), "stages": rows, "plan": plan.to_dict(),
        "quantization": ({**quant_report.to_dict(), "method": opts.resolved_quant_method}
                         if quant_report else None),
        "schedule": {k: v for k, v in (schedule or {}).items() if k != "scales"},
        "distill_history": history,
        "offload": str(off) if off is not None else None,
        "calibration": {"train_samples": len(train_cal), "eval_samples": len(eval_cal),
                        "eval_is_train": eval_cal is train_cal},
    }
    if main:
        with atomic_dir(out, overwrite=overwrite) as tmp:
            t = time.perf_counter()
            art = save_compressed(student, tmp / "artifact", extra={"compress": {"model": name, "ratio": opts.ratio,
                                                                                  "quant": opts.quant}})
            back = load_compressed(art)
            with streamed(student, back):
                report["reload_bit_identical"] = all(torch.equal(predict(student, x), predict(back, x))
                                                     for x in eval_batches[:2])
            report["artifact_bytes"] = weight_bytes(back)
            save_s = time.perf_counter() - t
            report["save_seconds"] = round(save_s, 2)
            report["total_seconds"] = round(time.perf_counter() - t_all, 2)
            table.save(tmp / "sensitivity.json")
            table.heatmap(tmp / "sensitivity.png", title=f"{name}: ΔP per block and component")
            plan.save(tmp / "plan.json")
            if history:
                line_plot({k: [h[k] for h in history] for k in ("loss", "out", "feat")}, tmp / "distill_loss.png",
                          title=f"{name}: distillation losses (faint: per step)", xlabel="step",
                          ylabel="loss (MSE to the teacher, log scale)", logy=True,
                          smooth=max(5, len(history) // 20))
            summary = format_table([{**r, "params": human_count(r["params"]), "bytes": human_bytes(r["bytes"])}
                                    for r in rows], ["stage", "params", "bytes", "rel_mse", "cosine_dist", "seconds"])
            report["summary"] = summary
            if extras is not None:
                extras(tmp, student, report)
            write_json(tmp / "report.json", report)
            (tmp / "report.md").write_text(_markdown(name, opts, report, summary, schedule))
        say(summary)
        say(f"outputs in {Path(out)}; the compressed model is {Path(out) / 'artifact'} (hprune.load_compressed)")
        if ckpt and Path(ckpt).is_dir():
            if opts.checkpoint_dir or opts.keep_checkpoints:
                say(f"distillation checkpoints kept in {Path(ckpt)}")
            else:
                from hprune.owned import remove_owned

                left = remove_owned(ckpt)  # only the files hprune wrote there, unchanged
                say(f"removed the distillation checkpoints ({Path(ckpt)}); keep them with --keep-checkpoints"
                    if not left else f"removed hprune's distillation checkpoints from {Path(ckpt)}; kept {len(left)} "
                                     f"file(s) hprune did not write there (e.g. {left[0]})")
    return student, report


def _spread(n: int, k: int) -> list[int]:
    return sorted(set(torch.linspace(0, n - 1, min(k, n)).round().long().tolist()))


def _markdown(name: str, opts: CompressOptions, report: dict[str, Any], summary: str,
              schedule: dict[str, Any] | None) -> str:
    from hprune.distill import schedule_table

    plan = report["plan"]
    lines = [f"# hprune compress: {name}", "",
             f"ratio {opts.ratio}, method {opts.method}, quantisation {opts.quant}, distillation {opts.steps} steps", "",
             "Fidelity is measured against the original model on held-out calibration trajectories "
             "(rel_mse: relative MSE of the predicted velocity; cosine_dist: 1 - cosine similarity). "
             "Bytes count floating tensors at 2 bytes (bf16) and packed 4-bit weights as stored.", "",
             summary, "",
             "Removed: " + ", ".join(f"{e['block']}:{e['component']}" for e in plan["entries"]) +
             f" ({plan['meta'].get('achieved_ratio', float('nan')):.1%} of the parameters).", "",
             f"Artifact reloads bit-identically: {report.get('reload_bit_identical')}.", ""]
    if schedule:
        lines += ["## Distillation schedule", "", schedule_table(schedule), ""]
    return "\n".join(lines)
