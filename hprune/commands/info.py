"""Show a model's blocks, their removable components and parameter counts, and its size in bytes
at bf16 and at INT4 (hprune's default format: asymmetric, group 64, bf16 scale and zero; the Linear
weights inside the blocks quantised, as `hprune compress` does).

MODEL is a built-in name (tiny-sd3, tiny-sd35, tiny-flux, shapes-teacher, sd3.5-large, sd3.5-medium,
flux.1-schnell, flux.1-dev), a local diffusers model or pipeline folder, a .safetensors file
with its config.json, or an hprune artifact folder. Real-size built-ins are instantiated on the
meta device: counting needs no memory."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

HELP = "blocks, components, parameters and bytes of a model"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--group-size", type=int, default=64, help="4-bit group size for the byte estimate (default 64, "
                   "as hprune.quant.quantize_model)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--config", help="config.json for a lone .safetensors MODEL")


def _step_line(step: dict[str, Any]) -> str:
    """One recipe step in words."""
    op = step.get("op")
    if op == "prune":
        plan = step.get("plan", {})
        entries = plan.get("entries", [])
        blocks = sorted(e["block"] for e in entries if e.get("component") == "block")
        comps = [f"{e['component']}@{e['block']}" for e in entries if e.get("component") != "block"]
        meta = plan.get("meta", {})
        ratio = meta.get("achieved_ratio", meta.get("ratio"))
        return (f"prune ({plan.get('method', '?')} plan{f', {ratio:.1%} of the parameters' if ratio else ''}): "
                f"{len(blocks)} block{'s' * (len(blocks) != 1)} removed{f' {blocks}' if blocks else ''}, "
                f"{len(comps)} component{'s' * (len(comps) != 1)}"
                + (f" ({', '.join(comps[:8])}{' ...' if len(comps) > 8 else ''})" if comps else ""))
    if op == "quantize":
        method = {"gptq": "GPTQ", "rtn": "round to nearest"}.get(step.get("method", "rtn"), step.get("method"))
        layer = "W4A8Linear (FP8 activations)" if step.get("act") == "fp8" else "W4A16Linear (bf16/fp16 activations)"
        if step.get("backend") == "bnb":
            layer = "bitsandbytes Linear4bit"
        return (f"quantize: {len(step.get('modules', []))} Linear layers to 4 bits, {step.get('fmt')} group "
                f"{step.get('group_size')}, {method} -> {layer}")
    if op == "shrink":
        return f"shrink (OBS-Diff structured): {len(step.get('sites', []))} sites lost heads / neurons"
    if op == "sparsity":
        return (f"sparsity (OBS-Diff): {step.get('method')} {step.get('pattern')} "
                f"{step.get('sparsity')} (zeros in dense tensors: same bytes)")
    if op == "quant_act":
        return f"activations: {step.get('act')} on {len(step.get('modules', []))} layers"
    return str(op)


def describe_artifact(art: Path) -> list[str]:
    """What an hprune artifact is, in lines: base class, where it came from, the recipe in order,
    the weights file."""
    from hprune.artifacts import read_recipe
    from hprune.report import human_bytes

    doc = read_recipe(art)
    v = doc.get("versions", {})
    lines = [f"hprune artifact {art} (written {str(doc.get('created', '?'))[:10]} by hprune {v.get('hprune', '?')}, "
             f"torch {v.get('torch', '?')}, diffusers {v.get('diffusers', '?')})"]
    src = (doc.get("extra") or {}).get("compress")
    lines.append(f"  base: {doc['class_name']}" + (f", from `hprune compress {src.get('model')}` (ratio "
                                                   f"{src.get('ratio')}, --quant {src.get('quant')})"
                                                   if isinstance(src, dict) else ""))
    steps = doc.get("recipe") or []
    lines.append("  recipe, in order:" if steps else "  recipe: none (the base model's weights as they are)")
    lines += [f"    {i}. {_step_line(s)}" for i, s in enumerate(steps, 1)]
    w = doc.get("weights", {})
    lines.append(f"  weights file: {w.get('file')}, {human_bytes(w.get('bytes', 0))} (tensors and header), "
                 f"{w.get('tensors', '?')} tensors")
    return lines


def _quantized(model: Any) -> str | None:
    """How the model's Linears are already 4-bit (from its recipe), or None."""
    from hprune import recipe

    q = [s for s in recipe.get_recipe(model) if s.get("op") == "quantize"]
    if not q:
        return None
    s = q[-1]
    return f"{s.get('fmt')} g{s.get('group_size')}" + (", GPTQ" if s.get("method") == "gptq" else "")


