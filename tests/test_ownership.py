"""Nothing a user owns is ever deleted (issue 24): hprune deletes or replaces only the files its
manifest lists, unchanged (hprune.owned); a user's OUT-checkpoints folder, a copied manifest or a
lone copied hprune.json never make a folder hprune's. Also: temporaries of a killed save, the
output lock, and a full disk."""
from __future__ import annotations

import errno
import json
import os
import shutil

import pytest

from hprune.cli import main
from hprune.errors import OutputError
from hprune.io import OUTPUT_MARKER
from hprune.owned import (claim_folder, clean_stale_temps, foreign_entries, output_lock, remove_owned,
                          write_manifest)
from util import one_line_error, run


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    assert main(["plan", "--method", "manual", "--blocks", "3", "--model", "tiny-sd3", "--out", str(path)]) == 0
    return path


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, plan):
    out = tmp_path_factory.mktemp("art") / "art"
    assert main(["prune", "tiny-sd3", "--plan", str(plan), "--out", str(out)]) == 0
    return out


# -- 1. a user's folder named OUT-checkpoints ------------------------------------------------------------
@pytest.mark.parametrize("every", [[], ["--checkpoint-every", "1"]])
def test_distill_never_deletes_a_users_checkpoints_folder(capsys, tmp_path, plan, every):
    mine = tmp_path / "myrun-checkpoints"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    code, text, err = run(capsys, "distill", "tiny-sd3", "--plan", plan, "--steps", 1, "--batch-size", 1,
                          "--eval-samples", 0, "--out", tmp_path / "myrun", *every)
    if every:  # hprune would write there: refused before any work
        one_line_error(code, err, "which hprune did not write")
        assert not (tmp_path / "myrun").exists()
    else:  # hprune does not write there: the run succeeds and leaves it alone
        assert code == 0, err
        assert "checkpoints" not in text
    assert (mine / "notes.txt").read_text() == "precious"


def test_checkpoint_folder_that_is_a_file_is_one_line(capsys, tmp_path, plan):
    (tmp_path / "myrun-checkpoints").write_text("precious")
    code, _, err = run(capsys, "distill", "tiny-sd3", "--plan", plan, "--steps", 1, "--batch-size", 1,
                       "--eval-samples", 0, "--checkpoint-every", 1, "--out", tmp_path / "myrun")
    one_line_error(code, err, "is a file")
    assert (tmp_path / "myrun-checkpoints").read_text() == "precious"


def test_checkpoints_cleanup_keeps_a_file_the_user_added(capsys, tmp_path, plan, monkeypatch):
    """A run's own checkpoints go at the end; a file the user put there meanwhile stays, and is named."""
    import hprune.distill

    ckpt = tmp_path / "myrun-checkpoints"
    real = hprune.distill._save_checkpoint

    def save_then_user_adds(root, *a, **k):
        path = real(root, *a, **k)
        (root / "notes.txt").write_text("precious")
        return path

    monkeypatch.setattr(hprune.distill, "_save_checkpoint", save_then_user_adds)
    code, text, err = run(capsys, "distill", "tiny-sd3", "--plan", plan, "--steps", 2, "--batch-size", 1,
                          "--eval-samples", 0, "--checkpoint-every", 1, "--out", tmp_path / "myrun")
    assert code == 0, err
    assert "kept 1 file(s) hprune did not write there (e.g. notes.txt)" in text
    assert sorted(os.listdir(ckpt)) == [OUTPUT_MARKER, "notes.txt"]  # step-* gone, the user's file kept


def test_compress_never_deletes_a_users_checkpoints_folder(capsys, tmp_path):
    mine = tmp_path / "out-checkpoints"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    code, text, err = run(capsys, "compress", "tiny-sd3", "--quant", "none", "--steps", 1, "--batch-size", 1,
                          "--checkpoint-every", 1, "--out", tmp_path / "out")
    one_line_error(code, err, "which hprune did not write")
    assert "probing" not in text and (mine / "notes.txt").read_text() == "precious"


