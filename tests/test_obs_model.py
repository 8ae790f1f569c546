"""OBS-Diff on whole tiny models: Hessians from the calibration loop, group-wise sequential
pruning, structured shrinking, pipelines, artifacts, 2:4 conversion."""
import functools

import pytest
import torch
import torch.nn as nn

from hprune.artifacts import load_compressed, save_compressed
from hprune.calib import synthetic
from hprune.errors import BackendUnavailableError, HpruneError
from hprune.metrics import rel_mse
from hprune.models import get_adapter
from hprune.obs import (HessianCollector, find_linear_units, find_sites, obs_prune_model, prune_linear,
                        run_calibration_loop, split_groups, step_weights, to_semi_structured)
from hprune.pipelines import build_pipeline, generate, stand_in_prompts
from hprune.recipe import get_recipe
from util import TINY, fresh, inputs, on_ranks, out


@functools.lru_cache(maxsize=None)
def calib_for(name: str):
    """A small synthetic calibration set (2 prompts, 3 steps, 16x16 latents) per tiny model."""
    return synthetic(fresh(name), n_prompts=2, num_steps=3, latent_size=16)


def direct_hessians(model, calib, sites, weights):
    """Oracle: run the model on the set's stored inputs, one sample at a time, and weight each
    sample's activations by its step's α."""
    c = HessianCollector(sites, weights)
    for i in range(len(calib)):
        c.step = int(calib.step[i])  # the step is known from the set; no tracking involved
        hs = [m[0].register_forward_pre_hook(lambda _m, a, site=s: c.add(site, a[0], c.alpha()))
              for s, m in sites.items()]
        try:
            x = next(calib.batches(batch_size=1, indices=[i]))
            with torch.no_grad():
                model(**x)
        finally:
            for h in hs:
                h.remove()
    return c.hessians()


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_loop_hessians_equal_direct_computation(name):
    """Hessians gathered while the denoising loop re-runs equal those computed directly from the
    calibration set's captured inputs with the step weights: same trajectory, same α per step."""
    model, calib = fresh(name), calib_for(name)
    units = find_linear_units(model)
    sites = {u.name: [l for _, l in u.linears] for u in units[:3] + units[-2:]}
    weights = step_weights("log-decrease", calib.num_steps)
    c = HessianCollector(sites, weights)
    run_calibration_loop(model, calib, c)
    direct = direct_hessians(model, calib, sites, weights)
    for s in sites:
        torch.testing.assert_close(c.hessians()[s], direct[s], rtol=2e-4, atol=1e-6)
    # and the weighting matters: uniform weights give a different Hessian
    cu = HessianCollector(sites, step_weights("uniform", calib.num_steps))
    run_calibration_loop(model, calib, cu)
    s0 = next(iter(sites))
    assert not torch.allclose(cu.hessians()[s0], c.hessians()[s0], rtol=1e-3)


def test_units_keep_qkv_together_and_modulation_dense():
    units = find_linear_units(fresh("tiny-flux"))
    names = {u.name: [p for p, _ in u.linears] for u in units}
    assert names["transformer_blocks.0.attn.to_q"] == [f"transformer_blocks.0.attn.{n}" for n in ("to_q", "to_k", "to_v")]
    assert names["transformer_blocks.0.attn.add_q_proj"][1:] == ["transformer_blocks.0.attn.add_k_proj",
                                                                 "transformer_blocks.0.attn.add_v_proj"]
    assert "single_transformer_blocks.0.proj_mlp" in names["single_transformer_blocks.0.attn.to_q"]
    every = [p for ps in names.values() for p in ps]
    assert not any(".norm" in p for p in every)
    assert len(every) == len(set(every))
    for k in (1, 2, 3, len(units)):
        parts = split_groups([u.numel for u in units], k)
        assert len(parts) == k and all(len(p) for p in parts)
        assert [i for p in parts for i in p] == list(range(len(units)))
    with pytest.raises(HpruneError, match="more than the"):
        split_groups([1, 2], 3)


@pytest.mark.parametrize("name,pattern,compare", [
    ("tiny-sd3", "unstructured", True), ("tiny-sd3", "2:4", True), ("tiny-flux", "unstructured", True),
    ("tiny-flux", "4:8", False), ("tiny-sd35", "2:4", False)])
