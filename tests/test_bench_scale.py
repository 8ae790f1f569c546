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
