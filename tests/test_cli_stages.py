"""The probing/planning CLI chain on the tiny models: calib -> probe -> plan -> prune, and its errors."""
import json

import pytest
import torch

from hprune.artifacts import load_compressed
from hprune.loading import load_model
from util import TINY, inputs, out, run


@pytest.mark.parametrize("name", TINY)
def test_chain_end_to_end(name, tmp_path, capsys):
    cal, probe, plan, art = tmp_path / "c.safetensors", tmp_path / "probe", tmp_path / "plan.json", tmp_path / "art"
    assert run(capsys, "calib", name, "--n", 1, "--steps", 2, "--out", cal)[0] == 0
    code, text, _ = run(capsys, "probe", name, "--calib", cal, "--out", probe, "--max-samples", 2)
    assert code == 0 and "ΔP (rel_mse)" in text
    assert (probe / "sensitivity.png").read_bytes()[:4] == b"\x89PNG"
    code, text, _ = run(capsys, "plan", "--sensitivity", probe / "sensitivity.json", "--ratio", 0.2, "--out", plan)
    assert code == 0 and "hpp plan" in text
    code, text, _ = run(capsys, "prune", name, "--plan", plan, "--out", art)
    assert code == 0 and "removed" in text
    meta = json.loads(plan.read_text())["meta"]
    model = load_compressed(art)
    full = load_model(name)
    assert meta["achieved_ratio"] >= 0.2
    removed = 1 - sum(p.numel() for p in model.parameters()) / sum(p.numel() for p in full.parameters())
    assert removed == pytest.approx(meta["achieved_ratio"])
    x = inputs(model)
    assert torch.isfinite(out(model, x)).all()


def test_baseline_and_manual_plans(tmp_path, capsys):
    probe = tmp_path / "probe"
    assert run(capsys, "probe", "tiny-sd3", "--out", probe, "--max-samples", 2, "--granularity", "block")[0] == 0
    for method in ("koala", "bksdm"):
        code, _, err = run(capsys, "plan", "--sensitivity", probe / "sensitivity.json", "--ratio", 0.25,
                           "--method", method, "--out", tmp_path / f"{method}.json")
        assert code == 0, err
    code, _, _ = run(capsys, "plan", "--method", "manual", "--blocks", "5-6", "--model", "tiny-sd3",
                     "--out", tmp_path / "m.json")
    assert code == 0
    assert run(capsys, "prune", "tiny-sd3", "--plan", tmp_path / "m.json", "--out", tmp_path / "a")[0] == 0


