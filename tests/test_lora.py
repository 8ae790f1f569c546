"""LoRA on compressed transformers (hprune.lora): a LoRA made with PEFT on the tiny original
moves the compressed model the way it moves the original; pruned keys are dropped and named;
removal restores bit-identical outputs; diffusers' pipeline calls reach it; torch.compile."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from diffusers import StableDiffusion3Pipeline
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from safetensors.torch import save_file

from hprune.errors import CheckpointError, HpruneError
from hprune.lora import apply_lora, lora_adapters, remove_lora, set_lora_scale
from hprune.models import PrunePlan, apply_plan
from hprune.obs import obs_prune_model
from hprune.quant import W4A8Linear, W4A16Linear, quantize_model
from util import TINY, fresh, inputs, out

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
           "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear",
           "norm1_context.linear", "proj_mlp", "proj_out"]
# blocks / components removed in each tiny model (indices: SD3 8 joint blocks; FLUX 2 double + 4 single)
PLANS = {"tiny-sd3": {2: ["block"], 4: ["ff"], 5: ["context"], 6: ["attn"]},
         "tiny-sd35": {1: ["attn2"], 2: ["block"], 4: ["ff"], 5: ["context"]},
         "tiny-flux": {1: ["ff", "context"], 3: ["mlp"], 4: ["attn"], 5: ["block"]}}


def make_lora(name, folder, b_scale=0.1, seed=1):
    """The tiny original with a PEFT LoRA (r=4, alpha=8: scaling 2) on every linear layer of the
    blocks, saved as diffusers saves one (pytorch_lora_weights.safetensors, PEFT metadata).
    PEFT initialises B to zero; random B (scaled by b_scale) makes the update visible."""
    peft_model = fresh(name)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(cfg, peft_model)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.mul_(b_scale)
    StableDiffusion3Pipeline.save_lora_weights(str(folder), transformer_lora_layers=get_peft_model_state_dict(peft_model),
                                               transformer_lora_adapter_metadata=cfg.to_dict())
    return peft_model, folder / "pytorch_lora_weights.safetensors"


def compressed(name, quant=False, shrink=True):
    m = fresh(name)
    apply_plan(m, PrunePlan.manual(PLANS[name], m))
    if shrink:  # magnitude: no compensation, so kept weights are exact slices of the original's
        obs_prune_model(m, None, 0.5, "structured", method="magnitude")
    if quant:  # the first blocks W4A8, the rest W4A16
        quantize_model(m, 64, include=["transformer_blocks.0."], act="fp8", refine=False)
        quantize_model(m, 32, refine=False)
    return m


def lora_paths(peft_model):
    return sorted({k.rsplit(".lora_A", 1)[0] for k in get_peft_model_state_dict(peft_model) if ".lora_A" in k})


def present(model, path):
    try:
        return model.get_submodule(path) is not None
    except AttributeError:
        return False


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_lora_on_the_original_equals_peft(name, tmp_path):
    """On an uncompressed model apply_lora computes what PEFT computes (alpha/r from the metadata)."""
    peft_model, path = make_lora(name, tmp_path)
    m = fresh(name)
    x = inputs(m)
    base = out(m, x)
    rep = apply_lora(m, path)
    assert not rep.dropped and not rep.sliced and len(rep.applied) == len(lora_paths(peft_model))
    torch.testing.assert_close(out(m, x), out(peft_model, x), rtol=1e-5, atol=1e-5)
    assert remove_lora(m) == len(rep.applied)
    assert torch.equal(out(m, x), base)


@pytest.mark.parametrize("name", TINY)
def test_sliced_layers_get_the_original_update_on_their_rows_and_columns(name, tmp_path):
    """Pruned blocks / components and OBS-Diff-shrunk heads and neurons: each layer's LoRA update
    (its effective ΔW) is the original's ΔW restricted to the rows / columns the layer kept, found
    here by matching the layer's weights against the original's; the dropped layers are exactly
    those the compressed model no longer has, each named with its reason."""
    peft_model, path = make_lora(name, tmp_path)
    m = compressed(name)
    with pytest.warns(UserWarning, match="dropped"):
        rep = apply_lora(m, path)
    paths = lora_paths(peft_model)
    gone = {p for p in paths if not present(m, p)}
    assert gone and set(rep.dropped) == gone and set(rep.applied) == set(paths) - gone
    assert all("removed by pruning" in why for why in rep.dropped.values())
    assert any("block was removed" in why for why in rep.dropped.values())
    assert len(rep.sliced) > 10
    for p in rep.applied:
        layer, orig = m.get_submodule(p), peft_model.get_submodule(p)
        w_c, w_o = layer.weight.detach(), orig.base_layer.weight.detach()
        eye = torch.eye(layer.in_features)
        with torch.no_grad():
            d_c = (layer(eye) - F.linear(eye, w_c, layer.bias)).t()
            d_o = orig.get_delta_weight("default")
        if w_c.shape[1] == w_o.shape[1]:  # rows kept (producers, AdaLN chunks)
            want = d_o[_match(w_c, w_o)]
        else:  # columns kept (consumers)
            assert w_c.shape[0] == w_o.shape[0]
            want = d_o[:, _match(w_c.t(), w_o.t())]
        assert (p in rep.sliced) == (want.shape != d_o.shape)
        torch.testing.assert_close(d_c, want, rtol=1e-5, atol=1e-6, msg=p)


def _match(kept, full):
    """Index in `full` (n, k) of each row of `kept` (m, k): rows are distinct random vectors."""
    eq = (kept[:, None, :] == full[None]).all(-1)
    assert (eq.sum(1) == 1).all()
    return eq.float().argmax(1)


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_compressed_model_moves_like_the_original(name, tmp_path):
    """Pruned + shrunk + W4A16 / W4A8: (compressed with LoRA - compressed) matches (original with
    LoRA - original). The LoRA update is 12-15 % of the output; measured rel. error of the update
    0.017-0.018 with quantisation alone and 0.12-0.18 with pruning and shrinking too (the removed
    parts change what the update passes through; cosine 0.984-0.993): bounds 0.05 and 0.3,
    cosine > 0.97.
    Removing the LoRA restores bit-identical outputs; the scale is linear in the branch."""
    peft_model, path = make_lora(name, tmp_path)
    orig = fresh(name)
    x = inputs(orig)
    d_orig = out(peft_model, x) - out(orig, x)
    for m, bound in ((_quant_only(name), 0.05),
                     (compressed(name, quant=True), 0.3)):
        assert any(isinstance(l, W4A8Linear) for l in m.modules())
        assert any(type(l) is W4A16Linear for l in m.modules())
        before = out(m, x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            apply_lora(m, path, adapter_name="style")
        d = out(m, x) - before
        assert rel(d, d_orig) < bound
        assert F.cosine_similarity(d.flatten(), d_orig.flatten(), dim=0) > 0.97
        assert lora_adapters(m) == {"style": 1.0}
        set_lora_scale(m, 0.0)
        assert torch.equal(out(m, x), before)
        remove_lora(m, "style")
        assert torch.equal(out(m, x), before) and lora_adapters(m) == {}
        assert not any(k.startswith("lora_") for l in m.modules() for k in l._buffers)


def _quant_only(name):
    m = fresh(name)
    quantize_model(m, 64, include=["transformer_blocks.0."], act="fp8", refine=False)
    quantize_model(m, 32, refine=False)
    return m


def test_scale_and_layer_update_on_a_4bit_layer(tmp_path):
    """On W4A16Linear the branch is unfused: the codes stay; output = layer + scale * s * B A x.
    The state dict (and so an artifact) holds the model without the LoRA, with a warning."""
    peft_model, path = make_lora("tiny-sd3", tmp_path)
    m = _quant_only("tiny-sd3")
    layer = m.get_submodule("transformer_blocks.3.attn.to_q")
    codes = layer.qweight.clone()
    x = torch.randn(5, layer.in_features)
    base = layer(x)
    apply_lora(m, path, scale=0.5)
    assert torch.equal(layer.qweight, codes)
    orig = peft_model.get_submodule("transformer_blocks.3.attn.to_q")
    with torch.no_grad():
        want = base + 0.5 * x @ orig.get_delta_weight("default").t()
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    assert "lora_down_default" not in m.state_dict() and not any("lora" in k for k in m.state_dict())
    from hprune.artifacts import load_compressed, save_compressed

    with pytest.warns(UserWarning, match="without its LoRA"):
        save_compressed(m, tmp_path / "art")
    assert torch.equal(load_compressed(tmp_path / "art").get_submodule("transformer_blocks.3.attn.to_q")(x), base)


def test_a_deep_copy_has_its_own_lora(tmp_path):
    """copy.deepcopy of a model with a LoRA (compress deep-copies models): scale and removal act on
    the copy alone, and its diffusers-facing methods are bound to the copy."""
    from hprune.lora import enable_diffusers_lora

    _, path = make_lora("tiny-sd3", tmp_path)
    m = enable_diffusers_lora(_quant_only("tiny-sd3"))
    x = inputs(m)
    base = out(m, x)
    m.load_lora_adapter(str(path))
    with_lora = out(m, x)
    c = copy.deepcopy(m)
    assert torch.equal(out(c, x), with_lora)
    set_lora_scale(c, 0.0)
    assert torch.equal(out(c, x), base) and torch.equal(out(m, x), with_lora)
    c.unload_lora()
    assert lora_adapters(c) == {} and lora_adapters(m) == {"default": 1.0}
    assert torch.equal(out(c, x), base) and torch.equal(out(m, x), with_lora)


def test_kohya_flux_keys_are_converted(tmp_path):
    """kohya-style FLUX keys (lora_unet_double_blocks_..., with alphas) are read through diffusers'
    converter: the fused qkv LoRA lands on to_q / to_k / to_v, linear2 on proj_out, scaled by alpha/r."""
    m = fresh("tiny-flux")
    dim, r, alpha = 32, 2, 1.0
    g = torch.Generator().manual_seed(0)
    sd = {}
    for key, (o, i) in {"lora_unet_double_blocks_0_img_attn_qkv": (3 * dim, dim),
                        "lora_unet_single_blocks_1_linear2": (dim, m.single_transformer_blocks[1].proj_out.in_features)}.items():
        sd[f"{key}.lora_down.weight"] = torch.randn(r, i, generator=g)
        sd[f"{key}.lora_up.weight"] = torch.randn(o, r, generator=g)
        sd[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(sd, str(tmp_path / "kohya.safetensors"))
    rep = apply_lora(m, tmp_path / "kohya.safetensors")
    assert set(rep.applied) == {"transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
                                "transformer_blocks.0.attn.to_v", "single_transformer_blocks.1.proj_out"}
    qkv_down, qkv_up = sd["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"], \
        sd["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"]
    for j, p in enumerate(["to_q", "to_k", "to_v"]):
        layer = m.get_submodule(f"transformer_blocks.0.attn.{p}")
        x = torch.randn(3, dim)
        with torch.no_grad():
            d = layer(x) - F.linear(x, layer.weight, layer.bias)
        want = (alpha / r) * x @ (qkv_up[j * dim:(j + 1) * dim] @ qkv_down).t()
        torch.testing.assert_close(d, want, rtol=1e-4, atol=1e-5)


def test_pipeline_load_lora_weights(tmp_path):
    """diffusers' own SD3 `pipe.load_lora_weights` reaches a compressed transformer from
    hprune.load_compressed (through its load_lora_adapter) and gives apply_lora's result;
    `unload_lora_weights` restores it."""
    from hprune.artifacts import load_compressed, save_compressed
    from hprune.pipelines import build_pipeline, stand_in_prompts, generate

    _, path = make_lora("tiny-sd3", tmp_path)
    m = compressed("tiny-sd3", quant=True)
    save_compressed(m, tmp_path / "art")
    t = load_compressed(tmp_path / "art")
    pipe = build_pipeline(t)
    emb = stand_in_prompts(t, 1)
    base = generate(pipe, **emb, steps=2)
    with pytest.warns(UserWarning, match="dropped"):
        pipe.load_lora_weights(str(path))
    with_lora = generate(pipe, **emb, steps=2)
    ref = load_compressed(tmp_path / "art")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        apply_lora(ref, path)
    assert torch.equal(with_lora, generate(build_pipeline(ref), **emb, steps=2))
    assert not torch.equal(with_lora, base)
    pipe.unload_lora_weights()
    assert torch.equal(generate(pipe, **emb, steps=2), base)


def test_flux_pipeline_you_assembled(tmp_path):
    """FLUX's own loader reshapes layers before loading (it fails on compressed ones);
    enable_diffusers_lora(pipe) routes pipe.load_lora_weights to apply_lora (the report comes back)."""
    from hprune.lora import enable_diffusers_lora
    from hprune.pipelines import build_pipeline

    _, path = make_lora("tiny-flux", tmp_path)
    m = compressed("tiny-flux", quant=True)
    ref = copy.deepcopy(m)
    x = inputs(m)
    base = out(m, x)
    pipe = enable_diffusers_lora(build_pipeline(m))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = pipe.load_lora_weights(str(path), scale=0.7)
        apply_lora(ref, path, scale=0.7)
    assert rep.applied and rep.sliced and rep.dropped
    assert torch.equal(out(m, x), out(ref, x)) and not torch.equal(out(m, x), base)
    pipe.unload_lora_weights()
    assert torch.equal(out(m, x), base)


def test_errors(tmp_path):
    m = fresh("tiny-sd3")
    with pytest.raises(CheckpointError, match="not found"):
        apply_lora(m, tmp_path / "nope.safetensors")
    save_file({"foo.lora_A.weight": torch.zeros(2, 3), "foo.lora_B.weight": torch.zeros(3, 2)},
              str(tmp_path / "other.safetensors"))
    with pytest.raises(HpruneError, match="none of the LoRA's 1 layers fits"):
        apply_lora(m, tmp_path / "other.safetensors", warn=False)
    _, path = make_lora("tiny-sd3", tmp_path)
    apply_lora(m, path)
    with pytest.raises(HpruneError, match="already applied"):
        apply_lora(m, path)
    with pytest.raises(HpruneError, match="no LoRA named"):
        set_lora_scale(m, 1.0, "other")


@pytest.mark.parametrize("name,backend", [("tiny-flux", "inductor"), ("tiny-sd3", "eager")])
def test_torch_compile_fullgraph_compressed_with_lora(name, backend, tmp_path):
    """torch.compile(fullgraph=True) of a compressed transformer (pruned blocks and components,
    shrunk heads and neurons, W4A16 and W4A8 layers, LoRA on) runs on the CPU with no graph break
    and gives the eager output. tiny-flux goes through inductor (its generated C++ reorders float32
    sums: rtol 1e-4, atol 1e-5; a cold compile takes ~1.5 min on 2 busy cores, seconds once inductor
    has cached it); tiny-sd3's other block code through dynamo alone (backend "eager": the same
    graph capture and fake kernels, exact)."""
    _, path = make_lora(name, tmp_path)
    m = compressed(name, quant=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        apply_lora(m, path)
    x = inputs(m, batch=1)
    eager = out(m, x)
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True, backend=backend)
    with torch.no_grad():
        got = compiled(**x, return_dict=False)[0]
    tol = dict(rtol=1e-4, atol=1e-5) if backend == "inductor" else dict(rtol=0, atol=0)
    torch.testing.assert_close(got, eager, **tol)
