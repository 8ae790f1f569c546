"""LoRA the way diffusers does it: joint_attention_kwargs={"scale": s} scales like set_lora_scale
(and like diffusers + PEFT on the original), DoRA and SD3 kohya files are refused in one line,
FLUX kohya files diffusers cannot convert give a one-line error, the dropped-layers warning names
the call the user made, and `hprune generate --lora` puts the LoRA and scale on the contact sheet."""
import copy
import warnings

import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from safetensors.torch import save_file

from hprune.errors import CheckpointError
from hprune.lora import apply_lora, remove_lora, set_lora_scale
from test_lora import compressed, make_lora
from util import fresh, inputs


@torch.no_grad()
def run(model, x, **kw):
    return model(**x, **kw, return_dict=False)[0]


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_joint_attention_kwargs_scale_equals_set_lora_scale_and_peft(name, tmp_path):
    peft_model, path = make_lora(name, tmp_path)
    m = fresh(name)
    x = inputs(m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        apply_lora(m, path)
    full = run(m, x)
    via_call = run(m, x, joint_attention_kwargs={"scale": 0.5})
    assert not torch.equal(via_call, full)
    # diffusers + PEFT on the original: the same call scales its LoRA the same way
    torch.testing.assert_close(via_call, run(peft_model, x, joint_attention_kwargs={"scale": 0.5}),
                               rtol=1e-5, atol=1e-5)
    assert torch.equal(run(m, x), full)  # for that call only
    set_lora_scale(m, 0.5)
    assert torch.equal(run(m, x), via_call)
    set_lora_scale(m, 0.25)
    quarter = run(m, x)
    set_lora_scale(m, 0.5)
    assert torch.equal(run(m, x, joint_attention_kwargs={"scale": 0.5}), quarter)  # the two multiply
    remove_lora(m)
    assert torch.equal(run(m, x, joint_attention_kwargs={"scale": 0.5}), run(fresh(name), x))
    assert not m._forward_pre_hooks and not m._forward_hooks  # nothing left behind


def test_joint_attention_kwargs_scale_on_a_compressed_model_and_its_copy(tmp_path):
    _, path = make_lora("tiny-sd3", tmp_path)
    m = compressed("tiny-sd3", quant=True)
    x = inputs(m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        apply_lora(m, path)
    c = copy.deepcopy(m)
    set_lora_scale(m, 0.3)
    want = run(m, x)
    set_lora_scale(m, 1.0)
    assert torch.equal(run(m, x, joint_attention_kwargs={"scale": 0.3}), want)
    assert torch.equal(run(c, x, joint_attention_kwargs={"scale": 0.3}), want)
    remove_lora(c)
    assert torch.equal(run(m, x, joint_attention_kwargs={"scale": 0.3}), want)  # the copy's removal left m alone


def test_dora_is_refused_in_one_line(tmp_path):
    m = fresh("tiny-sd3")
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k"], init_lora_weights=False, use_dora=True)
    dora_model = fresh("tiny-sd3")
    inject_adapter_in_model(cfg, dora_model)
    sd = get_peft_model_state_dict(dora_model)
    StableDiffusion3Pipeline.save_lora_weights(str(tmp_path), transformer_lora_layers=sd,
                                               transformer_lora_adapter_metadata=cfg.to_dict())
    f = tmp_path / "pytorch_lora_weights.safetensors"
    with pytest.raises(CheckpointError, match=r"pytorch_lora_weights\.safetensors: a DoRA adapter") as e:
        apply_lora(m, f)
    assert "\n" not in str(e.value) and "plain LoRA" in str(e.value)
    from hprune.lora import enable_diffusers_lora

    enable_diffusers_lora(m)
    with pytest.raises(CheckpointError, match="the LoRA state dict: a DoRA adapter"):
        m.load_lora_adapter(sd)
    assert not m._forward_hooks and not any(n.startswith("lora_") for n, _ in m.named_buffers())


@pytest.mark.parametrize("model, sd, match", [
    # SD3: diffusers has no kohya converter for it
    ("tiny-sd3", {"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": (2, 32),
                  "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": (96, 2),
                  "lora_unet_joint_blocks_0_x_block_attn_qkv.alpha": ()},
     r"kohya\.safetensors: a kohya-format LoRA .* SD3"),
    # FLUX: diffusers' converter asserts on a shape that is not 3 * dim + mlp
    ("tiny-flux", {"lora_unet_single_blocks_0_linear1.lora_down.weight": (2, 32),
                   "lora_unet_single_blocks_0_linear1.lora_up.weight": (50, 2)},
     r"kohya\.safetensors: diffusers cannot convert .* shapes"),
])
def test_kohya_files_hprune_cannot_apply_are_one_line_naming_the_file(tmp_path, model, sd, match):
    f = tmp_path / "kohya.safetensors"
    save_file({k: torch.randn(shape) if shape else torch.tensor(1.0) for k, shape in sd.items()}, str(f))
    with pytest.raises(CheckpointError, match=match) as e:
        apply_lora(fresh(model), f)
    assert "\n" not in str(e.value)


def test_dropped_warning_names_the_users_call(tmp_path):
    from hprune.lora import enable_diffusers_lora
    from hprune.pipelines import build_pipeline

    _, path = make_lora("tiny-flux", tmp_path)
    with pytest.warns(UserWarning) as rec:
        apply_lora(compressed("tiny-flux"), path)
    msg = str(rec[0].message)
    assert "hprune.apply_lora" in msg and "removed by pruning" in msg and "\n" not in msg
    pipe = enable_diffusers_lora(build_pipeline(compressed("tiny-flux")))
    with pytest.warns(UserWarning) as rec:
        pipe.load_lora_weights(str(path))
    msg = str(rec[0].message)
    assert "pipe.load_lora_weights" in msg and "apply_lora" not in msg


def test_generate_contact_sheet_shows_the_lora(tmp_path, monkeypatch):
    import hprune.plots
    from hprune.cli import main

    _, lora = make_lora("tiny-sd3", tmp_path)
    seen = {}
    real = hprune.plots.image_grid

    def spy(rows, path, title=None, col_labels=None):
        seen["title"] = title
        return real(rows, path, title=title, col_labels=col_labels)

    monkeypatch.setattr(hprune.plots, "image_grid", spy)
    assert main(["generate", "tiny-sd3", "--prompt", "a fox", "--lora", f"{lora}:0.5", "--steps", "1",
                 "--out", str(tmp_path / "g"), "--device", "cpu"]) == 0
    assert seen["title"] == "LoRA: pytorch_lora_weights.safetensors × 0.5"
