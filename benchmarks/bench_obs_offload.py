"""`hprune obs` block by block at real block shapes: a random-weight folder with the real
SD3.5-Medium (or -Large / FLUX.1) per-block shapes and fewer blocks (bench_scale.build_folder), a
small calibration set captured on it (`hprune calib`), then structured (or any --pattern) OBS-Diff
timed with its peak anonymous memory (bench_scale.run_stage: RssAnon sampled from /proc every
20 ms), block by block (bf16 on a CPU: automatic) and, for comparison, resident in float32
(`--dtype float32`: the whole model in anonymous memory, the denoising loop re-run).

Writes benchmarks/results/obs-offload-<model>-<blocks>-<host>.json and prints a Markdown table. One run per row
(no median: each takes minutes on the shared 2-core machine); times on a busy CPU are upper bounds.

    python benchmarks/bench_obs_offload.py --model sd3.5-medium --blocks 2 --size 256
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_scale import build_folder, run_stage  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    import diffusers
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="sd3.5-medium", help="sd3.5-medium, sd3.5-large or flux.1-dev")
    ap.add_argument("--blocks", type=int, default=2, help="blocks in the folder")
    ap.add_argument("--size", type=int, default=256, help="calibration image size in pixels")
    ap.add_argument("--steps", type=int, default=2, help="calibration denoising steps")
    ap.add_argument("--prompts", type=int, default=1, help="calibration prompts")
    ap.add_argument("--pattern", default="structured")
    ap.add_argument("--sparsity", default="0.3")
    ap.add_argument("--resident", action=argparse.BooleanOptionalAction, default=True,
                    help="also run the resident float32 path for comparison (default on)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per stage")
    args = ap.parse_args(argv)

    hp = [sys.executable, "-m", "hprune"]
    work = Path(tempfile.mkdtemp(prefix="hprune-obs-offload-"))
    rows = []
    try:
        folder = work / "model"
        info = build_folder(args.model, args.blocks, folder)
        calib = work / "calib.safetensors"
        obs = hp + ["obs", str(folder), "--calib", str(calib), "--device", "cpu", "--pattern", args.pattern,
                    "--eval-samples", "0", "--json", "--overwrite"]
        if ":" not in args.pattern:  # N:M patterns imply their sparsity
            obs += ["--sparsity", args.sparsity]
        stages = [("calib", hp + ["calib", str(folder), "--out", str(calib), "--device", "cpu", "--num-prompts",
                                  str(args.prompts), "--steps", str(args.steps), "--size", str(args.size)]),
                  ("obs --offload (bf16 storage, fp32 compute)", obs + ["--out", str(work / "off")])]
        if args.resident:
            stages.append(("obs resident (--dtype float32)", obs + ["--out", str(work / "res"), "--dtype", "float32"]))
        for stage, cmd in stages:
            r = run_stage(cmd, args.timeout)
            text = r.pop("out")
            row = {"model": args.model, "stage": stage, **info, **r}
            if stage.startswith("obs") and r["rc"] == 0 and "{" in text:
                rep = json.loads(text[text.index("{"):])
                row["report"] = {k: rep.get(k) for k in ("offload", "params_before", "params_after", "seconds")}
                row.pop("tail")
            rows.append(row)
            print(f"{stage}: {r['wall_s']} s wall, {r['cpu_s']} s CPU, peak anon {r['peak_anon'] / 1e9:.2f} GB, "
                  f"rc {r['rc']}", flush=True)
            if r["rc"] != 0:
                print(row.get("tail", ""), file=sys.stderr)
                break
    finally:
        shutil.rmtree(work, ignore_errors=True)
    doc = {"benchmark": "bench_obs_offload", "host": platform.node(), "cpus": os.cpu_count(),
           "threads": torch.get_num_threads(), "device": "cpu", "torch": torch.__version__,
           "diffusers": diffusers.__version__, "python": platform.python_version(),
           "settings": {k: getattr(args, k) for k in ("model", "blocks", "size", "steps", "prompts", "pattern",
                                                       "sparsity")},
           "note": "one run per row on a busy shared CPU: wall times are upper bounds, CPU times comparable",
           "results": rows}
    out = ROOT / "benchmarks" / "results" / f"obs-offload-{args.model}-{args.blocks}-{platform.node() or 'host'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2, default=str))
    print(f"| model shape | blocks | params | stage | wall s | CPU s | peak anon GB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['blocks']} | {r['params'] / 1e9:.2f} B | {r['stage']} | {r['wall_s']} | "
              f"{r['cpu_s']} | {r['peak_anon'] / 1e9:.2f} |")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
