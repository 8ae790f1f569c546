"""The self-test at the dispatch point (issue 15): a kernel is checked against the reference on its
first call per (op, backend, device capability, dtype); one that fails is disabled with one warning
and the next backend runs; never under torch.compile tracing or CUDA-graph capture; and
`hprune selftest` prints the table and fails on a broken kernel.

The broken backends here are real functions that return wrong numbers (or crash), registered next
to the real ones through the public `dispatch.register`: the same path a new backend takes."""
from __future__ import annotations

import warnings

import pytest
import torch

from hprune.cli import main
from hprune.errors import BackendUnavailableError
from hprune.kernels import dispatch
from hprune.kernels.w4a16 import OP as W4A16, w4a16_mm, w4a16_mm_reference


@pytest.fixture(autouse=True)
def _fresh_checks(monkeypatch):
    monkeypatch.setenv("HPRUNE_SELFTEST", "1")  # checks on the CPU too (default: CUDA devices only)
    dispatch.reset_checks()
    yield
    dispatch.reset_checks()


def _problem(device, dtype, gen):
    return [(torch.randn(7, 3, generator=gen).to(device=device, dtype=dtype),)]


@pytest.fixture
def toy():
    """An op with a wrong 'triton' kernel (off by 1 %), a right 'cpp' one and the reference."""
    op = "toy_selftest_op"
    calls = {"triton": 0, "cpp": 0}

    def wrong(x):
        calls["triton"] += 1
        return x * 2 * 1.01

    def right(x):
        calls["cpp"] += 1
        return x + x

    dispatch.register(op, "reference")(lambda x: x * 2)
    dispatch.register(op, "triton")(wrong)
    dispatch.register(op, "cpp")(right)
    dispatch.register_selftest(op, dispatch.SelfTest(make=_problem, outputs=lambda _a, out: [out],
                                                     tolerance=lambda _d: 1e-6, dtypes=(torch.float32,)))
    yield op, calls
    dispatch._REGISTRY.pop(op)
    dispatch._SELFTESTS.pop(op)


def test_broken_backend_is_caught_bypassed_and_warned_once(toy):
    op, calls = toy
    with pytest.warns(RuntimeWarning) as rec:
        assert dispatch.select(op, "cpu", dtype=torch.float32).name == "cpp"
    msgs = [str(w.message) for w in rec if "self-test" in str(w.message)]
    assert len(msgs) == 1
    assert op in msgs[0] and "'triton'" in msgs[0] and "cpu" in msgs[0] and "max error 0.01" in msgs[0]
    assert calls == {"triton": 1, "cpp": 1}  # each checked once
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise
        for _ in range(3):
            assert dispatch.select(op, "cpu", dtype=torch.float32).name == "cpp"
    assert calls == {"triton": 1, "cpp": 1}  # once per key: no second check
    # another dtype is another key: checked (and failed) again
    with pytest.warns(RuntimeWarning, match="float64"):
        assert dispatch.select(op, "cpu", dtype=torch.float64).name == "cpp"
    assert calls == {"triton": 2, "cpp": 2}
    # without a dtype nothing is checked (callers that cannot say what they run)
    assert dispatch.select(op, "cpu").name == "triton"


def test_a_crashing_backend_is_caught_too(toy):
    op, _calls = toy

    def crash(x):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    dispatch.register(op, "cuda")(crash)
    with pytest.warns(RuntimeWarning) as rec:
        assert dispatch.select(op, "cpu", dtype=torch.float32).name == "cpp"
    assert len(rec) == 2 and "RuntimeError: CUDA error: an illegal memory access" in str(rec[0].message)
    res = {r.backend: r for r in dispatch.check_results()}
    assert res["cuda"].status == "FAIL" and res["triton"].status == "FAIL" and res["cpp"].status == "ok"


def test_forced_backend_that_fails_raises(toy):
    op, _calls = toy
    with pytest.warns(RuntimeWarning), pytest.raises(BackendUnavailableError, match="failed its self-test"):
        dispatch.select(op, "cpu", backend="triton", dtype=torch.float32)


def test_unchecked_kernels_are_refused_while_tracing_then_checked_eagerly(toy, monkeypatch):
    """Without a child process nothing can be checked under tracing / capture, and nothing
    unchecked may be chosen there: the reference runs; the next eager call checks as usual."""
    op, calls = toy
    monkeypatch.setenv("HPRUNE_SELFTEST_ISOLATE", "0")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert dispatch.select(op, "cpu", dtype=torch.float32).name == "reference"  # nothing unchecked, nothing run
    assert calls == {"triton": 0, "cpp": 0} and not dispatch.check_results()
    with pytest.raises(BackendUnavailableError, match="not checked yet"):
        dispatch.select(op, "cpu", backend="cpp", dtype=torch.float32)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    with pytest.warns(RuntimeWarning):
        assert dispatch.select(op, "cpu", dtype=torch.float32).name == "cpp"
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # checked now: chosen there too
    assert dispatch.select(op, "cpu", dtype=torch.float32).name == "cpp"


def test_first_call_checks_default_to_cuda_devices_only(toy, monkeypatch):
    op, calls = toy
    monkeypatch.delenv("HPRUNE_SELFTEST")
    assert dispatch.select(op, "cpu", dtype=torch.float32).name == "triton"
    monkeypatch.setenv("HPRUNE_SELFTEST", "0")
    assert dispatch.select(op, "cpu", dtype=torch.float32).name == "triton"
    assert calls == {"triton": 0, "cpp": 0}


