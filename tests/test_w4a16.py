"""torch.ops.hprune.w4a16_mm: every backend against the plain PyTorch reference, the op's contract
(opcheck, torch.compile, autograd, errors, forcing a backend), W4A16Linear / quantize_model /
artifacts, and compile checks of the CUDA sources.

Error bound (stated once, used everywhere): backends and reference use the same weights (each
rounded once to the activation dtype T) and accumulate in fp32, so they differ only by the
accumulation order and the final rounding to T:  max|out - ref| <= TOL[T] * max|ref|, with
TOL = 1e-5 (fp32), 2e-3 (fp16, ~2 ulp), 1.6e-2 (bf16, ~2 ulp).
Triton runs in interpreter mode on the CPU (tests keep shapes small); on a GPU the same tests run
on the GPU, plus the CUDA kernel tests marked `gpu`.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from hprune.errors import BackendUnavailableError, HpruneError, ShapeError
from hprune.kernels import dispatch, use_backend
from hprune.kernels.w4a16 import OP, w4a16_mm, w4a16_mm_reference
from hprune.quant import W4A16Linear, quantize_linear, quantize_model
from hprune import formats as F
from util import inputs as sd3_inputs

ROOT = Path(__file__).resolve().parents[1]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _heuristic_triton_configs(monkeypatch):
    # Deterministic launch configurations (and no minutes of autotuning) in tests; the autotuner
    # itself has its own GPU test.
    monkeypatch.setenv("HPRUNE_TRITON_AUTOTUNE", "0")


def make(n: int, k: int, group: int, fmt: str, dtype: torch.dtype, device, seed: int = 0, bias: bool = True):
    """Fresh random weight (std 0.05, like a trained Linear) quantised, and a bias."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.05
    q = F.quantize(w, group, fmt, scale_dtype=dtype, refine=False)
    b = (torch.randn(n, generator=gen) * 0.1).to(dtype) if bias else None
    mv = lambda t: None if t is None else t.to(device)  # noqa: E731
    return mv(q.qweight), mv(q.scales), mv(q.zeros), mv(b)


def rand_x(m: int, k: int, dtype: torch.dtype, device, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=gen).to(dtype).to(device)


