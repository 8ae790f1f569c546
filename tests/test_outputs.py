"""Output paths: hprune replaces only what it wrote, refuses anything else with one line before
any work, and never leaves temporaries behind (hprune.io.check_output / atomic_dir / atomic_file)."""
from __future__ import annotations

import os

import pytest

from hprune.errors import OutputError
from hprune.io import OUTPUT_MARKER, atomic_dir, check_output
from util import one_line_error, run


@pytest.fixture
def plan(tmp_path, capsys):
    path = tmp_path / "plan.json"
    assert run(capsys, "plan", "--method", "manual", "--blocks", "5", "--model", "tiny-sd3", "--out", str(path))[0] == 0
    return path


def test_overwrite_replaces_its_own_folder_and_refuses_a_users(capsys, tmp_path, plan, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's")
    code, _, err = run(capsys, "prune", "tiny-sd3", "--plan", str(plan), "--out", "mine", "--overwrite")
    one_line_error(code, err, "holds 'notes.txt', which hprune did not write", alone=True)
    assert os.listdir(mine) == ["notes.txt"]
    (tmp_path / "afile").write_text("the user's")
    code, _, err = run(capsys, "prune", "tiny-sd3", "--plan", str(plan), "--out", "afile", "--overwrite")
    one_line_error(code, err, "afile is a file, not a folder hprune wrote", alone=True)
    code, _, err = run(capsys, "prune", "tiny-sd3", "--plan", str(plan), "--out", ".", "--overwrite")
    one_line_error(code, err, "is the current folder", alone=True)
    for _ in range(2):  # written, then replaced: its own output
        assert run(capsys, "prune", "tiny-sd3", "--plan", str(plan), "--out", "art/", "--overwrite")[0] == 0
    assert sorted(os.listdir(tmp_path / "art")) == [OUTPUT_MARKER, "hprune.json", "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["afile", "art", "mine", "plan.json"]  # no .tmp / .old left
    assert (tmp_path / "afile").read_text() == "the user's"


@pytest.mark.parametrize("where, match", [
    ("/proc/hprune-test/out", "cannot write"),
    ("{file}/sub", "is a file, not a folder"),
])
def test_unwritable_outputs_are_one_line(capsys, tmp_path, plan, where, match):
    afile = tmp_path / "afile"
    afile.write_text("x")
    out = where.format(file=afile)
    for argv in (["prune", "tiny-sd3", "--plan", str(plan), "--out", out],
                 ["plan", "--method", "manual", "--blocks", "3", "--model", "tiny-sd3", "--out", out],
                 ["calib", "tiny-sd3", "--num-prompts", "1", "--steps", "2", "--out", out]):
        code, _, err = run(capsys, *argv)
        one_line_error(code, err, match, alone=True)


def test_file_outputs_replace_only_hprune_files(capsys, tmp_path, plan):
    code, _, err = run(capsys, "plan", "--method", "manual", "--blocks", "6", "--model", "tiny-sd3", "--out", str(plan), "--overwrite")
    assert code == 0, err  # a plan hprune wrote
    folder = tmp_path / "folder"
    folder.mkdir()
    readme = tmp_path / "README.md"
    readme.write_text("the user's")
    for out, match in ((folder, "is a folder; this output is a file"), (readme, "not a file hprune wrote")):
        for argv in (["plan", "--method", "manual", "--blocks", "3", "--model", "tiny-sd3"],
                     ["calib", "tiny-sd3", "--num-prompts", "1", "--steps", "2"]):
            code, _, err = run(capsys, *argv, "--out", str(out), "--overwrite")
            one_line_error(code, err, match, alone=True)
    assert readme.read_text() == "the user's" and os.listdir(folder) == []


def test_atomic_dir_leaves_nothing_on_failure_and_keeps_the_old_output(tmp_path):
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "a.txt").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "out", overwrite=True) as tmp:
            (tmp / "a.txt").write_text("2")
            raise RuntimeError("stage failed")
    assert (tmp_path / "out" / "a.txt").read_text() == "1"
    assert sorted(os.listdir(tmp_path)) == ["out"]
    # a file the user drops in while hprune works is not deleted at commit time
    with pytest.raises(OutputError, match="late.txt"):
        with atomic_dir(tmp_path / "out", overwrite=True) as tmp:
            (tmp_path / "out" / "late.txt").write_text("mine")
    assert sorted(os.listdir(tmp_path)) == ["out"] and (tmp_path / "out" / "late.txt").is_file()
    assert check_output(tmp_path / "new") == tmp_path / "new"


def test_a_folder_without_a_manifest_is_never_replaced(tmp_path):
    """A recipe alone proves nothing (it may be a copy beside the user's files): without the
    manifest of what hprune wrote, --overwrite refuses (issue 24)."""
    from hprune.artifacts import save_compressed
    from util import fresh

    path = save_compressed(fresh("tiny-sd3"), tmp_path / "art")
    (path / OUTPUT_MARKER).unlink()
    with pytest.raises(OutputError, match="no .hprune-output manifest"):
        save_compressed(fresh("tiny-sd3"), path, overwrite=True)
    assert sorted(os.listdir(path)) == ["hprune.json", "model.safetensors"]
