"""The op `torch.ops.hprune.scaled_adamw_`: every backend that runs here against the PyTorch
reference on fresh random tensors of odd sizes, fp32 and bf16; argument checking; opcheck; and
compile checks of the GPU code (nvcc for the CUDA kernel, Triton's own compiler for sm_80/sm_90)
that run without a GPU.

Error measure for float32 results: max|out - ref| / max|ref| over each tensor (relative to the
tensor's scale; elementwise relative error is meaningless where a moment crosses zero). Bound
1e-6: the kernels do the reference's operations in its order, so the only differences are FMA
contraction and last-bit rounding (observed ~1e-7). bfloat16 parameters: each element within one
bf16 ulp of the reference (2^-7 relative) and at least 99% bit-identical, since both compute the
same fp32 value and round it once; a 1-ulp fp32 difference can only flip a rounding tie.
"""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from hprune.errors import BackendUnavailableError, OptimizerConfigError, ShapeError
from hprune.kernels import dispatch
from hprune.kernels import scaled_adamw as sa

ROOT = Path(__file__).resolve().parents[1]
OP = torch.ops.hprune.scaled_adamw_
FAST_BACKENDS = ("cuda", "triton", "cpp")
ODD_SIZES = (1, 7, 33, 1000, 4097, 0, 8192, 8193, 3 * 4 * 5)


