"""Fidelity of a compressed transformer to its reference: how far the predicted velocity moves.

Without image-quality models offline, quality is measured as fidelity to the unpruned model
(DESIGN §4): relative MSE  ||v - v_ref||^2 / ||v_ref||^2  and cosine similarity of the flattened
velocity, averaged over inputs (calibration samples / timesteps)."""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn as nn

Metric = Callable[[torch.Tensor, torch.Tensor], float]


def rel_mse(pred: torch.Tensor, ref: torch.Tensor) -> float:
    """||pred - ref||^2 / ||ref||^2 over all elements (0 = identical), computed in float64."""
    p, r = pred.double(), ref.double()
    return float(((p - r) ** 2).sum() / (r ** 2).sum().clamp_min(1e-30))


def rel_l2(pred: torch.Tensor, ref: torch.Tensor) -> float:
    """||pred - ref|| / ||ref|| (the square root of rel_mse), computed in float64."""
    return rel_mse(pred, ref) ** 0.5


def cosine_distance(pred: torch.Tensor, ref: torch.Tensor) -> float:
    """1 - cosine similarity per sample, averaged over the batch (0 = same direction)."""
    p, r = pred.double().flatten(1), ref.double().flatten(1)
    return float((1 - torch.nn.functional.cosine_similarity(p, r, dim=1)).mean())


METRICS: dict[str, Metric] = {"rel_mse": rel_mse, "cosine": cosine_distance}


def resolve_metric(metric: str | Metric) -> Metric:
    if callable(metric):
        return metric
    try:
        return METRICS[metric]
    except KeyError:
        raise ValueError(f"unknown metric {metric!r}; choose from {sorted(METRICS)} or pass a callable") from None


@torch.no_grad()
def predict(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**inputs, return_dict=False)[0]


@torch.no_grad()
def fidelity(reference: nn.Module, candidate: nn.Module, batches: Iterable[dict[str, torch.Tensor]],
             metrics: Iterable[str] = ("rel_mse", "cosine")) -> dict[str, float]:
    """Mean of each metric between the candidate's and the reference's predictions over `batches`."""
    fns = {m: resolve_metric(m) for m in metrics}
    sums = {m: 0.0 for m in fns}
    n = 0
    for x in batches:
        ref, pred = predict(reference, x), predict(candidate, x)
        for m, f in fns.items():
            sums[m] += f(pred.float(), ref.float())
        n += 1
    return {m: s / max(n, 1) for m, s in sums.items()}
