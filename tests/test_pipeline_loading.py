"""Loading the way people guess: load_compressed on the folder `hprune compress` writes and on a
pipeline folder, load_pipeline(base, artifact), save_compressed(..., as_pipeline=base)."""
import json
import warnings

import pytest
import torch

from hprune.artifacts import load_compressed, save_compressed
from hprune.errors import CheckpointError, HpruneError
from hprune.loading import load_model, load_pipeline
from hprune.lora import LoraReport
from hprune.models import PrunePlan, apply_plan
from hprune.pipelines import build_pipeline, generate, stand_in_prompts
from hprune.quant import quantize_model
from util import fresh, inputs, out


def _compressed(name="tiny-sd3"):
    m = fresh(name)
    apply_plan(m, PrunePlan.manual({2: ["block"], 4: ["ff"]}, m))
    quantize_model(m, 32, refine=False)
    return m


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A diffusers pipeline folder of the tiny original (tiny VAE, scheduler, no text encoders)."""
    folder = tmp_path_factory.mktemp("base") / "tiny-sd3-pipeline"
    build_pipeline(fresh("tiny-sd3")).save_pretrained(str(folder))
    return folder


def _images(pipe):
    return generate(pipe, **stand_in_prompts(pipe.transformer, 1), steps=2, seed=3)


def test_load_compressed_on_compress_output_and_pipeline_folders(base, tmp_path):
    m = _compressed()
    save_compressed(m, tmp_path / "out" / "artifact")  # the layout `hprune compress --out out` writes
    (tmp_path / "out" / "report.json").write_text("{}")
    save_compressed(m, tmp_path / "pipe", as_pipeline=base)
    x = inputs(m)
    want = out(m, x)
    for where in (tmp_path / "out", tmp_path / "out" / "artifact", tmp_path / "pipe", tmp_path / "pipe" / "transformer"):
        assert torch.equal(out(load_compressed(where), x), want), where
        assert torch.equal(out(load_model(str(where)), x), want), where
    with pytest.raises(CheckpointError, match="not hprune-compressed"):
        load_compressed(base)


def test_load_pipeline_puts_the_compressed_transformer_into_the_base(base, tmp_path):
    m = _compressed()
    save_compressed(m, tmp_path / "art")
    pipe = load_pipeline(base, tmp_path / "art")
    assert type(pipe).__name__ == "StableDiffusion3Pipeline"
    ref = build_pipeline(fresh("tiny-sd3"))  # the same seeded VAE as in the base folder
    for k, v in ref.vae.state_dict().items():
        assert torch.equal(pipe.vae.state_dict()[k], v)
    x = inputs(m)
    assert torch.equal(out(pipe.transformer, x), out(m, x))
    assert _images(pipe).shape == (1, 3, 64, 64)


def test_save_as_pipeline_opens_alone(base, tmp_path):
    m = _compressed()
    save_compressed(m, tmp_path / "art")
    folder = save_compressed(m, tmp_path / "pipe", as_pipeline=base)
    names = {p.name for p in folder.iterdir()}
    assert {"model_index.json", "vae", "scheduler", "transformer"} <= names
    assert (folder / "transformer" / "hprune.json").is_file()
    assert json.loads((folder / "model_index.json").read_text())["transformer"] == ["diffusers", "SD3Transformer2DModel"]
    alone = load_pipeline(folder)
    assert torch.equal(_images(alone), _images(load_pipeline(base, tmp_path / "art")))
    # from a loaded pipeline object too; the object keeps its own transformer
    obj = load_pipeline(base, tmp_path / "art")
    own = obj.transformer
    save_compressed(m, tmp_path / "pipe2", as_pipeline=obj)
    assert obj.transformer is own
    assert torch.equal(_images(load_pipeline(tmp_path / "pipe2")), _images(alone))


def test_pipeline_lora_methods(base, tmp_path):
    from test_lora import make_lora

    _, lora = make_lora("tiny-sd3", tmp_path)
    save_compressed(_compressed(), tmp_path / "art")
    pipe = load_pipeline(base, tmp_path / "art")
    before = _images(pipe)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = pipe.load_lora_weights(str(lora), scale=0.5)
    assert isinstance(rep, LoraReport) and rep.applied and rep.dropped
    assert not torch.equal(_images(pipe), before)
    pipe.unload_lora_weights()
    assert torch.equal(_images(pipe), before)


def test_errors(base, tmp_path):
    save_compressed(_compressed(), tmp_path / "art")
    with pytest.raises(HpruneError, match="pass the artifact too"):
        load_pipeline(base)
    with pytest.raises(HpruneError, match="not a diffusers pipeline folder"):
        load_pipeline(tmp_path / "art")
    flux = fresh("tiny-flux")
    save_compressed(flux, tmp_path / "flux")
    with pytest.raises(HpruneError, match="FluxTransformer2DModel"):
        load_pipeline(base, tmp_path / "flux")
    with pytest.raises(HpruneError, match="FluxTransformer2DModel"):
        save_compressed(flux, tmp_path / "p", as_pipeline=base)
    assert not (tmp_path / "p").exists()