def make_case(sizes, dtype, device, seed=0, zero_lr_at=None):
    """Random params/grads in `dtype`, random non-trivial fp32 moments, per-tensor lrs and steps."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(n, generator=g).to(dtype).to(device) for n in sizes]
    grads = [torch.randn(n, generator=g).to(dtype).to(device) for n in sizes]
    exp_avgs = [(0.1 * torch.randn(n, generator=g)).to(device) for n in sizes]
    exp_avg_sqs = [(0.01 * torch.rand(n, generator=g)).to(device) for n in sizes]
    lrs = (torch.rand(len(sizes), generator=g, dtype=torch.float64) * 1e-2).to(device)
    if zero_lr_at is not None:
        lrs[zero_lr_at] = 0.0
    steps = torch.randint(1, 200, (len(sizes),), generator=g).float().to(device)
    steps[0] = 1.0  # the step where bias correction matters most
    return params, grads, exp_avgs, exp_avg_sqs, lrs, steps


def clone_case(case):
    *lists, lrs, steps = case
    return [[t.clone() for t in lst] for lst in lists] + [lrs.clone(), steps.clone()]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if ref.numel() == 0:
        return 0.0
    scale = ref.float().abs().max().item()
    return (out.float() - ref.float()).abs().max().item() / max(scale, 1e-30)


def assert_matches(out_case, ref_case, dtype):
    for which, outs, refs in zip(("param", "exp_avg", "exp_avg_sq"), (out_case[0], out_case[2], out_case[3]),
                                 (ref_case[0], ref_case[2], ref_case[3])):
        for i, (o, r) in enumerate(zip(outs, refs)):
            if which == "param" and dtype == torch.bfloat16:
                ulp = 2.0 ** -7 * r.float().abs()
                assert ((o.float() - r.float()).abs() <= ulp).all(), f"{which}[{i}] off by more than 1 bf16 ulp"
                if r.numel():
                    same = (o == r).float().mean().item()
                    assert same >= 0.99, f"{which}[{i}]: only {same:.3f} of elements bit-identical"
            else:
                err = rel_err(o, r)
                assert err <= 1e-6, f"{which}[{i}] (numel {r.numel()}): relative error {err:.3g} > 1e-6"


def run(case, backend, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01):
    OP(*case, beta1, beta2, eps, weight_decay, backend=backend)


def need(backend, device):
    try:
        dispatch.select(sa.OP, device, backend)
    except BackendUnavailableError as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.3, 0.5)], ids=["betas-default", "betas-large-lerp"])
def test_backend_matches_reference(device, backend, dtype, betas):
    need(backend, device)
    case = make_case(ODD_SIZES, dtype, device, seed=1, zero_lr_at=2)
    ref, out = clone_case(case), clone_case(case)
    run(ref, "reference", *betas)
    run(out, backend, *betas)
    assert_matches(out, ref, dtype)
    # lr 0: the parameter is untouched bit for bit (the moments still move)
    assert torch.equal(out[0][2], case[0][2])
    assert not torch.equal(out[2][2], case[2][2])


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_many_tensors_and_repeated_steps(device, backend):
    """50 tensors of random sizes, 3 consecutive steps with changing lrs (launch tables are
    cached per layout; the lr table must still be read fresh every step)."""
    need(backend, device)
    g = torch.Generator().manual_seed(2)
    sizes = torch.randint(1, 3000, (50,), generator=g).tolist()
    case = make_case(sizes, torch.float32, device, seed=3)
    ref, out = clone_case(case), clone_case(case)
    for k in range(3):
        for c in (ref, out):
            c[4] = case[4] * (k + 1)
            c[5] = case[5] + k
        run(ref, "reference")
        run(out, backend)
    assert_matches(out, ref, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_unaligned_views(device, backend, dtype):
    """Contiguous views that start off a 16-byte boundary take the kernels' unvectorised path."""
    need(backend, device)

    def misaligned(t):
        buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        buf[1:].copy_(t)
        assert buf[1:].data_ptr() % 16 != 0
        return buf[1:]

    case = make_case((1001, 37, 4100), dtype, device, seed=4)
    ref = [[misaligned(t) for t in lst] for lst in case[:4]] + list(case[4:])
    out = [[misaligned(t) for t in lst] for lst in case[:4]] + list(case[4:])
    run(ref, "reference")
    run(out, backend)
    assert_matches(out, ref, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_large_tensors(backend, dtype):
    """Many chunks per tensor and more chunks than resident blocks (the CUDA grid strides)."""
    need(backend, torch.device("cuda"))
    case = make_case((3_000_001, 2432 * 9728, 5, 2432), dtype, "cuda", seed=5)
    ref, out = clone_case(case), clone_case(case)
    run(ref, "reference")
    run(out, backend)
    assert_matches(out, ref, dtype)


def test_empty_inputs(device):
    OP([], [], [], [], torch.zeros(0), torch.zeros(0), 0.9, 0.999, 1e-8, 0.0)
    case = make_case((0, 0), torch.float32, device)
    for backend in dispatch.available(sa.OP, device):
        run(case, backend)


def test_opcheck():
    case = make_case((1, 7, 1000), torch.float32, "cpu")
    args = tuple(case) + (0.9, 0.999, 1e-8, 0.01)
    for backend in ("reference",) + tuple(b for b in ("cpp",) if b in dispatch.available(sa.OP, "cpu")):
        torch.library.opcheck(OP.default, args, {"backend": backend})


def test_auto_choice_on_cpu():
    name = dispatch.select(sa.OP, "cpu").name
    assert name == ("cpp" if dispatch.ext_has("_scaled_adamw_cpu") else "reference")


def test_bad_arguments():
    case = make_case((5, 6), torch.float32, "cpu")
    p, g, m, v, lrs, steps = case
    hp = (0.9, 0.999, 1e-8, 0.0)
    with pytest.raises(ShapeError, match="mismatched list lengths"):
        OP(p, g[:1], m, v, lrs, steps, *hp)
    with pytest.raises(ShapeError, match="lrs must be 1-D"):
        OP(p, g, m, v, lrs[:1], steps, *hp)
    with pytest.raises(ShapeError, match="unsupported parameter dtype"):
        OP([t.half() for t in p], [t.half() for t in g], m, v, lrs, steps, *hp)
    with pytest.raises(ShapeError, match=r"grads\[1\] is torch.bfloat16"):
        OP(p, [g[0], g[1].bfloat16()], m, v, lrs, steps, *hp)
    with pytest.raises(ShapeError, match="must be float32"):
        OP(p, g, [m[0].double(), m[1]], v, lrs, steps, *hp)
    with pytest.raises(ShapeError, match="must match"):
        OP(p, [g[0], g[1][:3]], m, v, lrs, steps, *hp)
    with pytest.raises(ShapeError, match="contiguous"):
        w = torch.randn(4, 6)
        OP([w.t()], [w.t()], [torch.zeros(4, 6).t()], [torch.zeros(4, 6).t()], lrs[:1], steps[:1], *hp)
    with pytest.raises(OptimizerConfigError, match="betas"):
        OP(p, g, m, v, lrs, steps, 1.0, 0.999, 1e-8, 0.0)
    with pytest.raises(BackendUnavailableError, match="cuda"):
        OP(p, g, m, v, lrs, steps, *hp, backend="cuda")
    with pytest.raises(BackendUnavailableError, match="unknown backend"):
        OP(p, g, m, v, lrs, steps, *hp, backend="magic")


# ---- compile checks of the GPU code (no GPU needed) ------------------------------------------------

NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
def test_cuda_kernel_compiles_with_nvcc(tmp_path):
    """csrc/cuda/scaled_adamw.cu builds for sm_80 and sm_90a, and its PTX has the 16-byte
    streaming accesses the bandwidth target relies on; the binding parses against torch's
    headers (it is compiled for real only by a CUDA build of the extension)."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS  # what torch adds in the real build

    src = ROOT / "csrc" / "cuda" / "scaled_adamw.cu"
    cmd = [NVCC, "-std=c++17", "-O3", "--use_fast_math", "-Xcompiler", "-fPIC", *COMMON_NVCC_FLAGS,
           f"-I{ROOT / 'csrc'}",
           "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a",
           "-c", str(src), "-o", str(tmp_path / "k.o")]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]
    ptx = tmp_path / "k.ptx"
    res = subprocess.run([NVCC, "-std=c++17", "-O3", f"-I{ROOT / 'csrc'}", "-arch=sm_90a", "-ptx", str(src),
                          "-o", str(ptx)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]
    text = ptx.read_text()
    assert "ld.global.cs.v4.f32" in text and "st.global.cs.v4.f32" in text


@pytest.mark.skipif(NVCC is None or shutil.which("g++") is None, reason="nvcc or g++ not on PATH")
def test_cuda_binding_parses():
    from torch.utils.cpp_extension import include_paths

    from torch.utils.cpp_extension import CUDA_HOME

    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), CUDA_HOME, "/usr/local/cuda",
             str(Path(NVCC).resolve().parents[1])]
    incs = [Path(h) / "include" for h in homes if h]
    cuda_inc = next((i for i in incs if (i / "cuda_runtime.h").exists()), None)
    if cuda_inc is None:
        pytest.skip(f"no CUDA runtime headers in {[str(i) for i in incs]}")
    if not (Path(include_paths()[0]) / "c10" / "cuda" / "CUDAStream.h").exists():
        pytest.skip("this torch ships no c10/cuda headers")
    cmd = ["g++", "-std=c++17", "-fsyntax-only", "-DHPRUNE_WITH_CUDA=1",
           # the CPU wheel lacks the generated c10/cuda/impl/cuda_cmake_macros.h (shared-lib flags only)
           "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", f"-I{cuda_inc}", f"-I{ROOT / 'csrc'}"]
    cmd += [f"-I{p}" for p in include_paths()] + [str(ROOT / "csrc" / "cuda" / "scaled_adamw_binding.cpp")]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]


def _triton_cuda_compiler_available() -> bool:
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia import compiler  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


@pytest.mark.skipif(not _triton_cuda_compiler_available(), reason="triton's NVIDIA backend is not installed")
def test_triton_kernel_compiles_for_gpu():
    """The Triton kernel compiles to PTX for sm_80 and sm_90 (Triton's bundled ptxas, no GPU), and
    its aligned branch (taken per tensor) uses 16-byte loads and stores for fp32 and bf16
    parameters while the other branch has scalar ones. Runs in a subprocess: in this process
    TRITON_INTERPRET=1 turns kernels into interpreted functions."""
    script = textwrap.dedent("""
        import re, triton, triton.language as tl
        from triton.backends.compiler import GPUTarget
        from hprune.kernels._scaled_adamw_triton import scaled_adamw_kernel as k
        sig = {"ptrs": "*i64", "numels": "*i64", "chunks": "*i32", "hyper": "*fp32", "n_tensors": "i32",
               "w1": "fp32", "beta2": "fp32", "omb2": "fp32", "eps": "fp32"}
        for cap in (80, 90):
            for dt in (tl.float32, tl.bfloat16):
                const = {"P_DTYPE": dt, "BLOCK": 1024, "ITERS": 8, "SOFT_BF16": False, "LERP_SMALL": True}
                src = triton.compiler.ASTSource(fn=k, signature={**sig, **{c: "constexpr" for c in const}},
                                                constexprs=const)
                ptx = triton.compile(src, target=GPUTarget("cuda", cap, 32)).asm["ptx"]
                vec = bool(re.search(r"ld\\.global(\\.\\w+)*\\.v4\\.b32", ptx)) and \\
                      bool(re.search(r"st\\.global(\\.\\w+)*\\.v4\\.b32", ptx))
                scalar = bool(re.search(r"ld\\.global(\\.\\w+)*\\.b32 ", ptx))
                print(cap, dt, "vec" if vec else "novec", "scalar" if scalar else "noscalar")
                assert vec and scalar, (cap, dt)
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert res.stdout.count(" vec scalar") == 4, res.stdout
