"""Prebuilt CUDA objects (issue 26, item 3): setup.py links .prebuilt/cuda/*.o only when their
manifest matches the build (nvcc release, every requested arch, source and header hashes), and
compiles from source otherwise. The compile itself is tools/prebuild_cuda.py (nvcc; minutes)."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("hprune_prebuilt_t", ROOT / "hprune/kernels/prebuilt.py")
P = importlib.util.module_from_spec(spec)
spec.loader.exec_module(P)


def _tree(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    shutil.copytree(ROOT / "csrc", root / "csrc")
    out = root / P.PREBUILT_DIR
    out.mkdir(parents=True)
    groups = {}
    for group, archs in (("main", list(P.MAIN_ARCHS)), ("cutlass", list(P.CUTLASS_ARCHS))):
        hashes = P.source_hashes(str(root), group)
        for src in hashes:
            if src.endswith(".cu"):
                (out / P.object_name(src)).write_bytes(b"\x7fELF")
        groups[group] = {"archs": archs, "sources": hashes}
    (out / P.MANIFEST).write_text(json.dumps({"nvcc": "13.0", "groups": groups}))
    return root


def test_matching_objects_are_linked(tmp_path):
    root = _tree(tmp_path)
    objs, why = P.usable(str(root), "main", "9.0a", "13.0")
    assert sorted(Path(o).name for o in objs) == ["scaled_adamw.o", "w4a16.o"], why
    objs, _ = P.usable(str(root), "main", "8.0;9.0a", "13.0")
    assert objs
    objs, _ = P.usable(str(root), "cutlass", "9.0a", "13.0")
    assert [Path(o).name for o in objs] == ["w4a16_cutlass.o"]


def test_any_mismatch_builds_from_source(tmp_path):
    root = _tree(tmp_path)
    assert P.usable(str(root), "main", "9.0a", "12.8")[0] is None  # another nvcc
    assert P.usable(str(root), "main", "9.0a", None)[0] is None  # no nvcc
    objs, why = P.usable(str(root), "main", "8.9;9.0a", "13.0")  # an arch not prebuilt
    assert objs is None and "8.9" in why
    (root / "csrc/cuda/w4a16.h").write_text((root / "csrc/cuda/w4a16.h").read_text() + "\n// edited\n")
    objs, why = P.usable(str(root), "main", "9.0a", "13.0")  # a header changed
    assert objs is None and "changed" in why
    assert P.usable(str(root), "cutlass", "9.0a", "13.0")[0]  # the other group is unaffected
    (root / P.PREBUILT_DIR / "w4a16_cutlass.o").unlink()
    assert P.usable(str(root), "cutlass", "9.0a", "13.0")[0] is None  # an object missing
    assert P.usable(str(tmp_path / "nowhere"), "main", "9.0a", "13.0")[0] is None  # none at all


def test_arch_list_forms_and_gencode():
    assert P._archs("8.0;9.0a") == ["8.0", "9.0a"] and P._archs("9.0a+PTX") == ["9.0a"]
    assert P._archs("8.0 9.0") == ["8.0", "9.0"]
    assert P.gencode("9.0a") == "-gencode=arch=compute_90a,code=sm_90a"
