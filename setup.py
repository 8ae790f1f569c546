"""Build hprune's compiled extension `hprune._C` from csrc/.

- CPU C++ sources (csrc/*.cpp, csrc/cpu/*.cpp) are always built when torch is importable.
- CUDA sources (csrc/cuda/*.cu, csrc/cuda/*.cpp) are added when torch is a CUDA build and nvcc
  is found (CUDA_HOME). Architectures: TORCH_CUDA_ARCH_LIST, default "8.0;9.0a".
- HPRUNE_NO_EXT=1 skips the extension entirely (pure-Python install; the library then uses its
  Triton / PyTorch paths). A failed compile also degrades to pure Python with a warning, unless
  HPRUNE_REQUIRE_EXT=1 asks for a hard failure.
- Without torch at build time (e.g. `pip install .` with build isolation, or before torch is
  installed) the build stops with a message saying how to get the extension, rather than quietly
  producing a pure-Python wheel (pip shows a build's output only when it fails); HPRUNE_NO_EXT=1
  asks for the pure-Python package explicitly.
"""
import glob
import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


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
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
        ext = CUDAExtension(
            "hprune._C", sources + cuda_sources, include_dirs=include_dirs, define_macros=macros,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo",
                                                      "--expt-relaxed-constexpr"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension("hprune._C", sources, include_dirs=include_dirs, define_macros=macros,
                           extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])

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

    return [ext], {"build_ext": OptionalBuildExt.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
