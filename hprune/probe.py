"""ΔP probing: how much fidelity to the unpruned model is lost when one piece is removed.

ΔP(i, c) = mean over the calibration samples of metric(v_without(i, c), v_full), where v is the
predicted velocity and the default metric is the relative MSE (hprune.metrics). A piece is a
whole block or one of its removable components (hprune.models.blocks.COMPONENT_DOC).

Activations are reused: per calibration batch the unpruned model runs once, keeping each block's
input; the probe of block i then runs only blocks i..end from that cached input, with the piece
ablated by a forward hook (zero output; proven equal to removal by the surgery tests). For a model
of |B| blocks this runs ~(|B|+1)/2 blocks per probe instead of |B| (plus the embeddings).

The same pass records, per block, the cosine similarity of its image-stream input and output
(the KOALA-style ranking signal).

Under torchrun the calibration batches are dealt out to the ranks (batch k to rank k mod N), each
rank probes every piece on its own batches with its replica of the model, and the sums are
all-reduced: N ranks probe ~N x faster and every rank ends with the same table (equal to the
1-process one up to float64 summation order).
"""
from __future__ import annotations

import os
import time
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn

from hprune import dist as hdist
from hprune import recipe
from hprune.calib import CalibrationSet
from hprune.errors import HpruneError
from hprune.metrics import Metric, resolve_metric
from hprune.models.ablation import ablate
from hprune.models.adapters import get_adapter, model_class_name
from hprune.models.registry import fingerprint, model_config
from hprune.models.stats import param_count

TABLE_FORMAT = "hprune.sensitivity/1"
DEFAULT_MAX_SAMPLES = 32  # calibration samples probed by default (hprune probe and hprune compress alike)
NEGATIVE_TOLERANCE = 1e-9  # a float64 metric of identical outputs can come out a few ulp below 0


