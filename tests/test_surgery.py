"""Removal semantics: a removed component contributes exactly zero and its weights are gone."""
import gc
import weakref

import pytest
import torch

from hprune.errors import PlanError
from hprune.models import PrunePlan, RemovedBlock, apply_plan, get_adapter, param_count
from hprune.recipe import get_recipe
from util import TINY, fresh, inputs, out, zero_branch_hooks

# (model, block index, component): every component kind of every block kind.
CASES = (
    [("tiny-sd3", 0, c) for c in ("block", "attn", "ff", "context_ff", "context")]
    + [("tiny-sd3", 7, c) for c in ("block", "attn", "ff")]  # last block: context_pre_only
    + [("tiny-sd35", 1, c) for c in ("attn", "attn2", "ff", "context")]  # dual attention + qk norm
    + [("tiny-sd35", 5, "attn")]
    + [("tiny-flux", 1, c) for c in ("block", "attn", "ff", "context_ff", "context")]  # double
    + [("tiny-flux", 3, c) for c in ("block", "attn", "mlp")]  # single
)


@pytest.mark.parametrize("name,index,component", CASES)
def test_removal_equals_zeroed_branch(name, index, component):
    ref_model, model = fresh(name), fresh(name)
    x = inputs(model)
    before = out(model, x)
    handles = zero_branch_hooks(ref_model, index, {component})
    expected = out(ref_model, x)
    for h in handles:
        h.remove()

    ad = get_adapter(model)
    freed = ad.component_params(model, index)[component]
    n0 = param_count(model)
    keys0 = {k: v.shape for k, v in model.state_dict().items()}
    apply_plan(model, PrunePlan.manual({index: [component]}, model=model))
    got = out(model, x)

    # The component mattered, and removing it gives what the zeroed branch gives.
    assert (got - before).abs().max() > 1e-6
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # Its weights are gone, exactly as many as the adapter reports, and nothing else changed shape
    # except slices of modulation / projection weights.
    assert freed > 0 and n0 - param_count(model) == freed
    keys1 = {k: v.shape for k, v in model.state_dict().items()}
    assert set(keys1) < set(keys0)
    for k, s in keys1.items():
        assert all(a <= b for a, b in zip(s, keys0[k])), k


@pytest.mark.parametrize("name", TINY)
def test_removed_weights_are_freed(name):
    model = fresh(name)
    ad = get_adapter(model)
    blk = ad.get_block(model, 1)
    refs = [weakref.ref(p) for p in blk.ff.parameters()]
    blk = None
    apply_plan(model, PrunePlan.manual({1: ["ff"]}, model=model))
    gc.collect()
    assert all(r() is None for r in refs), "a removed parameter is still referenced"


def test_multiple_components_and_everything_becomes_block():
    ref_model, model = fresh("tiny-sd35"), fresh("tiny-sd35")
    x = inputs(model)
    comps = {"attn2", "ff", "context_ff"}
    hs = zero_branch_hooks(ref_model, 2, comps)
    expected = out(ref_model, x)
    for h in hs:
        h.remove()
    apply_plan(model, PrunePlan.manual({2: sorted(comps)}, model=model))
    torch.testing.assert_close(out(model, x), expected, rtol=1e-5, atol=1e-5)

    # Removing every branch leaves nothing: the block becomes a parameterless pass-through.
    m = fresh("tiny-sd3")
    apply_plan(m, PrunePlan.manual({3: ["attn", "ff", "context_ff"]}, model=m))
    blk = get_adapter(m).get_block(m, 3)
    assert isinstance(blk, RemovedBlock) and param_count(blk) == 0


@pytest.mark.parametrize("name", TINY)
def test_plans_compose(name):
    """Applying plan A then plan B gives bit for bit the model of plan A+B at once."""
    a, b = fresh(name), fresh(name)
    n = get_adapter(a).num_blocks(a)
    p1 = {0: ["ff"], n - 1: ["attn"]}
    p2 = {0: ["attn"], 1: ["block"]}
    apply_plan(a, PrunePlan.manual(p1, model=a))
    apply_plan(a, PrunePlan.manual(p2, model=a))
    apply_plan(b, PrunePlan.manual({0: ["ff", "attn"], n - 1: ["attn"], 1: ["block"]}, model=b))
    x = inputs(a)
    assert torch.equal(out(a, x), out(b, x))
    assert [s["op"] for s in get_recipe(a)] == ["prune", "prune"]


def test_whole_late_blocks_pass_streams_through():
    """Removing the last SD3 block (context_pre_only) and the last FLUX single block works."""
    for name in ("tiny-sd3", "tiny-flux"):
        ref_model, model = fresh(name), fresh(name)
        n = get_adapter(model).num_blocks(model)
        x = inputs(model)
        hs = zero_branch_hooks(ref_model, n - 1, {"block"})
        expected = out(ref_model, x)
        [h.remove() for h in hs]
        apply_plan(model, PrunePlan.manual([n - 1], model=model))
        torch.testing.assert_close(out(model, x), expected, rtol=0, atol=0)


def test_plan_json_round_trip(tmp_path):
    m = fresh("tiny-flux")
    plan = PrunePlan.manual({2: ["mlp"], 4: ["block"]}, model=m, why="test")
    plan.entries[0].score = 0.25
    plan.save(tmp_path / "plan.json")
    back = PrunePlan.load(tmp_path / "plan.json")
    assert back.to_dict() == plan.to_dict()


@pytest.mark.parametrize("remove,match", [
    ({99: ["block"]}, "unknown block index 99"),
    ({-1: ["block"]}, "unknown block index -1"),
    ({0: ["mlp"]}, "has no component 'mlp'"),
    ({5: ["attn2"]}, "has no component 'attn2'"),  # tiny-sd35 blocks 3.. have no dual attention
    ({7: ["context_ff"]}, "has no component 'context_ff'"),  # last block has no context MLP
])
def test_bad_plans_are_refused_before_any_change(remove, match):
    m = fresh("tiny-sd35")
    keys = list(m.state_dict())
    plan = PrunePlan.manual({0: ["ff"], **remove})
    with pytest.raises(PlanError, match=match):
        apply_plan(m, plan)
    assert list(m.state_dict()) == keys  # validated first: the valid entry was not applied either


def test_plan_for_another_model_is_refused(tmp_path):
    flux = fresh("tiny-flux")
    plan = PrunePlan.manual([1], model=fresh("tiny-sd3"))
    with pytest.raises(PlanError, match="plan is for a sd3 model"):
        apply_plan(flux, plan)
    plan = PrunePlan.manual([1], model=fresh("tiny-sd3"))
    plan.family = None  # same family check skipped, block count still checked
    plan.num_blocks = 38
    with pytest.raises(PlanError, match="38 blocks"):
        apply_plan(fresh("tiny-sd3"), plan)
    (tmp_path / "bad.json").write_text('{"entries": [{"block": "x"}]}')
    with pytest.raises(PlanError, match="must be an integer"):
        PrunePlan.load(tmp_path / "bad.json")
    (tmp_path / "bad2.json").write_text('{"entries": [{"block": 1, "component": "nope"}]}')
    with pytest.raises(PlanError, match="unknown component 'nope'"):
        PrunePlan.load(tmp_path / "bad2.json")
    with pytest.raises(PlanError, match="not found"):
        PrunePlan.load(tmp_path / "missing.json")
