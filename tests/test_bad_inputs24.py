"""The second bad-input sweep (issue 24): each case gives a one-line error naming the input and
the problem, with nothing written, or the right result. Data loss cases: tests/test_ownership.py;
the property-based sweep: tests/test_fuzz_inputs.py."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from hprune.errors import CheckpointError, HpruneError, PlanError
from util import fresh, one_line_error, run


@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    """RTN-quantised artifacts of tiny-sd3, tiny-sd35 and tiny-flux (their recipes have a quantize step)."""
    from hprune.artifacts import save_compressed
    from hprune.quant import quantize_model

    root = tmp_path_factory.mktemp("arts")
    out = {}
    for name in ("tiny-sd3", "tiny-sd35", "tiny-flux"):
        m = fresh(name)
        quantize_model(m, group_size=32, fmt="int4")
        out[name] = save_compressed(m, root / name)
    return out


def _edit(src, dst, fn):
    shutil.copytree(src, dst)
    doc = json.loads((dst / "hprune.json").read_text())
    fn(doc)
    (dst / "hprune.json").write_text(json.dumps(doc))
    return dst


# -- 3. --resume with another teacher or calibration set ----------------------------------------------------
def test_resume_refuses_another_teacher_or_calibration_set(tmp_path):
    from hprune.calib import builtin_calibration
    from hprune.distill import DistillConfig, distill
    from hprune.models import PrunePlan, apply_plan

    teacher = fresh("tiny-sd3")
    calib = builtin_calibration("tiny-sd3", teacher, n_prompts=2, num_steps=2)

    def student_of(t):
        s = fresh("tiny-sd3")
        s.load_state_dict(t.state_dict())
        apply_plan(s, PrunePlan.manual([5], s))
        return s

    ckpt = tmp_path / "ck"
    cfg = DistillConfig(steps=1, batch_size=1, checkpoint_every=1, checkpoint_dir=str(ckpt), sgd=False)
    distill(teacher, student_of(teacher), calib, cfg, progress=False)
    resume = DistillConfig(steps=2, batch_size=1, checkpoint_every=1, checkpoint_dir=str(ckpt), sgd=False, resume=True)
    other = fresh("tiny-sd3")
    with torch.no_grad():  # same architecture and size, other weights (a fine-tune)
        for p in other.parameters():
            p.mul_(1.01)
    with pytest.raises(HpruneError, match=r"another teacher \(its weights\)"):
        distill(other, student_of(other), calib, resume, progress=False)
    other_calib = builtin_calibration("tiny-sd3", teacher, n_prompts=2, num_steps=2, seed=7)
    assert len(other_calib) == len(calib)
    with pytest.raises(HpruneError, match=r"another calibration set \(its contents\)"):
        distill(teacher, student_of(teacher), other_calib, resume, progress=False)
    _, res = distill(teacher, student_of(teacher), calib, resume, progress=False)  # the same run resumes
    assert res.resumed_from == 1


def test_compress_run_key_holds_the_weights_and_calibration_contents():
    from hprune.calib import builtin_calibration
    from hprune.compress import CompressOptions, _run_key
    from hprune.models.registry import weights_fingerprint

    a, b = fresh("tiny-sd3"), fresh("tiny-sd3")
    with torch.no_grad():
        next(b.parameters()).add_(1e-3)
    assert weights_fingerprint(a) != weights_fingerprint(b)
    c1 = builtin_calibration("tiny-sd3", a, n_prompts=2, num_steps=2)
    c2 = builtin_calibration("tiny-sd3", a, n_prompts=2, num_steps=2, seed=3)
    k1, k2 = (_run_key(CompressOptions(), weights_fingerprint(a), c) for c in (c1, c2))
    assert k1["calib"] != k2["calib"] and k1["calib_samples"] == k2["calib_samples"]


# -- 4. generate with another model's artifact, and its numeric flags --------------------------------------
def test_generate_refuses_an_artifact_of_another_model(capsys, tmp_path, arts):
    for art, match in ((arts["tiny-flux"], "compressed from tiny-flux, not tiny-sd3"),
                       (arts["tiny-sd35"], "compressed from tiny-sd35, not tiny-sd3")):
        code, _, err = run(capsys, "generate", "tiny-sd3", "--artifact", art, "--prompt", "a fox", "--out", tmp_path / "o")
        one_line_error(code, err, match)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flag, value, match", [
    ("--size", 9, "--size 9: this model makes images of 8 to 128 pixels, in steps of 4"),
    ("--size", 33, "--size 33"), ("--size", 256, "--size 256"), ("--size", 65536, "between 8 and 16384"),
    ("--seed", 10**23, "--seed must be between 0 and"), ("--steps", 100000000, "--steps must be between 1 and 1000"),
    ("--guidance", "nan", "--guidance must be a finite number"),
    ("--lora", "x.safetensors:nan", "scale must be a finite number"),
    ("--lora", "x.safetensors:1e999", "scale must be a finite number"),
])
def test_generate_numeric_flags_are_bounded(capsys, tmp_path, flag, value, match):
    code, _, err = run(capsys, "generate", "tiny-sd3", "--prompt", "a fox", f"{flag}={value}", "--out", tmp_path / "o")
    one_line_error(code, err, match)
    assert not (tmp_path / "o").exists()


# -- 5. / 7. / 10. / 11. LoRA input -----------------------------------------------------------------------
def _lora(model, rank=2, **over):
    """A LoRA on transformer_blocks.0.attn.to_q of `model` (diffusers PEFT keys)."""
    q = model.transformer_blocks[0].attn.to_q
    g = torch.Generator().manual_seed(0)
    sd = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(rank, q.in_features, generator=g),
          "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(q.out_features, rank, generator=g)}
    sd.update(over)
    return sd


@pytest.mark.parametrize("bad, match", [
    ("nan", "holds NaN/inf"), ("inf", "holds NaN/inf"), ("huge", "beyond"), ("int8", "is int8"),
    ("alpha_nan", "alpha"),
])
def test_lora_with_non_finite_or_integer_values_is_refused(tmp_path, bad, match):
    from hprune.lora import apply_lora

    m = fresh("tiny-sd3")
    sd = _lora(m)
    key = next(iter(sd))
    if bad == "nan":
        sd[key][0, 0] = math.nan
    elif bad == "inf":
        sd[key][0, 0] = math.inf
    elif bad == "huge":
        sd[key][0, 0] = 1e30
    elif bad == "int8":
        sd[key] = sd[key].to(torch.int8)
    else:
        sd["transformer.transformer_blocks.0.attn.to_q.alpha"] = torch.tensor(math.nan)
    save_file(sd, str(tmp_path / "l.safetensors"))
    with pytest.raises(CheckpointError, match=match):
        apply_lora(m, tmp_path / "l.safetensors")
    with pytest.raises(CheckpointError, match=match):
        apply_lora(m, sd)
    assert not hasattr(m, "_hprune_lora") or not m._hprune_lora


def test_lora_scales_must_be_finite(tmp_path):
    from hprune.lora import apply_lora, set_lora_scale

    m = fresh("tiny-sd3")
    for s in (math.nan, math.inf, float("1e999")):
        with pytest.raises(HpruneError, match="finite"):
            apply_lora(m, _lora(m), scale=s)
    apply_lora(m, _lora(m))
    with pytest.raises(HpruneError, match="finite"):
        set_lora_scale(m, math.nan)


def test_rank_zero_lora_with_alpha_is_dropped_not_reported_applied():
    from hprune.lora import apply_lora

    m = fresh("tiny-sd3")
    sd = _lora(m, rank=0, **{"transformer.transformer_blocks.0.attn.to_q.alpha": torch.tensor(4.0)})
    with pytest.raises(HpruneError, match="rank 0"):  # was ZeroDivisionError
        apply_lora(m, sd, warn=False)
    good = _lora(m)
    good.update({k.replace("to_q", "to_k"): v for k, v in _lora(m, rank=0).items()})
    rep = apply_lora(m, good, warn=False)
    assert rep.applied == ["transformer_blocks.0.attn.to_q"]
    assert "rank 0" in rep.dropped["transformer_blocks.0.attn.to_k"]


def test_pickle_lora_in_a_folder_is_never_read(tmp_path):
    from hprune.lora import apply_lora

    m = fresh("tiny-sd3")
    folder = tmp_path / "lora"
    folder.mkdir()
    torch.save(_lora(m), folder / "pytorch_lora_weights.bin")
    with pytest.raises(CheckpointError, match="pytorch_lora_weights.bin is a pickle, which hprune never reads"):
        apply_lora(m, folder)
    save_file(_lora(m), str(folder / "pytorch_lora_weights.safetensors"))  # beside it: the safetensors one is read
    assert apply_lora(m, folder, warn=False).applied == ["transformer_blocks.0.attn.to_q"]


def test_apply_lora_given_a_dict_of_strings(tmp_path):
    from hprune.lora import apply_lora

    with pytest.raises(CheckpointError, match="is a str, not a tensor"):
        apply_lora(fresh("tiny-sd3"), {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": "abc"})


# -- 6. KOALA with a NaN similarity ---------------------------------------------------------------------
def test_koala_refuses_a_nan_similarity():
    from hprune.hpp import plan_koala
    from hprune.probe import SensitivityTable

    blocks = [{"index": i, "name": f"b{i}", "kind": "joint", "delta": {"block": 0.1 * (i + 1)},
               "params": {"block": 100}, "similarity": 0.5} for i in range(4)]
    blocks[1]["similarity"] = math.nan
    table = SensitivityTable.from_dict({"format": "hprune.sensitivity/1", "model": {"family": "sd3", "num_blocks": 4,
                                        "class": "SD3Transformer2DModel", "config": {}, "fingerprint": None},
                                        "metric": "rel_mse", "baseline": {}, "calib": {}, "seconds": 0, "blocks": blocks})
    with pytest.raises(PlanError, match="similarity of block 1 is nan"):
        plan_koala(table, 0.2)


# -- 8. save_compressed with a NaN weight ---------------------------------------------------------------
def test_save_compressed_refuses_nan_before_writing(tmp_path):
    from hprune.artifacts import save_compressed

    m = fresh("tiny-sd3")
    with torch.no_grad():
        m.transformer_blocks[3].ff.net[2].weight[1, 2] = math.nan
    with pytest.raises(CheckpointError, match=r"transformer_blocks\.3\.ff\.net\.2\.weight holds 1 NaN/inf value\(s\)"):
        save_compressed(m, tmp_path / "art")
    assert os.listdir(tmp_path) == []


def test_finite_check_is_chunked():
    from hprune.io import check_finite

    t = torch.zeros(1000)
    t[777] = math.inf
    t[5] = math.nan
    with pytest.raises(CheckpointError, match=r"tensor w holds 2 NaN/inf value\(s\) of 1000"):
        check_finite({"w": t}, "x", chunk_elems=100)


# -- 9. / 10. edited hprune.json ---------------------------------------------------------------------------
@pytest.mark.parametrize("edit, match", [
    (lambda d: d["base_config"].update(num_layers=10**5), "num_layers=100000 is out of range"),
    (lambda d: d["base_config"].update(num_layers=10**9), "num_layers=1000000000 is out of range"),
    (lambda d: d["base_config"].update(attention_head_dim=10**9), "attention_head_dim=1000000000 is out of range"),
    (lambda d: d.update(recipe=None), "recipe is NoneType, expected list"),
    (lambda d: d["recipe"][0].pop("fmt"), "recipe step 0 (quantize): corrupted"),
    (lambda d: d["recipe"][0].update(group_size="abc"), "recipe step 0 (quantize): corrupted"),
    (lambda d: d["recipe"][0].update(group_size=float("inf")), "recipe step 0 (quantize)"),
    (lambda d: d["recipe"][0].update(modules=5), "recipe step 0 (quantize): corrupted"),
    (lambda d: d["recipe"].append({"op": ["prune"]}), "unknown operation"),
    (lambda d: d["recipe"].append({"op": "prune"}), "recipe step 1 (prune): corrupted"),
    (lambda d: d["weights"].update(file="model\x00.safetensors"), "corrupted recipe (weights.file"),
])
def test_edited_recipe_is_one_line(capsys, tmp_path, arts, edit, match):
    from hprune.artifacts import load_compressed

    art = _edit(arts["tiny-sd3"], tmp_path / "art", edit)
    with pytest.raises(CheckpointError, match=re.escape(match)):
        load_compressed(art)
    for argv in (["info", art], ["generate", art, "--prompt", "a fox", "--out", tmp_path / "o"]):
        code, _, err = run(capsys, *argv)
        assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_load_compressed_refuses_an_integer_dtype(arts):
    from hprune.artifacts import load_compressed

    with pytest.raises(HpruneError, match="floating-point torch dtype"):
        load_compressed(arts["tiny-sd3"], dtype=torch.int8)


# -- 10. environment, pipes, pipelines --------------------------------------------------------------------
def _cli(*argv, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "hprune", *map(str, argv)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd()] + sys.path),
                                            **(env or {})}, **kw)


@pytest.mark.parametrize("env, match", [({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc'"),
                                        ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 without RANK"),
                                        ({"HPRUNE_NO_EXT": "maybe"}, "HPRUNE_NO_EXT='maybe'")])
def test_environment_is_checked_before_any_work(capsys, tmp_path, monkeypatch, env, match):
    for k in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    code, _, err = run(capsys, "calib", "tiny-sd3", "--num-prompts", 1, "--steps", 1, "--out", tmp_path / "c.safetensors")
    one_line_error(code, err, match)
    assert os.listdir(tmp_path) == []


def test_env_flags_share_one_parser_and_typos_are_named(monkeypatch):
    from hprune.env import flag, unknown_variables

    for v, want in (("1", True), ("true", True), ("YES", True), ("on", True), ("0", False), ("false", False),
                    ("no", False), ("", False)):
        monkeypatch.setenv("HPRUNE_NO_EXT", v)
        assert flag("HPRUNE_NO_EXT") is want
    assert unknown_variables({"HPRUNE_BAKEND": "x", "HPRUNE_BACKEND_W4A16_MM": "triton", "HPRUNE_PROGRESS": "1"}) \
        == [("HPRUNE_BAKEND", "HPRUNE_BACKEND")]


def test_selftest_extension_off_and_selftest_yes_accepted(monkeypatch):
    from hprune._ext import load_extension
    from hprune.kernels import dispatch

    monkeypatch.setenv("HPRUNE_NO_EXT", "true")
    load_extension.cache_clear()
    try:
        assert load_extension() is None
    finally:
        monkeypatch.delenv("HPRUNE_NO_EXT")
        load_extension.cache_clear()
    monkeypatch.setenv("HPRUNE_SELFTEST", "yes")
    assert dispatch._first_call_checks_on(torch.device("cpu"))
    monkeypatch.setenv("HPRUNE_SELFTEST", "off")
    assert not dispatch._first_call_checks_on(torch.device("cuda"))


def test_selftest_with_nothing_to_check_fails(capsys, monkeypatch):
    from hprune.kernels import selftest

    monkeypatch.setattr(selftest, "run_all", lambda device, ops=None, **kw: [])
    code, out, err = run(capsys, "selftest", "--device", "cpu")
    one_line_error(code, err, "nothing to check on cpu")
    assert "0 of 0" not in out


def test_selftest_json_into_a_closed_pipe_is_quiet():
    proc = subprocess.run(f"{sys.executable} -m hprune selftest --json --op w4a16_mm | head -c 60", shell=True,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd()] + sys.path)})
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


def test_prompts_lose_a_utf8_bom(tmp_path):
    from hprune.commands import read_prompts

    (tmp_path / "p.txt").write_bytes("\ufeffa red circle\nb\n".encode("utf-8"))
    assert read_prompts(str(tmp_path / "p.txt")) == ["a red circle", "b"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, arts):
    from hprune.artifacts import save_compressed
    from hprune.loading import load_compressed
    from hprune.pipelines import build_pipeline

    root = tmp_path_factory.mktemp("pipe")
    pipe = build_pipeline(fresh("tiny-sd3"))
    return save_compressed(load_compressed(arts["tiny-sd3"]), root / "pipe", as_pipeline=pipe)


def test_load_pipeline_without_vae_or_with_a_corrupt_scheduler(tmp_path, pipeline):
    from hprune.loading import load_pipeline

    novae = tmp_path / "novae"
    shutil.copytree(pipeline, novae)
    shutil.rmtree(novae / "vae")
    with pytest.raises(CheckpointError, match="names a vae .* no vae/ folder"):
        load_pipeline(novae)
    bad = tmp_path / "bad"
    shutil.copytree(pipeline, bad)
    (bad / "scheduler" / "scheduler_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot load the pipeline"):
        load_pipeline(bad)
    assert load_pipeline(pipeline).transformer is not None