@dataclass
class SensitivityTable:
    """ΔP for every probed piece, with the parameters each piece frees and the model's identity."""

    model: dict[str, Any]  # class_name, family, num_blocks, config, recipe, fingerprint, params
    metric: str
    blocks: list[dict[str, Any]]  # per block: index, name, kind, delta{piece: ΔP}, params{piece: n}, similarity
    baseline: float  # ΔP of removing nothing through the reuse path (0 when reuse is exact)
    calib: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Refuses a ΔP that is not a finite number >= 0 (NaN, inf, negative beyond rounding), naming
        the block and component: the planners rank by ΔP and SGDistill divides by it, so one bad
        value would silently change or poison the plan."""
        if not isinstance(self.blocks, list):
            raise HpruneError("corrupted sensitivity table (blocks is not a list)")
        for i, b in enumerate(self.blocks):
            if not isinstance(b, dict) or not isinstance(b.get("delta"), dict):
                raise HpruneError(f"corrupted sensitivity table (block entry {i} has no delta table)")
            for piece, d in b["delta"].items():
                bad = None
                if isinstance(d, bool) or not isinstance(d, (int, float)):
                    bad = f"is {d!r}, not a number"
                elif not math.isfinite(d):
                    bad = f"is {d}"
                elif d < -NEGATIVE_TOLERANCE:
                    bad = f"is negative ({d:.3g}): removing a piece cannot improve fidelity to the unpruned model"
                if bad:
                    raise HpruneError(f"sensitivity table: ΔP of block {b.get('index', i)}, component {piece!r} "
                                      f"{bad}; probe again (`hprune probe`) or fix the table")

    def delta(self, index: int, piece: str) -> float:
        return self.blocks[index]["delta"][piece]

    def pieces(self) -> list[tuple[int, str]]:
        return [(b["index"], c) for b in self.blocks for c in b["delta"]]

    @property
    def num_blocks(self) -> int:
        return self.model["num_blocks"]

    def to_dict(self) -> dict[str, Any]:
        return {"format": TABLE_FORMAT, "model": self.model, "metric": self.metric, "baseline": self.baseline,
                "calib": self.calib, "seconds": self.seconds, "blocks": self.blocks}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SensitivityTable":
        if not isinstance(d, dict) or d.get("format") != TABLE_FORMAT:
            got = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise HpruneError(f"not a sensitivity table (format {got!r}, expected {TABLE_FORMAT!r})")
        try:
            return cls(d["model"], d["metric"], d["blocks"], d["baseline"], d.get("calib", {}), d.get("seconds", 0.0))
        except KeyError as exc:
            raise HpruneError(f"corrupted sensitivity table (missing {exc})") from None

    def save(self, path: str | os.PathLike) -> None:
        from hprune.io import write_json

        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SensitivityTable":
        from hprune.io import read_json

        return cls.from_dict(read_json(path, "sensitivity table"))

    def check_model(self, model: nn.Module) -> None:
        """Raises HpruneError if `model` is not the model this table was measured on."""
        fp = fingerprint(model)
        if fp != self.model["fingerprint"]:
            raise HpruneError(f"sensitivity table is from another model ({self.model['class_name']}, "
                              f"{self.model['num_blocks']} blocks, fingerprint {self.model['fingerprint']}); "
                              f"this model's fingerprint is {fp}")

    def heatmap(self, path: str | os.PathLike, title: str | None = None) -> Path:
        """Block x component heatmap of ΔP (log colour scale) as PNG."""
        from hprune.plots import heatmap

        cols = []
        for b in self.blocks:
            for c in b["delta"]:
                if c not in cols:
                    cols.append(c)
        cols.sort(key=lambda c: (c != "block", c))
        rows = [[b["delta"].get(c) for c in cols] for b in self.blocks]
        labels = [f"{b['index']} {b['kind'].split('_')[-1]}" for b in self.blocks]
        return heatmap(rows, labels, cols, path, title=title or f"ΔP ({self.metric}) per block and component",
                       cbar_label=f"ΔP ({self.metric}, log scale)",
                       blank_note="blank cell: the block has no such component (e.g. the last SD3 block has no "
                                  "context FF), or it was removed before probing")


def _model_info(model: nn.Module) -> dict[str, Any]:
    ad = get_adapter(model)
    return {"class_name": model_class_name(model), "family": ad.family, "num_blocks": ad.num_blocks(model),
            "config": model_config(model), "recipe": recipe.get_recipe(model), "fingerprint": fingerprint(model),
            "params": param_count(model)}


def probe_block_passes(n_blocks: int, probes: list[tuple[int, str]], reuse: bool = True) -> int:
    """Block forwards per calibration sample that probing `probes` costs: the unpruned reference
    (n_blocks) plus, per probe (i, c), the blocks from i to the end when the prefix's activations
    are reused (else all n_blocks). The cost to state before a probe starts (a full-size SD3.5
    Medium at the default granularity: ~1,750 per sample)."""
    return n_blocks + sum((n_blocks - i) if reuse else n_blocks for i, _ in probes)


@torch.no_grad()
def probe_sensitivity(model: nn.Module, calib: CalibrationSet, *, granularity: str = "both",
                      metric: str | Metric = "rel_mse", batch_size: int = 4, blocks: Iterable[int] | None = None,
                      reuse: bool = True, progress: bool = True, max_samples: int | None = None,
                      dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> SensitivityTable:
    """Measures ΔP of every block and/or removable component of `model` on `calib`.

    Args:
        granularity: "block" (whole blocks), "component" (components only) or "both".
        metric: "rel_mse" (default), "cosine", or a callable (pred, ref) -> float, both (B, ...).
        blocks: restrict to these block indices (default: all).
        reuse: run only the tail from cached block inputs (default) instead of the whole model
            per probe; both give the same numbers (tested), reuse is faster.
        max_samples: use an evenly spaced subset of the calibration samples.
        dtype, device: of the inputs and activations (default: the model's first parameter's);
            give them when the model runs block by block (hprune.models.offload.offloaded).
    Returns a SensitivityTable; deterministic for the same inputs. Collective under torchrun:
    every rank must call it (see the module docstring)."""
    from hprune.report import tqdm

    if granularity not in ("block", "component", "both"):
        raise HpruneError(f"granularity must be block, component or both, not {granularity!r}")
    calib.check_fits(model)
    metric_fn: Callable = resolve_metric(metric)
    metric_name = metric if isinstance(metric, str) else getattr(metric, "__name__", "custom")
    ad = get_adapter(model)
    n_blocks = ad.num_blocks(model)
    infos = ad.blocks(model)
    which = sorted(set(range(n_blocks) if blocks is None else blocks))
    for i in which:
        ad.block_info(model, i)  # validates the index
    probes: list[tuple[int, str]] = []
    for i in which:
        if "block" in infos[i].removed:
            continue
        pieces = (["block"] if granularity in ("block", "both") else []) + \
                 (list(infos[i].components) if granularity in ("component", "both") else [])
        probes += [(i, c) for c in pieces]
    if len(calib) == 0:
        raise HpruneError("the calibration set is empty: nothing to probe on")
    if max_samples is not None and max_samples < 1:
        raise HpruneError(f"max_samples must be at least 1, got {max_samples}")
    if batch_size < 1:
        raise HpruneError(f"batch_size must be at least 1, got {batch_size}")
    indices = list(range(len(calib)))
    if max_samples is not None and max_samples < len(calib):
        indices = torch.linspace(0, len(calib) - 1, max_samples).round().long().tolist()
    n_samples = len(indices)
    # this rank's batches: the same batches as on one process, dealt out round-robin
    world, rank = hdist.world_size(), hdist.rank()
    chunks = [indices[s:s + batch_size] for s in range(0, n_samples, batch_size)]
    mine = [j for k, chunk in enumerate(chunks) if k % world == rank for j in chunk]
    p = next(model.parameters())
    device = torch.device(device) if device is not None else p.device
    dtype = dtype or (p.dtype if p.is_floating_point() else torch.float32)
    if progress and rank == 0:
        passes = probe_block_passes(n_blocks, probes, reuse)
        print(f"ΔP probe: {len(probes)} pieces on {n_samples} samples = {passes} block passes per sample "
              f"({passes * n_samples} in all; {passes / max(1, n_blocks):.1f} full forwards per sample)"
              + ("" if reuse else "; reuse=True would cut this"), flush=True)

    sums = {pc: 0.0 for pc in probes}
    base_sum, sim_sum = 0.0, torch.zeros(n_blocks, dtype=torch.float64)
    t0 = time.perf_counter()
    n_batches = -(-len(mine) // batch_size)
    bar = tqdm(total=n_batches * (len(probes) + 1), desc="probing", disable=not progress, unit="probe")
    for x in calib.batches(batch_size, device=device, dtype=dtype, indices=mine):
        b = x["hidden_states"].shape[0]
        states = [ad.prepare(model, x)]
        for i in range(n_blocks):
            states.append(ad.run_block(model, i, states[-1]))
            a, o = states[i].hidden.double().flatten(1), states[i + 1].hidden.double().flatten(1)
            sim_sum[i] += float(torch.nn.functional.cosine_similarity(a, o, dim=1).sum())
        ref = ad.finish(model, states[-1])

        def tail(start: int) -> torch.Tensor:
            st = states[start]
            for j in range(start, n_blocks):
                st = ad.run_block(model, j, st)
            return ad.finish(model, st)

        base_sum += metric_fn(tail(which[0]) if which else ref, ref) * b
        bar.update(1)
        for i, c in probes:
            with ablate(model, i, {c}):
                pred = tail(i) if reuse else ad.forward(model, x)
            sums[(i, c)] += metric_fn(pred, ref) * b
            bar.update(1)
    bar.close()
    if world > 1:
        flat = hdist.total(torch.tensor([base_sum, *sums.values(), *sim_sum.tolist()], dtype=torch.float64,
                                        device=device)).cpu()
        base_sum = float(flat[0])
        sums = {pc: float(v) for pc, v in zip(sums, flat[1:1 + len(sums)])}
        sim_sum = flat[1 + len(sums):]

    comp_params = {i: ad.component_params(model, i) for i in which}
    table_blocks = []
    for info in infos:
        entry = {"index": info.index, "name": info.name, "kind": info.kind, "removed": sorted(info.removed),
                 "similarity": float(sim_sum[info.index] / n_samples), "delta": {}, "params": {}}
        for (i, c), s in sums.items():
            if i == info.index:
                entry["delta"][c] = s / n_samples
                entry["params"][c] = comp_params[i][c]
        table_blocks.append(entry)
    return SensitivityTable(
        model=_model_info(model), metric=metric_name, blocks=table_blocks, baseline=base_sum / n_samples,
        calib={"samples": n_samples, "num_steps": calib.num_steps, "source": calib.meta.get("source"),
               "batch_size": batch_size, "reuse": reuse, "ranks": world},
        seconds=round(time.perf_counter() - t0, 3))
