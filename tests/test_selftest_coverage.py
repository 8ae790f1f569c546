"""The self-test checks what production runs (issue 26, item 1).

* Coverage: for every op and backend, the launch configuration each heuristic picks for the SD3.5 /
  FLUX layer shapes (and odd K) at M in {1, 16, 64, 256, 1024, 4096} on H100 / H200 / A100 / L40S
  SM counts is one the op's self-test problems reach (so it was checked on the device before use).
* The check key holds the configuration: a call whose configuration the problems never reached is
  checked on a problem of its own spec before it runs.
* A wrong split-K reduction (injected into the real Triton kernel's launch, run in the interpreter)
  fails the self-test.
* References run in exact fp32 whatever TF32 setting the user chose, and the setting is restored.
* Nothing unchecked is chosen under (simulated) CUDA-graph capture without a child process.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from hprune.kernels import dispatch
from hprune.kernels import scaled_adamw as SA
from hprune.kernels import w4a8 as W8
from hprune.kernels import w4a16 as W16

ROOT = Path(__file__).resolve().parents[1]

# (N, K) of the linear layers of the transformers hprune compresses (diffusers' configs; DESIGN.md):
# SD3.5 Large (2432 hidden, MLP 9728, AdaLayerNormZero 6x / dual-attention ...X 9x, context
# embedder from 4096, final norm 2x), SD3.5 Medium (1536 hidden, MLP 6144), FLUX.1 (3072 hidden,
# MLP 12288, norm1 6x, single-block norm 3x, proj_out over concat(attn, mlp) = 15360, x / context /
# time / pooled embedders from 64 / 4096 / 256 / 768).
LAYERS = (
    (2432, 2432), (9728, 2432), (2432, 9728), (14592, 2432), (21888, 2432), (2432, 4096), (4864, 2432),
    (1536, 1536), (6144, 1536), (1536, 6144), (9216, 1536), (13824, 1536), (1536, 4096),
    (3072, 3072), (12288, 3072), (3072, 12288), (18432, 3072), (9216, 3072), (3072, 15360),
    (3072, 64), (3072, 4096), (3072, 256), (3072, 768),
    (3072, 2433), (2432, 1000),  # odd K: a K tail (the Triton kernel takes any K)
)
MS = (1, 16, 64, 256, 1024, 4096)
# (key, capability, SMs): H100 SXM / H200, H100 PCIe, A100, L40S
DEVICES = (dispatch.DeviceInfo("sm_90", (9, 0), 132), dispatch.DeviceInfo("sm_90", (9, 0), 114),
           dispatch.DeviceInfo("sm_80", (8, 0), 108), dispatch.DeviceInfo("sm_89", (8, 9), 142))
W4A16_BACKENDS = ("cutlass", "cuda", "triton")


def _production_specs(groups=(64, 128), fmts=("int4", "int4_sym", "nf4")):
    for n, k in LAYERS:
        for m in MS:
            for g in groups:
                for fmt in fmts:
                    for bias in (True, False):
                        yield (m, n, k, g, fmt, bias)


def _uncovered(op: str, backend: str, specs, dtypes) -> list[str]:
    missing = []
    for info in DEVICES:
        for dtype in dtypes:
            checked = dispatch.selftest_configs(op, backend, dtype, info)
            for spec in specs:
                cfg = dispatch.config_of(op, backend, spec, dtype, info)
                if cfg is not None and cfg not in checked:
                    missing.append(f"{info.sms} SMs {dtype} {spec}: {cfg!r}")
    return sorted(set(missing))


@pytest.mark.parametrize("backend", W4A16_BACKENDS)
def test_w4a16_selftest_reaches_every_production_configuration(backend):
    dtypes = dispatch._SELFTESTS[W16.OP].dtypes
    missing = _uncovered(W16.OP, backend, list(_production_specs(groups=(32, 64, 128))), dtypes)
    assert not missing, f"{len(missing)} configurations the self-test never checks, e.g. {missing[:5]}"


def test_w4a8_selftest_reaches_every_production_configuration():
    dtypes = dispatch._SELFTESTS[W8.OP].dtypes
    missing = _uncovered(W8.OP, "triton", list(_production_specs(fmts=("int4", "int4_sym"))), dtypes)
    assert not missing, f"{len(missing)} configurations the self-test never checks, e.g. {missing[:5]}"


def test_scaled_adamw_selftest_reaches_both_lerp_variants():
    specs = [(b1,) for b1 in (0.0, 0.3, 0.5, 0.51, 0.9, 0.95, 0.99)]
    for backend in ("cuda", "triton", "cpp"):
        assert not _uncovered(SA.OP, backend, specs, SA.PARAM_DTYPES)


def test_the_configurations_tell_the_variants_apart():
    """The labels are not vacuous: split-K or not, whole K tiles or a tail, each tile (and the
    CUDA small / medium / large tiles) are different configurations, and the self-test reaches
    them all."""
    h100 = DEVICES[0]
    tri = {W16._triton_config((m, n, k, 64, "int4", False), torch.float16, h100)
           for m, n, k in ((1, 2432, 2432), (1, 200, 256), (1, 200, 328), (1, 2432, 2433),
                           (64, 3072, 3072), (256, 3072, 3072))}
    assert any("splitK" in c for c in tri) and any("splitK" not in c for c in tri)
    assert any("evenK" in c for c in tri) and any("Ktail" in c for c in tri)
    assert {c.split()[0] for c in tri} == {"16x64x128", "32x64x32", "64x128x32"}
    checked = dispatch.selftest_configs(W16.OP, "cuda", torch.float16, h100)
    assert {c.split()[0] for c in checked} == {"small", "medium", "large"}
    assert any("splitK" in c for c in checked) and any("Ktail" in c for c in checked)
    assert dispatch.selftest_configs(W16.OP, "cutlass", torch.bfloat16, h100) == {
        "128x128x64 persistent Mtail", "128x128x64 persistent Mwhole"}
    w8 = dispatch.selftest_configs(W8.OP, "triton", torch.float16, h100)
    assert len(w8) == 18  # 2 K blocks x 2 tiles x split / not x EVEN_K / tail, + 2 at large M
    assert dispatch.selftest_configs(SA.OP, "triton", torch.float32, h100) == {
        "lerp-small-weight", "lerp-large-weight"}


def test_the_cuda_plan_mirror_matches_the_kernel_source():
    """w4a16.cuda_plan mirrors csrc/cuda/w4a16.cu's host plan: tiles, M bounds, split rule."""
    src = (ROOT / "csrc/cuda/w4a16.cu").read_text()
    for name, (bm, bn, bk) in W16.CUDA_TILES.items():
        assert re.search(rf"using {name.capitalize()}Tile = Tile<{bm}, {bn}, {bk},", src), name
    plan = src[src.index("W4A16Plan w4a16_plan("):]
    assert f"if (M <= {W16.CUDA_SMALL_MAX_M})" in plan and f"else if (M <= {W16.CUDA_MEDIUM_MAX_M})" in plan
    assert "while (split < 16 && t * split < 2 * num_sms && k_tiles >= 4 * split) split *= 2;" in src


