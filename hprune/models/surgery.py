"""PrunePlan (which block / component goes) and applying it to a model."""
from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch.nn as nn

from hprune import recipe
from hprune.errors import PlanError
from hprune.models.adapters import get_adapter
from hprune.models.blocks import COMPONENTS

PLAN_FORMAT = "hprune.plan/1"
_ALL_COMPONENTS = {"block"} | {c for cs in COMPONENTS.values() for c in cs}


@dataclass
class PlanEntry:
    block: int  # global block index
    component: str  # "block" or a component name (see hprune.models.blocks.COMPONENT_DOC)
    score: float | None = None  # the ranking score that chose it (planners fill this)
    note: str | None = None


@dataclass
class PrunePlan:
    """Which blocks / components of a model are removed. JSON-serialisable.

    `family` and `num_blocks` (when set) are checked against the model the plan is applied to,
    so a plan made for one architecture cannot silently be applied to another."""

    entries: list[PlanEntry] = field(default_factory=list)
    family: str | None = None
    num_blocks: int | None = None
    method: str = "manual"
    meta: dict[str, Any] = field(default_factory=dict)

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def manual(cls, remove: dict[int, Iterable[str]] | Iterable[int], model: nn.Module | None = None,
               **meta: Any) -> "PrunePlan":
        """From {block: [components]} or a list of whole-block indices."""
        items = remove.items() if isinstance(remove, dict) else ((i, ["block"]) for i in remove)
        entries = [PlanEntry(int(i), c) for i, comps in items for c in ([comps] if isinstance(comps, str) else comps)]
        plan = cls(entries, method="manual", meta=dict(meta))
        if model is not None:
            plan.family = get_adapter(model).family
            plan.num_blocks = get_adapter(model).num_blocks(model)
        return plan

    def removed(self) -> dict[int, set[str]]:
        out: dict[int, set[str]] = defaultdict(set)
        for e in self.entries:
            out[e.block].add(e.component)
        return dict(out)

    def __len__(self) -> int:
        return len(self.entries)

    # -- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"format": PLAN_FORMAT, "family": self.family, "num_blocks": self.num_blocks,
                "method": self.method, "entries": [asdict(e) for e in self.entries], "meta": self.meta}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PrunePlan":
        if not isinstance(d, dict) or "entries" not in d:
            raise PlanError("not a prune plan (expected a JSON object with 'entries')")
        if d.get("format", PLAN_FORMAT) != PLAN_FORMAT:
            raise PlanError(f"unsupported plan format {d.get('format')!r} (expected {PLAN_FORMAT})")
        entries = []
        for i, e in enumerate(d["entries"]):
            try:
                block, comp = e["block"], e.get("component", "block")
            except (TypeError, KeyError):
                raise PlanError(f"plan entry {i}: expected {{'block': int, 'component': str}}, got {e!r}") from None
            if not isinstance(block, int) or isinstance(block, bool):
                raise PlanError(f"plan entry {i}: block index must be an integer, got {block!r}")
            if comp not in _ALL_COMPONENTS:
                raise PlanError(f"plan entry {i}: unknown component {comp!r} (known: {', '.join(sorted(_ALL_COMPONENTS))})")
            entries.append(PlanEntry(block, comp, e.get("score"), e.get("note")))
        return cls(entries, d.get("family"), d.get("num_blocks"), d.get("method", "manual"), dict(d.get("meta") or {}))

    def save(self, path: str | os.PathLike, overwrite: bool = True) -> None:
        from hprune.io import check_output, write_json

        if overwrite and os.path.exists(path):
            check_output(path, overwrite, kind="file")  # replaces only a file hprune wrote
        write_json(path, self.to_dict(), overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PrunePlan":
        p = Path(path)
        if not p.is_file():
            raise PlanError(f"plan file not found: {p}")
        try:
            d = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PlanError(f"{p}: not valid JSON ({exc})") from None
        return cls.from_dict(d)

    # -- checks ------------------------------------------------------------------------------
    def validate(self, model: nn.Module) -> None:
        """Raises PlanError if the plan does not fit `model` (family, block count, indices, components)."""
        ad = get_adapter(model)
        n = ad.num_blocks(model)
        if self.family is not None and self.family != ad.family:
            raise PlanError(f"plan is for a {self.family} model, not {ad.family} ({type(model).__name__})")
        if self.num_blocks is not None and self.num_blocks != n:
            raise PlanError(f"plan is for a model with {self.num_blocks} blocks; this one has {n}")
        fp = self.meta.get("model_fingerprint")
        if fp is not None:
            from hprune.models.registry import fingerprint

            if fp != fingerprint(model):
                raise PlanError(f"plan was made for another model (fingerprint {fp}, this model's is "
                                f"{fingerprint(model)}): re-probe this model and plan again")
        for block, comps in self.removed().items():
            ad.check_components(model, block, comps)


def apply_plan(model: nn.Module, plan: PrunePlan) -> nn.Module:
    """Removes the planned blocks/components in place (weights are freed, their contribution is
    exactly zero) and records the plan in the model's recipe. Returns `model`.

    The whole plan is validated before anything changes."""
    plan.validate(model)
    ad = get_adapter(model)
    for block, comps in sorted(plan.removed().items()):
        ad.prune(model, block, comps)
    spec = plan.to_dict()
    spec["family"], spec["num_blocks"] = ad.family, ad.num_blocks(model)
    recipe.record(model, "prune", {"plan": spec})
    return model


@recipe.register_op("prune")
def _replay_prune(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    return apply_plan(model, PrunePlan.from_dict(spec["plan"]))