def test_model_pattern_and_fidelity(name, pattern, compare):
    """Every targeted Linear gets the pattern, AdaLN stays dense, shapes stay, the recipe says
    so; on the model's velocity OBS is closer to the original than both baselines."""
    calib = calib_for(name)
    x = inputs(fresh(name))
    ref = out(fresh(name), x)
    errs = {}
    for method in ("obs", "wanda", "magnitude") if compare else ("obs",):
        m = fresh(name)
        s = 0.5 if pattern == "unstructured" else None
        rep = obs_prune_model(m, calib, s, pattern, method=method)
        for u in find_linear_units(m):
            for path, lin in u.linears:
                w = lin.weight
                if pattern == "unstructured":
                    assert abs(float((w == 0).float().mean()) - 0.5) < 0.02, path
                else:
                    n, mm = map(int, pattern.split(":"))
                    assert bool(((w != 0).reshape(w.shape[0], -1, mm).sum(-1) <= n).all()), path
        for n_, mod in m.named_modules():  # AdaLN modulation stays dense
            if isinstance(mod, nn.Linear) and ".norm" in n_:
                assert float((mod.weight == 0).float().mean()) < 0.01, n_
        assert rep["params_after"] == rep["params_before"]
        assert get_recipe(m)[-1]["op"] == "sparsity"
        y = out(m, x)
        assert torch.isfinite(y).all()
        errs[method] = rel_mse(y, ref)
    if compare:
        assert errs["obs"] < errs["wanda"] and errs["obs"] < errs["magnitude"], errs


def _plain_prune(model, calib, units, sparsity, weights):
    """Reference: Hessians for `units` from one calibration run on `model`, then prune_linear."""
    c = HessianCollector({u.name: [l for _, l in u.linears] for u in units}, weights)
    run_calibration_loop(model, calib, c)
    hs = c.hessians()
    for u in units:
        for _, lin in u.linears:
            with torch.no_grad():
                lin.weight.copy_(prune_linear(lin.weight, hs[u.name], sparsity))
    return hs


def test_groupwise_k1_equals_plain_and_k2_is_sequential():
    name, calib = "tiny-sd3", calib_for("tiny-sd3")
    w = step_weights("log-decrease", calib.num_steps)
    # K = 1: exactly plain one-shot pruning
    a = fresh(name)
    obs_prune_model(a, calib, 0.5, groups=1)
    b = fresh(name)
    _plain_prune(b, calib, find_linear_units(b), 0.5, w)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # K = 2: the second group is calibrated on the model whose first group is already pruned
    k2 = fresh(name)
    obs_prune_model(k2, calib, 0.5, groups=2)
    ref = fresh(name)
    units = find_linear_units(ref)
    first, second = split_groups([u.numel for u in units], 2)
    _plain_prune(ref, calib, [units[i] for i in first], 0.5, w)
    h_seq = _plain_prune(ref, calib, [units[i] for i in second], 0.5, w)
    s2, sr = k2.state_dict(), ref.state_dict()
    assert all(torch.equal(s2[k], sr[k]) for k in s2)
    assert not all(torch.equal(s2[k], sa[k]) for k in s2)
    # the sequential Hessians differ from the one-shot ones for the second group
    one_shot = fresh(name)
    last = find_linear_units(one_shot)[second[-1]]
    c = HessianCollector({last.name: [last.linears[0][1]]}, w)
    run_calibration_loop(one_shot, calib, c)
    assert not torch.allclose(c.hessians()[last.name], h_seq[last.name], rtol=1e-4)


def _zero_removed_groups(model, pruned, method_sites):
    """Oracle for structured pruning without compensation: the ORIGINAL model with the removed
    heads / neurons zeroed at the input of their consumers."""
    handles = []
    for site, entry in method_sites:
        kept = set(entry["kept"]) if "kept" in entry else None
        removed = [h for h in range(entry["before"]) if kept is not None and h not in kept]
        for path, off in entry["consumers"]:
            lin = model.get_submodule(path)
            if kept is None:  # neurons: removed = columns whose consumer weights are gone
                removed = site
            cols = torch.cat([off + torch.arange(h * entry["group_size"], (h + 1) * entry["group_size"])
                              for h in removed]) if len(removed) else torch.zeros(0, dtype=torch.long)

            def zero(_m, args, cols=cols):
                x = args[0].clone()
                x[..., cols] = 0
                return (x,)
            handles.append(lin.register_forward_pre_hook(zero))
    return handles