@pytest.mark.parametrize("argv,match", [
    (["plan", "--sensitivity", "{probe}", "--ratio", "1.5", "--out", "{tmp}/p.json"], "ratio must be in (0, 1)"),
    (["plan", "--sensitivity", "{probe}", "--ratio", "0.5", "--protect", "7", "--out", "{tmp}/p.json"],
     "cannot be met without touching the 7 protected"),
    (["plan", "--sensitivity", "{tmp}/missing.json", "--ratio", "0.2", "--out", "{tmp}/p.json"], "not found"),
    # a manual plan is checked against its model when it is made, not when `prune` applies it
    (["plan", "--method", "manual", "--blocks", "9", "--model", "tiny-sd3", "--out", "{tmp}/m.json"],
     "unknown block index 9"),
    (["plan", "--method", "manual", "--blocks", "9", "--sensitivity", "{probe}", "--out", "{tmp}/m.json"],
     "unknown block index 9: the sd3 model has 8 blocks"),
    (["plan", "--method", "manual", "--blocks", "3", "--out", "{tmp}/m.json"], "needs --model MODEL"),
    (["info", "tiny-sd3", "--group-size", "0"], "group_size must be a positive multiple of 32"),
    (["info", "tiny-sd3", "--group-size", "33"], "group_size must be a positive multiple of 32"),
    (["eval", "--prompts", "{binary}", "--out", "{tmp}/e6"], "not a UTF-8 text file"),
    (["eval", "tiny-sd3", "--out", "{tmp}/e7"], "not a ShapesBench model"),  # before the teacher samples
    (["calib", "tiny-sd3", "--size", "7", "--out", "{tmp}/c7.safetensors"], "image height 7 px: it must be a positive"),
    (["quantize", "{quantized}", "--out", "{tmp}/q6"], "already quantised"),
    (["prune", "tiny-flux", "--plan", "{plan}", "--out", "{tmp}/x"], "plan is for a sd3 model"),
    (["prune", "tiny-sd35", "--plan", "{plan}", "--out", "{tmp}/x"], "made for another model"),
    (["prune", "tiny-sd3", "--plan", "{plan}", "--out", "{probe_dir}"], "output path exists"),
    (["probe", "tiny-flux", "--calib", "{calib}", "--out", "{tmp}/p2"], "calibration set is for a sd3 model"),
    (["calib", "tiny-sd3", "--prompts", "{tmp}/x.txt", "--out", "{tmp}/c2.safetensors"], "has no text encoder"),
    (["probe", "tiny-sd3", "--out", "{probe_dir}"], "output path exists"),  # refused before probing
    (["probe", "tiny-sd3", "--device", "tpu9", "--out", "{tmp}/p3"], "unknown device 'tpu9'"),
    (["calib", "tiny-sd3", "--device", "meta", "--out", "{tmp}/c3.safetensors"], "hprune runs on cpu or cuda"),
    # every command that needs weights refuses a real-size architecture the same way (one helper)
    (["probe", "sd3.5-large", "--out", "{tmp}/p4"], "sd3.5-large is an architecture without trained weights here"),
    (["calib", "flux.1-schnell", "--out", "{tmp}/c4.safetensors"],
     "flux.1-schnell is an architecture without trained weights here"),
    (["prune", "sd3.5-large", "--plan", "{plan}", "--out", "{tmp}/x4"], "architecture without trained weights"),
    (["eval", "sd3.5-large", "--out", "{tmp}/e4"], "evaluate shapes-teacher or an artifact compressed from it"),
    (["eval", "--prompts", "{tmp}/none.txt", "--out", "{tmp}/e5"], "captions file not found"),
    (["quantize", "tiny-sd3", "--group-size", "48", "--out", "{tmp}/q1"], "group_size must be a positive multiple of 32"),
    (["quantize", "tiny-sd3", "--act", "fp8", "--format", "nf4", "--out", "{tmp}/q2"], "W4A8 takes fmt 'int4'"),
    (["quantize", "tiny-sd3", "--method", "gptq", "--calib", "{tmp}/none.safetensors", "--out", "{tmp}/q3"],
     "calibration set not found"),
    (["quantize", "tiny-flux", "--method", "gptq", "--calib", "{calib}", "--out", "{tmp}/q4"],
     "calibration set is for a sd3 model"),
    (["quantize", "sd3.5-large", "--out", "{tmp}/q5"], "sd3.5-large is an architecture without trained weights"),
    (["quantize", "tiny-sd3", "--out", "{probe_dir}"], "output path exists"),
])
def test_bad_input(argv, match, tmp_path_factory, capsys):
    d = _prepared(tmp_path_factory, capsys)
    argv = [a.format(**d) for a in argv]
    code, _, err = run(capsys, *argv)
    assert code == 1 and match in err and len(err.strip().splitlines()) == 1


_cache = {}


