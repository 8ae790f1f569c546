"""One small interface over the supported transformers: their blocks in order, the removable
components of each, and what removing them frees.

Block indices are global positions in execution order: SD3 `transformer_blocks[i]` is block i;
FLUX `transformer_blocks[i]` (double stream) is block i and `single_transformer_blocks[j]` is
block `num_layers + j`. Indices stay stable under pruning (a removed block is replaced by a
parameterless pass-through), so a plan's indices and the state-dict keys keep their meaning.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn as nn

from hprune.errors import PlanError
from hprune.models import blocks as B


@dataclass(frozen=True)
class BlockInfo:
    index: int  # global position in execution order
    name: str  # module path, e.g. "single_transformer_blocks.3"
    kind: str  # one of blocks.SD3_JOINT, SD3_LAST, FLUX_DOUBLE, FLUX_SINGLE
    components: tuple[str, ...]  # removable components still present ("block" not listed)
    removed: frozenset[str]  # components already removed ({"block"} for a removed block)


@dataclass
class FlowState:
    """The two streams between blocks, plus what every block reads (temb, rotary embedding)."""
    hidden: torch.Tensor  # (B, S_img, D) image tokens
    context: torch.Tensor | None  # (B, S_txt, D) context tokens (None after SD3's last block)
    temb: torch.Tensor  # (B, D) timestep + pooled-text embedding
    extra: dict  # family specific: rotary embedding (FLUX), latent height/width (SD3)


def meta_clone(module: nn.Module) -> nn.Module:
    """A structural copy of `module` whose parameters and buffers live on the meta device."""
    memo: dict[int, object] = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(module, memo)


def dense_meta_clone(module: nn.Module) -> nn.Module:
    """meta_clone with every quantised Linear (a module with `logical_numel`, e.g. W4A16Linear)
    replaced by a meta nn.Linear of its shape: what the structure would be unquantised, so that
    component surgery and parameter counts work on quantised models too."""
    twin = meta_clone(module)
    for name, m in list(twin.named_modules()):
        if name and hasattr(m, "logical_numel") and hasattr(m, "in_features"):
            dense = nn.Linear(m.in_features, m.out_features, bias=getattr(m, "bias", None) is not None, device="meta")
            parent, _, attr = name.rpartition(".")
            setattr(twin.get_submodule(parent) if parent else twin, attr, dense)
    return twin


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Adapter:
    """Adapter base: subclasses name the block lists and the kind of each block."""

    family: str = ""
    lists: tuple[str, ...] = ()

    def _kind(self, model: nn.Module, list_name: str, local: int) -> str:
        raise NotImplementedError

    # -- structure ---------------------------------------------------------------------------
    def _slots(self, model: nn.Module) -> list[tuple[str, int]]:
        return [(ln, j) for ln in self.lists for j in range(len(getattr(model, ln)))]

    def num_blocks(self, model: nn.Module) -> int:
        return sum(len(getattr(model, ln)) for ln in self.lists)

    def _slot(self, model: nn.Module, index: int) -> tuple[str, int]:
        slots = self._slots(model)
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(slots):
            raise PlanError(f"unknown block index {index!r}: {type(model).__name__} has blocks 0..{len(slots) - 1}")
        return slots[index]

    def get_block(self, model: nn.Module, index: int) -> nn.Module:
        ln, j = self._slot(model, index)
        return getattr(model, ln)[j]

    def set_block(self, model: nn.Module, index: int, module: nn.Module) -> None:
        ln, j = self._slot(model, index)
        getattr(model, ln)[j] = module

    def block_info(self, model: nn.Module, index: int) -> BlockInfo:
        ln, j = self._slot(model, index)
        block = getattr(model, ln)[j]
        kind = self._kind(model, ln, j)
        removed = frozenset(getattr(block, "removed", ()))
        if "block" in removed:
            comps: tuple[str, ...] = ()
        else:
            comps = tuple(c for c in B.COMPONENTS[kind]
                          if c not in removed and (c != "attn2" or getattr(block, "use_dual_attention", False)))
        return BlockInfo(index, f"{ln}.{j}", kind, comps, removed)

    def blocks(self, model: nn.Module) -> list[BlockInfo]:
        return [self.block_info(model, i) for i in range(self.num_blocks(model))]

    # -- surgery -----------------------------------------------------------------------------
    def check_components(self, model: nn.Module, index: int, components: Iterable[str]) -> None:
        info = self.block_info(model, index)
        allowed = set(B.COMPONENTS[info.kind]) | {"block"}
        if not getattr(self.get_block(model, index), "use_dual_attention", False):
            allowed.discard("attn2")
        bad = sorted(set(components) - allowed)
        if bad:
            raise PlanError(f"block {index} ({info.name}, {info.kind}) has no component {', '.join(map(repr, bad))}; "
                            f"its components: {', '.join(sorted(allowed))}")

    def prune(self, model: nn.Module, index: int, components: Iterable[str]) -> nn.Module:
        """Removes `components` of block `index` in place; returns the replacement module."""
        components = set(components)
        self.check_components(model, index, components)
        info = self.block_info(model, index)
        new = B.prune_block(self.get_block(model, index), info.kind, components)
        self.set_block(model, index, new)
        return new

    # -- block-by-block forward (bit-identical to the diffusers forward; see tests) -------------
    def prepare(self, model: nn.Module, inputs: dict) -> FlowState:
        raise NotImplementedError

    def run_block(self, model: nn.Module, index: int, state: FlowState, block: nn.Module | None = None) -> FlowState:
        raise NotImplementedError

    def finish(self, model: nn.Module, state: FlowState) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, model: nn.Module, inputs: dict) -> torch.Tensor:
        """prepare -> every block -> finish: the transformer's output (the predicted velocity)."""
        st = self.prepare(model, inputs)
        for i in range(self.num_blocks(model)):
            st = self.run_block(model, i, st)
        return self.finish(model, st)

    # -- accounting --------------------------------------------------------------------------
    def component_params(self, model: nn.Module, index: int) -> dict[str, int]:
        """Parameters freed by removing each component of block `index` alone ("block" included);
        computed by doing the surgery on a meta copy, so it is exact by construction."""
        info = self.block_info(model, index)
        block = dense_meta_clone(self.get_block(model, index))  # quantised layers count as their dense shape
        total = sum(p.numel() for p in block.parameters())
        out = {"block": total}
        if "block" in info.removed:
            return {"block": 0}
        for c in info.components:
            pruned = B.prune_block(meta_clone(block), info.kind, {c})
            out[c] = total - sum(p.numel() for p in pruned.parameters())
        return out


