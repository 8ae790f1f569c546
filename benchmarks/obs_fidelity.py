"""Quality side of OBS-Diff, measured on the CPU: how far pruning moves outputs, OBS vs Wanda vs
magnitude, at the same sparsity.

1. One Linear with correlated inputs (a few strong shared directions + mixed noise, per-feature
   scales, like transformer activations): relative output error ||(W - W')X||² / ||WX||² on
   held-out inputs, at 50% unstructured, 2:4 and 4:8.
2. The tiny built-in models (random weights, seeded): relative MSE and cosine distance of the
   predicted velocity against the unpruned model, on held-out denoising inputs (a calibration
   set with other prompts and noise than the one used for pruning), for 50% unstructured, 2:4
   and 30% structured; OBS with log-decrease weighting, K=1 and K=4 groups.
Random-weight tiny models have no learned structure, so these numbers compare methods; they do
not predict image quality of real checkpoints.

    python -m benchmarks.obs_fidelity
"""
from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import env_info, print_table, write_results  # noqa: E402


def layer_errors() -> list[dict]:
    from hprune.obs import magnitude_prune, prune_linear, wanda_prune

    g = torch.Generator().manual_seed(0)
    d, out = 256, 96
    A = torch.randn(d, d, generator=g) / d ** 0.5 + 3 * torch.randn(d, 8, generator=g) @ torch.randn(8, d, generator=g) / d ** 0.5
    scales = torch.exp(0.5 * torch.randn(d, generator=g))
    sample = lambda n: (torch.randn(n, d, generator=g) @ A) * scales  # noqa: E731
    W = torch.randn(out, d, generator=g)
    Xc, Xt = sample(2048), sample(2048)
    H = Xc.T @ Xc / len(Xc)
    err = lambda Wp: float(((W - Wp) @ Xt.T).square().sum() / (W @ Xt.T).square().sum())  # noqa: E731
    rows = []
    for pat in ("unstructured", "2:4", "4:8"):
        s = 0.5 if pat == "unstructured" else None
        rows.append({"pattern": pat, "obs": round(err(prune_linear(W, H, s, pat)), 5),
                     "wanda": round(err(wanda_prune(W, H, s, pat)), 5),
                     "magnitude": round(err(magnitude_prune(W, s, pat)), 5)})
    return rows


def model_fidelity(name: str) -> list[dict]:
    from hprune.calib import synthetic
    from hprune.metrics import cosine_distance, predict, rel_mse
    from hprune.loading import load_model
    from hprune.obs import obs_prune_model

    base = load_model(name)
    calib = synthetic(base, n_prompts=4, num_steps=8, seed=0)
    held_out = synthetic(base, n_prompts=2, num_steps=8, seed=100)
    batches = list(held_out.batches(batch_size=4))
    refs = [predict(base, x) for x in batches]
    rows = []
    for pattern, s in (("unstructured", 0.5), ("2:4", None), ("structured", 0.3)):
        for method, groups in (("obs", 1), ("obs", 4), ("wanda", 1), ("magnitude", 1)):
            m = copy.deepcopy(base)
            t0 = time.perf_counter()
            rep = obs_prune_model(m, calib, s, pattern, groups=groups, method=method)
            secs = time.perf_counter() - t0
            preds = [predict(m, x) for x in batches]
            rows.append({"model": name, "pattern": pattern, "method": method, "groups": groups,
                         "rel_mse": float(f"{sum(rel_mse(p, r) for p, r in zip(preds, refs)) / len(refs):.4g}"),
                         "cosine": float(f"{sum(cosine_distance(p, r) for p, r in zip(preds, refs)) / len(refs):.4g}"),
                         "params": rep["params_after"], "seconds": round(secs, 1)})
    return rows


def main() -> int:
    device = torch.device("cpu")
    layer = layer_errors()
    print_table(layer, ["pattern", "obs", "wanda", "magnitude"],
                title="one Linear (256 -> 96), correlated inputs: relative output error on held-out inputs")
    models = []
    for name in ("tiny-sd3", "tiny-sd35", "tiny-flux"):
        rows = model_fidelity(name)
        models += rows
        print_table(rows, ["model", "pattern", "method", "groups", "rel_mse", "cosine", "params", "seconds"],
                    title=f"{name}: velocity vs the unpruned model on held-out denoising inputs")
    write_results("obs-fidelity", {"env": env_info(device), "layer": layer, "models": models}, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
