"""HPP and the baseline planners: ratios met exactly as accounted, protection, ranking rules."""
import copy
import functools
import math
import os
import re

import pytest

from hprune.calib import synthetic
from hprune.errors import HpruneError, PlanError
from hprune.hpp import parse_blocks, plan_bksdm, plan_hpp, plan_koala, plan_manual, w_pos
from hprune.loading import load_model
from hprune.models import apply_plan, get_adapter, param_count
from hprune.probe import probe_sensitivity
from util import TINY, fresh


@functools.lru_cache(maxsize=None)
def table(name):
    m = fresh(name)
    return probe_sensitivity(m, synthetic(m, n_prompts=1, num_steps=2), progress=False)


def test_positional_weight():
    assert w_pos(0, 38) == pytest.approx(math.exp(-1))
    assert w_pos(37, 38) == pytest.approx(math.exp(-1 / 38))
    assert all(w_pos(i, 38) < w_pos(i + 1, 38) for i in range(37))


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("granularity", ["block", "component", "hybrid"])
def test_plan_meets_ratio_and_removes_exactly_what_it_says(name, granularity):
    t = table(name)
    ratio = 0.2
    plan = plan_hpp(t, ratio, granularity=granularity)
    m = fresh(name)
    n0 = param_count(m)
    apply_plan(m, plan)
    removed = n0 - param_count(m)
    assert removed == plan.meta["removed_params"]
    assert removed / n0 >= ratio and removed / n0 == pytest.approx(plan.meta["achieved_ratio"])
    protect = plan.meta["protect"]
    assert protect == t.num_blocks // 4
    assert all(e.block >= protect for e in plan.entries)
    pieces = {e.component for e in plan.entries}
    if granularity == "block":
        assert pieces == {"block"}
    elif granularity == "component":
        assert "block" not in pieces
    assert all(e.score is not None and "dP=" in e.note for e in plan.entries)


def _crafted(name="tiny-sd3", delta=1e-3):
    """The real table with every block's ΔP set equal: only position can decide."""
    t = copy.deepcopy(table(name))
    for b in t.blocks:
        b["delta"] = {"block": delta}
        b["params"] = {"block": b["params"]["block"]}
    return t


def test_positional_weight_decides_between_equal_deltas():
    t = _crafted()
    hpp = plan_hpp(t, 0.2, granularity="block")
    assert [e.block for e in hpp.entries] == [6, 5]  # latest non-last... the last block is smaller: per-param rule
    flat = plan_hpp(t, 0.2, granularity="block", positional=False, protect=0)
    # without position, ties are broken by index: earliest first (what HPP exists to avoid)
    assert flat.entries[0].block == 0


def test_protection_and_unmeetable_ratio():
    t = table("tiny-sd3")
    plan = plan_hpp(t, 0.15, protect=6)
    assert {e.block for e in plan.entries} <= {6, 7}
    with pytest.raises(PlanError, match="cannot be met without touching the 7 protected"):
        plan_hpp(t, 0.15, protect=7)  # the last block alone is 8% of the parameters
    for bad in (0, 1, -0.1, 1.5):
        with pytest.raises(HpruneError, match="ratio must be in"):
            plan_hpp(t, bad)


def test_baselines_rank_as_described():
    t = table("tiny-flux")
    bk = plan_bksdm(t, 0.25)
    deltas = [t.delta(e.block, "block") for e in bk.entries]
    assert deltas == sorted(deltas) and {e.component for e in bk.entries} == {"block"}
    # the first choice is the block with the smallest ΔP overall
    assert bk.entries[0].block == min(range(t.num_blocks), key=lambda i: t.delta(i, "block"))
    ko = plan_koala(t, 0.25)
    sims = [t.blocks[e.block]["similarity"] for e in ko.entries]
    assert sims == sorted(sims, reverse=True)
    assert ko.entries[0].block == max(range(t.num_blocks), key=lambda i: t.blocks[i]["similarity"])


def test_manual_plans_and_released_preset():
    assert parse_blocks("25-29,31-35") == [25, 26, 27, 28, 29, 31, 32, 33, 34, 35]
    with pytest.raises(HpruneError, match="cannot read block list"):
        parse_blocks("3-1")
    m = load_model("sd3.5-large")  # meta: counting only
    n0 = param_count(m)
    plan = plan_manual("sd3.5-large-released")
    apply_plan(m, plan)
    assert sum("block" in b.removed for b in get_adapter(m).blocks(m)) == 10
    assert 0.26 < 1 - param_count(m) / n0 < 0.28  # 10 of 38 joint blocks
    with pytest.raises(PlanError, match="38 blocks"):
        apply_plan(fresh("tiny-sd3"), plan_manual("sd3.5-large-released"))


def test_plan_from_another_models_table_is_refused():
    plan = plan_hpp(table("tiny-sd35"), 0.2)  # same family and block count as tiny-sd3
    with pytest.raises(PlanError, match="made for another model"):
        apply_plan(fresh("tiny-sd3"), plan)
    # the table itself can tell
    with pytest.raises(HpruneError, match="from another model"):
        table("tiny-sd35").check_model(fresh("tiny-sd3"))
    table("tiny-sd3").check_model(fresh("tiny-sd3"))


@pytest.mark.parametrize("value, match", [(float("nan"), "is nan"), (float("inf"), "is inf"),
                                          (-0.01, "is negative"), ("0.1", "is '0.1', not a number")])
def test_bad_delta_in_a_table_is_refused_naming_the_piece(tmp_path, value, match):
    from hprune.cli import main
    from hprune.probe import SensitivityTable

    d = table("tiny-sd3").to_dict()
    d = copy.deepcopy(d)
    d["blocks"][5]["delta"]["ff"] = value
    with pytest.raises(HpruneError, match=re.escape(f"block 5, component 'ff' {match}")):
        SensitivityTable.from_dict(d)
    if isinstance(value, float) and math.isnan(value):  # an all-NaN table used to remove blocks scored nan
        for b in d["blocks"]:
            b["delta"] = {k: float("nan") for k in b["delta"]}
    path = tmp_path / "s.json"
    import json

    path.write_text(json.dumps(d))
    assert main(["plan", "--sensitivity", str(path), "--ratio", "0.2", "--out", str(tmp_path / "p.json")]) == 1
    assert not os.path.exists(tmp_path / "p.json")


def test_heatmap_explains_its_blank_cells(tmp_path, monkeypatch):
    import hprune.plots

    seen = []
    real = hprune.plots._save

    def keep(fig, path):
        # the note sits under the tick labels, as the heatmap axes' x label (wrapped: compare words)
        seen.append(([" ".join(t.get_text().split()) for t in fig.texts]
                     + [" ".join(a.get_xlabel().split()) for a in fig.axes], [a.get_ylabel() for a in fig.axes]))
        return real(fig, path)

    monkeypatch.setattr(hprune.plots, "_save", keep)
    t = table("tiny-sd3")
    assert any(c not in t.blocks[-1]["delta"] for b in t.blocks for c in b["delta"])  # the last block has fewer
    t.heatmap(tmp_path / "s.png")
    (texts, ylabels), = seen
    assert any("blank cell: the block has no such component" in x for x in texts)
    assert "ΔP (rel_mse, log scale)" in ylabels
