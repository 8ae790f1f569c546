"""Compressed artifacts: bit-identical round trip, pipelines, atomic writes, corruption errors."""
import json
import os

import pytest
import torch

from hprune.artifacts import load_compressed, read_recipe, save_compressed
from hprune.errors import CheckpointError, HpruneError, OutputError, OutputExistsError
from hprune.loading import load_model
from hprune.models import PrunePlan, apply_plan, get_adapter, param_count, weight_bytes
from hprune.pipelines import build_pipeline, generate, stand_in_prompts
from util import TINY, fresh, inputs, out


def _pruned(name):
    m = fresh(name)
    n = get_adapter(m).num_blocks(m)
    last = {"tiny-flux": ["mlp"]}.get(name, ["ff"])
    apply_plan(m, PrunePlan.manual({0: ["context"], n - 2: ["block"], n - 1: last}, model=m))
    return m


@pytest.mark.parametrize("name", TINY)
def test_round_trip_is_bit_identical(name, tmp_path):
    m = _pruned(name)
    path = save_compressed(m, tmp_path / "art", extra={"note": "test"})
    assert sorted(os.listdir(path)) == [".hprune-output", "hprune.json", "model.safetensors"]
    back = load_compressed(path)
    assert type(back) is type(m)
    for seed in (0, 1):
        x = inputs(m, seed=seed)
        assert torch.equal(out(m, x), out(back, x))
    assert param_count(back) == param_count(m) and weight_bytes(back) == weight_bytes(m)
    doc = read_recipe(path)
    assert doc["recipe"][0]["op"] == "prune" and doc["extra"] == {"note": "test"}
    assert doc["stats"]["params"] == param_count(m)
    # saved again from the loaded model: same recipe
    save_compressed(back, tmp_path / "art2")
    assert read_recipe(tmp_path / "art2")["recipe"] == doc["recipe"]


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_loaded_transformer_runs_in_a_diffusers_pipeline(name, tmp_path):
    m = _pruned(name)
    back = load_compressed(save_compressed(m, tmp_path / "art"))
    prompts = stand_in_prompts(back, 2, seed=3)
    imgs = generate(build_pipeline(back), **prompts, steps=3, seed=5)
    assert imgs.shape == (2, 3, 64, 64) and torch.isfinite(imgs).all()
    # the in-memory pruned model produces the same images
    assert torch.equal(imgs, generate(build_pipeline(m), **prompts, steps=3, seed=5))


