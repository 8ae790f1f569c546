"""The --dry-run plan of `quantize` (hprune.models.memory, stages quantize-rtn / quantize-gptq /
save-quantized) against the host memory measured on the CPU: RTN and GPTQ, block by block (with
the output spilled, as the CLI runs it) and resident, on a tiny and a medium SD3 shape, within ±25 %.

Measured in a fresh process per case (benchmarks/peak_memory.py anon_peak_during: anonymous
resident memory polled every 0.5 ms, so the spill file's pages, which the save reads through its
maps, do not count) around quantize_model and then the save, after a warm-up quantisation of a
small layer (imports and one-time buffers are not the stage's), with the model already in memory
(built, not mapped): the plan's host bytes minus the weights' is what the stage adds."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hprune.models import memory as M

ROOT = Path(__file__).resolve().parents[1]
CLS = "SD3Transformer2DModel"
# tiny: ~1 M parameters, 64 tokens; medium: ~20 M parameters (the distillation harness's shape)
TINY = dict(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=32,
            num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=128, pooled_projection_dim=32,
            pos_embed_max_size=16)
MEDIUM = dict(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=4, attention_head_dim=64,
              num_attention_heads=6, joint_attention_dim=64, caption_projection_dim=384, pooled_projection_dim=64,
              pos_embed_max_size=16)
CALIB = dict(n_prompts=2, num_steps=2)  # 2 prompts x 2 steps x CFG 2 = 8 transformer calls
CALLS = 2 * 2 * 2


def _measure(cfg: dict, method: str, offload: bool) -> tuple[int, int]:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'benchmarks'}", OMP_NUM_THREADS="1",
               MALLOC_MMAP_THRESHOLD_="65536")  # big blocks go back to the OS when freed: no reuse hides a peak
    out = subprocess.run([sys.executable, __file__, json.dumps(cfg), method, str(int(offload))], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return tuple(json.loads(out.stdout.strip().splitlines()[-1]))


def _predicted(cfg: dict, method: str, offload: bool) -> tuple[int, int]:
    shape = M.config_shape(CLS, cfg, store_bytes=2, latent_size=cfg["sample_size"], text_len=16)
    o = M.Options(device="cpu", offload=offload, calib_samples=CALLS)
    stage = "quantize-rtn" if method == "rtn" else "quantize-gptq"
    plans = {p.stage: p for p in M.plan(shape, M.VERB_STAGES["quantize" if method == "rtn" else "quantize-gptq"],
                                        o, None)}
    base = shape.weight_bytes  # built in memory: in the resident set before the measured work
    return plans[stage].host_bytes - base, plans["save-quantized"].host_bytes - base


@pytest.mark.parametrize("cfg", [TINY, MEDIUM], ids=["tiny", "medium"])
@pytest.mark.parametrize("method,offload", [("rtn", True), ("rtn", False), ("gptq", True), ("gptq", False)])
def test_quantize_plan_within_25_percent_of_measured(cfg, method, offload):
    got_q, got_s = _measure(cfg, method, offload)
    want_q, want_s = _predicted(cfg, method, offload)
    assert 0.75 * got_q <= want_q <= 1.25 * got_q, (want_q, got_q)
    assert 0.75 * got_s <= want_s <= 1.25 * got_s, (want_s, got_s)


if __name__ == "__main__":  # the measuring child of _measure
    import tempfile

    import torch
    from peak_memory import anon_peak_during

    from hprune.artifacts import save_compressed
    from hprune.calib import synthetic
    from hprune.models.offload import Spill
    from hprune.models.registry import build_from_config
    from hprune.quant.model import quantize_model

    cfg, method, offload = json.loads(sys.argv[1]), sys.argv[2], bool(int(sys.argv[3]))
    model = build_from_config(CLS, cfg, dtype=torch.bfloat16)
    calib = synthetic(model, **CALIB, seed=0) if method == "gptq" else None
    warm = build_from_config(CLS, dict(cfg, num_layers=1, num_attention_heads=1), dtype=torch.bfloat16)
    with tempfile.TemporaryDirectory() as tmp, Spill(Path(tmp) / "w") as spill:  # imports, one-time buffers
        quantize_model(warm, method=method, calib=synthetic(warm, n_prompts=1, num_steps=1) if method == "gptq"
                       else None, offload="cpu" if offload else None, spill=spill if offload else None)
        save_compressed(warm, Path(tmp) / "w")
    del warm
    with tempfile.TemporaryDirectory() as tmp, Spill(Path(tmp) / "out") as spill:
        q, _ = anon_peak_during(lambda: quantize_model(model, method=method, calib=calib, offload="cpu" if offload else None,
                                                  spill=spill if offload else None))
        s, _ = anon_peak_during(lambda: save_compressed(model, Path(tmp) / "out"))
    print(json.dumps([q, s]))
