"""`hprune obs` on the tiny models: artifacts that load back, and one-line errors for bad input."""
import json
import os

import pytest
import torch

from hprune.cli import main
from hprune.loading import load_model
from hprune.models.adapters import sample_inputs
from hprune.recipe import get_recipe
from util import fresh, inputs, out


def run(capsys, *argv):
    code = main(list(argv))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.fixture(scope="module")
def calib_files(tmp_path_factory):
    from hprune.calib import synthetic

    d = tmp_path_factory.mktemp("calib")
    paths = {}
    for name in ("tiny-sd3", "tiny-flux"):
        paths[name] = str(synthetic(fresh(name), n_prompts=2, num_steps=3, latent_size=16).save(d / f"{name}.safetensors"))
    return paths


@pytest.mark.parametrize("name,argv", [
    ("tiny-sd3", ["--sparsity", "0.5", "--groups", "2", "--weighting", "linear-decrease"]),
    ("tiny-sd3", ["--pattern", "2:4"]),
    ("tiny-flux", ["--pattern", "structured", "--sparsity", "0.3", "--blocks", "0-4"]),
])
def test_cli_writes_an_artifact_that_loads_back(capsys, tmp_path, calib_files, name, argv):
    dest = tmp_path / "out"
    code, text, err = run(capsys, "obs", name, "--calib", calib_files[name], "--out", str(dest), "--json", *argv)
    assert code == 0, err
    rep = json.loads(text)
    assert rep["fidelity"]["samples"] > 0 and 0 <= rep["fidelity"]["rel_mse"] < 0.05
    assert sorted(os.listdir(dest)) == [".hprune-output", "hprune.json", "model.safetensors"]
    doc = json.loads((dest / "hprune.json").read_text())
    assert doc["extra"]["obs"]["method"] == "obs"
    m = load_model(str(dest))
    x = inputs(m)
    y = out(m, x)
    assert torch.isfinite(y).all()
    if "structured" in argv:
        assert rep["params_after"] < rep["params_before"]
        assert get_recipe(m)[-1]["op"] == "shrink"
        assert all(s["site"].split(".")[1] in "01234" for s in rep["sites"])  # --blocks 0-4 only
    else:
        assert rep["params_after"] == rep["params_before"]
        assert rep["pruned_fraction"] == pytest.approx(0.5, abs=0.01)


def test_cli_tiny_model_without_calib_and_magnitude(capsys, tmp_path):
    code, text, err = run(capsys, "obs", "tiny-flux", "--method", "magnitude", "--pattern", "4:8",
                          "--out", str(tmp_path / "m"))
    assert code == 0, err
    assert "magnitude 4:8" in text and "50.0% of the pruned layers' weights are zero" in text
    assert "fidelity" not in text  # magnitude needs no calibration set, so nothing to measure on


@pytest.mark.parametrize("argv,match", [
    (["--sparsity", "1.2"], "sparsity must be in (0, 1), got 1.2"),
    (["--sparsity", "0"], "sparsity must be in (0, 1)"),
    (["--pattern", "3:5:7"], "unknown sparsity pattern '3:5:7'"),
    (["--pattern", "3:7", "--method", "magnitude"], "not divisible by M=7"),
    (["--calib", "FLUX"], "calibration set is for a flux model, not sd3"),
    (["--calib", "/nonexistent.safetensors"], "calibration set not found"),
    (["--groups", "0"], "--groups must be >= 1"),
    (["--groups", "1000"], "groups=1000 is more than"),
    (["--blocks", "3-1"], "--blocks: empty range"),
    (["--blocks", "0,40", "--method", "magnitude"], "block index 40 out of range"),
    (["--pattern", "2:4", "--sparsity", "0.3"], "contradicts"),
    (["--alpha", "1.3", "1.0"], "alpha_min <= alpha_max"),
    (["--offload", "--groups", "2"], "--groups 2 is for resident runs: block by block (--offload) each"),
    (["--sequential", "--groups", "3"], "--groups 3 is for resident runs: block by block (--offload, implied by "
                                        "--sequential)"),
])
def test_cli_bad_input_is_one_line(capsys, tmp_path, calib_files, argv, match):
    argv = [calib_files["tiny-flux"] if a == "FLUX" else a for a in argv]
    if "--calib" not in argv:
        argv += ["--calib", calib_files["tiny-sd3"]]
    dest = tmp_path / "out"
    code, _, err = run(capsys, "obs", "tiny-sd3", "--out", str(dest), *argv)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hprune: error:") and match in lines[0], err
    assert not dest.exists(), "no half-written output"