def assert_matches(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert torch.isfinite(out).all()
    err = (out.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    assert err <= TOL[dtype] * scale, f"max error {err:.3e} > {TOL[dtype]:.1e} * max|ref| ({scale:.3e})"


def need_triton(device: torch.device) -> None:
    if not dispatch.triton_supports(device):
        pytest.skip(dispatch.triton_why_not(device))


# ---- the reference itself ------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", F.FORMATS)
def test_reference_is_linear_with_dequantized_weight(fmt):
    qw, s, z, b = make(24, 70, 32, fmt, torch.float32, "cpu")
    x = rand_x(5, 70, torch.float32, "cpu")
    w = F.dequantize(qw, s, z, 70, 32, fmt, torch.float32)
    ref = w4a16_mm_reference(x, qw, s, z, b, 32, fmt)
    torch.testing.assert_close(ref, torch.nn.functional.linear(x.double(), w.double(), b.double()).float(),
                               rtol=1e-5, atol=1e-6)


# ---- Triton against the reference --------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("fmt", F.FORMATS)
def test_triton_formats_groups_dtypes(device, fmt, group, dtype):
    """K = 200: not a multiple of 32 nor of any group size (partial last chunk and group)."""
    need_triton(device)
    m, n, k = 7, 40, 200
    qw, s, z, b = make(n, k, group, fmt, dtype, device)
    x = rand_x(m, k, dtype, device)
    out = w4a16_mm(x, qw, s, z, group, fmt, bias=b, backend="triton")
    ref = w4a16_mm(x, qw, s, z, group, fmt, bias=b, backend="reference")
    assert_matches(out, ref, dtype)


@pytest.mark.parametrize("m", [1, 7, 33, 257])
@pytest.mark.parametrize("n,k", [(24, 64), (40, 200), (72, 96)])
def test_triton_odd_shapes(device, m, n, k):
    need_triton(device)
    qw, s, z, b = make(n, k, 32, "int4", torch.float16, device, seed=m + n + k)
    x = rand_x(m, k, torch.float16, device, seed=m)
    out = w4a16_mm(x, qw, s, z, 32, "int4", bias=b, backend="triton")
    assert_matches(out, w4a16_mm_reference(x, qw, s, z, b, 32, "int4"), torch.float16)


def _configs():
    from hprune.kernels.triton_w4a16 import Config

    return {
        "small": Config(16, 32, 64),
        "splitk-atomic": Config(16, 32, 64, split_k=3, split_mode=0),
        "splitk-serial": Config(16, 16, 64, split_k=4, split_mode=1),
        "gemv": Config(2, 16, 64, use_dot=False),
        "gemv-splitk": Config(1, 32, 128, split_k=2, use_dot=False),
        "bk256-gather-scales": Config(16, 32, 256),
        "large-grouped": Config(64, 32, 64, group_m=2),
    }


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("cfg", list(_configs()))
def test_triton_configs(device, cfg, bias):
    """Each kernel path: split-K (atomic and serial), GEMV, multi-group tiles, grouped order."""
    need_triton(device)
    from hprune.kernels.triton_w4a16 import w4a16_matmul

    config = _configs()[cfg]
    big_m = 70 if config.block_m >= 16 else 6  # the GEMV path is slow in the interpreter
    # K = 456 is not a multiple of any BLOCK_K (masked K tail); K = 512 is (the EVEN_K path)
    for m, fmt, dtype, k in ((5, "int4", torch.float16, 456), (5, "int4", torch.float16, 512),
                             (big_m, "nf4", torch.bfloat16, 512), (3, "int4_sym", torch.float32, 456)):
        n, group = 40, 64
        qw, s, z, b = make(n, k, group, fmt, dtype, device, seed=m, bias=bias)
        x = rand_x(m, k, dtype, device, seed=m + 1)
        out = w4a16_matmul(x, qw, s, z, b, group, fmt, config)
        assert_matches(out, w4a16_mm_reference(x, qw, s, z, b, group, fmt), dtype)


@pytest.mark.parametrize("group,block_k", [(32, 256), (64, 128), (128, 256), (96, 64), (96, 128)])
def test_triton_scale_paths(device, group, block_k):
    """The three ways a K tile meets the groups: one group per tile, whole groups per tile (one
    row of scales / zeros per group, selected per row; 8 groups at 32 x 256) and groups not
    aligned to tiles (96: gathered per row). K = 424 ends inside a group and inside a tile."""
    need_triton(device)
    from hprune.kernels.triton_w4a16 import Config, w4a16_matmul

    k = 424
    for fmt, dtype in (("int4", torch.float16), ("nf4", torch.float32)):
        qw, s, z, b = make(40, k, group, fmt, dtype, device, seed=group + block_k)
        x = rand_x(5, k, dtype, device, seed=group)
        out = w4a16_matmul(x, qw, s, z, b, group, fmt, Config(16, 32, block_k))
        assert_matches(out, w4a16_mm_reference(x, qw, s, z, b, group, fmt), dtype)


@pytest.mark.gpu
def test_triton_first_call_inside_cuda_graph_capture():
    """The split-K arrival counters, created for the first time inside CUDA-graph capture (and NF4,
    whose values are constants in the kernel: no table to copy): the graph replays correctly
    (twice: the counters return to zero), and eager calls afterwards do not pick up buffers that
    only the graph fills."""
    from hprune.kernels import triton_w4a16 as t

    dev = torch.device("cuda")
    qw, s, z, b = make(200, 1024, 64, "nf4", torch.float16, dev)
    x = rand_x(4, 1024, torch.float16, dev)
    cfg = t.Config(16, 32, 128, split_k=4, split_mode=1)
    ref = w4a16_mm_reference(x, qw, s, z, b, 64, "nf4")
    t.w4a16_matmul(x, qw, s, z, b, 64, "nf4", cfg)  # compile outside capture
    torch.cuda.synchronize()
    t._COUNTERS.clear()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = t.w4a16_matmul(x, qw, s, z, b, 64, "nf4", cfg)
    assert not t._COUNTERS  # nothing captured-only left in the eager caches
    for _ in range(2):
        y.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert_matches(y, ref, torch.float16)
    assert_matches(t.w4a16_matmul(x, qw, s, z, b, 64, "nf4", cfg), ref, torch.float16)


def test_triton_strided_rows(device):
    """x may be a row-strided view (unit stride on K)."""
    need_triton(device)
    qw, s, z, b = make(24, 64, 32, "int4", torch.float16, device)
    big = rand_x(9, 100, torch.float16, device)
    x = big[:, 10:74]
    assert x.stride(0) == 100
    out = w4a16_mm(x, qw, s, z, 32, "int4", bias=b, backend="triton")
    assert_matches(out, w4a16_mm_reference(x.contiguous(), qw, s, z, b, 32, "int4"), torch.float16)


def test_leading_dims_and_empty(device):
    qw, s, z, b = make(24, 64, 32, "int4", torch.float32, device)
    x = rand_x(6, 64, torch.float32, device).reshape(2, 3, 64)
    out = w4a16_mm(x, qw, s, z, 32, "int4", bias=b)
    assert out.shape == (2, 3, 24)
    torch.testing.assert_close(out.reshape(6, 24), w4a16_mm_reference(x.reshape(6, 64), qw, s, z, b, 32, "int4"))
    assert w4a16_mm(x[:0], qw, s, z, 32, "int4").shape == (0, 3, 24)


# ---- CUDA C++ kernel (GPU only) ----------------------------------------------------------------------

def _need_cuda_backend():
    if "cuda" not in dispatch.available(OP, "cuda"):
        pytest.skip("hprune._C was built without the CUDA kernel (python setup.py build_ext --inplace)")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("fmt", F.FORMATS)
def test_cuda_formats_groups_dtypes(fmt, group, dtype):
    _need_cuda_backend()
    for m, n, k in ((1, 72, 200), (7, 64, 2432), (33, 136, 256), (300, 264, 520)):
        qw, s, z, b = make(n, k, group, fmt, dtype, "cuda", seed=m)
        x = rand_x(m, k, dtype, "cuda", seed=m + 1)
        out = w4a16_mm(x, qw, s, z, group, fmt, bias=b, backend="cuda")
        assert_matches(out, w4a16_mm_reference(x, qw, s, z, b, group, fmt), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 7, 16, 17, 33, 64, 65, 257, 1024])
@pytest.mark.parametrize("n,k", [(2432, 2432), (3072, 12288), (264, 9728)])
def test_cuda_sizes_and_split_k(m, n, k):
    """Real layer sizes: small M goes through serial split-K, large M through the 128x128 tiles."""
    _need_cuda_backend()
    qw, s, z, b = make(n, k, 64, "int4", torch.bfloat16, "cuda", seed=m)
    x = rand_x(m, k, torch.bfloat16, "cuda", seed=m + 1)
    ref = w4a16_mm_reference(x, qw, s, z, b, 64, "int4")
    for _ in range(3):  # repeated launches: the split-K counters must be reset every time
        assert_matches(w4a16_mm(x, qw, s, z, 64, "int4", bias=b, backend="cuda"), ref, torch.bfloat16)


@pytest.mark.gpu
def test_cuda_refuses_what_it_cannot_take_and_auto_falls_back():
    _need_cuda_backend()
    qw, s, z, b = make(36, 64, 32, "int4", torch.float16, "cuda")  # N = 36: not a multiple of 8
    x = rand_x(5, 64, torch.float16, "cuda")
    with pytest.raises(ShapeError, match="N % 8"):
        w4a16_mm(x, qw, s, z, 32, "int4", bias=b, backend="cuda")
    out = w4a16_mm(x, qw, s, z, 32, "int4", bias=b)  # automatic: Triton takes it
    assert_matches(out, w4a16_mm_reference(x, qw, s, z, b, 32, "int4"), torch.float16)
    qw, s, z, b = make(40, 64, 32, "int4", torch.float32, "cuda")
    with pytest.raises(ShapeError, match="float16/bfloat16"):
        w4a16_mm(rand_x(3, 64, torch.float32, "cuda"), qw, s, z, 32, "int4", backend="cuda")
    # a bias 2 bytes off alignment (a view into a larger buffer): forced cuda refuses, auto falls back
    qw, s, z, b = make(40, 64, 32, "int4", torch.float16, "cuda")
    odd = torch.empty(41, dtype=torch.float16, device="cuda")[1:]
    odd.copy_(b)
    x = rand_x(5, 64, torch.float16, "cuda")
    with pytest.raises(ShapeError, match="bias 4-byte aligned"):
        w4a16_mm(x, qw, s, z, 32, "int4", bias=odd, backend="cuda")
    assert_matches(w4a16_mm(x, qw, s, z, 32, "int4", bias=odd), w4a16_mm_reference(x, qw, s, z, b, 32, "int4"),
                   torch.float16)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 64, 1024])