@pytest.mark.parametrize("name", TINY)
def test_structured_magnitude_equals_zeroing_the_removed_groups(name):
    """Without compensation, shrinking must compute exactly what the original model computes with
    the removed heads/neurons zeroed: checks the slicing of q/k/v, add_q/k/v, to_out, to_add_out,
    ff, proj_mlp/proj_out and attn.heads on every block kind."""
    orig, m = fresh(name), fresh(name)
    rep = obs_prune_model(m, None, 0.5, "structured", method="magnitude")
    entries = [e for step in get_recipe(m) if step["op"] == "shrink" for e in step["sites"]]
    assert entries and {e["kind"] for e in entries} == {"heads", "neurons"}
    # recover removed neuron indices by matching the producer rows that survived
    method_sites = []
    for e in entries:
        if e["kind"] == "neurons":
            old = orig.get_submodule(e["producers"][0]).weight
            new = m.get_submodule(e["producers"][0]).weight
            kept = [int((old == row).all(1).nonzero()[0]) for row in new]
            method_sites.append(([j for j in range(e["before"]) if j not in kept], e))
            assert e["after"] % 8 == 0 and abs(e["after"] - 0.5 * e["before"]) <= 4
            assert new.shape[0] == e["after"]
        else:
            method_sites.append((None, e))
            attn = m.get_submodule(e["attention"])
            assert attn.heads == e["after"] == e["before"] - round(0.5 * e["before"])
            for p in e["producers"]:
                assert m.get_submodule(p).out_features == attn.heads * e["group_size"]
    hs = _zero_removed_groups(orig, m, method_sites)
    x = inputs(orig)
    try:
        want = out(orig, x)
    finally:
        for h in hs:
            h.remove()
    torch.testing.assert_close(out(m, x), want, rtol=1e-4, atol=1e-5)
    assert rep["params_after"] < 0.8 * rep["params_before"]


@pytest.mark.parametrize("name,groups", [("tiny-sd3", 2), ("tiny-sd35", 1), ("tiny-flux", 2)])
def test_structured_obs_runs_in_pipeline_and_round_trips(name, groups, tmp_path):
    calib = calib_for(name)
    m = fresh(name)
    x = inputs(m)
    ref = out(fresh(name), x)
    rep = obs_prune_model(m, calib, 0.3, "structured", groups=groups)
    assert rep["params_after"] < rep["params_before"]
    y = out(m, x)
    assert torch.isfinite(y).all()
    # compensation helps: OBS is closer to the original than the same sparsity by magnitude
    mag = fresh(name)
    obs_prune_model(mag, None, 0.3, "structured", method="magnitude")
    assert rel_mse(y, ref) < rel_mse(out(mag, x), ref)
    # runs inside a diffusers pipeline
    emb = stand_in_prompts(m, 1)
    img = generate(build_pipeline(m), emb["prompt_embeds"], emb["pooled_prompt_embeds"], steps=2)
    assert img.shape[1] == 3 and torch.isfinite(img).all()
    # artifact round trip: same tensors, same outputs, bit for bit
    save_compressed(m, tmp_path / "a")
    back = load_compressed(tmp_path / "a")
    sa, sb = m.state_dict(), back.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(out(back, x), y)
    for path in {e["attention"] for step in get_recipe(m) if step["op"] == "shrink"
                 for e in step["sites"] if e["kind"] == "heads"}:
        assert back.get_submodule(path).heads == m.get_submodule(path).heads


def test_unstructured_round_trip_and_composes_with_block_pruning(tmp_path):
    from hprune.models import PrunePlan, apply_plan

    m = fresh("tiny-flux")
    apply_plan(m, PrunePlan.manual({0: ["context_ff"], 3: ["mlp"]}, model=m))
    obs_prune_model(m, calib_for("tiny-flux"), 0.3, "structured", method="wanda")
    obs_prune_model(m, calib_for("tiny-flux"), pattern="2:4")
    assert [s["op"] for s in get_recipe(m)] == ["prune", "shrink", "sparsity"]
    save_compressed(m, tmp_path / "a")
    back = load_compressed(tmp_path / "a")
    x = inputs(m)
    assert torch.equal(out(back, x), out(m, x))
    assert get_recipe(back) == get_recipe(m)


def test_obs_prune_model_rejects_bad_input_before_changing_anything():
    m = fresh("tiny-sd3")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(HpruneError, match="calibration set is for a flux model"):
        obs_prune_model(m, calib_for("tiny-flux"), 0.5)
    with pytest.raises(HpruneError, match="needs a calibration set"):
        obs_prune_model(m, None, 0.5, method="wanda")
    with pytest.raises(HpruneError, match="not divisible by M=7"):
        obs_prune_model(m, None, pattern="3:7", method="magnitude")
    with pytest.raises(HpruneError, match="unknown pruning method 'sparsegpt'"):
        obs_prune_model(m, None, 0.5, method="sparsegpt")
    with pytest.raises(HpruneError, match="block index 99 out of range"):
        obs_prune_model(m, None, 0.5, method="magnitude", blocks=[0, 99])
    with pytest.raises(HpruneError, match="groups=500 is more than"):
        obs_prune_model(m, None, 0.5, method="magnitude", groups=500)
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert get_recipe(m) == []


