"""`hprune compress` end to end on the tiny models, on 1 process and under torchrun."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hprune.artifacts import load_compressed, read_recipe
from hprune.cli import main
from hprune.pipelines import build_pipeline, generate, stand_in_prompts
from util import on_ranks


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.mark.parametrize("name,quant,method", [("tiny-sd3", "int4", "rtn"), ("tiny-sd35", "bnb-nf4", "auto"),
                                               ("tiny-flux", "none", "auto"), ("tiny-flux", "int4", "auto")])
def test_compress_end_to_end(name, quant, method, tmp_path, capsys):
    out = tmp_path / "out"
    code, text, err = run(capsys, "compress", name, "--ratio", 0.3, "--quant", quant, "--steps", 12,
                          "--batch-size", 4, "--quant-method", method, "--out", out)
    assert code == 0, err
    rep = json.loads((out / "report.json").read_text())
    stages = [r["stage"] for r in rep["stages"]]
    assert stages[:3] == ["original", "pruned", "distilled"]
    assert len(stages) == (3 if quant == "none" else 4)
    assert rep["reload_bit_identical"] is True
    assert rep["plan"]["meta"]["achieved_ratio"] >= 0.3
    assert rep["schedule"]["sgd"] is True  # 30% > r_thres
    assert len(rep["distill_history"]) == 12
    md = (out / "report.md").read_text()
    assert "Distillation schedule" in md and "| stage" in md
    # the artifact is a working transformer in a diffusers pipeline
    model = load_compressed(out / "artifact")
    recipe_ops = [s["op"] for s in read_recipe(out / "artifact")["recipe"]]
    assert recipe_ops == (["prune"] if quant == "none" else ["prune", "quantize"])
    if quant != "none":  # auto = GPTQ for hprune int4, round to nearest for bitsandbytes
        used = {"int4": "gptq", "bnb-nf4": "rtn"}[quant] if method == "auto" else method
        assert rep["quantization"]["method"] == used
    if quant == "int4":
        assert read_recipe(out / "artifact")["recipe"][-1]["method"] == used
    imgs = generate(build_pipeline(model), **stand_in_prompts(model, 1), steps=2)
    assert torch.isfinite(imgs).all()


def test_compress_bad_input(tmp_path, capsys):
    for argv, match in [
        (["compress", "tiny-sd3", "--ratio", "0", "--out", tmp_path / "a"], "ratio must be in (0, 1)"),
        (["compress", "sd3.5-large", "--ratio", "0.2", "--out", tmp_path / "b"], "architecture without trained weights"),
        (["compress", "tiny-sd3", "--ratio", "0.2", "--protect", "8", "--steps", "0", "--out", tmp_path / "c"],
         "ratio cannot be met with every block protected"),
    ]:
        code, _, err = run(capsys, *argv)
        assert code == 1 and match in err and len(err.strip().splitlines()) == 1, err
    assert os.listdir(tmp_path) == []  # nothing half-written


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_compress_under_torchrun_two_processes(tmp_path):
    """The same command on 2 processes (gloo, FSDP2) gives the 1-process loss trajectory; the probe
    and GPTQ's calibration are shared out between the ranks."""
    common = ["tiny-sd3", "--ratio", "0.3", "--quant", "int4", "--steps", "3", "--batch-size", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "hprune", "compress", *common, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(["torchrun", "--standalone", "--nproc-per-node", "2", "-m", "hprune", "compress", *common,
                          "--out", str(tmp_path / "two")], capture_output=True, text=True, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    h1 = json.loads((tmp_path / "one" / "report.json").read_text())["distill_history"]
    h2 = json.loads((tmp_path / "two" / "report.json").read_text())["distill_history"]
    assert [r["loss"] for r in h2] == pytest.approx([r["loss"] for r in h1], rel=1e-5)
    assert json.loads((tmp_path / "two" / "report.json").read_text())["reload_bit_identical"] is True
    # the probe was dealt out to the 2 ranks and gives the 1-process table
    s1, s2 = (json.loads((tmp_path / d / "sensitivity.json").read_text()) for d in ("one", "two"))
    assert (s1["calib"]["ranks"], s2["calib"]["ranks"]) == (1, 2)
    for b1, b2 in zip(s1["blocks"], s2["blocks"]):
        assert b2["delta"] == pytest.approx(b1["delta"], rel=1e-12)
    # GPTQ's Hessians were gathered half on each rank: the same 4-bit model, up to near-ties
    q1, q2 = (json.loads((tmp_path / d / "report.json").read_text())["stages"][-1] for d in ("one", "two"))
    assert "GPTQ" in q2["stage"] and q2["rel_mse"] == pytest.approx(q1["rel_mse"], rel=0.05)
    # `hprune probe` under torchrun: rank 0 writes the same table
    probe = subprocess.run(["torchrun", "--standalone", "--nproc-per-node", "2", "-m", "hprune", "probe", "tiny-sd3",
                            "--out", str(tmp_path / "probe")], capture_output=True, text=True, env=env)
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert probe.stdout.count("wrote ") == 1
    assert json.loads((tmp_path / "probe" / "sensitivity.json").read_text())["calib"]["ranks"] == 2
    # `hprune calib` under torchrun: rank 0 writes the 1-process set
    from hprune.calib import CalibrationSet

    cal = ["calib", "tiny-sd3", "--num-prompts", "3", "--steps", "2"]
    for launcher, f in (([sys.executable, "-m"], "c1"), (["torchrun", "--standalone", "--nproc-per-node", "2", "-m"], "c2")):
        r = subprocess.run([*launcher, "hprune", *cal, "--out", str(tmp_path / f"{f}.safetensors")],
                           capture_output=True, text=True, env=env)
        assert r.returncode == 0 and r.stdout.count("wrote ") == 1, r.stderr[-3000:]
    c1, c2 = (CalibrationSet.load(tmp_path / f"{f}.safetensors") for f in ("c1", "c2"))
    assert torch.equal(c1.final, c2.final) and all(torch.equal(c1.inputs[k], c2.inputs[k]) for k in c1.inputs)
    # `hprune obs` under torchrun: one artifact, rank 0's
    obs = subprocess.run(["torchrun", "--standalone", "--nproc-per-node", "2", "-m", "hprune", "obs", "tiny-sd3",
                          "--sparsity", "0.5", "--out", str(tmp_path / "obs")], capture_output=True, text=True, env=env)
    assert obs.returncode == 0, obs.stderr[-3000:]
    assert obs.stdout.count("wrote ") == 1 and (tmp_path / "obs").is_dir()


def test_holdout_split_keeps_final_latents_with_their_trajectories():
    """split_holdout / CalibrationSet.subset: each part's final latents are its own trajectories',
    in the order of its prompt embeddings, and trajectory ids (the runs' noise seeds) are kept."""
    from hprune.calib import synthetic
    from hprune.compress import split_holdout
    from hprune.loading import load_model

    cal = synthetic(load_model("tiny-sd3"), n_prompts=4, num_steps=2, seed=0)
    emb, pooled = cal.prompt_embeddings()
    train, test = split_holdout(cal, 0.5)
    for part, trajs in ((train, [0, 1]), (test, [2, 3])):
        assert torch.unique(part.trajectory).tolist() == trajs
        assert torch.equal(part.final, cal.final[trajs])
        e, p = part.prompt_embeddings()
        assert torch.equal(e, emb[trajs]) and torch.equal(p, pooled[trajs])
    odd = cal.subset([i for i, t in enumerate(cal.trajectory.tolist()) if t in (1, 3)])
    assert torch.equal(odd.final, cal.final[[1, 3]]) and torch.unique(odd.trajectory).tolist() == [1, 3]


def test_compress_without_final_latents_fails_before_probing(tmp_path):
    from hprune.calib import synthetic
    from hprune.compress import CompressOptions, compress
    from hprune.errors import HpruneError
    from hprune.loading import load_model

    model = load_model("tiny-sd3")
    cal = synthetic(model, n_prompts=2, num_steps=2, seed=0)
    cal.final = None  # as captured by an older hprune
    with pytest.raises(HpruneError, match="no final latents"):
        compress(model, cal, CompressOptions(ratio=0.2), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_compress_options_refuse_bad_sgdistill_settings_before_any_work():
    from hprune.compress import CompressOptions
    from hprune.errors import HpruneError

    with pytest.raises(HpruneError, match="sgd_budget must be one of mean, fixed, not 'avg'"):
        CompressOptions(ratio=0.2, sgd_budget="avg").validate()
    with pytest.raises(HpruneError, match="sgd_scale must be one of inverse, log"):
        CompressOptions(ratio=0.2, sgd_scale="sqrt").validate()
    CompressOptions(ratio=0.2, sgd_scale="log", sgd_budget="fixed").validate()
    with pytest.raises(HpruneError, match="quant_method must be one of"):
        CompressOptions(ratio=0.2, quant_method="awq").validate()
    with pytest.raises(HpruneError, match="does not apply to --quant bnb-nf4"):
        CompressOptions(ratio=0.2, quant="bnb-nf4", quant_method="gptq").validate()
    CompressOptions(ratio=0.2, quant="int4-fp8", quant_method="gptq").validate()
    assert CompressOptions(ratio=0.2).resolved_quant_method == "gptq"
    assert CompressOptions(ratio=0.2, quant="bnb-nf4").resolved_quant_method == "rtn"
    assert CompressOptions(ratio=0.2, quant_method="rtn").resolved_quant_method == "rtn"


def test_torchrun_ranks_each_take_their_own_gpu(monkeypatch):
    """A bare "cuda" under torchrun is cuda:LOCAL_RANK (else every rank loads onto GPU 0); an
    explicit index and the CPU are kept."""
    from hprune.dist import local_device

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert local_device("cuda") == torch.device("cuda")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert local_device("cuda") == torch.device("cuda", 3)
    assert local_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert local_device("cpu") == torch.device("cpu")


def _capture_on_this_rank():
    """A 3-prompt synthetic calibration set of tiny-sd3 and how many transformer calls this process ran."""
    from hprune.calib import synthetic
    from hprune.loading import load_model

    model = load_model("tiny-sd3")
    calls = [0]
    model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    cal = synthetic(model, n_prompts=3, num_steps=2, seed=4)
    return {"inputs": cal.inputs, "t": cal.t, "step": cal.step, "trajectory": cal.trajectory, "final": cal.final,
            "calls": calls[0]}


def test_capture_under_two_processes_deals_out_the_prompts(tmp_path):
    """Prompt i runs on rank i mod 2; every rank gets the whole set, equal to one process's."""
    one = _capture_on_this_rank()
    r0, r1 = on_ranks(_capture_on_this_rank, 2, tmp_path)
    assert (r0["calls"], r1["calls"]) == (2 * one["calls"] // 3, one["calls"] // 3)  # prompts 0, 2 | 1
    for r in (r0, r1):
        for k in ("t", "step", "trajectory", "final"):
            assert torch.equal(r[k], one[k]), k
        assert r["inputs"].keys() == one["inputs"].keys()
        for k, v in one["inputs"].items():
            assert torch.equal(r["inputs"][k], v), k


def test_resume_reuses_the_recorded_plan_and_refuses_another_run_before_probing(tmp_path, capsys, monkeypatch):
    import hprune.plots

    ylabels = []
    real = hprune.plots._save
    monkeypatch.setattr(hprune.plots, "_save",
                        lambda fig, path: (ylabels.append((Path(path).name, fig.axes[0].get_ylabel())), real(fig, path))[1])
    out = tmp_path / "out"
    ckpt = tmp_path / "out-checkpoints"
    calib = tmp_path / "calib.safetensors"
    assert run(capsys, "calib", "tiny-sd3", "--num-prompts", 3, "--steps", 2, "--out", calib)[0] == 0
    base = ["compress", "tiny-sd3", "--quant", "none", "--batch-size", 2, "--checkpoint-every", 2, "--calib", calib,
            "--out", out]
    code, text, err = run(capsys, *base, "--ratio", 0.3, "--steps", 2, "--keep-checkpoints")
    assert code == 0, err
    assert "probing ΔP" in text and (ckpt / "run.json").is_file() and (ckpt / "step-0000002").is_dir()
    plan = json.loads((out / "plan.json").read_text())
    # another ratio, or no --resume, is refused at once: one line, no probe, nothing written
    for argv, match in [(["--ratio", 0.2, "--steps", 4, "--resume"], "cannot resume with a different run: ratio 0.3 -> 0.2"),
                        (["--ratio", 0.3, "--steps", 4], "holds checkpoints of an earlier run"),
                        (["--ratio", 0.3, "--steps", 1, "--resume"], "past the run's 1 steps"),
                        (["--ratio", 0.3, "--steps", 4, "--resume", "--lr", 1e-3], "lr 0.0003 -> 0.001")]:
        code, text, err = run(capsys, *base, *argv, "--overwrite")
        assert code == 1 and match in err and len(err.strip().splitlines()) == 1, err
        assert "probing" not in text
    code, text, err = run(capsys, *base, "--ratio", 0.3, "--steps", 4, "--resume", "--overwrite")
    assert code == 0, err
    assert "probing" not in text and "resuming: the ΔP table and plan recorded" in text
    assert f"the compressed model is {out / 'artifact'}" in text and "//" not in text
    assert json.loads((out / "plan.json").read_text())["entries"] == plan["entries"]
    rep = json.loads((out / "report.json").read_text())
    assert len(rep["distill_history"]) == 4
    assert not ckpt.exists() and "removed the distillation checkpoints" in text  # finished: cleaned up
    assert sorted(os.listdir(tmp_path)) == ["calib.safetensors", "out"]
    assert ("distill_loss.png", "loss (MSE to the teacher, log scale)") in ylabels  # the y axis says what it shows


@pytest.mark.parametrize("steps", [2, 0], ids=["distilled", "pruned-only"])
def test_compress_offload_equals_resident_bit_for_bit(steps, tmp_path, capsys, monkeypatch):
    """`compress --offload`: probe and fidelity checks per call block by block, pruning as host
    surgery (without distillation the student shares the teacher's tensors), the teacher streamed
    during distillation, RTN block by block: the same report numbers and artifact as resident."""
    from safetensors.torch import load_file

    from hprune.calib import builtin_calibration
    from hprune.loading import load_model

    monkeypatch.setenv("HPRUNE_PROGRESS_INTERVAL", "0")  # a progress line per update
    builtin_calibration("tiny-sd3", load_model("tiny-sd3"), n_prompts=3, num_steps=2).save(tmp_path / "c.safetensors")
    common = ["compress", "tiny-sd3", "--calib", tmp_path / "c.safetensors", "--ratio", 0.3, "--quant", "int4",
              "--quant-method", "rtn", "--steps", steps, "--batch-size", 2, "--max-probe-samples", 2, "--device", "cpu"]
    reports, tensors = [], []
    for label, extra in (("resident", []), ("offload", ["--offload"])):
        code, _, err = run(capsys, *common, *extra, "--out", tmp_path / label)
        assert code == 0, err
        # progress with an ETA on stderr (plain lines when it is not a terminal) for each streamed stage
        lines = [ln for ln in err.splitlines() if ln.startswith("[hprune]") and "ETA" in ln]
        assert any("probing" in ln for ln in lines)
        assert any("distilling" in ln and " step" in ln for ln in lines) == (steps > 0)
        assert any("RTN" in ln and " block" in ln for ln in lines) == bool(extra)  # block by block
        reports.append(json.loads((tmp_path / label / "report.json").read_text()))
        tensors.append(load_file(str(tmp_path / label / "artifact" / "model.safetensors")))
    a, b = reports
    assert (a["offload"], b["offload"]) == (None, "cpu")
    assert [(r["stage"], r["rel_mse"]) for r in a["stages"]] == [(r["stage"], r["rel_mse"]) for r in b["stages"]]
    assert a["distill_history"] == b["distill_history"] and len(a["distill_history"]) == steps
    assert b["reload_bit_identical"] is True
    a, b = tensors
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