# -- 2. --overwrite trusts only a manifest that matches the files ------------------------------------------
def test_overwrite_refuses_a_copied_manifest_beside_the_users_files(capsys, tmp_path, plan, artifact):
    mine = tmp_path / "mine"
    mine.mkdir()
    shutil.copy(artifact / OUTPUT_MARKER, mine / OUTPUT_MARKER)
    shutil.copy(artifact / "hprune.json", mine / "hprune.json")  # a true copy: unchanged, listed
    (mine / "model.safetensors").write_text("the user's own weights")  # listed name, other contents
    code, _, err = run(capsys, "prune", "tiny-sd3", "--plan", plan, "--out", mine, "--overwrite")
    one_line_error(code, err, "holds 'model.safetensors', which hprune did not write")
    (mine / "model.safetensors").unlink()
    (mine / "report.md").write_text("the user's report")  # a name the manifest does not list
    code, _, err = run(capsys, "prune", "tiny-sd3", "--plan", plan, "--out", mine, "--overwrite")
    one_line_error(code, err, "holds 'report.md', which hprune did not write")
    assert (mine / "report.md").read_text() == "the user's report"


def test_overwrite_refuses_a_lone_copied_recipe(capsys, tmp_path, plan, artifact):
    mine = tmp_path / "mine"
    mine.mkdir()
    shutil.copy(artifact / "hprune.json", mine / "hprune.json")
    (mine / "report.md").write_text("mine")
    (mine / "images.png").write_bytes(b"\x89PNG mine")
    code, _, err = run(capsys, "prune", "tiny-sd3", "--plan", plan, "--out", mine, "--overwrite")
    one_line_error(code, err, "no .hprune-output manifest")
    assert sorted(os.listdir(mine)) == ["hprune.json", "images.png", "report.md"]


def test_overwrite_refuses_an_old_style_name_list_marker(tmp_path, artifact):
    """hprune 0.x markers listed names only, which a copy satisfies: they are not trusted."""
    from hprune.io import check_output

    mine = tmp_path / "mine"
    shutil.copytree(artifact, mine)
    (mine / OUTPUT_MARKER).write_text(json.dumps({"producer": "hprune", "files": ["hprune.json",
                                                                                  "model.safetensors"]}))
    with pytest.raises(OutputError, match="no .hprune-output manifest"):
        check_output(mine, overwrite=True)


def test_overwrite_replaces_an_unchanged_output_and_refuses_an_edited_one(capsys, tmp_path, plan):
    out = tmp_path / "art"
    assert run(capsys, "prune", "tiny-sd3", "--plan", plan, "--out", out)[0] == 0
    assert run(capsys, "prune", "tiny-sd3", "--plan", plan, "--out", out, "--overwrite")[0] == 0
    doc = json.loads((out / "hprune.json").read_text())
    doc["extra"]["note"] = "the user's edit"
    (out / "hprune.json").write_text(json.dumps(doc))
    code, _, err = run(capsys, "prune", "tiny-sd3", "--plan", plan, "--out", out, "--overwrite")
    one_line_error(code, err, "holds 'hprune.json', which hprune did not write (or which changed since)")
    assert "the user's edit" in (out / "hprune.json").read_text()


def test_remove_owned_deletes_only_listed_unchanged_files(tmp_path):
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("a")
    (d / "sub" / "b.txt").write_text("b")
    write_manifest(d)
    assert foreign_entries(d) == []
    (d / "a.txt").write_text("changed")
    (d / "sub" / "user.txt").write_text("u")
    assert foreign_entries(d) == ["a.txt", "sub/user.txt"]
    assert remove_owned(d) == ["a.txt", "sub/user.txt"]
    assert sorted(p.relative_to(d).as_posix() for p in d.rglob("*")) == [OUTPUT_MARKER, "a.txt", "sub",
                                                                          "sub/user.txt"]
    os.remove(d / "a.txt")
    os.remove(d / "sub" / "user.txt")
    assert remove_owned(d) == [] and not d.exists()  # hprune's folder, emptied: gone


