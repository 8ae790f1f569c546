"""Prebuilt CUDA objects: compile the kernels that need only the CUDA runtime (and the CUTLASS
headers) once, on a machine without a GPU, and link them on the GPU machine (issue 26, item 3).

`python tools/prebuild_cuda.py` compiles csrc/cuda/*.cu (sm_80 and sm_90a) and
csrc/cuda/cutlass/*.cu (sm_90a) with nvcc into `.prebuilt/cuda/*.o` and writes a manifest beside
them: the nvcc release, the arch list of each group, and the SHA-256 of every source and header
they were built from. setup.py (which loads this file by path: standard library only) links them
instead of compiling those sources when `usable()` says the manifest matches this build: the same
nvcc release, every requested arch in the objects, the same source and header hashes. Otherwise
it compiles from source as before. The torch bindings (.cpp) are always compiled where torch is.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import subprocess
from typing import Optional

PREBUILT_DIR = os.path.join(".prebuilt", "cuda")
MANIFEST = "manifest.json"
# nvcc flags of csrc/cuda/*.cu: setup.py's, plus the half / bfloat16 defines torch's extension
# build adds in front (torch.utils.cpp_extension.COMMON_NVCC_FLAGS), so the objects are the ones
# a source build makes.
MAIN_FLAGS = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr",
              "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
              "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "-DHPRUNE_WITH_CUDA=1"]
MAIN_ARCHS = ("8.0", "9.0a")
CUTLASS_ARCHS = ("9.0a",)  # its NVCC_FLAGS (cutlass_headers.py) name sm_90a themselves
GROUPS = {"main": "csrc/cuda/*.cu", "cutlass": "csrc/cuda/cutlass/*.cu"}
HEADERS = {"main": ("csrc/cuda/*.h",), "cutlass": ("csrc/cuda/cutlass/*.h", "csrc/cuda/cutlass/*.hpp")}


def gencode(arch: str) -> str:
    """"9.0a" -> -gencode=arch=compute_90a,code=sm_90a."""
    num = arch.replace(".", "")
    return f"-gencode=arch=compute_{num},code=sm_{num}"


def nvcc_release(nvcc: str = "nvcc") -> Optional[str]:
    """"13.0" from `nvcc --version`, None without nvcc."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def _sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def source_hashes(root: str, group: str) -> dict[str, str]:
    """{relative path: sha256} of a group's sources and the headers they include."""
    files = sorted(glob.glob(os.path.join(root, GROUPS[group])))
    for pattern in HEADERS[group]:
        files += sorted(glob.glob(os.path.join(root, pattern)))
    return {os.path.relpath(f, root): _sha(f) for f in files}


def object_name(source: str) -> str:
    return os.path.basename(source).replace(".cu", ".o")


def load_manifest(root: str) -> Optional[dict]:
    try:
        with open(os.path.join(root, PREBUILT_DIR, MANIFEST)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _archs(arch_list: str) -> list[str]:
    """TORCH_CUDA_ARCH_LIST ("8.0;9.0a", "9.0a+PTX", "8.0 9.0") -> ["8.0", "9.0a"]."""
    return [a.replace("+PTX", "") for a in re.split(r"[;\s,]+", arch_list.strip()) if a]


def usable(root: str, group: str, arch_list: str, nvcc: Optional[str]) -> tuple[Optional[list[str]], str]:
    """(object paths to link instead of compiling the group's sources, or None; why / why not)."""
    man = load_manifest(root)
    if man is None or group not in man.get("groups", {}):
        return None, f"no prebuilt {group} objects in {PREBUILT_DIR}"
    g = man["groups"][group]
    if nvcc is None or man.get("nvcc") != nvcc:
        return None, f"prebuilt with nvcc {man.get('nvcc')}, this build has nvcc {nvcc}"
    want = _archs(arch_list) if group == "main" else list(CUTLASS_ARCHS)
    missing = [a for a in want if a not in g.get("archs", [])]
    if missing:
        return None, f"prebuilt {group} objects lack arch {', '.join(missing)} (have {', '.join(g.get('archs', []))})"
    if g.get("sources") != source_hashes(root, group):
        return None, f"the {group} sources changed since they were prebuilt"
    objs = [os.path.join(root, PREBUILT_DIR, object_name(s)) for s in sorted(g["sources"]) if s.endswith(".cu")]
    if not objs or not all(os.path.isfile(o) for o in objs):
        return None, f"prebuilt {group} objects are missing"
    return objs, f"prebuilt {group} objects ({', '.join(g['archs'])}, nvcc {nvcc})"
