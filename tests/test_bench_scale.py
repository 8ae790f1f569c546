"""benchmarks/bench_scale.py's folders: built block by block into diffusers-style shards with an
index, and read back by hprune's loader as a real sharded SD3.5 / FLUX folder."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_scale  # noqa: E402

from hprune.io import check_safetensors  # noqa: E402
from hprune.loading import load_model  # noqa: E402


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_build_folder_writes_shards_and_index_the_loader_reads(tmp_path, name):
    folder = tmp_path / "f"
    info = bench_scale.build_folder(name, 3, folder, shard_bytes=50_000)
    shards = sorted(folder.glob("diffusion_pytorch_model-*-of-*.safetensors"))
    assert info["files"] == len(shards) > 1  # one file per few blocks, not the model at once
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f.name for f in shards}
    assert all(check_safetensors(f)["__metadata__"] == {"format": "pt"} for f in shards)
    m = load_model(str(folder))
    state = m.state_dict()
    assert set(index["weight_map"]) == set(state)  # every tensor in exactly one shard
    assert sum(p.numel() for p in m.parameters()) == info["params"]
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    assert all(t.dtype.itemsize == 2 for t in state.values() if t.is_floating_point())  # bf16
    blocks = [k for k in state if k.startswith(("transformer_blocks.", "single_transformer_blocks."))]
    assert len({".".join(k.split(".")[:2]) for k in blocks}) == 3


def test_ordered_stages_puts_each_prerequisite_first_once():
    order = bench_scale.ordered_stages
    assert order(["prune", "gptq", "obs", "probe"]) == ["plan", "prune", "calib", "gptq", "obs", "probe"]
    assert order(["calib", "obs-structured"]) == ["calib", "obs-structured"]
    assert order(["obs-structured", "calib"]) == ["calib", "obs-structured"]  # not run twice
    assert order(["info", "rtn"]) == ["info", "rtn"]
    with pytest.raises(ValueError, match="unknown stage 'gptqq'"):
        order(["gptqq"])


def test_stage_commands_parse_and_read_what_their_prerequisite_writes(tmp_path):
    from hprune.cli import build_parser

    folder = tmp_path / "f"
    bench_scale.build_folder("tiny-flux", 2, folder)  # 1 double + 1 single block
    out = tmp_path / "out"
    parser = build_parser()

    def flag(cmd: list[str], name: str) -> str:
        return cmd[cmd.index(name) + 1]

    cmds = {s: bench_scale.stage_cmd(s, folder, out) for s in bench_scale.STAGES}
    for stage, cmd in cmds.items():
        args = parser.parse_args(cmd[3:])  # the hprune CLI takes every flag
        verb = {"dry-run": "quantize", "rtn": "quantize", "gptq": "quantize", "obs-structured": "obs"}.get(stage, stage)
        assert args.command == verb
    for stage, need in bench_scale.NEEDS.items():
        reads = flag(cmds[stage], "--plan" if need == "plan" else "--calib")
        assert reads == flag(cmds[need], "--out")
    assert flag(cmds["plan"], "--blocks") == "1"  # the last of the folder's 2 blocks
    assert flag(cmds["gptq"], "--method") == "gptq" and flag(cmds["obs-structured"], "--pattern") == "structured"


def test_predict_is_the_dry_run_plans_host_peak(tmp_path):
    folder = tmp_path / "f"
    bench_scale.build_folder("tiny-sd3", 2, folder)
    out = tmp_path / "out"
    for stage in ("info", "dry-run", "plan"):
        assert bench_scale.predict(stage, folder, out) is None
    for stage, first in (("calib", "calib"), ("obs-structured", "obs"), ("probe", "probe"), ("prune", "prune"),
                         ("gptq", "quantize-gptq")):
        p = bench_scale.predict(stage, folder, out)
        names = [s["stage"] for s in p["stages"]]
        assert first in names and names[0] == "load"
        assert p["host_peak"] == max(s["host_bytes"] for s in p["stages"]) > 0
        assert p["at"] in names