def test_blocks_option_limits_pruning():
    m = fresh("tiny-sd3")
    obs_prune_model(m, None, 0.5, method="magnitude", blocks=[1, 2])
    ad = get_adapter(m)
    for i in range(ad.num_blocks(m)):
        w = ad.get_block(m, i).ff.net[2].weight
        assert (float((w == 0).float().mean()) > 0.4) == (i in (1, 2))
    m = fresh("tiny-sd3")
    obs_prune_model(m, None, 0.5, "structured", method="magnitude", blocks=[0])
    assert [s.block for s in find_sites(m) if s.kind == "heads" and s.count < 4] == [0]


def test_semi_structured_swap_on_cpu_with_stand_in_converter(tmp_path):
    m = fresh("tiny-sd3")
    obs_prune_model(m, None, pattern="2:4", method="magnitude")
    x = inputs(m)
    y = out(m, x)
    with pytest.raises(BackendUnavailableError, match="need a CUDA GPU"):
        to_semi_structured(m)

    class Marked(torch.Tensor):
        pass

    done = to_semi_structured(m, converter=lambda w: w.clone().as_subclass(Marked))
    expected = [p for u in find_linear_units(fresh("tiny-sd3")) for p, _ in u.linears]
    assert sorted(done) == sorted(expected)
    assert all(type(m.get_submodule(p).weight.data) is Marked for p in done)
    assert torch.equal(out(m, x), y)
    with pytest.raises(HpruneError, match="save before converting"):
        save_compressed(m, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    with pytest.raises(HpruneError, match="no 2:4-sparse Linear"):
        to_semi_structured(fresh("tiny-sd3"), converter=lambda w: w)


@pytest.mark.gpu
def test_semi_structured_matches_dense_on_gpu():
    from hprune.loading import load_model

    m = load_model("tiny-sd3", device="cuda", dtype=torch.float16)
    obs_prune_model(m, None, pattern="2:4", method="magnitude")
    x = inputs(m)
    x = {k: v.to("cuda", torch.float16) if v.is_floating_point() else v.to("cuda") for k, v in x.items()}
    y = out(m, x)
    done = to_semi_structured(m)
    assert done
    torch.testing.assert_close(out(m, x), y, rtol=2e-2, atol=2e-2)


# ---- 2 processes (gloo): trajectories dealt out, Hessians combined --------------------------------


def _dist_hessians():
    """Hessians of a few sites over the whole set and over trajectory 1 only, the collectors' call
    counts (this process's work), and the OBS-pruned model's weights."""
    model, calib = fresh("tiny-sd3"), calib_for("tiny-sd3")
    units = find_linear_units(model)
    sites = {u.name: [l for _, l in u.linears] for u in units[:2] + units[-1:]}
    weights = step_weights("log-decrease", calib.num_steps)
    out = {}
    for key, trajs in (("all", None), ("one", [1])):
        c = HessianCollector(sites, weights)
        run_calibration_loop(model, calib, c, trajectories=trajs)
        out[key] = ({s: h.clone() for s, h in c.hessians().items()}, {s: c.mass(s) for s in sites}, c.calls)
    obs_prune_model(model, calib, 0.5, "unstructured", progress=False)
    out["pruned"] = {k: v.clone() for k, v in model.state_dict().items()}
    return out


def test_two_processes_share_the_calibration_loop(tmp_path):
    one = _dist_hessians()
    r0, r1 = on_ranks(_dist_hessians, 2, tmp_path)
    for key in ("all", "one"):
        (h1, m1, calls1), (ha, ma, ca), (hb, mb, cb) = one[key], r0[key], r1[key]
        assert ca + cb == calls1  # each trajectory ran on one rank only
        assert (ca, cb) == ((calls1 // 2, calls1 // 2) if key == "all" else (calls1, 0))
        assert ma == mb and ma == pytest.approx(m1, rel=1e-12)
        assert ha.keys() == hb.keys() == h1.keys()
        for s in h1:
            assert torch.equal(ha[s], hb[s])  # every rank holds the same Hessians
            torch.testing.assert_close(ha[s], h1[s], rtol=1e-5, atol=1e-7)
    # OBS on top: every rank prunes alike, and as one process does up to near-ties: a Hessian that
    # differs in the 7th digit can swap which of two almost equally cheap weights of a row is
    # zeroed (and so that row's compensation); every row with the same mask has the same weights
    p1, pa, pb = one["pruned"], r0["pruned"], r1["pruned"]
    rows = differ = 0
    for k, w in p1.items():
        assert torch.equal(pa[k], pb[k]), k
        if w.dim() == 2 and w.is_floating_point():
            same = ((pa[k] == 0) == (w == 0)).all(dim=1)
            rows, differ = rows + len(same), differ + int((~same).sum())
            # compensation amplifies the Hessians' last-digit differences: ~1e-4 of the weights' scale
            torch.testing.assert_close(pa[k][same], w[same], rtol=1e-3, atol=2e-4)
    assert differ <= 0.02 * rows, (differ, rows)
