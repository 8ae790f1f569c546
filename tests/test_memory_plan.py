"""The --dry-run planner (hprune.models.memory): its predictions against measured peaks, its
verdicts and remedies, and the distillation options it names (8-bit AdamW, gradient checkpointing)."""
from __future__ import annotations

import copy
import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import stage_peaks as SP
from hprune.errors import HpruneError
from hprune.models import memory as M

ROOT = Path(__file__).resolve().parents[1]
# activation-dominated: few weights, 1040 tokens; weight-dominated: ~20 M parameters, 80 tokens
TINY = dict(sample_size=64, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=32,
            num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=64, pooled_projection_dim=32,
            pos_embed_max_size=64)
MEDIUM = SP.SD3_MEDIUM  # one medium shape for every plan check (benchmarks/stage_peaks.py)


def _measure(cfg: dict, batch: int, variants: list[tuple[str, bool]]) -> list[int]:
    """Peak bytes of one distillation step (teacher forward, student forward + backward, optimizer
    step), measured in a fresh process for each (optimizer, checkpointing) variant."""
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'benchmarks'}", OMP_NUM_THREADS="1",
               MALLOC_MMAP_THRESHOLD_="65536")  # big blocks go back to the OS when freed: no reuse hides a peak
    out = subprocess.run([sys.executable, __file__, json.dumps(cfg), str(batch), json.dumps(variants)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _step_prediction(cfg: dict, batch: int, optimizer: str, ckpt: bool) -> int:
    shape = M.config_shape("SD3Transformer2DModel", cfg, latent_size=cfg["sample_size"], text_len=16)
    t = M.training_step_bytes(shape, M.Options(device="cpu", batch_size=batch, ratio=0.0, optimizer=optimizer,
                                               grad_checkpointing=ckpt))
    return sum(v for k, v in t.items() if k not in ("teacher", "student"))  # the models exist before the step


@pytest.mark.parametrize("cfg,batch,variants", [
    (TINY, 4, [("adamw", False), ("adamw", True)]),
    (MEDIUM, 2, [("adamw", False), ("adamw8bit", False)]),
], ids=["tiny-activations", "medium-weights"])
def test_predicted_training_step_peak_within_25_percent_of_measured(cfg, batch, variants):
    measured = _measure(cfg, batch, variants)
    for (opt, ckpt), got in zip(variants, measured):
        want = _step_prediction(cfg, batch, opt, ckpt)
        assert 0.75 * got <= want <= 1.25 * got, (opt, ckpt, want, got)


def test_predicted_step_peak_with_the_teacher_streamed_within_25_percent_of_measured():
    """The teacher stored bf16 and memory-mapped, streamed block by block on the CPU (each block
    upcast to fp32 for its forward only), the student resident in fp32: the plan predicts the
    step without the teacher's weights, and the measurement agrees. A teacher materialised in
    fp32 would add its 4 bytes/param (80 MB here) to a ~130 MB step and fail the bound."""
    measured = _measure(MEDIUM, 2, [("adamw8bit", False, True)])[0]
    shape = M.config_shape("SD3Transformer2DModel", MEDIUM, store_bytes=2, latent_size=MEDIUM["sample_size"],
                           text_len=16, mapped=True)
    o = M.Options(device="cpu", batch_size=2, ratio=0.0, optimizer="adamw8bit", offload=True)
    t = M.training_step_bytes(shape, o)
    want = M.distill_step_peak(shape, o) - t["student"]  # the student exists before the step
    assert 0.75 * measured <= want <= 1.25 * measured, (want, measured)
    resident = M.training_step_bytes(shape, M.Options(device="cpu", batch_size=2, ratio=0.0, optimizer="adamw8bit"))
    assert t["teacher"] < resident["teacher"] / 2  # the teacher's weights left the (host-as-device) peak


@pytest.mark.parametrize("case", list(SP.CASES))
def test_predicted_stage_peaks_within_25_percent_of_measured(case):
    """calib, the fidelity check, probe and OBS-Diff (resident unstructured and structured, block by
    block unstructured): the plan's host peak (= its device peak on a CPU) against the peak measured
    in a fresh process (benchmarks/stage_peaks.py), on an activation-bound tiny shape and
    weight-bound medium ones, fp32 and bf16 (block by block, fp32 compute), SD3 and FLUX."""
    rows = SP.measure(case)
    assert [r["stage"] for r in rows] == SP.CASES[case][4]
    for r in rows:
        p = SP.predict(case, r["stage"])
        got = r["start"] + r["peak"]
        assert p.device_bytes == p.host_bytes  # a CPU's device is its host
        assert 0.75 * got <= p.host_bytes <= 1.25 * got, (r["stage"], p.host_bytes, got)


def test_plan_verdicts_and_remedies():
    big = M.model_shape("sd3.5-large")
    assert big.num_blocks == 38 and 8.0e9 < big.params < 8.3e9 and big.store_bytes == 2
    o = M.Options(device="cuda", batch_size=4)
    plans = {p.stage: p for p in M.plan(big, M.VERB_STAGES["compress"], o, M.parse_size("80GB"))}
    assert plans["load"].fits and not plans["distill"].fits  # teacher + student + grads + fp32 AdamW
    fix = plans["distill"].options
    assert fix  # and the named options do fit
    import dataclasses
    assert M.plan_stage("distill", big, dataclasses.replace(o, **fix)).device_bytes <= 80e9
    # SD3.5-Large on a 48 GB card with checkpointing and 8-bit AdamW: only the streamed teacher makes it fit
    lean = dataclasses.replace(o, grad_checkpointing=True, optimizer="adamw8bit", ratio=0.3)
    d = M.plan(big, ["distill"], lean, M.parse_size("48GB"))[0]
    assert not d.fits and d.options == {"offload": True}
    streamed = M.plan_stage("distill", big, dataclasses.replace(lean, offload=True))
    assert streamed.device_bytes <= 48e9 and "streamed block by block" in streamed.note
    assert M.training_step_bytes(big, dataclasses.replace(lean, offload=True))["teacher"] < big.weight_bytes / 10
    # FLUX.1 on a 24 GB card: resident inference does not fit; block by block does
    flux = M.model_shape("flux.1-dev")
    q = M.plan(flux, ["quantize-gptq"], o, M.parse_size("24GB"))[0]
    assert not q.fits and q.options.get("offload") is True
    off = M.plan_stage("quantize-gptq", flux, dataclasses.replace(o, offload=True))
    assert off.device_bytes < 24e9 and "1 calibration pass" in off.note
    # 8-bit AdamW and checkpointing lower what they should
    base = M.training_step_bytes(big, o)
    assert M.training_step_bytes(big, dataclasses.replace(o, optimizer="adamw8bit"))["states"] < base["states"] / 1.9
    assert M.training_step_bytes(big, dataclasses.replace(o, grad_checkpointing=True))["activations"] < \
        base["activations"] / 5


def test_model_shape_reads_headers_only(tmp_path):
    from hprune.artifacts import save_compressed
    from hprune.loading import load_model

    m = load_model("tiny-sd3")
    m.save_pretrained(tmp_path / "folder")
    s = M.model_shape(str(tmp_path / "folder"))
    t = M.model_shape("tiny-sd3")
    assert (s.params, s.weight_bytes, s.block_bytes) == (t.params, t.weight_bytes, t.block_bytes)
    assert s.mapped and not t.mapped
    # no tensor data is read: a folder whose tensor bytes are garbage plans the same
    f = next((tmp_path / "folder").glob("*.safetensors"))
    raw = bytearray(f.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    raw[8 + n:] = b"\xff" * (len(raw) - 8 - n)
    f.write_bytes(bytes(raw))
    assert M.model_shape(str(tmp_path / "folder")).weight_bytes == s.weight_bytes
    save_compressed(m, tmp_path / "art")
    assert M.model_shape(str(tmp_path / "art")).params == t.params


def test_parse_size():
    assert M.parse_size("24GB") == 24 * 10 ** 9 and M.parse_size("80GiB") == 80 * 2 ** 30
    assert M.parse_size("512MB") == 512 * 10 ** 6
    for bad in ("lots", "-3GB", "0GB"):
        with pytest.raises(HpruneError):
            M.parse_size(bad)


def test_cli_dry_run_prints_plan_and_loads_nothing(capsys, tmp_path):
    from hprune.cli import main

    assert main(["compress", "sd3.5-large", "--out", str(tmp_path / "o"), "--dry-run", "--device", "cuda",
                 "--device-memory", "80GB"]) == 0
    out = capsys.readouterr().out
    assert " NO |" in out and "distill: --grad-checkpointing" in out
    assert not (tmp_path / "o").exists()
    assert main(["quantize", "flux.1-dev", "--out", str(tmp_path / "q"), "--dry-run", "--device", "cpu",
                 "--method", "gptq", "--offload"]) == 0
    assert "1 calibration pass" in capsys.readouterr().out
    assert main(["compress", "sd3.5-large", "--out", str(tmp_path / "o"), "--dry-run", "--device", "cuda",
                 "--device-memory", "48GB", "--grad-checkpointing", "--optimizer", "adamw8bit"]) == 0
    assert "distill: --offload" in capsys.readouterr().out
    assert main(["compress", "sd3.5-large", "--out", str(tmp_path / "o"), "--dry-run", "--device", "cuda",
                 "--device-memory", "48GB", "--grad-checkpointing", "--optimizer", "adamw8bit", "--offload"]) == 0
    assert "do not fit" not in capsys.readouterr().out


def test_cpu_dry_run_plans_16bit_weights_block_by_block(capsys, tmp_path):
    """On a CPU the verbs run 16-bit weights block by block by themselves (commands.load_for_offload,
    fp32 compute): their plan is the --offload one; float32 weights stay resident."""
    from hprune.cli import main

    for verb, extra in (("obs", ["--pattern", "structured"]), ("obs", []), ("calib", []), ("probe", []),
                        ("distill", ["--plan", str(tmp_path / "p.json")])):
        plans = []
        for flags in ([], ["--offload"]):
            assert main([verb, "sd3.5-large", "--out", str(tmp_path / "o"), "--dry-run", "--device", "cpu",
                         "--device-memory", "24GB", *extra, *flags]) == 0  # free RAM moves between calls
            plans.append(capsys.readouterr().out)
        assert "(offload: block by block)" in plans[0], verb
        assert plans[0] == plans[1], verb
    assert main(["obs", "tiny-sd3", "--out", str(tmp_path / "o"), "--dry-run", "--device", "cpu"]) == 0
    assert "(offload" not in capsys.readouterr().out


def test_dry_run_plans_the_samples_size_the_run_uses(capsys, tmp_path):
    """calib --size (at the real VAE's scale, 8) and a --calib set's own latents set the tokens the
    plan sizes activations for, not the model's default image size."""
    from hprune.calib import synthetic
    from hprune.cli import main
    from hprune.loading import load_model

    def tokens(argv):
        assert main([*argv, "--dry-run", "--device", "cpu", "--device-memory", "24GB"]) == 0
        return int(re.search(r"(\d+) tokens per sample", capsys.readouterr().out)[1])

    assert tokens(["calib", "sd3.5-large", "--out", str(tmp_path / "c")]) == 64 * 64 + 333
    assert tokens(["calib", "sd3.5-large", "--out", str(tmp_path / "c"), "--size", "256"]) == 16 * 16 + 333
    model = load_model("tiny-sd3")
    default = tokens(["obs", "tiny-sd3", "--out", str(tmp_path / "o")])
    cal = synthetic(model, n_prompts=1, num_steps=1, latent_size=8, text_len=16)
    cal.save(tmp_path / "cal.safetensors")
    got = tokens(["obs", "tiny-sd3", "--calib", str(tmp_path / "cal.safetensors"), "--out", str(tmp_path / "o")])
    patch = model.config.patch_size
    assert got != default and got == (8 // patch) ** 2 + M.model_shape("tiny-sd3").tokens_txt


def test_gpu_plans_keep_the_calibration_set_on_the_host():
    """On a GPU the set (and the records a capture makes) is host memory: more calls grow the host
    peak by exactly the set's bytes and leave the device peak alone; on a CPU both are the host.
    Block-by-block OBS-Diff holds one block, not the model, on the device."""
    import dataclasses

    big = M.model_shape("sd3.5-large")
    per_call = big.cfg_rows * big.calib_sample_bytes
    assert big.cfg_rows == 2 and per_call > 0
    for stage, copies in (("calib", 2), ("probe", 1), ("obs", 1), ("fidelity", 1)):
        few, many = (M.plan_stage(stage, big, M.Options(device="cuda", calib_samples=n)) for n in (8, 64))
        assert many.device_bytes == few.device_bytes, stage
        assert many.host_bytes - few.host_bytes == copies * 56 * per_call, stage
        cpu = [M.plan_stage(stage, big, M.Options(device="cpu", calib_samples=n)) for n in (8, 64)]
        assert cpu[1].device_bytes - cpu[0].device_bytes == copies * 56 * per_call, stage
    o = M.Options(device="cuda", calib_samples=8)
    off = M.plan_stage("obs", big, dataclasses.replace(o, offload=True))
    assert off.device_bytes < big.weight_bytes / 4 < M.plan_stage("obs", big, o).device_bytes


def test_dry_run_plans_the_verbs_own_options(capsys, tmp_path):
    """probe / obs plan for the calibration set given (its size read from the file's header) and
    their own flags (probe's --max-samples, OBS-Diff's --pattern and --groups)."""
    from hprune.cli import main

    path = _calib().save(tmp_path / "cal.safetensors")  # 2 prompts x 2 steps, 2 rows a call: 8 samples
    out = tmp_path / "o"
    assert main(["probe", "tiny-sd3", "--calib", str(path), "--out", str(out), "--dry-run", "--device", "cpu"]) == 0
    assert "x 8 samples" in capsys.readouterr().out
    assert main(["probe", "tiny-sd3", "--calib", str(path), "--out", str(out), "--dry-run", "--device", "cpu",
                 "--max-samples", "3"]) == 0
    assert "x 3 samples" in capsys.readouterr().out
    assert main(["obs", "tiny-sd3", "--calib", str(path), "--out", str(out), "--dry-run", "--device", "cpu",
                 "--pattern", "structured", "--groups", "2"]) == 0
    assert "structured: 2 calibration pass(es) of 4 calls" in capsys.readouterr().out
    assert main(["calib", "tiny-sd3", "--out", str(tmp_path / "c.safetensors"), "--num-prompts", "3", "--steps", "5",
                 "--dry-run", "--device", "cpu"]) == 0
    assert "15 transformer calls" in capsys.readouterr().out
    assert not out.exists()


# ---- distillation options the plan names ------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _calib():
    from hprune.calib import synthetic
    from hprune.loading import load_model

    return synthetic(load_model("tiny-sd3"), n_prompts=2, num_steps=2, seed=0)


def _distil(optimizer: str, ckpt: bool, steps: int = 2):
    from hprune.distill import DistillConfig, distill
    from hprune.loading import load_model

    teacher = load_model("tiny-sd3")
    student = copy.deepcopy(teacher)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    start = {k: v.clone() for k, v in student.state_dict().items()}
    cal = _calib()
    cfg = DistillConfig(steps=steps, batch_size=2, lr=1e-3, optimizer=optimizer, grad_checkpointing=ckpt, pwp=False,
                        sgd=False, lambda_feat=0.0)
    student, res = distill(teacher, student, cal, cfg, progress=False)
    return student, res, start


def test_adamw8bit_trains_on_cpu_like_fp32_adamw():
    student, _, base = _distil("adamw8bit", False, steps=3)
    ref, _, _ = _distil("adamw", False, steps=3)
    a, b = student.state_dict(), ref.state_dict()
    moved = sum(float((b[k] - base[k]).norm() ** 2) for k in b) ** 0.5
    apart = sum(float((a[k] - b[k]).norm() ** 2) for k in b) ** 0.5
    assert moved > 0 and apart < 0.5 * moved  # same direction: 8-bit moments approximate fp32 ones


def test_adamw8bit_states_are_8bit():
    import bitsandbytes as bnb

    from hprune.distill import adamw8bit

    m = torch.nn.Linear(256, 64)
    opt = adamw8bit(m, {"weight": 1.0, "bias": 0.0}, 1e-3, (0.9, 0.999), 1e-8, 0.0)
    assert isinstance(opt, bnb.optim.AdamW8bit) and len(opt.param_groups) == 1  # scale 0: left out
    m(torch.randn(4, 256)).sum().backward()
    bias = m.bias.detach().clone()
    opt.step()
    assert opt.state[m.weight]["state1"].dtype == torch.uint8
    assert torch.equal(m.bias, bias)


def test_grad_checkpointing_gives_the_same_gradients():
    from hprune.loading import load_model
    from hprune.models.adapters import sample_inputs

    grads = []
    for ckpt in (False, True):
        m = load_model("tiny-sd3").train().requires_grad_(True)
        if ckpt:
            m.enable_gradient_checkpointing()
        m(**sample_inputs(m, batch=2), return_dict=False)[0].square().mean().backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-7)


def test_adamw8bit_refuses_checkpoints():
    from hprune.distill import DistillConfig

    with pytest.raises(HpruneError, match="adamw8bit"):
        DistillConfig(optimizer="adamw8bit", checkpoint_every=5, checkpoint_dir="x").validate()
    with pytest.raises(HpruneError, match="optimizer"):
        DistillConfig(optimizer="sgd").validate()


if __name__ == "__main__":  # the measuring child of _measure
    import torch.nn.functional as F

    from peak_memory import peak_during

    from hprune.models.adapters import sample_inputs
    from hprune.models.registry import build_from_config

    import contextlib
    import tempfile

    from hprune.loading import load_model
    from hprune.models.offload import offloaded

    cfg, batch, variants = json.loads(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
    teacher = build_from_config("SD3Transformer2DModel", cfg).requires_grad_(False)
    x = sample_inputs(teacher, batch=batch, latent_size=cfg["sample_size"], text_len=16)
    with torch.no_grad():  # one-time allocations of a first forward are not the step's
        teacher(**sample_inputs(teacher, batch=1, latent_size=8, text_len=4), return_dict=False)
    peaks = []
    for opt_name, ckpt, *streamed in variants:
        student = copy.deepcopy(teacher).train().requires_grad_(True)
        ref, stream = teacher, contextlib.nullcontext()
        if streamed and streamed[0]:  # the teacher stored bf16, memory-mapped, streamed block by block
            folder = tempfile.mkdtemp()
            copy.deepcopy(teacher).to(torch.bfloat16).save_pretrained(folder)
            ref = load_model(folder).requires_grad_(False)
            stream = offloaded(ref, "cpu")
            stream.__enter__()
            with torch.no_grad():  # its file pages are mapped in before the step (they are not anonymous memory)
                ref(**x, return_dict=False)
        if ckpt:
            student.enable_gradient_checkpointing()

        def step():
            if opt_name == "adamw8bit":
                from hprune.distill import adamw8bit
                opt = adamw8bit(student, {n: 1.0 for n, _ in student.named_parameters()}, 1e-4, (0.9, 0.999), 1e-8, 0)
            else:
                from hprune.optim import SensitivityAdamW
                opt = SensitivityAdamW(list(student.named_parameters()), lr=1e-4,
                                       scales={n: 1.0 for n, _ in student.named_parameters()})
            with torch.no_grad():
                vt = ref(**x, return_dict=False)[0]
            F.mse_loss(student(**x, return_dict=False)[0], vt).backward()
            opt.step()
            return opt

        peak, opt = peak_during(step)
        peaks.append(peak)
        stream.__exit__(None, None, None)
        del opt, student
    print(json.dumps(peaks))
