"""Peak memory of saving and loading an artifact, and of `hprune quantize --method rtn`, on a
random-weight SD3.5-Medium-shaped transformer with a few blocks (bf16, the real pos_embed of
384x384 positions: one 453 MB tensor).

Each measurement runs in a fresh process and reads the high-water mark of its resident memory
(/proc/self/status VmHWM, reset through /proc/self/clear_refs just before the measured call):

    save     extra peak of save_compressed(model) over the loaded model
    load     extra peak of load_compressed(artifact) over the process before it (diffusers already
             imported): the file's pages, read through mmap, are the model's memory, so one file's
             worth means no copy
    quantize peak resident memory of a whole `hprune quantize MODEL --method rtn --eval-samples 0`
             run (its process's ru_maxrss) and its wall time

It measures whichever hprune is importable: run it once with the code before a change on
PYTHONPATH and once after, with --label, to compare (the JSON records the hprune path and commit).

    PYTHONPATH=/path/to/old python benchmarks/bench_save_memory.py --label before
    python benchmarks/bench_save_memory.py --label after
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # after PYTHONPATH: the hprune measured is the one on PYTHONPATH

_MEASURE = """
import json, os, sys, torch
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
def rss(key):
    for line in open('/proc/self/status'):
        if line.startswith(key + ':'):
            return int(line.split()[1]) * 1024
def measure(fn):
    before = rss('VmRSS')
    open('/proc/self/clear_refs', 'w').write('5')
    fn()
    return rss('VmHWM') - before
"""

_MAKE = _MEASURE + """
from hprune.models.registry import BUILTINS, build_from_config
blocks, folder = int(sys.argv[1]), sys.argv[2]
cfg = dict(BUILTINS["sd3.5-medium"].config, num_layers=blocks,
           dual_attention_layers=tuple(range(min(blocks, 13))))
m = build_from_config("SD3Transformer2DModel", cfg, seed=0, dtype=torch.bfloat16)
m.save_pretrained(folder)
sd = m.state_dict()
print(json.dumps({"model_bytes": sum(t.numel() * t.element_size() for t in sd.values()),
                  "largest_tensor": max(t.numel() * t.element_size() for t in sd.values()),
                  "tensors": len(sd)}))
"""

_SAVE = _MEASURE + """
from hprune.loading import load_model
from hprune.artifacts import save_compressed
m = load_model(sys.argv[1])
extra = measure(lambda: save_compressed(m, sys.argv[2]))
print(json.dumps({"save_extra": extra, "file_bytes": os.path.getsize(sys.argv[2] + "/model.safetensors")}))
"""

_QUANTIZE = """
import json, resource, sys, time
from hprune.cli import main
t0 = time.perf_counter()
rc = main(["quantize", sys.argv[1], "--method", "rtn", "--eval-samples", "0", "--device", "cpu", "--out", sys.argv[2]])
assert rc == 0
print(json.dumps({"quantize_s": round(time.perf_counter() - t0, 1),
                  "quantize_peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""

_LOAD = _MEASURE + """
from hprune.artifacts import load_compressed
import diffusers.models.transformers.transformer_sd3  # imports (~350 MB of code and data) before the measure
extra = measure(lambda: load_compressed(sys.argv[1]))
print(json.dumps({"load_extra": extra}))
"""


def _child(code: str, *args: str) -> dict:
    # run outside the repository, so that the hprune on PYTHONPATH is the one imported
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=tempfile.gettempdir())
    if r.returncode:
        raise SystemExit(f"child failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--label", default="current")
    p.add_argument("--no-quantize", action="store_true", help="skip the quantize run")
    p.add_argument("--workdir", help="where the model folder goes (default: a temporary folder)")
    args = p.parse_args()

    import hprune
    from benchmarks.common import env_info, print_table, write_results
    from hprune.report import human_bytes

    src = Path(hprune.__file__).resolve().parents[1]
    commit = subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        folder = Path(tmp) / "model"
        res: dict = {"blocks": args.blocks, "label": args.label, "hprune_path": str(src), "hprune_commit": commit}
        res.update(_child(_MAKE, str(args.blocks), str(folder)))
        res.update(_child(_SAVE, str(folder), str(Path(tmp) / "art")))
        res.update(_child(_LOAD, str(Path(tmp) / "art")))
        if not args.no_quantize:
            res.update(_child(_QUANTIZE, str(folder), str(Path(tmp) / "q")))
            res["quantized_bytes"] = os.path.getsize(Path(tmp) / "q" / "model.safetensors")
    rows = [{"what": k, "value": v if k in ("blocks", "tensors", "quantize_s") else human_bytes(v)}
            for k, v in res.items() if isinstance(v, (int, float))]
    print_table(rows, ["what", "value"], title=f"SD3.5-Medium shapes, {args.blocks} blocks, bf16 random weights; "
                f"hprune {src} ({commit}), {args.label}")
    write_results(f"save_memory-{args.label}", {"env": env_info("cpu"), "threads": os.environ.get("OMP_NUM_THREADS"),
                                                "results": res}, "cpu", out_dir=ROOT / "benchmarks" / "results")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