class SD3Adapter(Adapter):
    family = "sd3"
    lists = ("transformer_blocks",)
    timestep_scale = 1000.0  # the SD3 pipeline passes scheduler timesteps in [0, 1000]

    def _kind(self, model: nn.Module, list_name: str, local: int) -> str:
        return B.SD3_LAST if local == len(model.transformer_blocks) - 1 else B.SD3_JOINT

    def latent_channels(self, model: nn.Module) -> int:
        return model.config.in_channels

    # Mirrors SD3Transformer2DModel.forward (diffusers >= 0.35) without controlnet / IP-adapter.
    def prepare(self, model: nn.Module, inputs: dict) -> FlowState:
        x = inputs["hidden_states"]
        h, w = x.shape[-2:]
        hidden = model.pos_embed(x).contiguous()
        temb = model.time_text_embed(inputs["timestep"], inputs["pooled_projections"])
        context = model.context_embedder(inputs["encoder_hidden_states"])
        return FlowState(hidden, context, temb, {"height": h, "width": w})

    def run_block(self, model: nn.Module, index: int, state: FlowState, block: nn.Module | None = None) -> FlowState:
        block = block if block is not None else model.transformer_blocks[index]
        ctx, hid = block(hidden_states=state.hidden, encoder_hidden_states=state.context, temb=state.temb,
                         joint_attention_kwargs=None)
        return FlowState(hid, ctx, state.temb, state.extra)

    def finish(self, model: nn.Module, state: FlowState) -> torch.Tensor:
        x = model.proj_out(model.norm_out(state.hidden, state.temb))
        p = model.config.patch_size
        h, w = state.extra["height"] // p, state.extra["width"] // p
        x = x.reshape(x.shape[0], h, w, p, p, model.out_channels)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], model.out_channels, h * p, w * p)

    def transformer_inputs(self, model: nn.Module, latents: torch.Tensor, prompt_embeds: torch.Tensor,
                           pooled: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        """latents: (B, C, H, W) VAE latents; prompt_embeds: (B, T, joint_attention_dim);
        pooled: (B, pooled_projection_dim); t: (B,) flow time in [0, 1] (1 = pure noise)."""
        return dict(hidden_states=latents, encoder_hidden_states=prompt_embeds, pooled_projections=pooled,
                    timestep=t * self.timestep_scale)


class FluxAdapter(Adapter):
    family = "flux"
    lists = ("transformer_blocks", "single_transformer_blocks")
    timestep_scale = 1.0  # the FLUX pipeline passes t in [0, 1]; the model multiplies by 1000

    def _kind(self, model: nn.Module, list_name: str, local: int) -> str:
        return B.FLUX_DOUBLE if list_name == "transformer_blocks" else B.FLUX_SINGLE

    def latent_channels(self, model: nn.Module) -> int:
        return model.config.in_channels // 4  # 2x2 patches are packed into channels

    # Mirrors FluxTransformer2DModel.forward (diffusers >= 0.35) without controlnet / IP-adapter.
    def prepare(self, model: nn.Module, inputs: dict) -> FlowState:
        hidden = model.x_embedder(inputs["hidden_states"])
        t = inputs["timestep"].to(hidden.dtype) * 1000
        g = inputs.get("guidance")
        if g is None:
            temb = model.time_text_embed(t, inputs["pooled_projections"])
        else:
            temb = model.time_text_embed(t, g.to(hidden.dtype) * 1000, inputs["pooled_projections"])
        context = model.context_embedder(inputs["encoder_hidden_states"])
        txt_ids, img_ids = inputs["txt_ids"], inputs["img_ids"]
        txt_ids = txt_ids[0] if txt_ids.ndim == 3 else txt_ids
        img_ids = img_ids[0] if img_ids.ndim == 3 else img_ids
        rotary = model.pos_embed(torch.cat((txt_ids, img_ids), dim=0))
        return FlowState(hidden, context, temb, {"rotary": rotary})

    def run_block(self, model: nn.Module, index: int, state: FlowState, block: nn.Module | None = None) -> FlowState:
        block = block if block is not None else self.get_block(model, index)
        ctx, hid = block(hidden_states=state.hidden, encoder_hidden_states=state.context, temb=state.temb,
                         image_rotary_emb=state.extra["rotary"], joint_attention_kwargs=None)
        return FlowState(hid, ctx, state.temb, state.extra)

    def finish(self, model: nn.Module, state: FlowState) -> torch.Tensor:
        return model.proj_out(model.norm_out(state.hidden, state.temb))

    def transformer_inputs(self, model: nn.Module, latents: torch.Tensor, prompt_embeds: torch.Tensor,
                           pooled: torch.Tensor, t: torch.Tensor, guidance: float = 3.5) -> dict[str, torch.Tensor]:
        """latents: (B, C, H, W) VAE latents (packed here into 2x2 patches, as FluxPipeline does);
        prompt_embeds: (B, T, joint_attention_dim); pooled: (B, pooled_projection_dim); t: (B,) in [0, 1]."""
        b, c, h, w = latents.shape
        packed = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)
        ids = torch.zeros(h // 2, w // 2, 3, device=latents.device, dtype=latents.dtype)
        ids[..., 1] += torch.arange(h // 2, device=latents.device, dtype=latents.dtype)[:, None]
        ids[..., 2] += torch.arange(w // 2, device=latents.device, dtype=latents.dtype)[None, :]
        out = dict(hidden_states=packed, encoder_hidden_states=prompt_embeds, pooled_projections=pooled,
                   timestep=t * self.timestep_scale, img_ids=ids.reshape(-1, 3),
                   txt_ids=torch.zeros(prompt_embeds.shape[1], 3, device=latents.device, dtype=latents.dtype))
        if model.config.guidance_embeds:
            out["guidance"] = torch.full((b,), guidance, device=latents.device, dtype=latents.dtype)
        return out


def sample_inputs(model: nn.Module, batch: int = 2, seed: int = 0, t: float | torch.Tensor | None = None,
                  latent_size: int = 32, text_len: int = 16, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Seeded random transformer inputs (latents, prompt embeddings, pooled projections, a flow
    time per sample; uniform in (0, 1) unless `t` is given) shaped for `model`'s family."""
    ad = get_adapter(model)
    p = next(iter(model.parameters()))
    device = torch.device(device) if device is not None else (p.device if p.device.type != "meta" else torch.device("cpu"))
    dtype = dtype or (p.dtype if p.is_floating_point() else torch.float32)
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    lat = torch.randn(batch, ad.latent_channels(model), latent_size, latent_size, generator=g)
    txt = torch.randn(batch, text_len, cfg.joint_attention_dim, generator=g)
    pooled = torch.randn(batch, cfg.pooled_projection_dim, generator=g)
    if t is None:
        tt = torch.rand(batch, generator=g)
    else:
        tt = torch.as_tensor(t, dtype=torch.float32).expand(batch).clone()
    return {k: v.to(device=device, dtype=dtype) for k, v in
            ad.transformer_inputs(model, lat, txt, pooled, tt).items()}


MODEL_CLASSES = ("SD3Transformer2DModel", "FluxTransformer2DModel")


def model_class_name(model: nn.Module) -> str | None:
    """The diffusers transformer class of `model`, looking through wrappers that subclass it
    (FSDP2's `fully_shard` swaps in a generated subclass); None if it is not one."""
    for cls in type(model).__mro__:
        if cls.__name__ in MODEL_CLASSES:
            return cls.__name__
    return None


def get_adapter(model: nn.Module) -> Adapter:
    name = model_class_name(model) or type(model).__name__
    if name == "SD3Transformer2DModel":
        return SD3Adapter()
    if name == "FluxTransformer2DModel":
        return FluxAdapter()
    raise TypeError(f"hprune has no adapter for {name}; supported: SD3Transformer2DModel, FluxTransformer2DModel")