def test_save_refuses_existing_path_and_overwrite_replaces_only_its_own(tmp_path):
    m = _pruned("tiny-sd3")
    target = tmp_path / "art"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="exists"):
        save_compressed(m, target)
    with pytest.raises(OutputError, match="holds 'keep.txt', which hprune did not write"):
        save_compressed(m, target, overwrite=True)  # a user's folder is never deleted
    assert os.listdir(target) == ["keep.txt"]
    (target / "keep.txt").unlink()
    save_compressed(m, target, overwrite=True)  # an empty folder loses nothing
    save_compressed(m, target, overwrite=True)  # its own output: replaced
    assert sorted(os.listdir(target)) == [".hprune-output", "hprune.json", "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["art"]  # no temporary siblings left
    (target / "notes.txt").write_text("added by the user")
    with pytest.raises(OutputError, match="notes.txt"):
        save_compressed(m, target, overwrite=True)
    assert (target / "notes.txt").read_text() == "added by the user"
    afile = tmp_path / "afile"
    afile.write_text("mine")
    with pytest.raises(OutputError, match="is a file, not a folder hprune wrote"):
        save_compressed(m, afile, overwrite=True)
    assert afile.read_text() == "mine" and sorted(os.listdir(tmp_path)) == ["afile", "art"]


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    """Interrupt the save after the weights are half written: no folder appears at the path."""
    import hprune.artifacts
    from hprune.io import save_safetensors

    def broken(tensors, filename, metadata=None):
        save_safetensors(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(100)
        raise OSError("disk full")

    monkeypatch.setattr(hprune.artifacts, "save_safetensors", broken)
    with pytest.raises(OSError, match="disk full"):
        save_compressed(_pruned("tiny-sd3"), tmp_path / "art")
    assert os.listdir(tmp_path) == []


def test_same_tensors_give_the_same_bytes_in_every_process(tmp_path):
    """safetensors writes its metadata in hash-map order, which changes from process to process:
    artifacts and calibration sets are re-encoded so that their bytes (and the recipe's sha256)
    depend on the tensors alone."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = ("import sys, torch; sys.path[:0] = [sys.argv[2], sys.argv[2] + '/tests']\n"
            "from util import fresh\n"
            "from hprune.artifacts import save_compressed\n"
            "from hprune.calib import synthetic\n"
            "m = fresh('tiny-sd3')\n"
            "save_compressed(m, sys.argv[1] + '/art')\n"
            "synthetic(m, n_prompts=1, num_steps=2).save(sys.argv[1] + '/calib.safetensors')\n")
    outs = []
    for i in range(3):
        d = tmp_path / f"run{i}"
        d.mkdir()
        proc = subprocess.run([sys.executable, "-c", code, str(d), str(root)], capture_output=True, text=True,
                              env={**os.environ, "PYTHONHASHSEED": str(i)})
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs.append(((d / "art" / "model.safetensors").read_bytes(), (d / "calib.safetensors").read_bytes(),
                     json.loads((d / "art" / "hprune.json").read_text())["weights"]["sha256"]))
    assert outs[0] == outs[1] == outs[2]


def test_meta_model_cannot_be_saved(tmp_path):
    with pytest.raises(HpruneError, match="meta device"):
        save_compressed(load_model("sd3.5-medium"), tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.fixture
def saved(tmp_path):
    return save_compressed(_pruned("tiny-sd3"), tmp_path / "art")


def test_truncated_weights_are_detected(saved):
    w = saved / "model.safetensors"
    size = w.stat().st_size
    with open(w, "r+b") as f:
        f.truncate(size - 1000)
    with pytest.raises(CheckpointError, match="truncated"):
        load_compressed(saved)


def test_flipped_bytes_fail_the_checksum(saved):
    w = saved / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-10] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_compressed(saved)


def test_corrupted_or_missing_recipe(saved):
    (saved / "hprune.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupted artifact recipe"):
        load_compressed(saved)
    (saved / "hprune.json").unlink()
    with pytest.raises(CheckpointError, match="not found"):
        load_compressed(saved)


def test_recipe_that_does_not_match_the_weights(saved):
    doc = json.loads((saved / "hprune.json").read_text())
    doc["recipe"] = []  # claims an unpruned model: the pruned weights no longer fit
    (saved / "hprune.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="weights do not match the model"):
        load_compressed(saved)
    doc["recipe"] = [{"op": "teleport"}]
    (saved / "hprune.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="unknown operation 'teleport'"):
        load_compressed(saved)


def test_missing_artifact(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_compressed(tmp_path / "nope")


def _rewrite_weights(folder, change):
    """Edits the stored tensors with `change(state)` and re-signs the recipe's checksum, as a
    hand-made or tampered artifact would be."""
    import hashlib

    from safetensors.torch import load_file, save_file

    w = folder / "model.safetensors"
    state = load_file(str(w))
    change(state)
    save_file(state, str(w))
    doc = json.loads((folder / "hprune.json").read_text())
    doc["weights"]["sha256"] = hashlib.sha256(w.read_bytes()).hexdigest()
    (folder / "hprune.json").write_text(json.dumps(doc))


@pytest.fixture
def saved_int4(tmp_path):
    from hprune.quant import quantize_model

    m = fresh("tiny-sd3")
    quantize_model(m)
    return save_compressed(m, tmp_path / "int4")


@pytest.mark.parametrize("name", ["weights", "scales"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_tensors_are_refused_at_load(saved_int4, name, value):
    key = {"weights": "proj_out.weight", "scales": "transformer_blocks.0.attn.to_q.scales"}[name]

    def poison(state):
        state[key].view(-1)[3] = value

    _rewrite_weights(saved_int4, poison)
    with pytest.raises(CheckpointError, match=f"tensor {key} holds 1 NaN/inf value"):
        load_compressed(saved_int4)


@pytest.mark.parametrize("key, dtype, match", [
    ("transformer_blocks.0.attn.to_q.qweight", torch.int8, "is stored as int8, the model needs uint8"),
    ("transformer_blocks.0.attn.to_q.qweight", torch.float32, "is stored as float32, the model needs uint8"),
    ("proj_out.weight", torch.float16, "mixed dtypes"),
    ("proj_out.weight", torch.int32, "is stored as int32, the model needs float32"),
])
def test_tensors_in_another_dtype_are_refused_at_load(saved_int4, key, dtype, match):
    def convert(state):
        state[key] = state[key].to(dtype)

    _rewrite_weights(saved_int4, convert)
    with pytest.raises(CheckpointError, match=match):
        load_compressed(saved_int4)


@pytest.mark.parametrize("file", ["/etc/passwd", "../outside.safetensors", "sub/../../outside.safetensors",
                                  "link.safetensors"])
def test_weights_file_outside_the_artifact_is_refused(saved, file):
    outside = saved.parent / "outside.safetensors"
    outside.write_bytes((saved / "model.safetensors").read_bytes())
    (saved / "link.safetensors").symlink_to(outside)
    doc = json.loads((saved / "hprune.json").read_text())
    doc["weights"]["file"] = file
    (saved / "hprune.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="leaves the artifact folder"):
        load_compressed(saved)
    with pytest.raises(CheckpointError, match="leaves the artifact folder"):
        read_recipe(saved)
