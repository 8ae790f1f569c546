"""Built-in models, adapters, loading MODEL arguments, and safetensors validation."""
import json
import struct

import pytest
import torch

from hprune.errors import CheckpointError, ModelNotFoundError
from hprune.io import check_safetensors
from hprune.loading import load_model
from hprune.models import get_adapter, model_report, param_count
from util import fresh, inputs, out


def test_tiny_models_are_seeded():
    a, b = load_model("tiny-sd3"), load_model("tiny-sd3")
    c = load_model("tiny-sd3", seed=1)
    sa, sc = a.state_dict(), c.state_dict()
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in sa.items())
    assert not all(torch.equal(v, sc[k]) for k, v in sa.items())


@pytest.mark.parametrize("name,blocks,params,kinds", [
    ("sd3.5-large", 38, (8.0e9, 8.15e9), {"sd3_joint": 37, "sd3_last": 1}),
    ("sd3.5-medium", 24, (2.2e9, 2.3e9), {"sd3_joint": 23, "sd3_last": 1}),
    ("flux.1-schnell", 57, (11.8e9, 11.95e9), {"flux_double": 19, "flux_single": 38}),
    ("flux.1-dev", 57, (11.8e9, 11.95e9), {"flux_double": 19, "flux_single": 38}),
])
def test_real_size_architectures_on_meta(name, blocks, params, kinds):
    m = load_model(name)
    assert next(m.parameters()).device.type == "meta"
    ad = get_adapter(m)
    infos = ad.blocks(m)
    assert len(infos) == blocks
    assert params[0] < param_count(m) < params[1]
    counts = {}
    for b in infos:
        counts[b.kind] = counts.get(b.kind, 0) + 1
    assert counts == kinds
    if name == "sd3.5-medium":  # dual attention in blocks 0-12 only
        assert [("attn2" in b.components) for b in infos] == [i <= 12 for i in range(24)]


def test_component_accounting_sums_to_block():
    """SD3.5-Large joint block: the disjoint components (attn, ff, context_ff) plus the AdaLN rows
    and context-query weights they leave behind add up to the whole block."""
    m = load_model("sd3.5-large")
    c = get_adapter(m).component_params(m, 10)
    d = 2432
    assert c["ff"] == c["context_ff"] == 2 * (d * 4 * d) + 4 * d + d + 3 * (d * d + d)
    assert c["block"] == sum(p.numel() for p in get_adapter(m).get_block(m, 10).parameters())
    rep = model_report(m)
    # bf16 bytes: every parameter plus the stored positional-embedding table, two bytes each
    assert rep["bytes_bf16"] == 2 * (rep["params"] + m.pos_embed.pos_embed.numel())
    assert rep["bytes_int4"] < rep["bytes_bf16"] / 3


# ---- loading MODEL arguments ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("models") / "tiny"
    m = fresh("tiny-sd35")
    m.save_pretrained(d)  # diffusers' own format: config.json + diffusion_pytorch_model.safetensors
    return d, m


def test_load_diffusers_model_folder(tiny_folder):
    d, m = tiny_folder
    back = load_model(str(d))
    x = inputs(m)
    assert torch.equal(out(back, x), out(m, x))


def test_load_pipeline_folder_and_lone_safetensors(tiny_folder, tmp_path):
    import shutil

    d, m = tiny_folder
    pipe = tmp_path / "pipe"
    shutil.copytree(d, pipe / "transformer")
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    x = inputs(m)
    assert torch.equal(out(load_model(str(pipe)), x), out(m, x))
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(d / "diffusion_pytorch_model.safetensors", lone / "weights.safetensors")
    with pytest.raises(ModelNotFoundError, match="no config"):
        load_model(str(lone / "weights.safetensors"))
    assert torch.equal(out(load_model(str(lone / "weights.safetensors"), config=d / "config.json"), x), out(m, x))


def test_unknown_and_missing_models(tmp_path):
    with pytest.raises(ModelNotFoundError, match="unknown model 'sd9'.*tiny-sd3"):
        load_model("sd9")
    with pytest.raises(ModelNotFoundError, match="not found"):
        load_model(str(tmp_path / "nothing" / "here"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="not a diffusers model"):
        load_model(str(tmp_path / "empty"))


def test_bad_folders(tiny_folder, tmp_path):
    import shutil

    d, _ = tiny_folder
    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    (bad / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
    with pytest.raises(ModelNotFoundError, match="not a supported transformer config"):
        load_model(str(bad))
    (bad / "config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="corrupted model config"):
        load_model(str(bad))
    shutil.copy(d / "config.json", bad / "config.json")
    w = bad / "diffusion_pytorch_model.safetensors"
    with open(w, "r+b") as f:
        f.truncate(w.stat().st_size // 2)
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(str(bad))
    # weights of another architecture
    shutil.copy(d / "config.json", bad / "config.json")
    fresh("tiny-sd3").save_pretrained(tmp_path / "other")
    shutil.copy(tmp_path / "other" / "diffusion_pytorch_model.safetensors", w)
    with pytest.raises(CheckpointError, match="weights do not match"):
        load_model(str(bad))


def _write(path, header: bytes, data: bytes = b""):
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


@pytest.mark.parametrize("content,match", [
    (b"", "truncated"),
    (b"\x05\x00", "truncated"),
])
def test_check_safetensors_tiny_files(tmp_path, content, match):
    p = tmp_path / "x.safetensors"
    p.write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        check_safetensors(p)


def test_check_safetensors_headers(tmp_path):
    p = tmp_path / "x.safetensors"
    _write(p, b"not json")
    with pytest.raises(CheckpointError, match="corrupted safetensors header"):
        check_safetensors(p)
    p.write_bytes(struct.pack("<Q", 10_000) + b"{}")
    with pytest.raises(CheckpointError, match="header claims"):
        check_safetensors(p)
    hdr = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}).encode()
    _write(p, hdr, b"\0" * 12)
    with pytest.raises(CheckpointError, match="12 bytes for shape"):
        check_safetensors(p)
    hdr = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    _write(p, hdr, b"\0" * 8)
    with pytest.raises(CheckpointError, match="truncated"):
        check_safetensors(p)
    _write(p, hdr, b"\0" * 16)
    assert check_safetensors(p)["w"]["shape"] == [4]
    with pytest.raises(CheckpointError, match="not found"):
        check_safetensors(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("name", ["tiny-sd35", "tiny-flux"])
def test_int4_byte_estimate_equals_quantized_model(name):
    """`hprune info`'s INT4 figure is what quantize_model really stores (bf16 for the rest)."""
    import torch

    from hprune.models import bytes_at
    from hprune.quant import quantize_model

    m = fresh(name)
    estimate = bytes_at(m, torch.bfloat16, int4_group=64)
    quantize_model(m)  # defaults: int4 asymmetric, group 64, the blocks' Linear layers
    assert bytes_at(m, torch.bfloat16) == estimate
