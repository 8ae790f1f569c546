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

HELP = "blocks, components, parameters and bytes of a model"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--group-size", type=int, default=64, help="4-bit group size for the byte estimate (default 64, "
                   "as hprune.quant.quantize_model)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--config", help="config.json for a lone .safetensors MODEL")


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

    if args.json:
        print(json.dumps({**rep, "extension": build_info()}, indent=2))
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
    print(f"{args.model}: {rep['class']} ({rep['family']}), {rep['num_blocks']} blocks")
    print(format_table(rows, ["#", "block", "kind", "params"] + comps))
    print()
    print(format_table([
        {"": "parameters", "total": human_count(rep["params"]), "in blocks": human_count(rep["block_params"]),
         "outside blocks": human_count(rep["other_params"])},
    ], ["", "total", "in blocks", "outside blocks"]))
    print()
    print(format_table([
        {"format": "as stored", "bytes": human_bytes(rep["bytes_stored"])},
        {"format": "bf16", "bytes": human_bytes(rep["bytes_bf16"])},
        {"format": f"INT4 g{args.group_size} (block Linears) + bf16 rest", "bytes": human_bytes(rep["bytes_int4"])},
    ], ["format", "bytes"]))
    print()
    print(describe_build())
    return 0