def _prepared(factory, capsys):
    if not _cache:
        tmp = factory.mktemp("stages")
        run(capsys, "calib", "tiny-sd3", "--n", 1, "--steps", 2, "--out", tmp / "c.safetensors")
        run(capsys, "probe", "tiny-sd3", "--calib", tmp / "c.safetensors", "--out", tmp / "probe", "--max-samples", 2)
        run(capsys, "plan", "--sensitivity", tmp / "probe" / "sensitivity.json", "--ratio", 0.2, "--out", tmp / "plan.json")
        run(capsys, "quantize", "tiny-sd3", "--out", tmp / "q", "--eval-samples", 0)
        (tmp / "binary.txt").write_bytes(bytes(range(256)))
        _cache.update(tmp=str(tmp), probe=str(tmp / "probe" / "sensitivity.json"), probe_dir=str(tmp / "probe"),
                      plan=str(tmp / "plan.json"), calib=str(tmp / "c.safetensors"), quantized=str(tmp / "q"),
                      binary=str(tmp / "binary.txt"))
    return _cache


def test_quantize_a_pruned_artifact_with_gptq(tmp_path_factory, capsys):
    """prune -> quantize --method gptq: the artifact reloads with the pruning and the 4-bit layers
    in its recipe, and its velocity is the one the command measured; rtn on the same artifact
    moves the velocity further (GPTQ's point)."""
    d = _prepared(tmp_path_factory, capsys)
    tmp = tmp_path_factory.mktemp("quantize")
    assert run(capsys, "prune", "tiny-sd3", "--plan", d["plan"], "--out", tmp / "pruned")[0] == 0
    reports = {}
    for label, method, extra in (("rtn", "rtn", []), ("gptq", "gptq", []), ("natural", "gptq", ["--natural-order"])):
        code, text, err = run(capsys, "quantize", tmp / "pruned", "--method", method, "--calib", d["calib"],
                              "--group-size", 32, "--out", tmp / label, "--json", *extra)
        assert code == 0, err
        reports[label] = json.loads(text)
        assert reports[label]["method"] == method and reports[label]["num_quantized"] > 0
        doc = json.loads((tmp / label / "hprune.json").read_text())
        assert [s["op"] for s in doc["recipe"]] == ["prune", "quantize"]
        assert doc["recipe"][-1]["method"] == method
    assert (reports["gptq"]["act_order"], reports["natural"]["act_order"]) == (True, False)
    assert "act_order" not in reports["rtn"]
    for label in ("gptq", "natural"):
        assert reports[label]["fidelity"]["rel_mse"] < reports["rtn"]["fidelity"]["rel_mse"]
    back = load_compressed(tmp / "gptq")
    assert torch.isfinite(out(back, inputs(back))).all()


def test_info_and_prune_on_a_quantised_artifact(tmp_path_factory, capsys):
    """info counts a 4-bit model's pieces as their dense shapes (the same numbers as before
    quantising); cutting components out of 4-bit blocks is refused with one line."""
    d = _prepared(tmp_path_factory, capsys)
    code, text, err = run(capsys, "info", d["quantized"], "--json")
    assert code == 0, err
    code, dense, _ = run(capsys, "info", "tiny-sd3", "--json")
    q, dense = json.loads(text), json.loads(dense)
    assert [b["components"] for b in q["blocks"]] == [b["components"] for b in dense["blocks"]]
    assert q["params"] == dense["params"] and q["bytes_stored"] < dense["bytes_stored"] / 2
    tmp = tmp_path_factory.mktemp("qprune")
    assert run(capsys, "plan", "--method", "manual", "--blocks", "5", "--model", "tiny-sd3", "--out",
               tmp / "whole.json")[0] == 0
    assert run(capsys, "prune", d["quantized"], "--plan", tmp / "whole.json", "--out", tmp / "a")[0] == 0
    (tmp / "ff.json").write_text(json.dumps({"format": "hprune.plan/1", "family": "sd3", "num_blocks": 8,
                                             "method": "manual", "entries": [{"block": 5, "component": "ff"}]}))
    code, _, err = run(capsys, "prune", d["quantized"], "--plan", tmp / "ff.json", "--out", tmp / "b")
    assert code == 1 and "prune before quantising" in err and len(err.strip().splitlines()) == 1, err