# ---- the check key holds the configuration --------------------------------------------------------

@pytest.fixture
def sized_op(monkeypatch):
    """An op whose 'triton' backend has two configurations ('small' for n <= 4, 'big' above) and
    is wrong in 'big' only; its self-test problems reach 'small' alone."""
    monkeypatch.setenv("HPRUNE_SELFTEST", "1")
    monkeypatch.setenv("HPRUNE_SELFTEST_ISOLATE", "0")
    dispatch.reset_checks()
    op = "toy_sized_op"
    ran: list[int] = []

    def make(device, dtype, gen, specs=((3,), (4,))):
        return [(torch.randn(n, generator=gen).to(device=device, dtype=dtype),) for (n,) in specs]

    def kernel(x):
        ran.append(x.numel())
        return x * 2 if x.numel() <= 4 else x * 2 + 1

    dispatch.register(op, "reference")(lambda x: x * 2)
    dispatch.register(op, "triton", config=lambda spec, dtype, info: "small" if spec[0] <= 4 else "big")(kernel)
    dispatch.register_selftest(op, dispatch.SelfTest(make=make, outputs=lambda _a, out: [out],
                                                     tolerance=lambda _d: 1e-6, dtypes=(torch.float32,),
                                                     specs=((3,), (4,)), spec_of=lambda a: (a[0].numel(),)))
    yield op, ran
    dispatch._REGISTRY.pop(op)
    dispatch._SELFTESTS.pop(op)
    dispatch.reset_checks()