@pytest.mark.parametrize("n,k", [(2432, 2432), (3072, 12288)])
def test_triton_real_sizes_every_path(m, n, k):
    """Real layer sizes through the heuristic config and forced split-K variants, launched
    repeatedly (the serial split-K counters must return to zero)."""
    from hprune.kernels.triton_w4a16 import Config, heuristic_config, w4a16_matmul

    dev = torch.device("cuda")
    qw, s, z, b = make(n, k, 64, "int4", torch.bfloat16, dev, seed=m)
    x = rand_x(m, k, torch.bfloat16, dev, seed=m + 1)
    ref = w4a16_mm_reference(x, qw, s, z, b, 64, "int4")
    cfgs = [heuristic_config(m, n, k, dev), Config(16, 64, 128, split_k=8, split_mode=1),
            Config(16, 64, 128, split_k=8, split_mode=0), Config(128, 128, 64, num_warps=8)]
    if m <= 4:
        cfgs.append(Config(m, 32, 256, split_k=4, use_dot=False))
    for cfg in cfgs:
        for _ in range(3):
            assert_matches(w4a16_matmul(x, qw, s, z, b, 64, "int4", cfg), ref, torch.bfloat16)


@pytest.mark.gpu
def test_triton_autotuner_picks_a_correct_config(monkeypatch):
    from hprune.kernels import triton_w4a16 as tw

    monkeypatch.setenv("HPRUNE_TRITON_AUTOTUNE", "1")
    dev = torch.device("cuda")
    qw, s, z, b = make(1024, 1024, 64, "int4", torch.float16, dev)
    x = rand_x(8, 1024, torch.float16, dev)
    out = tw.w4a16_matmul(x, qw, s, z, b, 64, "int4")
    assert_matches(out, w4a16_mm_reference(x, qw, s, z, b, 64, "int4"), torch.float16)
    assert any(key.startswith("8 1024 1024") for key in tw.tuned_configs())