@pytest.fixture
def broken_w4a16():
    """A wrong CPU kernel registered as w4a16_mm's 'cpp' backend: 1 % off the reference."""
    def wrong(x, qweight, scales, zeros, bias, group_size, fmt):
        return w4a16_mm_reference(x, qweight, scales, zeros, bias, group_size, fmt) * 1.01

    dispatch.register(W4A16, "cpp", supports=lambda d: d.type == "cpu")(wrong)
    yield
    dispatch._REGISTRY[W4A16].pop("cpp")


def test_real_op_with_a_broken_kernel_gives_reference_numbers(broken_w4a16):
    from hprune import formats as F

    gen = torch.Generator().manual_seed(0)
    q = F.quantize(torch.randn(40, 96, generator=gen) * 0.05, 32, "int4", refine=False)
    x = torch.randn(3, 96, generator=gen)
    with pytest.warns(RuntimeWarning, match="'cpp' kernel of w4a16_mm failed its self-test on cpu"):
        out = w4a16_mm(x, q.qweight, q.scales, q.zeros, group_size=32)
    torch.testing.assert_close(out, w4a16_mm_reference(x, q.qweight, q.scales, q.zeros, None, 32, "int4"),
                               rtol=0, atol=0)


def test_cli_selftest_prints_table_and_fails_on_a_broken_kernel(broken_w4a16, capsys):
    assert main(["selftest", "--op", "w4a16_mm", "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "| op" in out and "FAIL" in out and "w4a16_mm" in out and "cpp" in out
    assert "checks FAILED" in out


def test_cli_selftest_passes_on_this_machine(capsys):
    assert main(["selftest", "--op", "scaled_adamw_", "--json"]) == 0
    import json

    rep = json.loads(capsys.readouterr().out)
    assert rep["results"], "at least one kernel besides the reference runs here"
    assert all(r["result"] in ("ok", "n/a") for r in rep["results"])
    assert main(["selftest", "--device", "nope"]) == 1
    assert main(["selftest", "--op", "nope"]) == 1


@pytest.mark.gpu
def test_first_call_inside_cuda_graph_capture_is_checked_in_a_child(monkeypatch, tmp_path):
    """On a fresh key inside capture the check runs in a child process (it touches no stream of
    this process), so the kernel that enters the graph is a checked one."""
    from hprune import formats as F

    dev = torch.device("cuda")
    monkeypatch.delenv("HPRUNE_SELFTEST")  # the default: on for CUDA, in a child process
    monkeypatch.setenv("HPRUNE_CACHE_DIR", str(tmp_path))
    gen = torch.Generator().manual_seed(0)
    q = F.quantize(torch.randn(64, 128, generator=gen) * 0.05, 64, "int4", scale_dtype=torch.float16,
                   refine=False)
    qw, s, z = q.qweight.to(dev), q.scales.to(dev), q.zeros.to(dev)
    x = torch.randn(4, 128, generator=gen).half().to(dev)
    from hprune.kernels.triton_w4a16 import w4a16_matmul

    w4a16_matmul(x, qw, s, z, None, 64, "int4")  # compile outside capture (Triton's warm-up)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = w4a16_mm(x, qw, s, z, group_size=64)
    assert [r for r in dispatch.check_results() if r.op == W4A16 and r.ok]
    graph.replay()
    torch.cuda.synchronize()
    ref = w4a16_mm_reference(x, qw, s, z, None, 64, "int4")
    assert (y.float() - ref.float()).abs().max() <= 2e-3 * ref.float().abs().max()


def test_problems_a_backend_declines_are_skipped_not_passed():
    """A backend that declines some problems (ShapeError: not its shape) is checked on the rest;
    one that declines all is "n/a"; wrong numbers on a problem it takes still fail."""
    from hprune.errors import ShapeError

    op = "toy_partial_op"

    def make(device, dtype, gen):
        return [(torch.randn(3, 5, generator=gen).to(device=device, dtype=dtype),),
                (torch.randn(4, 8, generator=gen).to(device=device, dtype=dtype),)]

    def wide_only_wrong(x):  # declines the 5-wide problem, wrong on the 8-wide one
        if x.shape[-1] % 8:
            raise ShapeError("needs K % 8 == 0")
        return x * 2 + 1

    def declines_all(x):
        raise ShapeError("takes no such input")

    dispatch.register(op, "reference")(lambda x: x * 2)
    dispatch.register(op, "triton")(wide_only_wrong)
    dispatch.register(op, "cpp")(declines_all)
    dispatch.register_selftest(op, dispatch.SelfTest(make=make, outputs=lambda _a, out: [out],
                                                     tolerance=lambda _d: 1e-6, dtypes=(torch.float32,)))
    try:
        res = dispatch.run_selftest(op, "triton", "cpu", torch.float32)
        assert res.status == "FAIL" and res.max_error > 0.1
        res = dispatch.run_selftest(op, "cpp", "cpu", torch.float32)
        assert res.status == "n/a" and "takes no such input" in res.error
    finally:
        dispatch._REGISTRY.pop(op)
        dispatch._SELFTESTS.pop(op)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_w4a16_selftest_problems_include_ones_the_cutlass_backend_serves(dtype):
    """Otherwise the cutlass kernel would decline every self-test problem ("n/a") and then run
    unchecked on the layers it does serve."""
    from hprune.kernels import cutlass_w4a16 as CW
    from hprune.kernels.w4a16 import selftest_problems

    probs = selftest_problems(torch.device("cpu"), dtype, torch.Generator().manual_seed(0))
    served = [p for p in probs if CW.cutlass_unsupported(p[0], p[1], p[2], p[3], p[5], p[6], p[4]) is None]
    assert {p[6] for p in served} == set(CW.FORMATS)
    assert any(p[0].shape[0] > 128 and p[0].shape[0] % 128 for p in served)  # a tail past one M tile
