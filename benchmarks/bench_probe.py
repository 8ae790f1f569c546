"""ΔP probing: activation reuse vs the naive way (a full forward per probe).

Both produce identical tables (tests/test_probe.py); this measures the time. Models: the
built-in tiny ones plus a deeper SD3-shaped model (24 blocks) where the saving approaches the
(|B|+1)/(2|B|) block-count ratio. CPU: one thread, process time; GPU: wall time after sync.

    python benchmarks/bench_probe.py [--device cuda]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import env_info, print_table, write_results  # noqa: E402
from hprune.calib import synthetic  # noqa: E402
from hprune.loading import load_model  # noqa: E402
from hprune.models import get_adapter  # noqa: E402
from hprune.models.registry import BUILTINS, build_from_config  # noqa: E402
from hprune.probe import probe_sensitivity  # noqa: E402

DEEP_SD3 = {**BUILTINS["tiny-sd3"].config, "num_layers": 24, "num_attention_heads": 4, "attention_head_dim": 32,
            "caption_projection_dim": 128}


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t
    t = time.process_time()
    fn()
    return time.process_time() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--samples", type=int, default=8)
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    models = [("tiny-sd3", load_model("tiny-sd3")), ("tiny-flux", load_model("tiny-flux")),
              ("sd3-24-blocks", build_from_config("SD3Transformer2DModel", DEEP_SD3, seed=0))]
    rows = []
    for name, model in models:
        model = model.to(device)
        cal = synthetic(model, n_prompts=2, num_steps=4, seed=0)
        kw = dict(batch_size=4, max_samples=args.samples, progress=False)
        probe_sensitivity(model, cal, **{**kw, "max_samples": 2})  # warm-up
        t_naive = timed(lambda: probe_sensitivity(model, cal, reuse=False, **kw), device)
        t_reuse = timed(lambda: probe_sensitivity(model, cal, reuse=True, **kw), device)
        n_probes = len(probe_sensitivity(model, cal, **{**kw, "max_samples": 1}).pieces())
        rows.append({"model": name, "blocks": get_adapter(model).num_blocks(model),
                     "probes": n_probes, "samples": args.samples, "naive_s": round(t_naive, 3),
                     "reuse_s": round(t_reuse, 3), "speedup": round(t_naive / t_reuse, 2)})
    print_table(rows, ["model", "blocks", "probes", "samples", "naive_s", "reuse_s", "speedup"],
                title=f"ΔP probing, naive vs activation reuse ({env_info(device)['device']}; "
                      f"{'1 thread, process time' if device.type == 'cpu' else 'wall time'})")
    write_results("probe", {"env": env_info(device), "rows": rows}, device)


if __name__ == "__main__":
    main()
