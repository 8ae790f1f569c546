"""Hierarchical Position Pruning (HPP) and the baseline planners, all producing a PrunePlan.

HPP ranks every (block, piece) by its measured ΔP combined with the positional weight

    W_pos(i) = exp((i - |B|) / |B|)        (rises from e^-1 at the first block to ~1 at the last)

so that late blocks, which refine texture rather than lay out structure, are pruned first:
cost(i, c) = ΔP(i, c) / W_pos(i). Pieces are taken greedily, cheapest first, until the removed
fraction of the transformer's parameters reaches `ratio`; the first `protect` blocks are never
touched. By default the ranking is per parameter freed (cost / params, the usual greedy knapsack
rule, so that a large block with a small ΔP beats a tiny component with a slightly smaller one);
`rank="delta"` ranks by cost alone. Granularities: "block" (whole blocks), "component"
(components only), "hybrid" (both; the default).

Baselines, same interface:
- KOALA-style: whole blocks, most similar input/output (cosine of the image stream) first.
- BK-SDM-style: whole blocks by ΔP alone, no positional weight.
- manual: given block indices (e.g. the released SD3.5-Large plan, blocks 25-29 and 31-35).

Parameter accounting is exact: each choice is applied to a meta-device copy of the model (built
from the table's config and recipe), so overlapping components are never double counted.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import torch.nn as nn

from hprune import rebuild
from hprune.errors import HpruneError, PlanError
from hprune.models.adapters import get_adapter
from hprune.models.registry import build_from_config
from hprune.models.stats import param_count
from hprune.models.surgery import PlanEntry, PrunePlan
from hprune.probe import SensitivityTable

# Plans published with models (indices into the model's blocks).
PRESETS: dict[str, dict[str, Any]] = {
    "sd3.5-large-released": {"blocks": [25, 26, 27, 28, 29, 31, 32, 33, 34, 35], "family": "sd3", "num_blocks": 38,
                             "note": "HierarchicalPrune's released SD3.5-Large plan (10 of 38 blocks)"},
}


def w_pos(i: int, n: int) -> float:
    """Positional pruning eligibility of block i of n: exp((i - n) / n)."""
    return math.exp((i - n) / n)


def default_protect(n_blocks: int) -> int:
    return n_blocks // 4


def _meta_model(table: SensitivityTable) -> nn.Module:
    m = build_from_config(table.model["class_name"], table.model["config"], meta=True)
    return rebuild.replay(m, table.model.get("recipe", []))


def _check_ratio(ratio: float) -> None:
    if not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
        raise HpruneError(f"ratio must be in (0, 1), got {ratio!r}")


def _greedy(table: SensitivityTable, ratio: float, candidates: list[tuple[float, int, str, dict[str, Any]]],
            protect: int, method: str, meta: dict[str, Any]) -> PrunePlan:
    """Takes candidates (sort key, block, piece, info) in order until `ratio` of the parameters is
    removed, on a meta copy for exact accounting."""
    _check_ratio(ratio)
    model = _meta_model(table)
    ad = get_adapter(model)
    total = param_count(model)
    target = ratio * total
    removed = 0
    entries: list[PlanEntry] = []
    for key, i, piece, info in sorted(candidates, key=lambda t: (t[0], t[1], t[2])):
        if removed >= target:
            break
        bi = ad.block_info(model, i)
        if "block" in bi.removed or (piece != "block" and piece not in bi.components):
            continue  # already gone with an earlier choice
        before = param_count(model)
        ad.prune(model, i, {piece})
        freed = before - param_count(model)
        if freed <= 0:
            continue
        removed += freed
        details = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items())
        entries.append(PlanEntry(i, piece, float(key), f"{details}, freed={freed}"))
    if removed < target:
        raise PlanError(f"ratio {ratio:.3g} cannot be met without touching the {protect} protected leading "
                        f"block(s): at most {removed / total:.1%} of the parameters are removable this way "
                        f"(lower the ratio, or protect fewer blocks)")
    achieved = removed / total
    plan = PrunePlan(entries, family=table.model["family"], num_blocks=table.num_blocks, method=method,
                     meta={**meta, "ratio": ratio, "achieved_ratio": achieved, "removed_params": removed,
                           "total_params": total, "protect": protect, "metric": table.metric,
                           "model_fingerprint": table.model["fingerprint"]})
    return plan


def plan_hpp(table: SensitivityTable, ratio: float, *, granularity: str = "hybrid", protect: int | None = None,
             positional: bool = True, rank: str = "per_param") -> PrunePlan:
    """Hierarchical Position Pruning: see the module docstring. Returns a PrunePlan whose entries
    carry their score (lower = pruned earlier) and a note with ΔP, W_pos and parameters freed."""
    if granularity not in ("block", "component", "hybrid"):
        raise HpruneError(f"granularity must be block, component or hybrid, not {granularity!r}")
    if rank not in ("per_param", "delta"):
        raise HpruneError(f"rank must be per_param or delta, not {rank!r}")
    n = table.num_blocks
    protect = default_protect(n) if protect is None else protect
    if not 0 <= protect <= n:
        raise HpruneError(f"protect must be between 0 and {n}, got {protect}")
    cands = []
    for b in table.blocks:
        i = b["index"]
        if i < protect:
            continue
        for piece, dp in b["delta"].items():
            if (granularity == "block") != (piece == "block") and granularity != "hybrid":
                continue
            w = w_pos(i, n) if positional else 1.0
            cost = max(dp, 0.0) / w
            params = b["params"][piece]
            key = cost / params if rank == "per_param" and params else cost
            cands.append((key, i, piece, {"dP": dp, "W_pos": w, "params": params}))
    if not cands:
        _check_ratio(ratio)
        if protect >= n:
            raise PlanError(f"ratio {ratio:.3g} cannot be met: all {n} blocks are protected (protect={protect})")
        raise PlanError("the sensitivity table has no probes for the requested granularity")
    return _greedy(table, ratio, cands, protect, "hpp" if positional else "delta-only",
                   {"granularity": granularity, "positional": positional, "rank": rank})


def plan_bksdm(table: SensitivityTable, ratio: float, *, protect: int = 0) -> PrunePlan:
    """BK-SDM-style: whole blocks ranked by ΔP alone (no positional weight), smallest first."""
    cands = [(b["delta"]["block"], b["index"], "block", {"dP": b["delta"]["block"]})
             for b in table.blocks if "block" in b["delta"] and b["index"] >= protect]
    if not cands:
        raise PlanError("the sensitivity table has no whole-block probes (probe with granularity block or both)")
    plan = _greedy(table, ratio, cands, protect, "bksdm", {"granularity": "block"})
    return plan


def plan_koala(table: SensitivityTable, ratio: float, *, protect: int = 0) -> PrunePlan:
    """KOALA-style: whole blocks ranked by the cosine similarity of their image-stream input and
    output (a block that changes its input least goes first). PlanError for a similarity that is not
    a number in [-1, 1] (a NaN would rank its block first, silently)."""
    for b in table.blocks:
        s = b.get("similarity")
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or abs(s) > 1 + 1e-3:
            raise PlanError(f"sensitivity table: the similarity of block {b.get('index')} is {s!r}, not a number in "
                            f"[-1, 1]; probe again (`hprune probe`) or fix the table")
    cands = [(-b["similarity"], b["index"], "block", {"similarity": b["similarity"]})
             for b in table.blocks if b["index"] >= protect and "block" not in b.get("removed", [])]
    return _greedy(table, ratio, cands, protect, "koala", {"granularity": "block"})


def parse_blocks(spec: str) -> list[int]:
    """"25-29,31-35" -> [25, 26, 27, 28, 29, 31, 32, 33, 34, 35]."""
    out: list[int] = []
    try:
        for part in spec.split(","):
            part = part.strip()
            if not part:
                continue
            if "-" in part:
                a, b = (int(x) for x in part.split("-", 1))
                if b < a:
                    raise ValueError
                out += list(range(a, b + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise HpruneError(f"cannot read block list {spec!r}; expected e.g. 25-29,31-35") from None
    return sorted(set(out))


def plan_manual(blocks: Sequence[int] | str, *, model: nn.Module | None = None,
                table: SensitivityTable | None = None, components: Iterable[str] = ("block",)) -> PrunePlan:
    """A plan removing `components` (default: whole blocks) of the given blocks, or a preset name
    from PRESETS. With a model or table the plan records family and block count (checked when applied)."""
    meta: dict[str, Any] = {}
    family = num_blocks = None
    if isinstance(blocks, str) and blocks in PRESETS:
        pre = PRESETS[blocks]
        meta["preset"], meta["note"] = blocks, pre["note"]
        family, num_blocks = pre["family"], pre["num_blocks"]
        blocks = pre["blocks"]
    elif isinstance(blocks, str):
        blocks = parse_blocks(blocks)
    if not blocks:
        raise HpruneError("a manual plan needs at least one block")
    entries = [PlanEntry(int(i), c) for i in blocks for c in components]
    plan = PrunePlan(entries, family=family, num_blocks=num_blocks, method="manual", meta=meta)
    if model is not None:
        ad = get_adapter(model)
        plan.family, plan.num_blocks = ad.family, ad.num_blocks(model)
        plan.validate(model)
    elif table is not None:
        plan.family, plan.num_blocks = table.model["family"], table.num_blocks
        plan.meta["model_fingerprint"] = table.model["fingerprint"]
    if plan.num_blocks is not None:  # checked now, not when the plan is applied
        bad = sorted({e.block for e in entries if not 0 <= e.block < plan.num_blocks})
        if bad:
            raise PlanError(f"unknown block index {bad[0]}: the {plan.family} model has {plan.num_blocks} blocks "
                            f"(0-{plan.num_blocks - 1})")
    return plan
