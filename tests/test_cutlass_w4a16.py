"""The CUTLASS W4A16 backend (Hopper): its weight order against the kernel's CuTe layout, the exact
inverse, that its operands give exactly formats' weights, the dispatch through dispatch.ROUTES,
the compile of the kernel for sm_90a (no spills), and, on an H100/H200, the kernel against the
reference.

Error bound on a GPU (as in test_w4a16.py): the kernel multiplies by exactly the reference's
weights and accumulates in fp32, so max|out - ref| <= TOL[T] * max|ref|, TOL = 2e-3 (fp16),
1.6e-2 (bf16): about 2 ulp of the output.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from hprune.errors import BackendUnavailableError, ShapeError
from hprune.kernels import cutlass_w4a16 as CW
from hprune.kernels import dispatch
from hprune.kernels.cutlass_headers import CUTLASS_VERSION, NVCC_FLAGS, cutlass_include
from hprune.kernels.w4a16 import OP, w4a16_mm, w4a16_mm_reference
from hprune import formats as F

ROOT = Path(__file__).resolve().parents[1]
CUTLASS_DIR = ROOT / "csrc" / "cuda" / "cutlass"
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = (torch.float16, torch.bfloat16)


def make(n: int, k: int, group: int, fmt: str, dtype: torch.dtype, seed: int = 0, spread: float = 0.05,
         refine: bool = False):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * spread
    q = F.quantize(w, group, fmt, scale_dtype=dtype, refine=refine)
    return q.qweight, q.scales, q.zeros


# ---- the weight order ---------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", CW.FORMATS)
@pytest.mark.parametrize("n,k", [(16, 16), (48, 80), (128, 64), (32, 1040)])
def test_reorder_is_a_permutation_with_an_exact_inverse(fmt, n, k):
    gen = torch.Generator().manual_seed(n * k)
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    qweight = F.pack_int4(codes, fmt)
    packed = CW.reorder_weight(qweight, k, fmt)
    assert packed.dtype == torch.uint8 and packed.shape == (n * k // 2,)
    assert torch.equal(CW.restore_weight(packed, n, k, fmt), qweight)
    # a permutation of the codes, as q ^ 8 (the two's-complement nibble of q - 8)
    nibbles = torch.stack([packed & 0xF, packed >> 4], 1).reshape(-1)
    want = codes.reshape(-1) ^ 8
    assert torch.equal(torch.sort(nibbles).values, torch.sort(want).values)


def test_reorder_known_positions():
    """Hand-checked positions: thread t's 8 codes are the 32-bit word t of the atom, in value
    order [0, 2, 4, 6, 1, 3, 5, 7] (n = t // 4 + 8 v1, k = 2 (t % 4) + v0 + 8 v2)."""
    n, k = 32, 32
    codes = torch.zeros(n, k, dtype=torch.uint8)
    spots = {(0, 0): 0, (0, 1): 4, (8, 0): 1, (0, 8): 2, (0, 2): 8, (1, 0): 32, (16, 0): 256, (0, 16): 512,
             (17, 19): 512 + 256 + 32 + 8 + 4}
    for i, (nk, pos) in enumerate(spots.items()):
        codes[nk] = 1 + i % 15
        packed = CW.reorder_codes(codes, signed=False)
        flat = torch.stack([packed & 0xF, packed >> 4], 1).reshape(-1)
        assert flat[pos] == 1 + i % 15 and int((flat != 0).sum()) == 1, f"code {nk} not at {pos}"
        codes[nk] = 0


def test_reorder_refuses_shapes_off_the_atom():
    with pytest.raises(ShapeError, match="multiples of 16"):
        CW.reorder_codes(torch.zeros(24, 32, dtype=torch.uint8), False)
    with pytest.raises(ShapeError, match="int4"):
        CW.reorder_weight(torch.zeros(16, 16, dtype=torch.uint8), 32, "nf4")
    with pytest.raises(ShapeError, match="N\\*K/2"):
        CW.restore_codes(torch.zeros(10, dtype=torch.uint8), 16, 16, False)


CUTLASS_INC, CUTLASS_WHY = cutlass_include()


def _cuda_include() -> Path | None:
    nvcc = shutil.which("nvcc")
    for base in ([Path(nvcc).resolve().parents[1]] if nvcc else []) + [Path("/usr/local/cuda")]:
        if (base / "include" / "cuda_runtime_api.h").exists():
            return base / "include"
    return None


@pytest.mark.skipif(CUTLASS_INC is None or shutil.which("g++") is None or _cuda_include() is None,
                    reason=f"needs g++, the CUDA headers and the CUTLASS headers ({CUTLASS_WHY})")
def test_reorder_matches_the_kernel_layout(tmp_path):
    """A host program compiled from the kernel's layout header (CuTe) prints where the kernel reads
    each code and checks the atom against CuTe's wgmma A-operand thread/value layout; the PyTorch
    reorder must put every code exactly there."""
    cuda_inc = _cuda_include()
    exe = tmp_path / "layout_check"
    cmd = ["g++", "-std=c++17", "-O1", f"-I{CUTLASS_DIR}", f"-I{CUTLASS_INC}", f"-I{cuda_inc / 'cccl'}", f"-I{cuda_inc}",
           str(ROOT / "tests" / "cpp" / "cutlass_layout_check.cpp"), "-o", str(exe)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    for n, k in ((16, 16), (48, 80), (256, 128)):
        out = subprocess.run([str(exe), str(n), str(k)], capture_output=True, text=True, check=True).stdout.splitlines()
        assert out[0] == "atom ok", out[0]
        offsets = torch.tensor([[int(v) for v in line.split()] for line in out[1:]])
        assert offsets.shape == (n, k)
        codes = torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(k), dtype=torch.uint8)
        packed = CW.reorder_codes(codes, signed=False)
        flat = torch.stack([packed & 0xF, packed >> 4], 1).reshape(-1)
        assert torch.equal(flat[offsets], codes)


# ---- the kernel's operands give formats' weights exactly ------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", CW.FORMATS)
@pytest.mark.parametrize("spread,refine", [(0.05, False), (0.05, True), (300.0, True), (1e-4, False)])
def test_kernel_operands_give_exactly_the_formats_weights(fmt, dtype, spread, refine):
    n, k, group = 128, 192, 64
    qweight, scales, zeros = make(n, k, group, fmt, dtype, seed=int(spread * 10) + 1, spread=spread, refine=refine)
    p = CW.prepared(qweight, scales, zeros, k, group, fmt, dtype)
    assert p.inexact is None
    if fmt == "int4":
        assert p.scales.dtype == torch.float32 and p.zeros.dtype == torch.float32
        assert torch.equal(p.scales, scales.to(dtype).float())
        # z' = z + 8 s, exactly (float64 holds the sum of two fp16 / bf16 values of these ranges)
        assert torch.equal(p.zeros.double(), zeros.to(dtype).double() + 8 * scales.to(dtype).double())
    else:
        assert p.scales.dtype == dtype and p.zeros is None
    w = CW.kernel_weight(p.codes, p.scales, p.zeros, n, k, group, fmt, dtype)
    assert torch.equal(w, F.dequantize(qweight, scales, zeros, k, group, fmt, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_shifted_zero_that_float32_cannot_hold_is_refused(dtype):
    """Codes are stored as q - 8, so the kernel's zero is z + 8 s; a group whose |z| dwarfs its
    scale would lose bits there: prepared() names it (and the op then takes another kernel)."""
    qweight, scales, zeros = make(128, 128, 64, "int4", dtype)
    zeros, scales = zeros.clone(), scales.clone()
    zeros[1, 5], scales[1, 5] = 1024.0, 2.0 ** -10  # 2^10 + 2^-7: 18 significant bits, fits fp32
    assert CW.prepared(qweight, scales, zeros, 128, 64, "int4", dtype).inexact is None
    scales[1, 5] = 2.0 ** -24 if dtype == torch.float16 else 2.0 ** -20  # 2^10 + 2^-21 / 2^-17: > 24 bits
    why = CW.prepared(qweight, scales, zeros, 128, 64, "int4", dtype).inexact
    assert why is not None and "in 1 group(s)" in why


def test_two_roundings_would_differ():
    """Why "int4" takes fp32 scales: rounding q * s to bf16 before adding z changes weights."""
    qweight, scales, zeros = make(128, 256, 64, "int4", torch.bfloat16)
    q = F.unpack_int4(qweight, 256).float()
    s = scales.float().repeat_interleave(64, 0).t()
    z = zeros.float().repeat_interleave(64, 0).t()
    twice = ((q * s).to(torch.bfloat16).float() + z).to(torch.bfloat16)
    assert not torch.equal(twice, F.dequantize(qweight, scales, zeros, 256, 64, "int4", dtype=torch.bfloat16))


def test_prepared_weight_is_cached_and_follows_changes():
    qweight, scales, zeros = make(128, 128, 64, "int4", torch.bfloat16)
    p1 = CW.prepared(qweight, scales, zeros, 128, 64, "int4", torch.bfloat16)
    assert CW.prepared(qweight, scales, zeros, 128, 64, "int4", torch.bfloat16) is p1
    assert CW.prepared(qweight, scales, zeros, 128, 64, "int4", torch.float16) is not p1
    qweight[0, 0] ^= 0x11  # in place: the cached codes are stale
    p2 = CW.prepared(qweight, scales, zeros, 128, 64, "int4", torch.float16)
    assert torch.equal(CW.restore_weight(p2.codes, 128, 128, "int4"), qweight)
    scales.mul_(2)
    p3 = CW.prepared(qweight, scales, zeros, 128, 64, "int4", torch.float16)
    assert p3 is not p2 and torch.equal(p3.scales, scales.to(torch.float16).float())


def test_unsupported_inputs_are_named():
    qweight, scales, zeros = make(128, 128, 64, "int4", torch.bfloat16)
    x = torch.randn(4, 128, dtype=torch.bfloat16)
    assert CW.cutlass_unsupported(x, qweight, scales, zeros, 64, "int4") is None
    assert "NF4" in CW.cutlass_unsupported(x, qweight, scales, None, 64, "nf4")
    assert "float16/bfloat16" in CW.cutlass_unsupported(x.float(), qweight, scales, zeros, 64, "int4")
    q32, s32, z32 = make(128, 128, 32, "int4", torch.bfloat16)
    assert "multiple of 64" in CW.cutlass_unsupported(x, q32, s32, z32, 32, "int4")
    q, s, z = make(136, 128, 64, "int4", torch.bfloat16)
    assert "N % 128" in CW.cutlass_unsupported(x, q, s, z, 64, "int4")
    q, s, z = make(128, 160, 64, "int4", torch.bfloat16)
    assert "K % 64" in CW.cutlass_unsupported(torch.randn(4, 160, dtype=torch.bfloat16), q, s, z, 64, "int4")
    wide = torch.randn(4, 132, dtype=torch.bfloat16)[:, :128]  # rows 264 bytes apart
    assert "16-byte aligned" in CW.cutlass_unsupported(wide, qweight, scales, zeros, 64, "int4")


# ---- dispatch: the table --------------------------------------------------------------------------

def test_route_table():
    assert dispatch.route(OP, (9, 0), 128) == "cutlass"
    assert dispatch.route(OP, (9, 0), 4096) == "cutlass"
    assert dispatch.route(OP, (9, 0), 127) is None  # small M: the split-K CUDA kernel
    assert dispatch.route(OP, (8, 0), 4096) is None  # A100: no wgmma
    assert dispatch.route(OP, (8, 9), 4096) is None
    assert dispatch.route(OP, (10, 0), 4096) is None  # sm_90a code does not run on Blackwell
    assert dispatch.route(OP, None, 4096) is None  # not a GPU
    assert dispatch.route("w4a8_mm", (9, 0), 4096) is None  # no CUTLASS W4A8 (module docstring of cutlass_w4a16)


@pytest.fixture
def routed_toy(monkeypatch):
    op = "toy_routed_op"
    dispatch.register(op, "reference")(lambda: "reference")
    dispatch.register(op, "cuda", supports=lambda d: True)(lambda: "cuda")
    dispatch.register(op, "cutlass", supports=lambda d: True)(lambda: "cutlass")
    monkeypatch.setattr(dispatch, "ROUTES", dispatch.ROUTES + (dispatch.Route(op, "cutlass", (9, 0), (9, 0), 128, 8192),))
    yield op
    dispatch._REGISTRY.pop(op)


def test_select_follows_the_table_with_a_fake_capability(routed_toy, monkeypatch):
    monkeypatch.delenv("HPRUNE_BACKEND", raising=False)
    sel = lambda m, cap: dispatch.select(routed_toy, "cuda", m=m, capability=cap).name  # noqa: E731
    assert sel(128, (9, 0)) == "cutlass"
    assert sel(8192, (9, 0)) == "cutlass"
    assert sel(8193, (9, 0)) == "cuda"  # past the row's M range
    assert sel(127, (9, 0)) == "cuda"
    assert sel(4096, (8, 0)) == "cuda"
    assert sel(None, (9, 0)) == "cuda"  # a routed backend never runs where no row names it
    # forcing still beats the table, both ways
    assert dispatch.select(routed_toy, "cuda", "cuda", m=4096, capability=(9, 0)).name == "cuda"
    assert dispatch.select(routed_toy, "cuda", "cutlass", m=1, capability=(8, 0)).name == "cutlass"


def test_cpu_never_routes_to_cutlass(monkeypatch):
    monkeypatch.delenv("HPRUNE_BACKEND", raising=False)
    monkeypatch.delenv("HPRUNE_BACKEND_W4A16_MM", raising=False)
    assert dispatch.select(OP, "cpu", m=4096, capability=(9, 0)).name == "reference"
    with pytest.raises(BackendUnavailableError, match="CUDA tensor"):
        dispatch.select(OP, "cpu", "cutlass")


def test_op_falls_through_what_cutlass_cannot_take(monkeypatch):
    """The real op on the CPU with the table's conditions faked (an sm_90 capability and a cutlass
    backend that runs here and records its calls): routed sizes reach it, inputs it cannot take
    (nf4, group 32, fp32, small M) go on to the next backend (reference on the CPU)."""
    calls = []

    def fake_cutlass(x, qweight, scales, zeros, bias, group_size, fmt):
        calls.append(fmt)
        return w4a16_mm_reference(x, qweight, scales, zeros, bias, group_size, fmt)

    regs = dispatch._REGISTRY[OP]
    monkeypatch.setitem(regs, "cutlass", dispatch.Backend("cutlass", fake_cutlass, lambda d: True, lambda d: True,
                                                          lambda d: "fake"))
    monkeypatch.setattr(dispatch, "device_capability", lambda d: (9, 0))
    monkeypatch.delenv("HPRUNE_BACKEND", raising=False)
    monkeypatch.delenv("HPRUNE_BACKEND_W4A16_MM", raising=False)
    for fmt, group, dtype, m, hits in (("int4", 64, torch.bfloat16, 128, 1), ("int4_sym", 128, torch.float16, 130, 1),
                                       ("int4", 64, torch.bfloat16, 127, 0), ("nf4", 64, torch.bfloat16, 256, 0),
                                       ("int4", 32, torch.bfloat16, 256, 0), ("int4", 64, torch.float32, 256, 0)):
        calls.clear()
        qweight, scales, zeros = make(128, 128, group, fmt, dtype if dtype != torch.float32 else torch.bfloat16)
        x = torch.randn(m, 128).to(dtype)
        out = w4a16_mm(x, qweight, scales, zeros, group, fmt)
        assert len(calls) == hits, (fmt, group, dtype, m)
        assert torch.equal(out, w4a16_mm_reference(x, qweight, scales.to(dtype), None if zeros is None else
                                                   zeros.to(dtype), None, group, fmt))
    calls.clear()
    qweight, scales, zeros = make(128, 128, 64, "int4", torch.bfloat16)
    zeros[0, 0], scales[0, 0] = 1024.0, 2.0 ** -20  # z + 8 s not exact in fp32: not for the kernel
    x = torch.randn(256, 128).to(torch.bfloat16)
    assert torch.equal(w4a16_mm(x, qweight, scales, zeros, 64, "int4"),
                       w4a16_mm_reference(x, qweight, scales, zeros, None, 64, "int4")) and not calls
    with pytest.raises(ShapeError, match="float32 cannot hold"):
        w4a16_mm(x, qweight, scales, zeros, 64, "int4", backend="cutlass")
    qweight, scales, _ = make(128, 128, 64, "nf4", torch.bfloat16)
    with pytest.raises(ShapeError, match="NF4"):  # forced: refused with the reason, no silent fallback
        w4a16_mm(torch.randn(256, 128).to(torch.bfloat16), qweight, scales, None, 64, "nf4", backend="cutlass")


# ---- the build ------------------------------------------------------------------------------------

def test_headers_come_only_from_the_pinned_wheel(monkeypatch, tmp_path):
    monkeypatch.setenv("HPRUNE_CUTLASS_INCLUDE", str(tmp_path))
    inc, why = cutlass_include()
    assert inc is None and "cutlass/cutlass.h" in why
    monkeypatch.delenv("HPRUNE_CUTLASS_INCLUDE")
    inc, why = cutlass_include()
    assert (inc is None) != (CUTLASS_VERSION in why and Path(inc, "cutlass", "cutlass.h").exists())
    setup_py = (ROOT / "setup.py").read_text()
    assert "hprune._C_cutlass" in setup_py and "headers.NVCC_FLAGS" in setup_py
    assert "-gencode=arch=compute_90a,code=sm_90a" in NVCC_FLAGS
    assert f'nvidia-cutlass=={CUTLASS_VERSION}' in (ROOT / "pyproject.toml").read_text()


@pytest.mark.skipif(shutil.which("g++") is None or _cuda_include() is None, reason="needs g++ and the CUDA headers")
def test_cutlass_binding_syntax():
    """The torch binding compiles against this torch's headers (CUDA macros stubbed on a CPU torch);
    it needs neither CUTLASS nor nvcc."""
    import torch.utils.cpp_extension as ce

    incs = [f"-I{p}" for p in ce.include_paths()] + [f"-I{_cuda_include()}", f"-I{CUTLASS_DIR}"]
    r = subprocess.run(["g++", "-std=c++17", "-fsyntax-only", "-w", "-DHPRUNE_WITH_CUDA",
                        "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", *incs, str(CUTLASS_DIR / "w4a16_cutlass_binding.cpp")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None or CUTLASS_INC is None,
                    reason=f"needs nvcc and the CUTLASS headers ({CUTLASS_WHY})")
def test_cutlass_kernel_compiles_for_sm90a_without_spills(tmp_path):
    """One translation unit, four kernels ({fp16, bf16} x {int4, int4_sym}); ptxas -v must report
    each with 0 bytes of spill stores and loads. Takes 2-4 minutes of one core here."""
    import torch.utils.cpp_extension as ce

    # the flags setup.py's build uses: torch's COMMON_NVCC_FLAGS first, then the module's own
    cmd = [shutil.which("nvcc"), *ce.COMMON_NVCC_FLAGS, *NVCC_FLAGS, f"-I{CUTLASS_INC}", f"-I{CUTLASS_DIR}",
           "-Xptxas", "-v", "-c", str(CUTLASS_DIR / "w4a16_cutlass.cu"), "-o", str(tmp_path / "w4a16_cutlass.o")]
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True)
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stderr[-4000:]
    log = r.stdout + r.stderr
    entries = re.findall(r"Compiling entry function '(\w+)' for 'sm_90a'", log)
    kernels = [e for e in entries if "GemmUniversal" in e]
    assert len(kernels) == 4, entries
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    assert len(spills) >= 4 and all(s == ("0", "0") for s in spills), spills
    regs = sorted(set(re.findall(r"Used (\d+) registers", log)))
    print(f"\ncutlass w4a16: nvcc sm_90a compile {took:.0f} s, registers {regs}")


# ---- on an H100 / H200 ---------------------------------------------------------------------------

def _need_cutlass():
    if not torch.cuda.is_available() or "cutlass" not in dispatch.available(OP, "cuda"):
        pytest.skip("needs an sm_90 GPU and hprune._C_cutlass (built with nvidia-cutlass==4.2.0.0)")


def _gpu_make(n, k, group, fmt, dtype, seed=0, bias=True):
    qweight, scales, zeros = make(n, k, group, fmt, dtype, seed=seed)
    b = (torch.randn(n, generator=torch.Generator().manual_seed(seed + 7)) * 0.1).to(dtype) if bias else None
    mv = lambda t: None if t is None else t.cuda()  # noqa: E731
    return mv(qweight), mv(scales), mv(zeros), mv(b)


def _assert_matches(out, ref, dtype):
    assert out.dtype == ref.dtype and out.shape == ref.shape and torch.isfinite(out).all()
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= TOL[dtype] * ref.float().abs().max().item(), f"max error {err:.3e}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", CW.FORMATS)
@pytest.mark.parametrize("group", [64, 128, 192])
def test_cutlass_matches_reference(fmt, group, dtype):
    _need_cutlass()
    for m, n, k, bias in ((128, 128, 384, True), (129, 256, 576, False), (1000, 384, 1152, True), (1, 128, 384, True)):
        qweight, scales, zeros, b = _gpu_make(n, k, group, fmt, dtype, seed=m, bias=bias)
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype).cuda()
        out = w4a16_mm(x, qweight, scales, zeros, group, fmt, bias=b, backend="cutlass")
        _assert_matches(out, w4a16_mm_reference(x, qweight, scales, zeros, b, group, fmt), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [128, 1024, 4096])
@pytest.mark.parametrize("n,k", [(2432, 2432), (3072, 12288), (12288, 3072), (2432, 9728)])
def test_cutlass_real_sizes_and_auto_choice(m, n, k):
    _need_cutlass()
    qweight, scales, zeros, b = _gpu_make(n, k, 64, "int4", torch.bfloat16, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16).cuda()
    assert dispatch.select(OP, x.device, m=m).name == "cutlass"
    ref = w4a16_mm_reference(x, qweight, scales, zeros, b, 64, "int4")
    for _ in range(2):  # the second call takes the cached prepared weight
        _assert_matches(w4a16_mm(x, qweight, scales, zeros, 64, "int4", bias=b), ref, torch.bfloat16)


@pytest.mark.gpu
def test_cutlass_strided_rows_and_refusals():
    _need_cutlass()
    qweight, scales, zeros, b = _gpu_make(256, 512, 64, "int4_sym", torch.float16)
    big = torch.randn(300, 640, generator=torch.Generator().manual_seed(3)).half().cuda()
    x = big[:, 64:576]  # rows 1280 bytes apart, unit stride along K
    _assert_matches(w4a16_mm(x, qweight, scales, zeros, 64, "int4_sym", bias=b, backend="cutlass"),
                    w4a16_mm_reference(x.contiguous(), qweight, scales, zeros, b, 64, "int4_sym"), torch.float16)
    q, s, _, _ = _gpu_make(256, 512, 64, "nf4", torch.float16)
    with pytest.raises(ShapeError, match="NF4"):
        w4a16_mm(x, q, s, None, 64, "nf4", backend="cutlass")


def test_bench_w4a16_runs_on_the_cpu(tmp_path):
    """The benchmark still runs without a GPU: reference rows, the W4A8 reference and the FP8
    ceiling (torch's CPU _scaled_mm); the CUTLASS / Triton / CUDA rows need their GPU."""
    import json

    from benchmarks.bench_w4a16 import FP8_CEILING, main

    assert main(["--device", "cpu", "--shapes", "64x128", "--m", "2", "--out", str(tmp_path)]) == 0
    (result,) = tmp_path.glob("bench_w4a16-*.json")
    data = json.loads(result.read_text())
    timed = {r["method"] for r in data["rows"] if "ms" in r}
    assert {"bf16 F.linear", "hprune reference", "hprune W4A8 reference", FP8_CEILING} <= timed
    assert not timed & {"hprune CUTLASS", "hprune Triton", "hprune CUDA"}
    assert data["routes"][0]["backend"] == "cutlass"
