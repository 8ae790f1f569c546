"""OBS-Diff on one layer: the OBS/SparseGPT solver, the baselines, structured group OBS, step weights."""
import math

import pytest
import torch

from hprune.errors import HpruneError, ShapeError
from hprune.obs import magnitude_prune, prune_linear, step_weights, wanda_prune
from hprune.obs.hessian import HessianCollector
from hprune.obs.structured import ColumnOBS, greedy_obs_removal


def correlated_layer(d=256, out=96, seed=0):
    """A Linear with inputs like a transformer's activations: a few strong shared directions
    (low-rank correlation) on top of mixed noise, with per-feature scales."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=g) / d ** 0.5 + 3 * torch.randn(d, 8, generator=g) @ torch.randn(8, d, generator=g) / d ** 0.5
    scales = torch.exp(0.5 * torch.randn(d, generator=g))

    def sample(n):
        return (torch.randn(n, d, generator=g) @ A) * scales

    W = torch.randn(out, d, generator=g)
    X_cal, X_test = sample(2048), sample(2048)
    return W, X_cal.T @ X_cal / len(X_cal), X_test


def out_err(W, Wp, X):
    """Relative output error on held-out inputs."""
    return float(((W - Wp) @ X.T).square().sum() / (W @ X.T).square().sum())


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
def test_obs_beats_wanda_beats_magnitude(pattern):
    W, H, X = correlated_layer()
    s = 0.5 if pattern == "unstructured" else None
    e_obs = out_err(W, prune_linear(W, H, s, pattern), X)
    e_wanda = out_err(W, wanda_prune(W, H, s, pattern), X)
    e_mag = out_err(W, magnitude_prune(W, s, pattern), X)
    assert e_obs < 0.5 * e_wanda, (e_obs, e_wanda)
    assert e_wanda < e_mag, (e_wanda, e_mag)


def test_compensation_is_what_helps():
    """Same OBS mask without the weight update is much worse: the update does the work."""
    W, H, X = correlated_layer(seed=1)
    Wp = prune_linear(W, H, 0.5)
    masked_only = torch.where(Wp == 0, torch.zeros_like(W), W)
    assert out_err(W, Wp, X) < 0.2 * out_err(W, masked_only, X)


@pytest.mark.parametrize("fn", ["obs", "wanda", "magnitude"])
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_pattern_holds_exactly(fn, n, m):
    W, H, _ = correlated_layer(d=128, out=40, seed=2)
    W = W.to(torch.bfloat16)
    pat = f"{n}:{m}"
    Wp = {"obs": lambda: prune_linear(W, H, pattern=pat, blocksize=36),  # block not a multiple of M
          "wanda": lambda: wanda_prune(W, H, pattern=pat),
          "magnitude": lambda: magnitude_prune(W, pattern=pat)}[fn]()
    assert Wp.dtype == torch.bfloat16 and Wp.shape == W.shape
    nz = (Wp != 0).reshape(W.shape[0], -1, m).sum(-1)
    assert bool((nz == n).all()), "every group of M keeps exactly N weights"


@pytest.mark.parametrize("s", [0.3, 0.5, 0.7])
def test_unstructured_sparsity_is_exact(s):
    W, H, _ = correlated_layer(d=256, out=64, seed=3)
    for Wp in (prune_linear(W, H, s), wanda_prune(W, H, s), magnitude_prune(W, s)):
        assert abs(float((Wp == 0).float().mean()) - s) < 1e-3
    # Wanda compares within rows: every row has the same count
    assert len(set((wanda_prune(W, H, s) == 0).sum(1).tolist())) == 1


def test_dead_inputs_are_handled():
    """Inputs that never fire have a zero Hessian diagonal: their weights go (they cannot matter),
    the solver neither fails nor produces NaNs, and the output is as good as without them."""
    W, H, X = correlated_layer(d=128, out=32, seed=4)
    dead = torch.tensor([3, 50, 51, 127])
    H = H.clone()
    H[dead, :] = 0
    H[:, dead] = 0
    X = X.clone()
    X[:, dead] = 0
    Wp = prune_linear(W, H, 0.5)
    assert torch.isfinite(Wp).all()
    assert (Wp[:, dead] == 0).all()
    assert out_err(W, Wp, X) < out_err(W, wanda_prune(W, H, 0.5), X)
    Hd = torch.zeros(128, 128)  # a layer that never saw an input: everything is dead
    assert (prune_linear(W, Hd, 0.5) == 0).all()


def test_structured_group_obs_matches_least_squares():
    """Removing a set of column groups with OBS leaves the remaining columns at the exact
    least-squares optimum min ||(W - W')X||² (with the same damping)."""
    W, H, _ = correlated_layer(d=64, out=24, seed=5)
    st = ColumnOBS(W, H, percdamp=0.01)
    groups = torch.arange(64).view(8, 8)  # 8 "heads" of 8 columns
    kept = greedy_obs_removal([st], [groups], n_remove=3)
    assert len(kept) == 5
    R = groups[kept].flatten()
    Hd = H.double() + 0.01 * torch.diagonal(H).double().mean() * torch.eye(64, dtype=torch.float64)
    best = W.double() @ Hd[:, R] @ torch.linalg.inv(Hd[R][:, R])
    torch.testing.assert_close(st.W[:, R], best, rtol=1e-7, atol=1e-8)
    removed = torch.tensor(sorted(set(range(64)) - set(R.tolist())))
    assert (st.W[:, removed] == 0).all()


def test_structured_picks_the_cheapest_group():
    """With one group to remove, the greedy choice is the brute-force best."""
    W, H, _ = correlated_layer(d=48, out=16, seed=6)
    groups = torch.arange(48).view(6, 8)
    Hd = H.double() + 0.01 * torch.diagonal(H).double().mean() * torch.eye(48, dtype=torch.float64)

    def cost(drop):
        R = torch.cat([groups[i] for i in range(6) if i != drop])
        Wr = W.double() @ Hd[:, R] @ torch.linalg.inv(Hd[R][:, R])
        E = W.double().clone()
        E[:, R] -= Wr
        return float(torch.einsum("oi,ij,oj->", E, Hd, E))

    brute = min(range(6), key=cost)
    kept = greedy_obs_removal([ColumnOBS(W, H)], [groups], n_remove=1)
    assert sorted(set(range(6)) - set(kept.tolist())) == [brute]


def test_bad_inputs_raise_clear_errors():
    W, H, _ = correlated_layer(d=64, out=8)
    with pytest.raises(HpruneError, match=r"sparsity must be in \(0, 1\)"):
        prune_linear(W, H, 1.0)
    with pytest.raises(HpruneError, match="sparsity must be in"):
        wanda_prune(W, H, 0.0)
    with pytest.raises(HpruneError, match="unknown sparsity pattern 'blocky'"):
        prune_linear(W, H, 0.5, "blocky")
    with pytest.raises(HpruneError, match="not divisible by M=7"):
        prune_linear(W, H, pattern="3:7")
    with pytest.raises(HpruneError, match="contradicts"):
        prune_linear(W, H, 0.3, "2:4")
    with pytest.raises(ShapeError, match=r"hessian must be \(64, 64\)"):
        prune_linear(W, H[:32, :32], 0.5)
    with pytest.raises(HpruneError, match="N:M needs 0 < N < M"):
        magnitude_prune(W, pattern="4:4")


def test_step_weights_values():
    T = 5
    ld = step_weights("log-decrease", T)
    assert ld[0] == pytest.approx(1.2) and ld[-1] == pytest.approx(0.8)
    for t in range(1, T + 1):
        assert ld[t - 1] == pytest.approx(0.8 + 0.4 * math.log(T - t + 1) / math.log(T))
    li = step_weights("log-increase", T)
    assert li[0] == pytest.approx(0.8) and li[-1] == pytest.approx(1.2)
    assert li[2] == pytest.approx(0.8 + 0.4 * math.log(3) / math.log(5))
    lin = step_weights("linear-decrease", T)
    assert lin == pytest.approx([1.2, 1.1, 1.0, 0.9, 0.8])
    assert step_weights("uniform", T) == pytest.approx([1.0] * T)
    assert step_weights("log-decrease", 4, 0.5, 2.0)[0] == pytest.approx(2.0)
    assert all(a > b for a, b in zip(ld, ld[1:])), "log-decrease decreases"
    assert step_weights("log-decrease", 1) == pytest.approx([1.2])
    with pytest.raises(HpruneError, match="unknown weighting 'cosine'"):
        step_weights("cosine", 4)
    with pytest.raises(HpruneError, match="alpha_min <= alpha_max"):
        step_weights("uniform", 4, 1.5, 1.0)


def test_collector_running_mean_equals_direct_sum():
    """The running weighted mean equals Σ α XᵀX / Σ α·tokens computed in float64."""
    g = torch.Generator().manual_seed(0)
    c = HessianCollector({"site": [torch.nn.Linear(12, 3)]}, [1.0])
    direct, mass = torch.zeros(12, 12, dtype=torch.float64), 0.0
    for k in range(7):
        x = torch.randn(3, 5 + k, 12, generator=g)
        a = 0.8 + 0.05 * k
        c.add("site", x, a)
        x2 = x.reshape(-1, 12).double()
        direct += a * x2.T @ x2
        mass += a * x2.shape[0]
    torch.testing.assert_close(c.hessians()["site"].double(), direct / mass, rtol=1e-5, atol=1e-6)
    assert c.mass("site") == pytest.approx(mass)