def test_claim_folder_refuses_a_users_folder_and_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        claim_folder(tmp_path / "f", "checkpoint folder")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.txt").write_text("x")
    with pytest.raises(OutputError, match="'x.txt', which hprune did not write"):
        claim_folder(tmp_path / "d", "checkpoint folder")
    claim_folder(tmp_path / "new", "checkpoint folder")
    claim_folder(tmp_path / "new", "checkpoint folder")  # its own: accepted again
    assert os.listdir(tmp_path / "new") == [OUTPUT_MARKER]


# -- temporaries of a killed save, the lock, a full disk -------------------------------------------------
def test_a_killed_saves_temporary_is_never_an_artifact_and_is_cleaned(capsys, tmp_path, plan, artifact):
    from hprune.artifacts import load_compressed
    from hprune.errors import CheckpointError

    stale = tmp_path / ".art.tmp-0123abcd"
    shutil.copytree(artifact, stale)  # complete, as a kill between the write and the rename leaves it
    (tmp_path / ".art.old-89abcdef").mkdir()
    with pytest.raises(CheckpointError, match="temporary folder"):
        load_compressed(stale)
    code, _, err = run(capsys, "info", stale)
    one_line_error(code, err, "temporary folder")
    (tmp_path / ".other.tmp-0123abcd").mkdir()  # another output's: not touched
    (tmp_path / "notes.tmp-0123abcd").write_text("no leading dot: not hprune's name")
    assert run(capsys, "prune", "tiny-sd3", "--plan", plan, "--out", tmp_path / "art")[0] == 0
    assert sorted(os.listdir(tmp_path)) == [".other.tmp-0123abcd", "art", "notes.tmp-0123abcd"]
    assert clean_stale_temps(tmp_path / "other") == [tmp_path / ".other.tmp-0123abcd"]


def test_two_runs_on_one_output_learn_of_each_other_at_the_start(capsys, tmp_path, plan):
    out = tmp_path / "art"
    with output_lock(out):
        import subprocess
        import sys

        proc = subprocess.run([sys.executable, "-m", "hprune", "prune", "tiny-sd3", "--plan", str(plan), "--out",
                               str(out)], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd()] + sys.path)})
        one_line_error(proc.returncode, proc.stderr, f"another hprune run (pid {os.getpid()}) is writing")
        assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == []  # the lock file goes with the lock
    assert run(capsys, "prune", "tiny-sd3", "--plan", plan, "--out", out)[0] == 0


def _enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_while_saving_an_artifact_is_one_line_and_leaves_nothing(capsys, tmp_path, plan, monkeypatch):
    import hprune.artifacts

    def partial_write(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"\0" * 100)
        _enospc()

    monkeypatch.setattr(hprune.artifacts, "save_safetensors", partial_write)
    code, _, err = run(capsys, "prune", "tiny-sd3", "--plan", plan, "--out", tmp_path / "art")
    one_line_error(code, err, "No space left on device")
    assert sorted(os.listdir(tmp_path)) == []


def test_disk_full_while_writing_calibration_or_a_checkpoint_is_one_line(capsys, tmp_path, plan, monkeypatch):
    import hprune.io

    monkeypatch.setattr(hprune.io.os, "fsync", _enospc)
    code, _, err = run(capsys, "calib", "tiny-sd3", "--num-prompts", 1, "--steps", 2, "--out", tmp_path / "c.safetensors")
    one_line_error(code, err, "No space left on device")
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    monkeypatch.setattr(hprune.io, "save_safetensors", lambda *a, **k: _enospc())
    code, _, err = run(capsys, "distill", "tiny-sd3", "--plan", plan, "--steps", 2, "--batch-size", 1,
                       "--eval-samples", 0, "--checkpoint-every", 1, "--out", tmp_path / "run")
    one_line_error(code, err, "No space left on device")
    left = [p.name for p in (tmp_path / "run-checkpoints").iterdir()]
    assert not any(n.endswith(".tmp") for n in left), left  # no .step-*.tmp left behind
