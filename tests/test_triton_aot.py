"""What a GPU launch would show, caught without a GPU (issue 15): every Triton configuration the
launch heuristics can choose (W4A16, W4A8, the AdamW kernel) compiles ahead of time for sm_90
and sm_80 (`triton.compile` with an explicit GPUTarget, Triton's own ptxas) within the device's
shared memory (227 KB / 163 KB) and without register spills (no local-memory stack frame); the
checker itself flags a configuration known not to fit; and the W4A8 FP8 dots promote to fp32
every 32 products on sm_90 (max_num_imprecise_acc).

The compiles run in a subprocess: in this process TRITON_INTERPRET=1 makes kernels interpreted
functions. ~190 compiles, one process per target: ~3-5 minutes on 2 cores when Triton's cache is
cold, seconds when warm; `python -m hprune.kernels.triton_aot --full` adds fp16 and group 128."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _nvidia_backend() -> bool:
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia import compiler  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


pytestmark = pytest.mark.skipif(not _nvidia_backend(), reason="triton's NVIDIA backend is not installed")

SCRIPT = textwrap.dedent("""
    import json, re, sys
    from dataclasses import asdict
    from hprune.kernels import triton_aot as aot
    from hprune.kernels.triton_w4a16 import Config as C16

    arch = int(sys.argv[1])
    out = {"heuristics": [asdict(r) for r in aot.check(aot.launch_specs(arch), arch)]}
    if arch == 90:
        # the autotuners' candidates (timed on the GPU by default): none may spill either
        out["candidates"] = [asdict(r) for r in aot.check(aot.candidate_specs(90), 90)]
        # known not to launch well: fp32 activations at 16x64x256 (4 warps) spill (or, with other
        # scale paths, need ~300 KB of shared memory: DESIGN §7)
        bad, _ = aot.compile_spec(aot.w4a16_spec(C16(16, 64, 256, num_warps=4, num_stages=4), "fp32", "int4", 64), 90)
        out["known_bad"] = asdict(bad)
        # W4A8 with BLOCK_M 64 (wgmma): what the FP8 dots accumulate in reduced precision
        spec = [s for s in aot.w4a8_specs(90) if s.kernel == "w4a8" and s.constexprs["BLOCK_M"] == 64
                and s.constexprs["SPLIT_K"] == 1 and s.constexprs["BLOCK_K"] == 64][0]
        spec.constexprs["FMT"] = 1  # int4_sym: only the FP8 dots (no tf32 zero-term dot)
        _, compiled = aot.compile_spec(spec, 90)
        ttgir = compiled.asm["ttgir"]
        out["w4a8_imprecise_acc"] = sorted(set(int(v) for v in re.findall(r"maxNumImpreciseAcc = (\\d+)", ttgir)))
        out["w4a8_wgmma"] = "warp_group_dot" in ttgir
    print("AOT-JSON " + json.dumps(out))
""")


@pytest.fixture(scope="module")
def aot_results():
    """One process per target, side by side (a CPU core each)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, str(arch)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT) for arch in (90, 80)]
    merged: dict = {"heuristics": []}
    for p in procs:
        out, err = p.communicate(timeout=1800)
        assert p.returncode == 0, out[-2000:] + err[-4000:]
        part = json.loads([ln for ln in out.splitlines() if ln.startswith("AOT-JSON ")][-1][len("AOT-JSON "):])
        merged["heuristics"] += part.pop("heuristics")
        merged.update(part)
    return merged


def _limit(arch: int) -> int:
    from hprune.kernels.triton_aot import SHARED_LIMIT

    return SHARED_LIMIT[arch]


def test_every_heuristic_config_fits_sm90_and_sm80_without_spills(aot_results):
    rows = aot_results["heuristics"]
    kernels = {r["kernel"] for r in rows}
    assert {"w4a16", "w4a8", "w4a8_quant", "adamw"} <= kernels
    assert {r["arch"] for r in rows} == {80, 90}
    bad = [f"sm_{r['arch']} {r['kernel']} {r['label']}: shared {r['shared']} B (limit {_limit(r['arch'])}), "
           f"{r['registers']} registers, stack {r['stack']} B {r['error']}"
           for r in rows if r["error"] or r["shared"] > _limit(r["arch"]) or r["stack"] > 0]
    assert not bad, "\n".join(bad)


def test_the_check_flags_a_config_that_does_not_fit(aot_results):
    bad = aot_results["known_bad"]
    assert not bad["error"] and (bad["shared"] > _limit(90) or bad["stack"] > 0), bad


def test_w4a8_fp8_dots_promote_every_32_products_on_sm90(aot_results):
    assert aot_results["w4a8_wgmma"], "BLOCK_M 64 should use Hopper's wgmma (where the default is imprecise)"
    assert aot_results["w4a8_imprecise_acc"] == [32]


def test_every_autotune_candidate_fits_sm90_without_spills(aot_results):
    cands = aot_results["candidates"]
    assert {r["kernel"] for r in cands} == {"w4a16_candidate", "w4a8_candidate"}
    bad = [f"{r['label']}: stack {r['stack']}, shared {r['shared']} {r['error']}" for r in cands
           if not (r["error"] == "" and r["stack"] == 0 and r["shared"] <= _limit(90))]
    assert not bad, bad
