"""Assembling diffusers pipelines around a (compressed) transformer, and generating images.

Real checkpoints come with their VAE and text encoders (a local pipeline folder). The built-in
tiny models get a tiny seeded VAE and stand-in prompt embeddings (no text encoder is needed:
the pipelines accept `prompt_embeds` directly), which is how diffusers' own pipeline tests run.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from hprune.models.adapters import get_adapter


# The VAE of SD3, SD3.5 and FLUX.1: 8 pixels per latent pixel a side. A transformer without its
# pipeline (a model folder, a .safetensors file, an artifact) gets the tiny stand-in VAE below,
# whose scale is 2; image sizes asked for such a model are read at this scale, the one its real
# pipeline has (hprune.calib.synthetic), so that 256 px means the latents of a 256 px image.
FAMILY_VAE_SCALE = 8


def tiny_vae(latent_channels: int = 4, seed: int = 0) -> nn.Module:
    """A 2-level AutoencoderKL (8x8 -> 16x16 pixels per latent pixel ratio 2), seeded: the VAE of
    the built-in tiny models, and the stand-in of a transformer without its pipeline (nothing is
    decoded then; FAMILY_VAE_SCALE gives the pixel sizes)."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            block_out_channels=(8, 16), in_channels=3, out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            latent_channels=latent_channels, norm_num_groups=4, sample_size=64,
            use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0, scaling_factor=1.0)
    return vae.eval()


def build_pipeline(transformer: nn.Module, vae: nn.Module | None = None, scheduler: Any = None) -> Any:
    """A StableDiffusion3Pipeline or FluxPipeline around `transformer`, without text encoders
    (call it with prompt embeddings). `vae` defaults to a tiny seeded VAE."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

    ad = get_adapter(transformer)
    tiny = vae is None
    if tiny:  # on the transformer's device, so the pipeline's execution device is unambiguous
        p = next(transformer.parameters())
        vae = tiny_vae(ad.latent_channels(transformer)).to(p.device if p.device.type != "meta" else "cpu")
    scheduler = scheduler or FlowMatchEulerDiscreteScheduler()
    if ad.family == "sd3":
        pipe = StableDiffusion3Pipeline(
            transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None,
            text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    else:
        pipe = FluxPipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=None,
                            tokenizer=None, text_encoder_2=None, tokenizer_2=None)
        if tiny:  # 32x32 latents -> 64x64 images with the tiny VAE, as for the tiny SD3 models
            pipe.default_sample_size = 32
    pipe.set_progress_bar_config(disable=True)
    return require_prompt_embeds(pipe)


def require_prompt_embeds(pipe: Any) -> Any:
    """On a pipeline without text encoders, a call with a text prompt fails in one line that names
    the routes that work (diffusers would raise a bare "'NoneType' object is not callable"); calls
    with prompt_embeds go through unchanged. Returns `pipe`."""
    from hprune.errors import HpruneError

    if getattr(pipe, "text_encoder", None) is not None or not hasattr(pipe, "encode_prompt"):
        return pipe
    encode = pipe.encode_prompt  # the bound method of the class

    def encode_prompt(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("prompt_embeds") is None:
            raise HpruneError(
                f"this {type(pipe).__name__} has no text encoders (a built-in tiny model's): pass prompt_embeds= "
                f"and pooled_prompt_embeds= (e.g. hprune.pipelines.stand_in_prompts(pipe.transformer, 1)), or "
                f"use `hprune generate`")
        return encode(*args, **kwargs)

    object.__setattr__(pipe, "encode_prompt", encode_prompt)
    return pipe


def stand_in_prompts(transformer: nn.Module, n: int, text_len: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random prompt embeddings standing in for a text encoder's output:
    prompt_embeds (n, text_len, joint_attention_dim), pooled_prompt_embeds (n, pooled_projection_dim)."""
    g = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    return {"prompt_embeds": torch.randn(n, text_len, cfg.joint_attention_dim, generator=g),
            "pooled_prompt_embeds": torch.randn(n, cfg.pooled_projection_dim, generator=g)}


@torch.no_grad()
def generate(pipe: Any, prompt_embeds: torch.Tensor, pooled_prompt_embeds: torch.Tensor, *, steps: int = 4,
             seed: int = 0, height: int | None = None, width: int | None = None,
             guidance_scale: float = 1.0) -> torch.Tensor:
    """Runs the pipeline; returns images as a float tensor (n, 3, H, W) in [0, 1].
    The same seed gives the same initial noise, so two transformers can be compared image by image."""
    p = next(pipe.transformer.parameters())
    dtype = p.dtype if p.is_floating_point() else torch.float32
    kw: dict[str, Any] = dict(prompt_embeds=prompt_embeds.to(dtype), pooled_prompt_embeds=pooled_prompt_embeds.to(dtype),
                              num_inference_steps=steps, guidance_scale=guidance_scale, output_type="pt",
                              generator=torch.Generator().manual_seed(seed))
    if height is not None:
        kw["height"], kw["width"] = height, width or height
    if guidance_scale > 1 and type(pipe).__name__ == "StableDiffusion3Pipeline":
        kw["negative_prompt_embeds"] = torch.zeros_like(kw["prompt_embeds"])
        kw["negative_pooled_prompt_embeds"] = torch.zeros_like(kw["pooled_prompt_embeds"])
    return pipe(**kw).images.float().clamp(0, 1)