def test_distill_stage_alone_resumes_bit_exactly(tmp_path_factory, capsys):
    """`hprune distill` = compress's stage 3 on its own: from a pruned artifact (or a plan), with the
    probe's table for SGDistill; a run continued with --resume ends bit-identical to one run
    straight through; another student or stale checkpoints are refused before any work."""
    from safetensors.torch import load_file

    d = _prepared(tmp_path_factory, capsys)
    tmp = tmp_path_factory.mktemp("distill")
    assert run(capsys, "prune", "tiny-sd3", "--plan", d["plan"], "--out", tmp / "pruned")[0] == 0
    common = ["distill", "tiny-sd3", "--calib", d["calib"], "--sensitivity", d["probe"], "--batch-size", 2,
              "--eval-samples", 2, "--sgd", "on"]
    code, text, err = run(capsys, *common, "--student", tmp / "pruned", "--steps", 4, "--out", tmp / "straight")
    assert code == 0, err
    assert "SGDistill" in text and "rel_mse vs the teacher" in text
    code, _, err = run(capsys, *common, "--plan", d["plan"], "--steps", 2, "--checkpoint-every", 2,
                       "--keep-checkpoints", "--out", tmp / "part")
    assert code == 0 and (tmp / "part-checkpoints" / "step-0000002").is_dir(), err
    for argv, match in [(["--plan", d["plan"], "--steps", 4], "holds checkpoints of an earlier run"),
                        (["--plan", d["plan"], "--steps", 4, "--resume", "--lr", 1e-3], "lr 0.0003 -> 0.001"),
                        (["--student", d["quantized"], "--steps", 4, "--resume"], "not a pruned copy")]:
        code, _, err = run(capsys, *common, *argv, "--out", tmp / "part", "--overwrite")
        assert code == 1 and match in err and len(err.strip().splitlines()) == 1, err
    code, text, err = run(capsys, *common, "--student", tmp / "pruned", "--steps", 4, "--resume", "--out", tmp / "part",
                          "--overwrite")
    assert code == 0, err
    assert not (tmp / "part-checkpoints").exists()  # a finished run cleans up after itself
    a, b = (load_file(str(tmp / n / "model.safetensors")) for n in ("straight", "part"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp / "part" / "hprune.json").read_text())["extra"]["distill"]["resumed_from"] == 2


def test_distill_streams_the_teacher_with_the_same_result(tmp_path_factory, capsys):
    """`hprune distill --offload` streams the teacher block by block and ends bit-identical to the
    resident run; a bf16 teacher on a CPU streams by itself (fp32 compute), its student trains in
    float32 and is saved in bf16: exactly the bf16 rounding of a resident run on the same
    (bf16-exact) weights stored in float32."""
    from safetensors.torch import load_file

    d = _prepared(tmp_path_factory, capsys)
    tmp = tmp_path_factory.mktemp("distill_offload")
    m16 = load_model("tiny-sd3").to(torch.bfloat16)
    m16.save_pretrained(tmp / "m16")
    m16.float().save_pretrained(tmp / "m32")
    common = ["--plan", d["plan"], "--calib", d["calib"], "--batch-size", 2, "--steps", 2, "--eval-samples", 1,
              "--sgd", "off", "--device", "cpu"]
    runs = {"resident": ("tiny-sd3", []), "offload": ("tiny-sd3", ["--offload"]),
            "fp32": (tmp / "m32", []), "bf16": (tmp / "m16", [])}
    got = {}
    for label, (model, extra) in runs.items():
        code, text, err = run(capsys, "distill", model, *common, *extra, "--out", tmp / label)
        assert code == 0, err
        got[label] = load_file(str(tmp / label / "model.safetensors"))
    a, b = got["resident"], got["offload"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a, b = got["fp32"], got["bf16"]
    assert a.keys() == b.keys()
    assert all(b[k].dtype == torch.bfloat16 and torch.equal(a[k].to(torch.bfloat16), b[k]) for k in a
               if a[k].is_floating_point())
