"""The --dry-run plan of `quantize` (hprune.models.memory, stages quantize-rtn / quantize-gptq)
against the host memory measured on the CPU: RTN and GPTQ, block by block (bf16 weights, the
output spilled, as the CLI runs them on a CPU) and resident (fp32 weights, which the CLI keeps
resident on a CPU), on a tiny and a medium SD3 shape, within ±25 %.

Measured in a fresh process per case (benchmarks/peak_memory.py anon_peak_during: anonymous
resident memory polled every 0.5 ms, so the spill file's pages, which the save reads through its
maps, do not count) around quantize_model, after a warm-up quantisation of a
small layer (imports and one-time buffers are not the stage's), with the model already in memory
(built, not mapped): the plan's host bytes minus the weights' is what the stage adds."""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import stage_peaks as SP
from hprune.models import memory as M

ROOT = Path(__file__).resolve().parents[1]
CLS = "SD3Transformer2DModel"
# tiny: ~1 M parameters, 64 tokens; medium: ~20 M parameters (the distillation harness's shape)
TINY = dict(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=32,
            num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=128, pooled_projection_dim=32,
            pos_embed_max_size=16)
MEDIUM = SP.SD3_MEDIUM  # one medium shape for every plan check (benchmarks/stage_peaks.py)
SHAPES = {"tiny": TINY, "medium": MEDIUM}
CALIB = dict(n_prompts=2, num_steps=2)  # 2 prompts x 2 steps x CFG 2 = 8 transformer calls
CALLS = 2 * 2 * 2


VARIANTS = [("rtn", True), ("rtn", False), ("gptq", True), ("gptq", False)]


@functools.lru_cache(maxsize=None)
def _measure(name: str) -> dict[tuple[str, bool], int]:
    """Peak anonymous bytes of quantize_model for every variant, in one fresh process per shape."""
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'benchmarks'}", OMP_NUM_THREADS="1",
               MALLOC_MMAP_THRESHOLD_="65536")  # big blocks go back to the OS when freed: no reuse hides a peak
    out = subprocess.run([sys.executable, __file__, json.dumps(SHAPES[name])], env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    return {v: p for v, p in zip(VARIANTS, json.loads(out.stdout.strip().splitlines()[-1]))}


def _predicted(cfg: dict, method: str, offload: bool) -> int:
    shape = M.config_shape(CLS, cfg, store_bytes=2 if offload else 4, latent_size=cfg["sample_size"], text_len=16)
    o = M.Options(device="cpu", offload=offload, calib_samples=CALLS)
    stage = "quantize-rtn" if method == "rtn" else "quantize-gptq"
    assert M._quantize_offload(shape, o) == offload  # what the CLI does with these weights on a CPU
    return M.plan_stage(stage, shape, o).host_bytes - shape.weight_bytes  # built in memory: there before


@pytest.mark.parametrize("name", ["tiny", "medium"])
@pytest.mark.parametrize("method,offload", VARIANTS)
def test_quantize_plan_within_25_percent_of_measured(name, method, offload):
    got = _measure(name)[method, offload]
    want = _predicted(SHAPES[name], method, offload)
    assert 0.75 * got <= want <= 1.25 * got, (want, got)


if __name__ == "__main__":  # the measuring child of _measure
    import tempfile

    import torch
    from peak_memory import anon_peak_during

    from hprune.calib import synthetic
    from hprune.models.offload import Spill
    from hprune.models.registry import build_from_config
    from hprune.quant.model import quantize_model

    cfg = json.loads(sys.argv[1])
    calib = synthetic(build_from_config(CLS, cfg), **CALIB, seed=0)  # the set does not depend on the dtype
    warm_calib = synthetic(build_from_config(CLS, dict(cfg, num_layers=1)), n_prompts=1, num_steps=1)
    peaks = []
    for method, offload in VARIANTS:
        dtype = torch.bfloat16 if offload else torch.float32
        with tempfile.TemporaryDirectory() as tmp, Spill(Path(tmp) / "w") as spill:  # imports, one-time buffers
            quantize_model(build_from_config(CLS, dict(cfg, num_layers=1), dtype=dtype), method=method,
                           calib=warm_calib if method == "gptq" else None, offload="cpu" if offload else None,
                           spill=spill if offload else None)
        model = build_from_config(CLS, cfg, dtype=dtype)
        with tempfile.TemporaryDirectory() as tmp, Spill(Path(tmp) / "out") as spill:
            kw = dict(method=method, calib=calib if method == "gptq" else None, offload="cpu" if offload else None,
                      spill=spill if offload else None)
            peak, _ = anon_peak_during(lambda m=model, kw=kw: quantize_model(m, **kw))
        peaks.append(peak)
        del model
    print(json.dumps(peaks))