def test_a_configuration_the_problems_never_reached_is_checked_before_it_runs(sized_op):
    op, ran = sized_op
    assert dispatch.select(op, "cpu", dtype=torch.float32, spec=(3,)).name == "triton"
    assert ran == [3, 4]  # the problem set, once
    assert dispatch.select(op, "cpu", dtype=torch.float32, spec=(2,)).name == "triton"
    assert ran == [3, 4]  # 'small' was checked: nothing more runs
    with pytest.warns(RuntimeWarning, match="configuration big"):
        assert dispatch.select(op, "cpu", dtype=torch.float32, spec=(9,)).name == "reference"
    assert ran == [3, 4, 9]  # 'big' checked on a problem of the call's own spec, and refused
    assert dispatch.select(op, "cpu", dtype=torch.float32, spec=(3,)).name == "triton"  # 'small' still runs
    keys = {(r.config, r.status) for r in dispatch.check_results()}
    assert ("small", "ok") in keys and ("big", "FAIL") in keys


def test_no_unchecked_configuration_is_chosen_under_capture(sized_op, monkeypatch):
    """Under capture (simulated through the function the dispatch point asks) an unchecked kernel
    or configuration is refused without a child process; checked ones still run there."""
    op, ran = sized_op
    monkeypatch.setattr(dispatch, "capturing_or_tracing", lambda device: True)
    assert dispatch.select(op, "cpu", dtype=torch.float32, spec=(3,)).name == "reference"
    assert ran == []
    monkeypatch.setattr(dispatch, "capturing_or_tracing", lambda device: False)
    assert dispatch.select(op, "cpu", dtype=torch.float32, spec=(3,)).name == "triton"
    monkeypatch.setattr(dispatch, "capturing_or_tracing", lambda device: True)
    assert dispatch.select(op, "cpu", dtype=torch.float32, spec=(4,)).name == "triton"  # checked: allowed
    assert dispatch.select(op, "cpu", dtype=torch.float32, spec=(9,)).name == "reference"  # 'big' unchecked
    assert ran == [3, 4]


def _tf32_state():
    return (torch.get_float32_matmul_precision(), getattr(torch.backends.cuda.matmul, "fp32_precision", None))


def test_references_run_in_exact_fp32_and_the_users_setting_is_restored(sized_op):
    op, _ran = sized_op
    seen = []
    dispatch._REGISTRY[op]["reference"] = dispatch.Backend(
        "reference", lambda x: (seen.append(_tf32_state()), x * 2)[1], dispatch._always, dispatch._always,
        lambda d: "")
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")  # a user who enabled TF32
        user = _tf32_state()
        assert dispatch.run_selftest(op, "triton", "cpu", torch.float32).ok
        assert seen and all(s[0] == "highest" and s[1] in (None, "ieee") for s in seen)
        assert _tf32_state() == user
    finally:
        torch.set_float32_matmul_precision(before)


# ---- a broken split-K reduction is caught -----------------------------------------------------------

