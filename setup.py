"""Build hprune's compiled extension `hprune._C` from csrc/.

- CPU C++ sources (csrc/*.cpp, csrc/cpu/*.cpp) are always built when torch is importable.
- CUDA sources (csrc/cuda/*.cu, csrc/cuda/*.cpp) are added when torch is a CUDA build and nvcc
  is found (CUDA_HOME). Architectures: TORCH_CUDA_ARCH_LIST, default "8.0;9.0a".
- The CUTLASS kernels (csrc/cuda/cutlass/) build as a second module, `hprune._C_cutlass`, for
  sm_90a only, when CUDA builds, the arch list includes 9.0 and the pinned `nvidia-cutlass` wheel
  provides the headers (hprune/kernels/cutlass_headers.py; HPRUNE_NO_CUTLASS=1 skips it). It takes
  a few minutes of nvcc; without it the other kernels serve every size.
- Prebuilt objects (tools/prebuild_cuda.py -> .prebuilt/cuda/, hprune/kernels/prebuilt.py): when
  their manifest matches this build (nvcc release, every arch of TORCH_CUDA_ARCH_LIST, source and
  header hashes), the .cu files are linked from there instead of compiled (the GPU machine then
  compiles only the torch bindings: seconds, not minutes); otherwise they are compiled from source.
- HPRUNE_BUILD_ONLY=hprune._C (or hprune._C_cutlass) builds that module alone (with its own
  --build-temp, two builds can run side by side: benchmarks/gpu_suite.py does).
- HPRUNE_NO_EXT=1 skips the extension entirely (pure-Python install; the library then uses its
  Triton / PyTorch paths). A failed compile also degrades to pure Python with a warning, unless
  HPRUNE_REQUIRE_EXT=1 asks for a hard failure.
- Without torch at build time (e.g. `pip install .` with build isolation, or before torch is
  installed) the build stops with a message saying how to get the extension, rather than quietly
  producing a pure-Python wheel (pip shows a build's output only when it fails); HPRUNE_NO_EXT=1
  asks for the pure-Python package explicitly.
"""
import glob
import importlib.util
import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _cutlass_headers():
    """hprune/kernels/cutlass_headers.py (the pinned nvidia-cutlass headers and the nvcc flags),
    loaded by path: importing the package here would run its __init__."""
    spec = importlib.util.spec_from_file_location(
        "hprune_cutlass_headers", os.path.join(HERE, "hprune", "kernels", "cutlass_headers.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _prebuilt():
    """hprune/kernels/prebuilt.py, loaded by path (standard library only)."""
    spec = importlib.util.spec_from_file_location(
        "hprune_prebuilt", os.path.join(HERE, "hprune", "kernels", "prebuilt.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


NO_TORCH_MESSAGE = """
hprune: torch is not importable at build time, so the compiled extension hprune._C (the CPU C++
and CUDA kernels) cannot be built. Either
  - install torch first, then build against it without isolation:
        pip install torch ninja && pip install --no-build-isolation .
  - or ask for the pure-Python package (Triton / PyTorch paths only, slower optimizer on the CPU):
        HPRUNE_NO_EXT=1 pip install .
`hprune info` says which build you have.
"""


def _extensions():
    if _flag("HPRUNE_NO_EXT"):
        print("hprune: HPRUNE_NO_EXT set, building pure-Python package", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        sys.exit(NO_TORCH_MESSAGE)

    rel = lambda pattern: sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))
    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    cuda_sources = rel("csrc/cuda/*.cu") + rel("csrc/cuda/*.cpp")
    use_cuda = (torch.version.cuda is not None and CUDA_HOME is not None and not _flag("HPRUNE_NO_CUDA")
                and bool(cuda_sources))
    # -fno-math-errno: lets GCC vectorise loops that call sqrt (errno is never read)
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno"]
    macros = [("HPRUNE_WITH_CUDA", "1")] if use_cuda else []
    include_dirs = [os.path.join(HERE, "csrc")]
    prebuilt = _prebuilt()
    nvcc = prebuilt.nvcc_release(os.path.join(CUDA_HOME, "bin", "nvcc")) if use_cuda else None
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
        objs, why = prebuilt.usable(HERE, "main", os.environ["TORCH_CUDA_ARCH_LIST"], nvcc)
        print(f"hprune: CUDA kernels of hprune._C: {why if objs else 'compiled from source (' + why + ')'}",
              file=sys.stderr)
        if objs:
            cuda_sources = [s for s in cuda_sources if not s.endswith(".cu")]
        ext = CUDAExtension(
            "hprune._C", sources + cuda_sources, include_dirs=include_dirs, define_macros=macros,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo",
                                                      "--expt-relaxed-constexpr"]},
            extra_link_args=["-fopenmp"], extra_objects=objs or [],
        )
    else:
        ext = CppExtension("hprune._C", sources, include_dirs=include_dirs, define_macros=macros,
                           extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])

    exts = [ext]
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    if use_cuda and not _flag("HPRUNE_NO_CUTLASS") and "9.0" in arch_list:
        headers = _cutlass_headers()
        inc, why = headers.cutlass_include()
        objs, pre_why = prebuilt.usable(HERE, "cutlass", arch_list, nvcc)
        cutlass_dir = os.path.join("csrc", "cuda", "cutlass")
        if objs:  # the kernel is compiled already: only the binding (no CUTLASS headers) is left
            print(f"hprune: linking the CUTLASS kernels (sm_90a) from {pre_why}", file=sys.stderr)
            exts.append(CUDAExtension(
                "hprune._C_cutlass", rel("csrc/cuda/cutlass/*.cpp"), include_dirs=[os.path.join(HERE, cutlass_dir)],
                define_macros=macros, extra_compile_args={"cxx": ["-O3", "-std=c++17"]}, extra_objects=objs))
        elif inc is None:
            print(f"hprune: not building the CUTLASS kernels: {why} ({pre_why})", file=sys.stderr)
        else:
            print(f"hprune: building the CUTLASS kernels (sm_90a) from {why} ({pre_why})", file=sys.stderr)
            exts.append(CUDAExtension(
                "hprune._C_cutlass", rel("csrc/cuda/cutlass/*.cu") + rel("csrc/cuda/cutlass/*.cpp"),
                include_dirs=[os.path.join(HERE, cutlass_dir), inc], define_macros=macros,
                # its explicit -gencode (sm_90a) keeps torch from adding TORCH_CUDA_ARCH_LIST's flags here
                extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": list(headers.NVCC_FLAGS)},
            ))

    only = os.environ.get("HPRUNE_BUILD_ONLY")  # one module per process: the GPU suite builds both side by side
    if only:
        exts = [e for e in exts if e.name == only]

    class OptionalBuildExt(BuildExtension):
        """A compile failure leaves a working pure-Python install (unless HPRUNE_REQUIRE_EXT=1)."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - any compiler failure
                if _flag("HPRUNE_REQUIRE_EXT"):
                    raise
                print(f"hprune: WARNING: building hprune._C failed ({exc}); installing without it",
                      file=sys.stderr)

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001
                if _flag("HPRUNE_REQUIRE_EXT"):
                    raise
                print(f"hprune: WARNING: compiling {ext.name} failed ({exc}); installing without it",
                      file=sys.stderr)

    return exts, {"build_ext": OptionalBuildExt.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