@pytest.mark.gpu
def test_auto_backend_on_gpu_prefers_cuda_then_triton():
    order = dispatch.available(OP, "cuda")
    # without M the table (dispatch.ROUTES) names nothing: cutlass serves only the rows it is routed to
    assert dispatch.select(OP, "cuda").name == [n for n in order if n != "cutlass"][0]
    assert "triton" in order and "reference" in order


# ---- the op's contract -----------------------------------------------------------------------------

def test_opcheck(device):
    qw, s, z, b = make(24, 96, 32, "int4", torch.float32, device)
    x = rand_x(5, 96, torch.float32, device)
    torch.library.opcheck(torch.ops.hprune.w4a16_mm.default, (x, qw, s, z, b, 32, "int4", None))
    torch.library.opcheck(torch.ops.hprune.w4a16_mm.default,
                          (x.reshape(5, 1, 96).requires_grad_(), qw, s, None, None, 32, "nf4", None))


@pytest.mark.parametrize("act", [None, "fp8"])
def test_short_input_with_the_same_packed_width_is_refused(act):
    # K = 63 and K = 64 pack to the same 32 bytes per row and one group: only in_features tells them
    # apart. nn.Linear raises here; so must the 4-bit layers and the ops when given in_features.
    from hprune.kernels.w4a8 import w4a8_mm

    torch.manual_seed(0)
    q = quantize_linear(nn.Linear(64, 16), act=act)
    x = torch.randn(4, 63)
    with pytest.raises(ShapeError, match="63 input features.*in_features = 64"):
        q(x)
    mm = w4a8_mm if act else w4a16_mm
    with pytest.raises(ShapeError, match="in_features = 64"):
        mm(x, q.qweight, q.scales, q.zeros, 64, "int4", in_features=64)
    assert mm(x, q.qweight, q.scales, q.zeros, 64, "int4").shape == (4, 16)  # K from x when not given
    assert q(torch.randn(2, 3, 64)).shape == (2, 3, 16)
    torch.library.opcheck(getattr(torch.ops.hprune, "w4a8_mm" if act else "w4a16_mm").default,
                          (torch.randn(3, 64), q.qweight, q.scales, q.zeros, q.bias, 64, "int4", None, 64))


