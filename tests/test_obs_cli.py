"""`hprune obs` on the tiny models: artifacts that load back, and one-line errors for bad input."""
import json
import os

import pytest
import torch

from hprune.cli import main
from hprune.loading import load_model
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
