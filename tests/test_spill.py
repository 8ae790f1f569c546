"""The output spilled block by block (hprune.models.offload.Spill): each block's new tensors leave
anonymous memory for a memory-mapped hprune-owned temporary file beside the output; the artifact
is byte-identical, and a failed or killed run leaves nothing behind."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from hprune.artifacts import save_compressed
from hprune.calib import builtin_calibration
from hprune.errors import HpruneError, OutputError
from hprune.loading import load_model
from hprune.models.offload import Spill
from hprune.quant.model import quantize_model
from util import one_line_error, run


def file_maps(path: Path) -> list[tuple[int, int]]:
    """Address ranges of this process's memory maps of `path` (from /proc/self/maps)."""
    out = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5] == str(path):
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            out.append((lo, hi))
    return out


def in_file(t: torch.Tensor, maps: list[tuple[int, int]]) -> bool:
    p = t.untyped_storage().data_ptr()
    return any(lo <= p < hi for lo, hi in maps)


def module_tensors(m: nn.Module) -> list[torch.Tensor]:
    return list(m.parameters()) + list(m.buffers())


def test_spill_maps_tensors_from_its_file_and_keeps_values(tmp_path):
    m = nn.Linear(96, 40).to(torch.bfloat16)
    m.register_buffer("codes", torch.randint(0, 255, (40, 48), dtype=torch.uint8))
    m.register_buffer("flag", torch.tensor(True))
    m.register_buffer("wt", torch.randn(48, 40).t())  # not contiguous
    x = torch.randn(3, 96, dtype=torch.bfloat16)
    y = m(x)
    ref = {k: (v.clone(), v.dtype, v.shape) for k, v in m.state_dict().items()}
    with Spill(tmp_path / "out") as sp:
        assert sp.path.parent == tmp_path and sp.path.name.startswith(".out.tmp-")
        n = sp(m)
        assert n >= sum(t.numel() * t.element_size() for t in module_tensors(m)) and sp.path.is_file()
        maps = file_maps(sp.path)
        assert maps and all(in_file(t, maps) for t in module_tensors(m))  # file pages, not anonymous memory
        assert sp(m) == 0  # already spilled: not written twice
        for k, v in m.state_dict().items():
            assert v.dtype == ref[k][1] and v.shape == ref[k][2] and torch.equal(v, ref[k][0]), k
    assert not sp.path.exists() and list(tmp_path.iterdir()) == []  # removed on close
    assert torch.equal(m(x), y)  # the maps outlive the file's name: the module stays usable


def test_spill_disk_full_is_one_output_error_and_leaves_nothing(tmp_path, monkeypatch):
    import hprune.io

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    m = nn.Linear(8, 8)
    w = m.weight.detach().clone()
    monkeypatch.setattr(hprune.io, "write_tensor_bytes", full)
    with pytest.raises(OutputError, match="cannot write the spill file .*No space left"), Spill(tmp_path / "out") as sp:
        sp(m)
    assert list(tmp_path.iterdir()) == [] and torch.equal(m.weight, w)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_quantize_with_spill_writes_byte_identical_artifact(tmp_path, method):
    name = "tiny-sd3"
    calib = builtin_calibration(name, load_model(name), n_prompts=1, num_steps=1) if method == "gptq" else None
    a, b = load_model(name, dtype=torch.bfloat16), load_model(name, dtype=torch.bfloat16)
    quantize_model(a, method=method, calib=calib, offload="cpu")
    with Spill(tmp_path / "b") as sp:
        rep = quantize_model(b, method=method, calib=calib, offload="cpu", spill=sp)
        maps = file_maps(sp.path)
        new = [b.get_submodule(n) for n in rep.quantized]
        # every new layer's tensors were spilled (not one big copy at the end: several maps)
        assert len(maps) > 1 and all(in_file(t, maps) for q in new for t in module_tensors(q))
        save_compressed(b, tmp_path / "b")
    save_compressed(a, tmp_path / "a")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # the spill file is gone


@pytest.mark.parametrize("method", ["obs", "magnitude"])
def test_obs_blockwise_with_spill_prunes_the_same_into_the_file(tmp_path, method):
    from hprune.obs.sequential import obs_prune_model

    calib = builtin_calibration("tiny-sd3", load_model("tiny-sd3"), n_prompts=1, num_steps=1) \
        if method == "obs" else None
    a, b = load_model("tiny-sd3"), load_model("tiny-sd3")
    obs_prune_model(a, calib, pattern="2:4", method=method, offload="cpu")
    with Spill(tmp_path / "b") as sp:
        rep = obs_prune_model(b, calib, pattern="2:4", method=method, offload="cpu", spill=sp)
        maps = file_maps(sp.path)
        pruned = [b.get_submodule(r["layer"]).weight for r in rep["layers"]]
        assert len(maps) > 1 and all(in_file(w, maps) for w in pruned)  # pruned in the file, block by block
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_spill_needs_offload():
    with pytest.raises(HpruneError, match="spill .* needs offload"):
        quantize_model(load_model("tiny-sd3"), spill=object())


def test_cli_error_mid_run_leaves_no_temp_file_and_no_output(tmp_path, capsys, monkeypatch):
    import hprune.models.offload as O
    import hprune.quant.blockwise as B

    seen = []
    real_call, real_q = O.Spill.__call__, B.quantize_linear

    def spy(self, mods):
        n = real_call(self, mods)
        seen.append(self.path.is_file())
        return n

    def fail_in_block_2(lin, *a, **k):
        if len(seen) >= 2:
            raise HpruneError("boom in block 2")
        return real_q(lin, *a, **k)

    monkeypatch.setattr(O.Spill, "__call__", spy)
    monkeypatch.setattr(B, "quantize_linear", fail_in_block_2)
    code, _, err = run(capsys, "quantize", "tiny-sd3", "--out", tmp_path / "q", "--device", "cpu", "--offload",
                       "--eval-samples", "0")
    one_line_error(code, err, "boom in block 2")
    assert seen == [True, True]  # two blocks were spilled to a file before the error
    assert list(tmp_path.iterdir()) == []  # no output, no spill file, no lock file


def test_cli_offload_removes_a_killed_runs_spill_and_its_own(tmp_path, capsys):
    stale = tmp_path / ".q.tmp-0123abcd"  # what a killed run leaves beside its output
    stale.write_bytes(b"x" * 100)
    keep = tmp_path / "notes.txt"  # the user's file beside it stays
    keep.write_text("mine")
    code, _, err = run(capsys, "quantize", "tiny-sd3", "--out", tmp_path / "q", "--device", "cpu", "--offload",
                       "--eval-samples", "2", "--json")
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "q"]
    assert keep.read_text() == "mine"
    # the fidelity check ran on the spilled layers
    import json

    doc = json.loads((tmp_path / "q" / "hprune.json").read_text())
    assert doc["extra"]["quantize"]["fidelity"]["samples"] == 2 and doc["extra"]["quantize"]["offload"] is True
