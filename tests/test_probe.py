"""ΔP probing: exactness of activation reuse, meaning of the numbers, determinism, bad input."""
import copy
import functools

import pytest
import torch

from hprune.calib import CalibrationSet, synthetic
from hprune.errors import HpruneError
from hprune.metrics import rel_mse
from hprune.models import PrunePlan, apply_plan, get_adapter
from hprune.probe import SensitivityTable, probe_sensitivity
from util import TINY, fresh, on_ranks


@functools.lru_cache(maxsize=None)
def calib(name):
    return synthetic(fresh(name), n_prompts=1, num_steps=3, seed=1)


@pytest.mark.parametrize("name", TINY)
def test_reuse_equals_naive_and_nothing_removed_is_zero(name):
    m, c = fresh(name), calib(name)
    fast = probe_sensitivity(m, c, batch_size=2, progress=False)
    slow = probe_sensitivity(m, c, batch_size=2, progress=False, reuse=False)
    assert fast.baseline == 0.0  # running the tail from cached activations reproduces the output exactly
    assert fast.pieces() == slow.pieces()
    for i, piece in fast.pieces():
        assert fast.delta(i, piece) == slow.delta(i, piece)
    # every probed piece matters in a random model, and a whole block matters at least as much as
    # (roughly) its biggest part
    assert all(fast.delta(i, p) > 0 for i, p in fast.pieces())


def test_delta_is_the_fidelity_loss_of_the_pruned_model():
    """ΔP(i, c) equals the relative MSE, over the calibration set, of the model with (i, c)
    actually removed by surgery."""
    name = "tiny-sd35"
    m, c = fresh(name), calib(name)
    table = probe_sensitivity(m, c, batch_size=len(c), progress=False, blocks=[1, 6])
    x = next(c.batches(len(c)))
    with torch.no_grad():
        ref = m(**x).sample
    for i, piece in [(1, "attn2"), (1, "context"), (6, "block"), (6, "ff")]:
        pruned = copy.deepcopy(m)
        apply_plan(pruned, PrunePlan.manual({i: [piece]}, model=pruned))
        with torch.no_grad():
            got = rel_mse(pruned(**x).sample, ref)
        assert got == pytest.approx(table.delta(i, piece), rel=1e-4)


def test_metrics_granularity_and_determinism(tmp_path):
    m, c = fresh("tiny-flux"), calib("tiny-flux")
    a = probe_sensitivity(m, c, granularity="block", metric="cosine", progress=False)
    b = probe_sensitivity(m, c, granularity="block", metric="cosine", progress=False)
    assert a.to_dict()["blocks"] == b.to_dict()["blocks"]
    assert {p for _, p in a.pieces()} == {"block"}
    comp = probe_sensitivity(m, c, granularity="component", progress=False, blocks=[0, 5])
    assert {i for i, _ in comp.pieces()} == {0, 5} and "block" not in {p for _, p in comp.pieces()}

    def max_abs(pred, ref):
        return float((pred - ref).abs().max())

    custom = probe_sensitivity(m, c, granularity="block", metric=max_abs, progress=False, blocks=[2])
    assert custom.metric == "max_abs" and custom.delta(2, "block") > 0
    a.save(tmp_path / "s.json")
    assert SensitivityTable.load(tmp_path / "s.json").to_dict() == a.to_dict()
    png = a.heatmap(tmp_path / "s.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_koala_similarity_is_block_input_output_cosine():
    m, c = fresh("tiny-sd3"), calib("tiny-sd3")
    table = probe_sensitivity(m, c, granularity="block", progress=False, blocks=[3])
    ad = get_adapter(m)
    sims = []
    with torch.no_grad():
        for x in c.batches(2):
            st = ad.prepare(m, x)
            for i in range(3):
                st = ad.run_block(m, i, st)
            nxt = ad.run_block(m, 3, st)
            sims.append(torch.nn.functional.cosine_similarity(st.hidden.flatten(1).double(),
                                                             nxt.hidden.flatten(1).double(), dim=1))
    assert table.blocks[3]["similarity"] == pytest.approx(float(torch.cat(sims).mean()), rel=1e-9)


def test_bad_probe_input(tmp_path):
    m = fresh("tiny-sd3")
    with pytest.raises(HpruneError, match="calibration set is for a flux model"):
        probe_sensitivity(m, calib("tiny-flux"), progress=False)
    with pytest.raises(HpruneError, match="granularity"):
        probe_sensitivity(m, calib("tiny-sd3"), granularity="heads", progress=False)
    with pytest.raises(HpruneError, match="max_samples must be at least 1"):
        probe_sensitivity(m, calib("tiny-sd3"), max_samples=0, progress=False)
    with pytest.raises(HpruneError, match="batch_size must be at least 1"):
        probe_sensitivity(m, calib("tiny-sd3"), batch_size=0, progress=False)
    with pytest.raises(HpruneError, match="calibration set is empty"):
        probe_sensitivity(m, calib("tiny-sd3").subset([]), progress=False)
    (tmp_path / "t.json").write_text('{"format": "something-else"}')
    with pytest.raises(HpruneError, match="not a sensitivity table"):
        SensitivityTable.load(tmp_path / "t.json")
    calib("tiny-sd3").save(tmp_path / "c.safetensors")
    assert len(CalibrationSet.load(tmp_path / "c.safetensors")) == len(calib("tiny-sd3"))
    with pytest.raises(HpruneError, match="exists"):
        calib("tiny-sd3").save(tmp_path / "c.safetensors")


# ---- 2 processes (gloo): the batches are dealt out, the table is the 1-process one ---------------

# (batch_size, max_samples): 6 samples in 3 batches (ranks get 2 and 1), and 3 samples in 1 batch
# (rank 1 gets none and must still take part in the all-reduce)
SPLITS = [(2, None), (4, 3)]


def _probe_tables():
    """The tables of SPLITS, and how many sample rows went through block 0 (this process's work)."""
    m, c = fresh("tiny-sd3"), calib("tiny-sd3")
    rows = [0]

    def count(_mod, args, kwargs):
        rows[0] += (args[0] if args else kwargs["hidden_states"]).shape[0]

    get_adapter(m).get_block(m, 0).register_forward_pre_hook(count, with_kwargs=True)
    tables = [probe_sensitivity(m, c, batch_size=b, max_samples=n, progress=False).to_dict() for b, n in SPLITS]
    return tables, rows[0]


def test_two_processes_share_the_probe_and_agree_with_one(tmp_path):
    one, work_one = _probe_tables()
    assert len(calib("tiny-sd3")) == 6
    (r0, work0), (r1, work1) = on_ranks(_probe_tables, 2, tmp_path)
    assert work0 + work1 == work_one and 0 < work1 < work0  # the work is split, not repeated
    for a, b, c in zip(one, r0, r1):
        assert b["blocks"] == c["blocks"] and b["baseline"] == c["baseline"]  # every rank: one table
        assert b["calib"]["ranks"] == 2 and a["calib"]["ranks"] == 1
        assert b["calib"]["samples"] == a["calib"]["samples"]
        assert b["baseline"] == pytest.approx(a["baseline"], abs=1e-15)
        for ba, bb in zip(a["blocks"], b["blocks"]):
            assert ba["delta"].keys() == bb["delta"].keys() and ba["params"] == bb["params"]
            for piece, v in ba["delta"].items():  # the same batches summed in another order
                assert bb["delta"][piece] == pytest.approx(v, rel=1e-12)
            assert bb["similarity"] == pytest.approx(ba["similarity"], rel=1e-12)