def test_torch_compile_fullgraph_cpu():
    lin = quantize_linear(nn.Linear(96, 40), group_size=32)
    model = nn.Sequential(nn.Linear(16, 96), nn.GELU(), lin)
    x = torch.randn(3, 16)
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    torch.testing.assert_close(compiled(x), model(x))


def test_backward_matches_dense_linear():
    lin = nn.Linear(64, 24)
    q = quantize_linear(lin, group_size=32)
    q.bias.requires_grad_(True)
    x = torch.randn(4, 64, requires_grad=True)
    q(x).square().sum().backward()
    xd = x.detach().clone().requires_grad_(True)
    w = q.dequantize(torch.float32)
    bd = q.bias.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(xd, w, bd).square().sum().backward()
    torch.testing.assert_close(x.grad, xd.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(q.bias.grad, bd.grad, rtol=1e-5, atol=1e-6)


def test_auto_backend_on_cpu_is_reference(monkeypatch):
    monkeypatch.delenv("HPRUNE_BACKEND", raising=False)
    monkeypatch.delenv("HPRUNE_BACKEND_W4A16_MM", raising=False)
    assert dispatch.select(OP, "cpu").name == "reference"


def test_forcing_a_backend(monkeypatch):
    qw, s, z, b = make(24, 64, 32, "int4", torch.float16, "cpu")
    x = rand_x(3, 64, torch.float16, "cpu")
    with pytest.raises(BackendUnavailableError, match="CUDA tensor"):
        w4a16_mm(x, qw, s, z, 32, "int4", backend="cuda")
    with pytest.raises(BackendUnavailableError, match="unknown backend"):
        w4a16_mm(x, qw, s, z, 32, "int4", backend="cublas")
    monkeypatch.setenv("HPRUNE_BACKEND_W4A16_MM", "cuda")
    with pytest.raises(BackendUnavailableError):
        w4a16_mm(x, qw, s, z, 32, "int4")
    monkeypatch.delenv("HPRUNE_BACKEND_W4A16_MM")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # triton cannot run on the CPU without the interpreter
    with pytest.raises(BackendUnavailableError, match="interpreter"):
        with use_backend("triton"):
            w4a16_mm(x, qw, s, z, 32, "int4")
    monkeypatch.setenv("HPRUNE_BACKEND", "reference")
    torch.testing.assert_close(w4a16_mm(x, qw, s, z, 32, "int4"), w4a16_mm_reference(x, qw, s, z, None, 32, "int4"))


def test_forcing_triton_by_environment(monkeypatch):
    need_triton(torch.device("cpu"))
    from hprune.kernels import triton_w4a16

    calls = []
    real = triton_w4a16.w4a16_matmul
    monkeypatch.setattr(triton_w4a16, "w4a16_matmul", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setenv("HPRUNE_BACKEND_W4A16_MM", "triton")
    qw, s, z, b = make(24, 64, 32, "int4", torch.float16, "cpu")
    x = rand_x(3, 64, torch.float16, "cpu")
    assert_matches(w4a16_mm(x, qw, s, z, 32, "int4"), w4a16_mm_reference(x, qw, s, z, None, 32, "int4"),
                   torch.float16)
    assert calls == [1]


@pytest.mark.parametrize("case,match", [
    ("int_x", "activations"),
    ("qweight_bytes", "bytes per row"),
    ("qweight_dtype", "uint8"),
    ("scales_shape", "scales has shape"),
    ("zeros_missing", "needs zeros"),
    ("zeros_for_nf4", "takes no zeros"),
    ("group_not_32", "multiple of 32"),
    ("bias_shape", "bias must be"),
    ("x_not_contiguous", "contiguous along K"),
    ("unknown_fmt", "unknown 4-bit format"),
    ("scales_int", "scales must be"),
])
def test_bad_inputs_raise_shape_error(case, match):
    qw, s, z, b = make(24, 64, 32, "int4", torch.float32, "cpu")
    x = rand_x(3, 64, torch.float32, "cpu")
    args = dict(x=x, qweight=qw, scales=s, zeros=z, group_size=32, fmt="int4", bias=b)
    if case == "int_x":
        args["x"] = x.to(torch.int32)
    elif case == "qweight_bytes":
        args["x"] = rand_x(3, 100, torch.float32, "cpu")
    elif case == "qweight_dtype":
        args["qweight"] = qw.to(torch.int32)
    elif case == "scales_shape":
        args["scales"] = s.t().contiguous()
    elif case == "zeros_missing":
        args["zeros"] = None
    elif case == "zeros_for_nf4":
        args["fmt"] = "nf4"
    elif case == "group_not_32":
        args["group_size"] = 48
    elif case == "bias_shape":
        args["bias"] = b[:5]
    elif case == "x_not_contiguous":
        args["x"] = rand_x(64, 3, torch.float32, "cpu").t()
    elif case == "unknown_fmt":
        args["fmt"] = "int3"
    elif case == "scales_int":
        args["scales"] = s.to(torch.int32)
    with pytest.raises(ShapeError, match=match):
        w4a16_mm(**args)


# ---- W4A16Linear, quantize_model, artifacts ----------------------------------------------------------

def test_w4a16linear_from_shapes_on_meta():
    m = W4A16Linear(200, 40, bias=True, group_size=64, fmt="int4", device="meta")
    sd = m.state_dict()
    assert set(sd) == {"qweight", "scales", "zeros", "bias"}
    assert sd["qweight"].shape == (40, 112) and sd["qweight"].dtype == torch.uint8
    assert sd["scales"].shape == (4, 40) and sd["zeros"].shape == (4, 40)
    assert m.logical_numel == 200 * 40
    assert set(W4A16Linear(64, 8, bias=False, fmt="nf4", device="meta").state_dict()) == {"qweight", "scales"}


@pytest.mark.parametrize("fmt", F.FORMATS)
def test_quantize_linear(fmt):
    lin = nn.Linear(200, 48).to(torch.bfloat16)
    q = quantize_linear(lin, group_size=64, fmt=fmt)
    assert q.scales.dtype == torch.bfloat16
    w = q.dequantize()
    assert w.shape == (48, 200) and w.dtype == torch.bfloat16
    rel = ((w.float() - lin.weight.float()).norm() / lin.weight.float().norm()).item()
    assert rel < 0.12, f"{fmt}: weight error {rel:.3f} (uniform init: expect ~0.05-0.09)"
    x = torch.randn(5, 200, dtype=torch.bfloat16)
    ref = (x.float() @ w.float().t() + lin.bias.float()).to(torch.bfloat16)
    torch.testing.assert_close(q(x), ref, rtol=0, atol=0)  # the CPU path is the reference
    expect = 48 * 112 + 2 * 4 * 48 * (2 if fmt == "int4" else 1) + 2 * 48
    assert q.nbytes == expect


@pytest.fixture(scope="module")
def tiny_sd3_quantized():
    import hprune
    from hprune.models import param_count

    model = hprune.load_model("tiny-sd3")
    inputs = sd3_inputs(model, t=0.5)
    with torch.no_grad():
        y0 = model(**inputs).sample
    n0 = param_count(model)
    report = quantize_model(model, skip=("*.norm1_context.linear",))
    return model, inputs, y0, n0, report


def test_quantize_model_tiny_sd3(tiny_sd3_quantized):
    from hprune.models import param_count

    model, inputs, y0, n0, report = tiny_sd3_quantized
    lin_left = [n for n, m in model.named_modules() if type(m) is nn.Linear and n.startswith("transformer_blocks.")]
    assert lin_left and all(n.endswith("norm1_context.linear") for n in lin_left)  # the skip list
    assert sorted(lin_left) == sorted(report.skipped)
    assert model.context_embedder.__class__ is nn.Linear  # outside the blocks: dense
    assert len(report.quantized) == sum(isinstance(m, W4A16Linear) for m in model.modules()) > 0
    assert report.bytes_after < report.bytes_before
    assert report.linear_bytes_after < 0.2 * report.linear_bytes_before  # fp32 -> ~4.5 bits
    assert param_count(model) == n0
    with torch.no_grad():
        y1 = model(**inputs).sample
    rel = ((y1 - y0).norm() / y0.norm()).item()
    assert 0 < rel < 0.05, f"output error of the quantised tiny model {rel:.4f}"


def test_artifact_round_trip_bit_identical(tiny_sd3_quantized, tmp_path):
    import hprune

    model, inputs, _, _, _ = tiny_sd3_quantized
    with torch.no_grad():
        y1 = model(**inputs).sample
    hprune.save_compressed(model, tmp_path / "art")
    loaded = hprune.load_compressed(tmp_path / "art")
    assert isinstance(loaded.transformer_blocks[0].attn.to_q, W4A16Linear)
    with torch.no_grad():
        y2 = loaded(**inputs).sample
    assert torch.equal(y1, y2)
    hprune.save_compressed(loaded, tmp_path / "again")  # the loaded model keeps its recipe
    assert torch.equal(hprune.load_compressed(tmp_path / "again").transformer_blocks[1].ff.net[2].qweight,
                       model.transformer_blocks[1].ff.net[2].qweight)


def test_quantize_model_flux_single_blocks():
    import hprune

    model = hprune.load_model("tiny-flux")
    report = quantize_model(model, group_size=32, fmt="int4_sym")
    assert any(n.startswith("single_transformer_blocks.") for n in report.quantized)
    assert isinstance(model.single_transformer_blocks[0].proj_out, W4A16Linear)


def test_quantize_model_bnb_backend(tmp_path):
    import bitsandbytes as bnb

    import hprune

    model = hprune.load_model("tiny-sd3")
    inputs = sd3_inputs(model, t=0.5)
    with torch.no_grad():
        y0 = model(**inputs).sample
    report = quantize_model(model, backend="bnb")  # NF4, blocksize 64: the paper's setting
    assert report.fmt == "nf4" and report.bytes_after < report.bytes_before
    assert isinstance(model.transformer_blocks[0].attn.to_q, bnb.nn.Linear4bit)
    with torch.no_grad():
        y1 = model(**inputs).sample
    assert ((y1 - y0).norm() / y0.norm()).item() < 0.05
    with pytest.raises(HpruneError, match="convert_bnb_model"):
        hprune.save_compressed(model, tmp_path / "bnb")
    assert not (tmp_path / "bnb").exists()


def test_quantize_model_bad_arguments():
    import hprune

    model = hprune.load_model("tiny-sd3")
    with pytest.raises(HpruneError, match="backend"):
        quantize_model(model, backend="gptq")
    with pytest.raises(HpruneError, match="bitsandbytes"):
        quantize_model(model, backend="bnb", fmt="int4")
    with pytest.raises(ShapeError, match="multiple of 32"):
        quantize_model(model, group_size=100)


def test_convert_bnb_model_then_artifact_round_trip(tmp_path):
    """A bitsandbytes-NF4 model converts to W4A16Linear with unchanged outputs, and then saves."""
    import hprune
    from hprune.quant import convert_bnb_model

    model = hprune.load_model("tiny-sd3")
    quantize_model(model, backend="bnb", fmt="nf4", compress_statistics=True)
    inputs = sd3_inputs(model, t=0.5)
    with torch.no_grad():
        y_bnb = model(**inputs).sample
    report = convert_bnb_model(model)
    assert report.quantized and isinstance(model.transformer_blocks[0].attn.to_q, W4A16Linear)
    with torch.no_grad():
        y = model(**inputs).sample
    torch.testing.assert_close(y, y_bnb, rtol=1e-4, atol=1e-4)
    hprune.save_compressed(model, tmp_path / "conv")
    with torch.no_grad():
        assert torch.equal(hprune.load_compressed(tmp_path / "conv")(**inputs).sample, y)


# ---- compile checks of the CUDA sources ----------------------------------------------------------------
# Both compiles take a minute of CPU; they start in the background when this module's first test
# runs (only if the checks are selected) and overlap the interpreter tests, which use one core.

def _nvcc() -> str | None:
    return shutil.which("nvcc")


def _cuda_include() -> Path | None:
    for base in filter(None, (os.environ.get("CUDA_HOME"), "/usr/local/cuda")):
        if (Path(base) / "include" / "cuda_runtime_api.h").exists():
            return Path(base) / "include"
    nv = _nvcc()
    if nv:
        inc = Path(nv).resolve().parents[1] / "include"
        if (inc / "cuda_runtime_api.h").exists():
            return inc
    return None


def _nvcc_cmds(out_dir: Path) -> list[list[str]]:
    """nvcc + ptxas (which checks the inline PTX) of each kernel TU, for sm_80 and sm_90a."""
    return [[_nvcc(), "-std=c++17", "-O3", "-Xptxas", "-O1", "--expt-relaxed-constexpr", f"-I{ROOT / 'csrc'}",
             "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a",
             "-c", str(src), "-o", str(out_dir / (src.stem + ".o"))]
            for src in sorted((ROOT / "csrc" / "cuda").glob("*.cu"))]


def _binding_cmd() -> list[str]:
    """The torch binding against this torch's headers (CUDA build macros stubbed on a CPU torch)."""
    import torch.utils.cpp_extension as ce

    incs = [f"-I{p}" for p in ce.include_paths()] + [f"-I{_cuda_include()}", f"-I{ROOT / 'csrc'}"]
    return ["g++", "-std=c++17", "-fsyntax-only", "-w", "-DHPRUNE_WITH_CUDA", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
            *incs, str(ROOT / "csrc" / "cuda" / "w4a16_binding.cpp")]


NVCC_TEST = "test_cuda_kernel_compiles_for_sm80_and_sm90a"
BINDING_TEST = "test_cuda_binding_syntax"
_JOBS: dict[str, list[subprocess.Popen]] = {}


def _start(cmds: list[list[str]]) -> list[subprocess.Popen]:
    return [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cmds]


@pytest.fixture(scope="module", autouse=True)
def _background_compile_checks(request, tmp_path_factory):
    selected = {item.name for item in request.session.items}
    if NVCC_TEST in selected and _nvcc():
        _JOBS["nvcc"] = _start(_nvcc_cmds(tmp_path_factory.mktemp("nvcc")))
    if BINDING_TEST in selected and shutil.which("g++") and _cuda_include():
        _JOBS["binding"] = _start([_binding_cmd()])
    yield
    for procs in _JOBS.values():
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    _JOBS.clear()


def _finish(key: str, cmds) -> None:
    for p, cmd in zip(_JOBS.pop(key, None) or _start(cmds), cmds):
        _, err = p.communicate()
        assert p.returncode == 0, f"{' '.join(map(str, cmd[:2]))} ... {cmd[-1]} failed:\n{err[-4000:]}"


@pytest.mark.skipif(_nvcc() is None, reason="nvcc is not on PATH")
def test_cuda_kernel_compiles_for_sm80_and_sm90a(tmp_path):
    _finish("nvcc", _nvcc_cmds(tmp_path))


@pytest.mark.skipif(shutil.which("g++") is None or _cuda_include() is None,
                    reason="needs g++ and the CUDA runtime headers")
def test_cuda_binding_syntax():
    _finish("binding", [_binding_cmd()])


def test_quantize_model_failure_leaves_the_model_untouched():
    """A layer that cannot be quantised (NaN weights) fails the call before any layer is swapped
    in: no half-quantised model without a recipe step."""
    import hprune
    from hprune.recipe import get_recipe

    model = hprune.load_model("tiny-sd3")
    with torch.no_grad():
        model.transformer_blocks[-1].ff.net[2].weight[0, 0] = float("nan")
    with pytest.raises(ShapeError, match="inf or NaN"):
        quantize_model(model)
    assert not any(isinstance(m, W4A16Linear) for m in model.modules())
    assert not any(st.get("op") == "quantize" for st in get_recipe(model))


def test_requantising_is_refused_without_a_recipe_step():
    import hprune
    from hprune.recipe import get_recipe

    model = hprune.load_model("tiny-sd3")
    quantize_model(model)
    with pytest.raises(HpruneError, match="nothing to quantise: its .* block Linear layers are already quantised"):
        quantize_model(model)
    assert [st["op"] for st in get_recipe(model)] == ["quantize"]
    with pytest.raises(HpruneError, match="every eligible Linear is skipped"):
        quantize_model(hprune.load_model("tiny-sd3"), skip=("*",))