def test_a_wrong_split_k_reduction_fails_the_selftest(monkeypatch):
    """The serial split-K reduction of the real Triton kernel, made wrong: the arrival counters
    start at 1 instead of 0, so the first K slice to arrive believes it is the last and reduces
    before the other slices' partials exist. The self-test (fp16, the split-K problems at
    M <= 16 and 17-128) fails it at those configurations; unbroken, it passes."""
    pytest.importorskip("triton")
    if not dispatch.triton_supports(torch.device("cpu")):
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest without a GPU)")
    from hprune.kernels import triton_w4a16 as TW

    monkeypatch.setenv("HPRUNE_TRITON_AUTOTUNE", "0")
    split_specs = [s for s in W16.SELFTEST_PROBLEMS if s[0] <= 40
                   and "splitK" in W16._triton_config(s, torch.float16, DEVICES[0])][:2]
    assert split_specs
    ok = dispatch.run_selftest(W16.OP, "triton", "cpu", torch.float16, split_specs)
    assert ok.status == "ok", ok.error
    # a fresh buffer each launch: the real cached counters stay clean for the other tests
    monkeypatch.setattr(TW, "_counters", lambda device, n: torch.ones(n, dtype=torch.int32, device=device))
    bad = dispatch.run_selftest(W16.OP, "triton", "cpu", torch.float16, split_specs)
    assert bad.status == "FAIL" and "splitK" in bad.error


# ---- autotuning chooses only checked numbers ----------------------------------------------------

def test_autotune_candidates_start_with_the_heuristic_config():
    from hprune.kernels import triton_w4a8 as T8
    from hprune.kernels import triton_w4a16 as T16

    for m in MS:
        for n, k in LAYERS[:6]:
            for dtype in (torch.float16, torch.bfloat16, torch.float32):
                assert T16.candidate_configs(m, n, k, None, dtype, sms=132)[0] == T16.heuristic_config(
                    m, n, k, None, dtype, sms=132)
            for g in (64, 128):
                assert T8.candidate_configs(m, n, k, g, None, sms=132)[0] == T8.heuristic_config(
                    m, n, k, g, None, sms=132)


def test_the_autotuner_never_picks_a_candidate_that_disagrees_with_the_checked_config(monkeypatch):
    """A candidate that is fastest but wrong (1 % off) is dropped; the heuristic (self-tested)
    config is chosen. Runs the real tuner loop in the interpreter with a fake clock."""
    pytest.importorskip("triton")
    if not dispatch.triton_supports(torch.device("cpu")):
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest without a GPU)")
    import triton

    from hprune import formats as F
    from hprune.kernels import triton_w4a16 as TW

    heur = TW.heuristic_config(4, 64, 128, None, torch.float16, sms=132)
    bad = TW.Config(16, 32, 64, num_warps=4, num_stages=2)
    real = TW._launch
    monkeypatch.setattr(TW, "_launch", lambda *a: real(*a) * 1.01 if a[-1] == bad else real(*a))
    monkeypatch.setattr(TW, "candidate_configs", lambda *a, **k: [heur, bad])
    monkeypatch.setattr(TW, "_autotune_enabled", lambda device: True)
    timed = []
    # a fake clock: the first candidate timed (the heuristic) takes 1.0, every later one 0.1
    monkeypatch.setattr(triton.testing, "do_bench",
                        lambda fn, **k: (timed.append(1), 1.0 if len(timed) == 1 else 0.1)[1])
    gen = torch.Generator().manual_seed(0)
    q = F.quantize(torch.randn(64, 128, generator=gen) * 0.05, 64, "int4", scale_dtype=torch.float16, refine=False)
    x = torch.randn(4, 128, generator=gen).half()
    TW._TUNED.clear()
    try:
        assert TW.get_config(x, q.qweight, q.scales, q.zeros, None, 64, "int4") == heur
        assert len(timed) == 1  # the wrong candidate was never timed
        # the same candidate, right: it is faster, so it is chosen
        TW._TUNED.clear()
        timed.clear()
        monkeypatch.setattr(TW, "_launch", real)
        assert TW.get_config(x, q.qweight, q.scales, q.zeros, None, 64, "int4") == bad
    finally:
        TW._TUNED.clear()
