"""Real-shape scale benchmark: random-weight folders with the real SD3.5-Medium / SD3.5-Large /
FLUX.1 block shapes (diffusers' own classes and config, bf16 safetensors sharded as diffusers
writes big models, built block by block so a full 16 GB SD3.5-Large needs ~2 GB of memory; fewer
blocks than the real models where wanted), and each CLI stage timed with its peak
anonymous memory (RssAnon of the child process and its children, sampled from /proc every 20 ms;
memory-mapped weights are file pages and do not count). Each stage runs at two block counts so a
per-block slope extrapolates to the full depth:

    value(L) = value(n2) + (value(n2) - value(n1)) / (n2 - n1) * (L - n2)

Writes benchmarks/results/scale-<host or --name>.json (rewritten after every stage, so a run
stopped part way keeps what it measured) and prints a Markdown table (docs/scale.md holds the
measured one). Times on a busy shared CPU are upper bounds.

    python benchmarks/bench_scale.py --models sd3.5-medium --blocks 1,2 --stages info,dry-run,rtn

Stages (--stages, any subset; one folder's stages share its outputs): info, dry-run (quantize's),
rtn, calib (1 stand-in prompt x 2 steps at 256 px: the set the others read), gptq, obs (2:4),
obs-structured (30 %), probe (1 sample, blocks only), plan (a manual plan removing the last block)
and prune (applies it). A stage that reads another's output (gptq, obs, obs-structured and probe
the calibration set, prune the plan) gets that stage run first on the same folder, added by itself
when not asked for (`ordered_stages`). Every stage's verb also runs its `--dry-run` (in-process,
as JSON): the plan's predicted host anonymous peak goes beside the measurement (`prune` has no
--dry-run; its row is the same planner's `prune` verb).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("info", "dry-run", "rtn", "calib", "gptq", "obs", "obs-structured", "probe", "plan", "prune")
# a stage that reads another stage's output (on the same folder) -> that stage
NEEDS = {"gptq": "calib", "obs": "calib", "obs-structured": "calib", "probe": "calib", "prune": "plan"}
# the calibration set the stages share: small work, so a real-shape block finishes in minutes on a CPU
CALIB_ARGS = ["--num-prompts", "1", "--steps", "2", "--size", "256"]


SHARD_BYTES = 2 * 10**9  # bf16 bytes per weights file of a built folder (a few blocks each)


def build_folder(name: str, blocks: int, out: Path, shard_bytes: int = SHARD_BYTES) -> dict:
    """A diffusers folder with `name`'s real config but `blocks` blocks (FLUX: double and single
    blocks in the real 19:38 proportion, at least one of each), random bf16 weights, written block
    by block: the model is built on the meta device and one block (or the non-block modules) at a
    time gets real weights, goes into the current weights file and is dropped, so a 16 GB
    SD3.5-Large folder needs about one file's bytes of memory. Sharded as diffusers writes big
    models: `diffusion_pytorch_model-0000i-of-0000n.safetensors` of at most `shard_bytes` each
    (metadata format "pt"), the index `diffusion_pytorch_model.safetensors.index.json` and
    config.json; hprune reads every .safetensors file of the folder (models.registry.weight_files)."""
    import torch

    from hprune.io import save_safetensors, write_json
    from hprune.models.adapters import get_adapter
    from hprune.models.registry import BUILTINS, build_from_config, randomize_

    b = BUILTINS[name]
    cfg = dict(b.config)
    if b.class_name == "FluxTransformer2DModel":
        double = max(1, round(blocks / 3))
        cfg.update(num_layers=double, num_single_layers=max(1, blocks - double))
        full = b.config["num_layers"] + b.config["num_single_layers"]
    else:
        cfg["num_layers"] = blocks
        cfg["dual_attention_layers"] = tuple(i for i in b.config.get("dual_attention_layers", ()) if i < blocks)
        full = b.config["num_layers"]
    model = build_from_config(b.class_name, cfg, meta="params")
    lists = get_adapter(model).lists
    # the parts, in file order: the non-block modules, then each block
    parts: list[tuple[str, torch.nn.Module]] = [(n, m) for n, m in model.named_children() if n not in lists]
    parts += [(f"{ln}.{j}", blk) for ln in lists for j, blk in enumerate(getattr(model, ln))]

    def part_bytes(m: torch.nn.Module) -> int:
        return sum(t.numel() * 2 if t.is_floating_point() else t.numel() * t.element_size()
                   for t in m.state_dict().values())

    shards: list[list[tuple[str, torch.nn.Module]]] = [[]]
    size = 0
    for prefix, m in parts:
        nb = part_bytes(m)
        if shards[-1] and size + nb > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((prefix, m))
        size += nb
    out.mkdir(parents=True)
    model.save_config(out)
    weight_map: dict[str, str] = {}
    total = params = 0
    for k, shard in enumerate(shards):
        fname = f"diffusion_pytorch_model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors: dict[str, torch.Tensor] = {}
        for i, (prefix, m) in enumerate(shard):
            randomize_(m, "cpu", torch.bfloat16, seed=1000 * k + i)
            params += sum(p.numel() for p in m.parameters())
            tensors.update({f"{prefix}.{n}": t.detach() for n, t in m.state_dict().items()})
        save_safetensors(tensors, out / fname, metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({n: fname for n in tensors})
        del tensors
        for _, m in shard:
            m.to("meta")  # drop the block's weights before the next file
    write_json(out / "diffusion_pytorch_model.safetensors.index.json",
               {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    del model
    return {"blocks": blocks, "full_blocks": full, "bytes": size, "params": params, "files": len(shards)}


def _anon(pid: int) -> int:
    total = 0
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        kids = []
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                total += int(line.split()[1]) * 1024
    except OSError:
        return 0
    return total + sum(_anon(int(k)) for k in kids)


def run_stage(cmd: list[str], timeout: float) -> dict:
    """Runs `cmd`; wall seconds, CPU seconds, peak RssAnon (sampled), return code, output tail."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    r0 = os.times()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _anon(proc.pid))
            time.sleep(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        out, _ = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        rc = "timeout"
    done.set()
    th.join()
    r1 = os.times()
    return {"wall_s": round(time.perf_counter() - t0, 2),
            "cpu_s": round((r1.children_user - r0.children_user) + (r1.children_system - r0.children_system), 2),
            "peak_anon": peak[0], "rc": rc, "tail": (out or "")[-600:], "out": out or ""}


def ordered_stages(stages: list[str]) -> list[str]:
    """`stages` in the order given, each stage's prerequisite (NEEDS) put before it when it is not
    already earlier; ValueError for an unknown stage. E.g. [prune, gptq] -> [plan, prune, calib, gptq]."""
    out: list[str] = []
    for s in stages:
        if s not in STAGES:
            raise ValueError(f"unknown stage {s!r}: use {', '.join(STAGES)}")
        chain = [s]
        while chain[-1] in NEEDS:
            chain.append(NEEDS[chain[-1]])
        out += [c for c in reversed(chain) if c not in out]
    return out


def stage_cmd(stage: str, folder: Path, out: Path) -> list[str]:
    """The `python -m hprune ...` command of `stage` on `folder`; its outputs go under `out` (one
    folder's stages share it: calib writes out/calib.safetensors, plan out/plan.json)."""
    hp = [sys.executable, "-m", "hprune"]
    m, calib, plan = str(folder), str(out / "calib.safetensors"), str(out / "plan.json")
    dev = ["--device", "cpu"]
    if stage == "info":
        return hp + ["info", m]
    if stage == "dry-run":
        return hp + ["quantize", m, "--out", str(out / "rtn"), *dev, "--dry-run", "--json"]
    if stage == "rtn":
        return hp + ["quantize", m, "--out", str(out / "rtn"), *dev, "--method", "rtn", "--eval-samples", "0",
                     "--overwrite"]
    if stage == "calib":
        return hp + ["calib", m, "--out", calib, *dev, *CALIB_ARGS, "--overwrite"]
    if stage == "gptq":
        return hp + ["quantize", m, "--out", str(out / "gptq"), *dev, "--method", "gptq", "--calib", calib,
                     "--eval-samples", "0", "--overwrite"]
    if stage == "obs":
        return hp + ["obs", m, "--out", str(out / "obs"), *dev, "--calib", calib, "--pattern", "2:4",
                     "--eval-samples", "0", "--overwrite"]
    if stage == "obs-structured":
        return hp + ["obs", m, "--out", str(out / "obs-structured"), *dev, "--calib", calib,
                     "--pattern", "structured", "--sparsity", "0.3", "--eval-samples", "0", "--overwrite"]
    if stage == "probe":
        return hp + ["probe", m, "--out", str(out / "probe"), *dev, "--calib", calib, "--max-samples", "1",
                     "--batch-size", "1", "--granularity", "block", "--overwrite"]
    if stage == "plan":
        return hp + ["plan", "--method", "manual", "--blocks", str(num_blocks(folder) - 1), "--model", m,
                     "--out", plan, "--overwrite"]
    if stage == "prune":
        return hp + ["prune", m, "--plan", plan, "--out", str(out / "prune"), "--overwrite"]
    raise ValueError(stage)


def num_blocks(folder: Path) -> int:
    """Transformer blocks of a built folder (FLUX: double + single), from its config.json."""
    cfg = json.loads((folder / "config.json").read_text())
    return int(cfg["num_layers"]) + int(cfg.get("num_single_layers", 0) or 0)


def predict(stage: str, folder: Path, out: Path) -> dict | None:
    """The plan (`--dry-run --json`, run in this process: it reads only the config, the safetensors
    headers and the calibration set's header) for the stage's own command, or None for stages
    that load no model (info, dry-run, plan). `prune` has no --dry-run: the planner's `prune` verb
    for the same model. Returns {"stages": [...], "host_peak": max host bytes, "at": that stage}."""
    if stage in ("info", "dry-run", "plan"):
        return None
    from hprune.cli import build_parser
    from hprune.commands.plan_memory import print_plan

    argv = stage_cmd(stage, folder, out)[3:]
    if stage == "prune":
        args = argparse.Namespace(model=str(folder), device="cpu", command="prune")
    else:
        args = build_parser().parse_args(argv + ["--dry-run"])
    args.json = True
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        print_plan(args, args.command)
    stages = json.loads(buf.getvalue())["stages"]
    top = max(stages, key=lambda p: p["host_bytes"])
    return {"stages": stages, "host_peak": top["host_bytes"], "at": top["stage"]}


def extrapolate(rows: list[dict], full: int, key: str) -> float | None:
    pts = sorted((r["blocks"], r[key]) for r in rows if r.get(key) is not None and r.get("rc") == 0)
    if len(pts) < 2:
        return None
    (n1, v1), (n2, v2) = pts[0], pts[-1]
    return v2 + (v2 - v1) / (n2 - n1) * (full - n2)


def results_path(name: str | None) -> Path:
    return ROOT / "benchmarks" / "results" / f"scale-{name or platform.node() or 'host'}.json"


def write_results(out: Path, results: list[dict], models: list[str], stages: list[str]) -> list[dict]:
    """Writes the JSON (every row so far and the per-model summary, extrapolated to full depth);
    called after each stage, so a run stopped part way keeps what it measured. Returns the summary."""
    import torch

    summary = []
    for name in models:
        for stage in stages:
            rows = [r for r in results if r["model"] == name and r["stage"] == stage]
            if not rows:
                continue
            full = rows[0].get("full_blocks")
            summary.append({"model": name, "stage": stage, "full_blocks": full,
                            "measured": [{k: r.get(k) for k in ("blocks", "wall_s", "cpu_s", "peak_anon", "rc",
                                                                "predicted_host_peak")}
                                         for r in rows],
                            "full_wall_s": extrapolate(rows, full, "wall_s") if full else None,
                            "full_cpu_s": extrapolate(rows, full, "cpu_s") if full else None,
                            "full_peak_anon": extrapolate(rows, full, "peak_anon") if full else None})
    doc = {"benchmark": "bench_scale", "host": platform.node(), "cpus": os.cpu_count(),
           "torch": torch.__version__, "python": platform.python_version(),
           "note": "busy shared CPU: times are upper bounds", "results": results, "summary": summary}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str))
    tmp.replace(out)
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="sd3.5-medium", help="comma list of sd3.5-medium, sd3.5-large, flux.1-dev")
    ap.add_argument("--blocks", default="1,2", help="block counts to build (two or more give the per-block slope)")
    ap.add_argument("--stages", default="info,dry-run,rtn", help=f"comma list of {', '.join(STAGES)}")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per stage")
    ap.add_argument("--workdir", default=None, help="where folders are built (default: a temp dir, removed)")
    ap.add_argument("--name", default=None, help="results file benchmarks/results/scale-NAME.json (default: the host)")
    args = ap.parse_args(argv)
    try:
        stages = ordered_stages(args.stages.split(","))
    except ValueError as exc:
        ap.error(str(exc))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="hprune-scale-"))
    results = []
    timed_out: set[tuple[str, str]] = set()
    try:
        for name in args.models.split(","):
            for n in [int(b) for b in args.blocks.split(",")]:
                folder = work / f"{name}-{n}"
                if not folder.exists():
                    t0, c0 = time.perf_counter(), time.process_time()
                    info = build_folder(name, n, folder)
                    info.update(build_wall_s=round(time.perf_counter() - t0, 1),
                                build_cpu_s=round(time.process_time() - c0, 1))
                    print(f"built {folder}: {info}", flush=True)
                else:
                    info = {"blocks": n}
                out = work / f"{name}-{n}-out"
                out.mkdir(parents=True, exist_ok=True)
                for stage in stages:
                    if (name, stage) in timed_out or (name, NEEDS.get(stage)) in timed_out:
                        # a stage past --timeout on fewer blocks is not run again on more
                        results.append({"model": name, "stage": stage, **info, "rc": "skipped",
                                        "why": "timed out on fewer blocks (or its prerequisite did)"})
                        print(f"{name} {n} blocks {stage}: skipped (timed out on fewer blocks)", flush=True)
                        write_results(results_path(args.name), results, args.models.split(","), stages)
                        continue
                    r = run_stage(stage_cmd(stage, folder, out), args.timeout)
                    if r["rc"] == "timeout":
                        timed_out.add((name, stage))
                    text = r.pop("out")
                    row = {"model": name, "stage": stage, **info, **r}
                    if stage == "dry-run" and r["rc"] == 0 and "{" in text:
                        row["predicted"] = json.loads(text[text.index("{"):])
                        row.pop("tail")
                    pred = predict(stage, folder, out) if r["rc"] == 0 else None
                    if pred:
                        row["plan"] = pred
                        row["predicted_host_peak"] = pred["host_peak"]
                    results.append(row)
                    write_results(results_path(args.name), results, args.models.split(","), stages)
                    print(f"{name} {n} blocks {stage}: {r['wall_s']} s wall, {r['cpu_s']} s CPU, "
                          f"peak anon {r['peak_anon'] / 1e9:.2f} GB"
                          + (f" (plan: {pred['host_peak'] / 1e9:.2f} GB at {pred['at']})" if pred else "")
                          + f", rc {r['rc']}", flush=True)
                    if r["rc"] != 0:
                        print(r["tail"], flush=True)
                shutil.rmtree(work / f"{name}-{n}-out", ignore_errors=True)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    out = results_path(args.name)
    summary = write_results(out, results, args.models.split(","), stages)
    print("| model | stage | blocks | wall s | CPU s | peak anon GB | plan: host peak GB "
          "| full depth: wall s | CPU s | peak anon GB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for s in summary:
        for m in s["measured"]:
            plan = m.get("predicted_host_peak")
            if m["rc"] == "skipped":
                print(f"| {s['model']} | {s['stage']} | {m['blocks']} | skipped | | | | | | |")
                continue
            print(f"| {s['model']} | {s['stage']} | {m['blocks']} | {m['wall_s']} | {m['cpu_s']} | "
                  f"{m['peak_anon'] / 1e9:.2f} | {'' if plan is None else f'{plan / 1e9:.2f}'} | | | |")
        if s["full_wall_s"] is not None:
            print(f"| {s['model']} | {s['stage']} | {s['full_blocks']} (extrapolated) | | | | | {s['full_wall_s']:.0f} | "
                  f"{s['full_cpu_s']:.0f} | {s['full_peak_anon'] / 1e9:.2f} |")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