def run(args: argparse.Namespace) -> int:
    from hprune.loading import load_model
    from hprune.models import model_report
    from hprune.models.registry import BUILTINS
    from hprune.report import format_table, human_bytes, human_count

    from hprune import formats as F

    F.check_group_size(args.group_size)  # the same rule as quantize / compress, before loading
    # everything but a tiny built-in is counted on the meta device: a folder, file or artifact from
    # its safetensors headers, without reading (or checking) a single weight
    meta = None if args.model in BUILTINS and BUILTINS[args.model].tiny else True
    model = load_model(args.model, meta=meta, config=args.config)
    rep = model_report(model, int4_group=args.group_size)
    from hprune._ext import build_info, describe_build

    from hprune.threads import current

    if args.json:
        threads = current()
        print(json.dumps({**rep, "extension": build_info(), "threads": {"count": threads.threads,
                                                                         "reason": threads.reason},
                          "quantized": _quantized(model)}, indent=2))
        return 0
    comps = sorted({c for b in rep["blocks"] for c in b["components"] if c != "block"})
    rows = []
    for b in rep["blocks"]:
        row = {"#": b["index"], "block": b["name"], "kind": b["kind"], "params": human_count(b["params"])}
        for c in comps:
            row[c] = human_count(b["components"][c]) if c in b["components"] else ("removed" if c in b["removed"] else "-")
        if b["removed"] == ["block"]:
            row["params"] = "removed"
        rows.append(row)
    from hprune.models.registry import artifact_in

    art = artifact_in(Path(args.model)) if args.model not in BUILTINS else None
    if art is not None:
        print("\n".join(describe_artifact(art)))
    print(f"{args.model}: {rep['class']} ({rep['family']}), {rep['num_blocks']} blocks")
    print(format_table(rows, ["#", "block", "kind", "params"] + comps))
    print()
    print(format_table([
        {"": "parameters", "total": human_count(rep["params"]), "in blocks": human_count(rep["block_params"]),
         "outside blocks": human_count(rep["other_params"])},
    ], ["", "total", "in blocks", "outside blocks"]))
    print()
    quant = _quantized(model)
    rest = next((str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.is_floating_point()), "")
    if quant is None:
        byte_rows = [
            {"format": "as stored", "bytes": human_bytes(rep["bytes_stored"]),
             "what it counts": "every tensor at the dtype it has now"},
            {"format": "bf16", "bytes": human_bytes(rep["bytes_bf16"]),
             "what it counts": "floating-point tensors at 2 bytes each"},
            {"format": f"INT4 g{args.group_size} (block Linears) + bf16 rest", "bytes": human_bytes(rep["bytes_int4"]),
             "what it counts": "estimate: what `hprune quantize` would store"}]
    else:  # already 4-bit: an "INT4" estimate would only repeat the bf16 row
        byte_rows = [
            {"format": "as stored", "bytes": human_bytes(rep["bytes_stored"]),
             "what it counts": f"4-bit block Linears ({quant}: packed codes + scales), the rest at {rest}"},
            {"format": "rest at bf16", "bytes": human_bytes(rep["bytes_bf16"]),
             "what it counts": "the same 4-bit Linears; the other floating-point tensors at 2 bytes each"}]
    print(format_table(byte_rows, ["format", "bytes", "what it counts"]))
    print()
    print(current().describe())
    print(describe_build())  # the last line: which build this is (scripts read it)
    return 0