def test_cli_existing_out_and_real_size_without_weights(capsys, tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    code, _, err = run(capsys, "obs", "tiny-sd3", "--out", str(dest))
    assert code == 1 and "output path exists" in err and len(err.strip().splitlines()) == 1
    assert sorted(os.listdir(dest)) == ["keep.txt"]
    if not torch.cuda.is_available():
        code, _, err = run(capsys, "obs", "sd3.5-large", "--method", "magnitude", "--out", str(tmp_path / "big"))
        assert code == 1 and "has no weights here" in err
        code, _, err = run(capsys, "obs", "tiny-sd3", "--device", "cuda", "--out", str(tmp_path / "g"))
        assert code == 1 and "no CUDA GPU is available" in err
    code, _, err = run(capsys, "obs", "tiny-sd3", "--device", "tpu9", "--out", str(tmp_path / "g"))
    assert code == 1 and "unknown device 'tpu9'" in err
    code, _, err = run(capsys, "obs", "./no-such-model", "--out", str(tmp_path / "x"))
    assert code == 1 and "model path not found" in err


@pytest.mark.parametrize("name,argv", [
    ("tiny-sd3", ["--pattern", "2:4"]),
    ("tiny-flux", ["--pattern", "structured", "--sparsity", "0.3"]),  # single blocks share proj_out
])
def test_cli_offload_gives_the_resident_artifact(capsys, tmp_path, calib_files, name, argv, monkeypatch):
    """`hprune obs --offload` against the resident run: the same masks, kept heads / neurons and
    shapes, weights within rtol 1e-4 / atol 1e-6 (block by block replays the set's stored inputs
    instead of re-running its denoising loop, so the Hessians agree to float rounding; equal on
    these models), the same fidelity; the artifact loads; progress is per block. Unstructured /
    N:M block by block, the pruned Linears go to the spill file beside --out (models.offload.Spill),
    which is gone after the save."""
    from hprune.models import offload as O

    spilled = []

    class Counting(O.Spill):
        def __call__(self, modules):
            n = super().__call__(modules)
            spilled.append(n)
            return n

    monkeypatch.setattr(O, "Spill", Counting)
    reps, models = [], []
    for extra in ([], ["--offload"]):
        dest = tmp_path / ("off" if extra else "res")
        code, text, err = run(capsys, "obs", name, "--calib", calib_files[name], "--device", "cpu", "--json",
                              "--out", str(dest), *argv, *extra)
        assert code == 0, err
        reps.append(json.loads(text))
        models.append(load_model(str(dest)))
        if extra:  # the block-by-block stage reports per block with an ETA, no bar counts "it"
            stage = [ln for ln in err.splitlines() if ln.startswith("[hprune] OBS-Diff")]
            assert stage and all(" block" in ln for ln in stage), err
            assert not [ln for ln in err.splitlines() if ln.startswith("[hprune]") and " it " in ln], err
    res, off = reps
    assert res["offload"] is False and off["offload"] == {"device": "cpu", "sequential": False}
    assert (sum(spilled) > 0) == ("structured" not in argv), spilled  # structured makes new Linears on the host
    assert sorted(p.name for p in tmp_path.iterdir()) == ["off", "res"]  # no spill file, no lock left
    key = "sites" if "structured" in argv else "pruned_fraction"  # kept heads / neurons, or the zeros
    assert off[key] == res[key]
    assert off["params_after"] == res["params_after"]
    assert off["fidelity"]["rel_mse"] == pytest.approx(res["fidelity"]["rel_mse"], rel=1e-3)
    assert get_recipe(models[1]) == get_recipe(models[0])
    sa, sb = models[0].state_dict(), models[1].state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].shape == sb[k].shape
        assert torch.equal(sa[k] == 0, sb[k] == 0), k  # the same masks
        torch.testing.assert_close(sb[k], sa[k], rtol=1e-4, atol=1e-6)


def test_cli_offload_automatic_for_bf16_on_cpu_and_sequential(capsys, tmp_path, calib_files):
    """bf16 weights on a CPU run block by block by themselves (float32 compute); --groups is then
    said to be unused; --sequential implies --offload (the dry run plans block by block too)."""
    dest = tmp_path / "bf"
    code, text, err = run(capsys, "obs", "tiny-flux", "--calib", calib_files["tiny-flux"], "--device", "cpu",
                          "--dtype", "bfloat16", "--pattern", "structured", "--groups", "2", "--eval-samples", "2",
                          "--json", "--out", str(dest))
    assert code == 0, err
    assert "--groups 2 is unused block by block" in err
    rep = json.loads(text)
    assert rep["offload"] == {"device": "cpu", "sequential": False} and rep["groups"] == 1
    m = load_model(str(dest))
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    assert torch.isfinite(out(m, sample_inputs(m, batch=1, dtype=torch.bfloat16))).all()
    code, text, err = run(capsys, "obs", "tiny-sd3", "--calib", calib_files["tiny-sd3"], "--device", "cpu",
                          "--pattern", "structured", "--sequential", "--eval-samples", "0", "--json",
                          "--out", str(tmp_path / "seq"))
    assert code == 0, err
    assert json.loads(text)["offload"] == {"device": "cpu", "sequential": True}
    code, text, err = run(capsys, "obs", "tiny-sd3", "--sequential", "--dry-run", "--device", "cpu",
                          "--out", str(tmp_path / "plan"))
    assert code == 0 and "(offload: block by block)" in text, err
    assert not (tmp_path / "plan").exists()


def test_cli_magnitude_offload_reports_progress_per_block(capsys, tmp_path):
    """Magnitude pruning block by block reads no data but still moves every block: its progress is
    per block, with plain lines in a log."""
    code, _, err = run(capsys, "obs", "tiny-sd3", "--method", "magnitude", "--pattern", "2:4", "--offload",
                       "--device", "cpu", "--eval-samples", "0", "--out", str(tmp_path / "m"))
    assert code == 0, err
    lines = [ln for ln in err.splitlines() if ln.startswith("[hprune] OBS-Diff magnitude")]
    assert lines and lines[-1].split(" done: ")[1].startswith("8/8 block"), err
