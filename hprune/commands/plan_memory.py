"""`--dry-run` of the verbs that load a model: the plan of hprune.models.memory, printed (no weight
is read, nothing is written)."""
from __future__ import annotations

import argparse
import json
import os

# verbs that load their model with commands.load_for_offload: block by block by themselves for
# 16-bit weights on a CPU (and for weights that do not fit the GPU, which the plan cannot know)
AUTO_OFFLOAD = ("quantize", "obs", "calib", "probe", "compress", "distill")


def print_plan(args: argparse.Namespace, verb: str) -> int:
    """Prints the predicted peak device / host memory and time of each stage of `verb` for
    args.model and the run's options, whether each fits, and the options that would make it fit."""
    import dataclasses

    from hprune.models import memory as M
    from hprune.report import format_table, human_bytes, human_count

    device = (getattr(args, "device", None) or ("cuda" if _cuda() else "cpu")).split(":")[0]
    if device not in ("cpu", "cuda"):
        from hprune.errors import HpruneError

        raise HpruneError(f"--device {args.device}: hprune runs on cpu or cuda")
    shape = M.model_shape(args.model, _latent_size(args, verb))
    opts = M.Options(device=device, devices=int(os.environ.get("WORLD_SIZE", "1")), threads=M.cpu_threads(),
                     offload=bool(getattr(args, "offload", False)),
                     batch_size=int(getattr(args, "batch_size", 4) or 4), steps=int(getattr(args, "steps", 200) or 0),
                     ratio=float(getattr(args, "ratio", None) if getattr(args, "ratio", None) is not None else 0.0),
                     optimizer=getattr(args, "optimizer", "adamw") or "adamw",
                     grad_checkpointing=bool(getattr(args, "grad_checkpointing", False)))
    if device == "cpu" and shape.store_bytes == 2 and verb in AUTO_OFFLOAD:
        opts.offload = True  # as the run itself (commands.load_for_offload): fp32 compute, block by block
    _stage_options(args, verb, shape, opts)
    if verb == "quantize" and getattr(args, "method", "rtn") == "gptq":
        verb = "quantize-gptq"
    if verb == "compress" and getattr(args, "steps", 200) == 0:
        stages = [s for s in M.VERB_STAGES["compress"] if s != "distill"]
    else:
        stages = M.VERB_STAGES.get(verb, ["load"])
    if getattr(args, "device_memory", None):
        mem, what = M.parse_size(args.device_memory), "--device-memory"
    else:
        mem, what = M.device_memory_found(device)
    plans = M.plan(shape, stages, opts, mem or None)
    rows = []
    for p in plans:
        fix = ", ".join(_flag(k, v) for k, v in p.options.items()) if p.options else ""
        rows.append({"stage": p.stage, "device peak": human_bytes(p.device_bytes), "host anon peak": human_bytes(p.host_bytes),
                     "time": _duration(p.seconds), "fits": "?" if p.fits is None else ("yes" if p.fits else "NO"),
                     "would fit with": fix if p.fits is False else "", "note": p.note})
    if getattr(args, "json", False):
        print(json.dumps({"model": dataclasses.asdict(shape), "options": dataclasses.asdict(opts),
                          "device_memory": mem, "stages": [dataclasses.asdict(p) for p in plans]}, indent=2))
        return 0
    print(f"{args.model}: {shape.family}, {shape.num_blocks} blocks, {human_count(shape.params)} params, "
          f"{human_bytes(shape.weight_bytes)} of weights (largest block {human_bytes(max(shape.block_bytes, default=0))}), "
          f"{shape.tokens} tokens per sample")
    print(f"plan for {opts.devices} x {device}{' (offload: block by block)' if opts.offload else ''}, "
          f"{human_bytes(mem) + ' each (' + what + ')' if mem else 'device memory unknown'}; "
          f"times assume {M.THROUGHPUT[device] / 1e9:.0f} GFLOP/s per {'GPU' if device == 'cuda' else 'CPU thread'}"
          f"{f' x {opts.threads} threads' if device == 'cpu' else ''} (estimates; hprune.models.memory)")
    print(format_table(rows, ["stage", "device peak", "host anon peak", "time", "fits", "would fit with", "note"]))
    bad = [p for p in plans if p.fits is False]
    if bad:
        print(f"{len(bad)} stage(s) do not fit: " + "; ".join(
            f"{p.stage}: " + (", ".join(_flag(k, v) for k, v in p.options.items()) if p.options else "nothing tried fits")
            for p in bad))
    return 0


def _stage_options(args: argparse.Namespace, verb: str, shape, opts) -> None:
    """The options of calib / probe / obs / the fidelity check that change their plan, from the
    verb's own flags: the calibration set's size (its file's header, or what the verb captures),
    probe's batch and samples, OBS-Diff's pattern and groups, --eval-samples."""
    calls = None
    path = getattr(args, "calib", None)
    if path and os.path.isfile(path):  # the set's samples from its header (hprune.calib.CalibrationSet.save)
        from hprune.io import check_safetensors

        head = check_safetensors(path)
        if "t" in head:
            calls = -(-int(head["t"]["shape"][0]) // max(1, shape.cfg_rows))
    elif verb == "calib":
        calls = int(getattr(args, "n", 8) or 8) * int(getattr(args, "steps", 8) or 8)
    elif verb in ("probe", "obs", "eval", "generate"):
        calls = 4 * 8  # the built-in set these verbs make without --calib: 4 prompts x 8 steps
    if calls:
        opts.calib_samples = calls
    if verb == "probe":
        opts.probe_batch = int(getattr(args, "batch_size", 4) or 4)
        cap = getattr(args, "max_samples", 32)
        total = calls * shape.cfg_rows if calls else None
        sizes = [x for x in (cap, total) if x]  # --max-samples 0: every sample
        if sizes:
            opts.probe_samples = min(sizes)
    if verb == "obs":
        opts.pattern = "structured" if getattr(args, "pattern", "") == "structured" else "unstructured"
        opts.groups = max(1, int(getattr(args, "groups", 1) or 1))
    if getattr(args, "eval_samples", None) is not None:
        opts.eval_samples = int(args.eval_samples)


def _latent_size(args: argparse.Namespace, verb: str) -> int | None:
    """The samples' latent side the run will use, where the flags tell it: a --calib set's own
    latents (its file header), or calib's --size at the real VAE's scale; None: the model's default."""
    path = getattr(args, "calib", None)
    if path and os.path.isfile(path):
        from hprune.io import check_safetensors

        shape = check_safetensors(path).get("in.hidden_states", {}).get("shape")
        if shape and len(shape) == 4:  # SD3: (N, C, lat, lat)
            return int(shape[-1])
        if shape and len(shape) == 3:  # FLUX: (N, tokens, C), 2x2 latent patches packed
            return 2 * int(round(int(shape[1]) ** 0.5))
    if verb == "calib" and getattr(args, "size", None):
        from hprune.calib import size_vae_scale

        scale = size_vae_scale(args.model)  # None: a tiny built-in's stand-in VAE (its default size)
        if scale:
            return max(1, int(args.size) // scale)
    return None


def _flag(key: str, value) -> str:
    if key == "devices":
        return f"torchrun --nproc-per-node {value} (FSDP2)"
    if key == "optimizer":
        return f"--optimizer {value}"
    if value is True:
        return "--" + key.replace("_", "-")
    return f"--{key.replace('_', '-')} {value}"


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
