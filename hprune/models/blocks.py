"""Pruned replacements for the transformer blocks of SD3/SD3.5 and FLUX.1.

Every branch of an MMDiT block is `residual + gate * f(x)`. Removing a component makes its
`f` contribute exactly zero AND drops its weights: the Linears of the branch, and the rows of the
AdaLN modulation Linear (shift/scale/gate chunks) that only that branch used. Replacing `f` by an
identity would add `gate * x` instead, which is not a removal.

The replacement modules keep the attribute names of the diffusers blocks (`norm1.linear`,
`attn.to_q`, `ff.net.0.proj`, ...), so a pruned model's state-dict keys are a subset of the
original's and its tensors are row/column slices of the originals. They also keep the diffusers
forward signatures, so `SD3Transformer2DModel.forward` / `FluxTransformer2DModel.forward` (and
gradient checkpointing, which passes arguments positionally) run them unchanged.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

# Chunk names of each AdaLN flavour, in the order the diffusers module splits its Linear output.
_ADALN_ZERO = ("shift_msa", "scale_msa", "gate_msa", "shift_mlp", "scale_mlp", "gate_mlp")
_ADALN_ZERO_X = _ADALN_ZERO + ("shift_msa2", "scale_msa2", "gate_msa2")
_ADALN_CONTINUOUS = ("scale_msa", "shift_msa")  # AdaLayerNormContinuous: `scale, shift = chunk(2)`

SD3_JOINT = "sd3_joint"  # SD3 JointTransformerBlock with a context output
SD3_LAST = "sd3_last"  # SD3 JointTransformerBlock with context_pre_only=True (the last block)
FLUX_DOUBLE = "flux_double"
FLUX_SINGLE = "flux_single"

# Removable components of each block kind ("block" = the whole block, always removable).
COMPONENTS: dict[str, tuple[str, ...]] = {
    SD3_JOINT: ("attn", "attn2", "ff", "context_ff", "context"),
    SD3_LAST: ("attn", "attn2", "ff"),
    FLUX_DOUBLE: ("attn", "ff", "context_ff", "context"),
    FLUX_SINGLE: ("attn", "mlp"),
}

COMPONENT_DOC = {
    "block": "the whole block: both streams pass through unchanged",
    "attn": "joint attention: its output on the image and on the context stream",
    "attn2": "SD3.5 dual attention: the second, image-only self-attention",
    "ff": "image-stream MLP",
    "context_ff": "context-stream MLP (norm2_context + ff_context)",
    "context": "context-stream update (context attention output + context MLP); "
               "attention still reads the context as keys/values",
    "mlp": "FLUX single block MLP branch (proj_mlp and its proj_out columns)",
}


def adaln_chunk_names(module: nn.Module) -> tuple[str, ...]:
    """Chunk names of an AdaLN module (diffusers class or a trimmed `Modulation`)."""
    if isinstance(module, Modulation):
        return module.names
    cls = type(module).__name__
    if cls == "AdaLayerNormZero":
        return _ADALN_ZERO
    if cls == "SD35AdaLayerNormZeroX":
        return _ADALN_ZERO_X
    if cls == "AdaLayerNormContinuous":
        return _ADALN_CONTINUOUS
    raise TypeError(f"unsupported AdaLN module {cls}")


class Modulation(nn.Module):
    """AdaLN modulation keeping only the chunks that surviving branches use.

    `linear(silu(temb))` is split into the named chunks (each of width `dim`); the LayerNorm has
    no parameters. State-dict keys match the diffusers module (`<name>.linear.weight/bias`).
    """

    def __init__(self, linear: nn.Linear, names: Iterable[str], dim: int, cast_to_input: bool = False):
        super().__init__()
        self.names = tuple(names)
        self.dim = dim
        self.linear = linear
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        # AdaLayerNormContinuous casts silu(temb) to the activations' dtype before its Linear.
        self.cast_to_input = cast_to_input

    @classmethod
    def trimmed(cls, module: nn.Module, keep: Iterable[str]) -> "Modulation":
        names = adaln_chunk_names(module)
        keep = set(keep)
        unknown = keep - set(names)
        if unknown:
            raise ValueError(f"chunks {sorted(unknown)} not in {names}")
        kept = tuple(n for n in names if n in keep)
        lin = module.linear
        dim = lin.out_features // len(names)
        rows = [torch.arange(i * dim, (i + 1) * dim) for i, n in enumerate(names) if n in keep]
        idx = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)
        new = nn.Linear(lin.in_features, len(kept) * dim, bias=lin.bias is not None,
                        device=lin.weight.device, dtype=lin.weight.dtype)
        with torch.no_grad():
            if lin.weight.device.type != "meta":
                idx_d = idx.to(lin.weight.device)
                new.weight.copy_(lin.weight.index_select(0, idx_d))
                if lin.bias is not None:
                    new.bias.copy_(lin.bias.index_select(0, idx_d))
        new.weight.requires_grad_(lin.weight.requires_grad)
        if new.bias is not None:
            new.bias.requires_grad_(lin.bias.requires_grad)
        cast = isinstance(module, Modulation) and module.cast_to_input or type(module).__name__ == "AdaLayerNormContinuous"
        return cls(new, kept, dim, cast_to_input=cast)

    def chunks(self, temb: torch.Tensor, like: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """temb: (B, D_cond) -> {name: (B, dim)}."""
        if not self.names:
            return {}
        e = F.silu(temb)
        if self.cast_to_input and like is not None:
            e = e.to(like.dtype)
        return dict(zip(self.names, self.linear(e).chunk(len(self.names), dim=1)))

    def forward(self, temb: torch.Tensor) -> dict[str, torch.Tensor]:  # pragma: no cover - use chunks()
        return self.chunks(temb)

    def extra_repr(self) -> str:
        return f"chunks={list(self.names)}"


def _modulate(normed: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    return normed * (1 + scale[:, None]) + shift[:, None]


def _layer_norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6)


class RemovedBlock(nn.Module):
    """A whole block removed: both streams pass through unchanged. No parameters."""

    def __init__(self, kind: str, context_pre_only: bool = False):
        super().__init__()
        self.kind = kind
        self.removed = frozenset({"block"})
        self.context_pre_only = context_pre_only

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                *args: Any, **kwargs: Any) -> tuple[torch.Tensor | None, torch.Tensor]:
        return encoder_hidden_states, hidden_states

    def extra_repr(self) -> str:
        return f"kind={self.kind}, removed=block"


def _sd3_image_attention(attn: nn.Module, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """SD3 joint attention computing only the image rows: queries from the image tokens,
    keys/values from [image; context] (diffusers' order). Needs no add_q_proj / to_add_out."""
    b, heads = x.shape[0], attn.heads
    q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
    hd = k.shape[-1] // heads
    q, k, v = (t.view(b, -1, heads, hd).transpose(1, 2) for t in (q, k, v))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    ck = attn.add_k_proj(c).view(b, -1, heads, hd).transpose(1, 2)
    cv = attn.add_v_proj(c).view(b, -1, heads, hd).transpose(1, 2)
    if attn.norm_added_k is not None:
        ck = attn.norm_added_k(ck)
    o = F.scaled_dot_product_attention(q, torch.cat([k, ck], 2), torch.cat([v, cv], 2))
    o = o.transpose(1, 2).reshape(b, -1, heads * hd).to(q.dtype)
    return attn.to_out[1](attn.to_out[0](o))


def _flux_image_attention(attn: nn.Module, x: torch.Tensor, c: torch.Tensor, rotary: Any) -> torch.Tensor:
    """FLUX double-block attention computing only the image rows (sequence order [context; image],
    rotary embedding over the whole sequence)."""
    from diffusers.models.embeddings import apply_rotary_emb

    hd = attn.head_dim
    q = attn.norm_q(attn.to_q(x).unflatten(-1, (-1, hd)))
    k = attn.norm_k(attn.to_k(x).unflatten(-1, (-1, hd)))
    v = attn.to_v(x).unflatten(-1, (-1, hd))
    ck = attn.norm_added_k(attn.add_k_proj(c).unflatten(-1, (-1, hd)))
    cv = attn.add_v_proj(c).unflatten(-1, (-1, hd))
    k, v = torch.cat([ck, k], 1), torch.cat([cv, v], 1)
    if rotary is not None:
        t = c.shape[1]
        cos, sin = rotary
        q = apply_rotary_emb(q, (cos[t:], sin[t:]), sequence_dim=1)
        k = apply_rotary_emb(k, rotary, sequence_dim=1)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    o = o.transpose(1, 2).flatten(2, 3).to(q.dtype)
    return attn.to_out[1](attn.to_out[0](o))


def normalise_removed(kind: str, removed: Iterable[str], has_attn2: bool = False) -> frozenset[str]:
    """Closes a removal set under the implications between components; returns {"block"} when
    nothing of the block would remain."""
    removed = set(removed)
    if "block" in removed:
        return frozenset({"block"})
    allowed = set(COMPONENTS[kind])
    if not has_attn2:
        allowed.discard("attn2")
    bad = removed - allowed
    if bad:
        raise ValueError(f"components {sorted(bad)} do not exist in a {kind} block (it has: {sorted(allowed)})")
    if "context" in removed and "context_ff" in allowed:
        removed.add("context_ff")
    if kind == FLUX_SINGLE:
        branches = {"attn", "mlp"}
        return frozenset({"block"}) if branches <= removed else frozenset(removed)
    image_live = bool({"attn", "ff"} - removed) or (has_attn2 and "attn2" not in removed)
    ctx_live = kind != SD3_LAST and "context" not in removed and bool({"attn", "context_ff"} - removed)
    if not image_live and not ctx_live:
        return frozenset({"block"})
    return frozenset(removed)


class PrunedJointBlock(nn.Module):
    """A JointTransformerBlock (SD3/SD3.5) or FluxTransformerBlock with components removed.

    Forward signature follows the block it replaces; returns (encoder_hidden_states, hidden_states).
    """

    def __init__(self, block: nn.Module, kind: str, removed: Iterable[str]):
        super().__init__()
        assert kind in (SD3_JOINT, SD3_LAST, FLUX_DOUBLE)
        prev = getattr(block, "removed", frozenset())
        has_attn2 = bool(getattr(block, "use_dual_attention", False))
        self.kind = kind
        self.removed = normalise_removed(kind, set(prev) | set(removed), has_attn2=has_attn2)
        assert "block" not in self.removed, "use RemovedBlock for a whole-block removal"
        r = self.removed
        self.context_pre_only = kind == SD3_LAST
        self.has_attn = "attn" not in r
        self.has_attn2 = has_attn2 and "attn2" not in r
        self.has_ff = "ff" not in r
        self.ctx_update = not self.context_pre_only and "context" not in r
        self.has_cff = self.ctx_update and "context_ff" not in r
        self.ctx_attn_out = self.has_attn and self.ctx_update
        # Attributes of the diffusers block that callers sometimes read.
        self.use_dual_attention = has_attn2
        self._chunk_size = None
        self._chunk_dim = 0

        keep1 = set()
        if self.has_attn:
            keep1 |= {"shift_msa", "scale_msa", "gate_msa"}
        if self.has_ff:
            keep1 |= {"shift_mlp", "scale_mlp", "gate_mlp"}
        if self.has_attn2:
            keep1 |= {"shift_msa2", "scale_msa2", "gate_msa2"}
        self.dim = getattr(block, "dim", None) or block.norm1.linear.in_features
        self.norm1 = Modulation.trimmed(block.norm1, keep1) if keep1 else None

        keepc = set()
        if self.has_attn:
            keepc |= {"shift_msa", "scale_msa"}
            if self.ctx_attn_out:
                keepc.add("gate_msa")
        if self.has_cff:
            keepc |= {"shift_mlp", "scale_mlp", "gate_mlp"}
        self.norm1_context = Modulation.trimmed(block.norm1_context, keepc) if keepc else None

        self.attn = block.attn if self.has_attn else None
        # The image-only attention path needs no context queries and no context output projection.
        self._image_only_attn = self.has_attn and not self.ctx_attn_out and not self.context_pre_only
        if self._image_only_attn:
            self.attn.add_q_proj = None
            self.attn.to_add_out = None
            self.attn.norm_added_q = None
        self.attn2 = block.attn2 if self.has_attn2 else None
        self.norm2 = nn.LayerNorm(self.dim, elementwise_affine=False, eps=1e-6) if self.has_ff else None
        self.ff = block.ff if self.has_ff else None
        self.norm2_context = (nn.LayerNorm(self.dim, elementwise_affine=False, eps=1e-6)
                              if self.has_cff else None)
        self.ff_context = block.ff_context if self.has_cff else None

    def set_chunk_feed_forward(self, chunk_size: int | None, dim: int = 0) -> None:
        self._chunk_size, self._chunk_dim = chunk_size, dim

    def _ff(self, ff: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self._chunk_size is None:
            return ff(x)
        from diffusers.models.attention import _chunked_feed_forward

        return _chunked_feed_forward(ff, x, self._chunk_dim, self._chunk_size)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                *args: Any, **kwargs: Any) -> tuple[torch.Tensor | None, torch.Tensor]:
        if self.kind == FLUX_DOUBLE:  # (..., image_rotary_emb=None, joint_attention_kwargs=None)
            rotary = args[0] if len(args) > 0 else kwargs.get("image_rotary_emb")
            jkw = (args[1] if len(args) > 1 else kwargs.get("joint_attention_kwargs")) or {}
        else:  # SD3: (..., joint_attention_kwargs=None)
            rotary = None
            jkw = (args[0] if len(args) > 0 else kwargs.get("joint_attention_kwargs")) or {}
        x, c = hidden_states, encoder_hidden_states
        m = self.norm1.chunks(temb) if self.norm1 is not None else {}
        ip_out = None
        ctx_attn = None
        if self.has_attn or self.has_attn2:
            nx = _layer_norm(x)
        if self.has_attn:
            mc = self.norm1_context.chunks(temb, like=c)
            ax = _modulate(nx, m["scale_msa"], m["shift_msa"])
            nc = _modulate(_layer_norm(c), mc["scale_msa"], mc["shift_msa"])
            if self._image_only_attn:
                if self.kind == FLUX_DOUBLE:
                    attn_out = _flux_image_attention(self.attn, ax, nc, rotary)
                else:
                    attn_out = _sd3_image_attention(self.attn, ax, nc)
            else:
                extra = {"image_rotary_emb": rotary} if self.kind == FLUX_DOUBLE else {}
                outs = self.attn(hidden_states=ax, encoder_hidden_states=nc, **extra, **jkw)
                attn_out, ctx_attn = outs[0], outs[1]
                if len(outs) == 3:
                    ip_out = outs[2]
            x = x + m["gate_msa"].unsqueeze(1) * attn_out
        if self.has_attn2:
            ax2 = _modulate(nx, m["scale_msa2"], m["shift_msa2"])
            x = x + m["gate_msa2"].unsqueeze(1) * self.attn2(hidden_states=ax2, **jkw)
        if self.has_ff:
            h = _modulate(self.norm2(x), m["scale_mlp"], m["shift_mlp"])
            x = x + m["gate_mlp"].unsqueeze(1) * self._ff(self.ff, h)
        if ip_out is not None:
            x = x + ip_out
        if self.context_pre_only:
            return None, x
        if self.ctx_attn_out:
            c = c + mc["gate_msa"].unsqueeze(1) * ctx_attn
        if self.has_cff:
            mc = self.norm1_context.chunks(temb, like=c) if not self.has_attn else mc
            h = _modulate(self.norm2_context(c), mc["scale_mlp"], mc["shift_mlp"])
            c = c + mc["gate_mlp"].unsqueeze(1) * self._ff(self.ff_context, h)
        if self.kind == FLUX_DOUBLE and c.dtype == torch.float16:
            c = c.clip(-65504, 65504)
        return c, x

    def extra_repr(self) -> str:
        return f"kind={self.kind}, removed={sorted(self.removed)}"


class PrunedSingleBlock(nn.Module):
    """A FluxSingleTransformerBlock with its attention or MLP branch removed.

    The block's output is `residual + gate * proj_out(cat(attn, mlp))`; proj_out is linear in the
    concatenation, so dropping a branch drops its columns of proj_out and its contribution is
    exactly zero. The bias stays with whichever branch remains.
    """

    def __init__(self, block: nn.Module, removed: Iterable[str]):
        super().__init__()
        prev = getattr(block, "removed", frozenset())
        self.kind = FLUX_SINGLE
        self.removed = normalise_removed(FLUX_SINGLE, set(prev) | set(removed))
        assert "block" not in self.removed
        self.has_attn = "attn" not in self.removed
        self.has_mlp = "mlp" not in self.removed
        self.norm = block.norm
        self.attn = block.attn if self.has_attn else None
        self.proj_mlp = block.proj_mlp if self.has_mlp else None
        self.act_mlp = block.act_mlp if self.has_mlp else None
        # Columns of proj_out: [attention (dim) | mlp (mlp_hidden_dim)] in the unpruned block.
        old = block.proj_out
        dim = old.out_features
        a_cols = getattr(block, "_attn_cols", dim if getattr(block, "has_attn", True) else 0)
        cols = []
        if self.has_attn:
            cols.append(torch.arange(0, a_cols))
        if self.has_mlp:
            cols.append(torch.arange(a_cols, old.in_features))
        self._attn_cols = a_cols if self.has_attn else 0
        idx = torch.cat(cols)
        new = nn.Linear(len(idx), dim, bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype)
        with torch.no_grad():
            if old.weight.device.type != "meta":
                new.weight.copy_(old.weight.index_select(1, idx.to(old.weight.device)))
                if old.bias is not None:
                    new.bias.copy_(old.bias)
        new.weight.requires_grad_(old.weight.requires_grad)
        if new.bias is not None:
            new.bias.requires_grad_(old.bias.requires_grad)
        self.proj_out = new

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                image_rotary_emb: Any = None, joint_attention_kwargs: dict | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        t = encoder_hidden_states.shape[1]
        h = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        residual = h
        nh, gate = self.norm(h, emb=temb)
        parts = []
        if self.has_attn:
            parts.append(self.attn(hidden_states=nh, image_rotary_emb=image_rotary_emb,
                                   **(joint_attention_kwargs or {})))
        if self.has_mlp:
            parts.append(self.act_mlp(self.proj_mlp(nh)))
        h = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
        h = residual + gate.unsqueeze(1) * self.proj_out(h)
        if h.dtype == torch.float16:
            h = h.clip(-65504, 65504)
        return h[:, :t], h[:, t:]

    def extra_repr(self) -> str:
        return f"kind={self.kind}, removed={sorted(self.removed)}"


def prune_block(block: nn.Module, kind: str, removed: Iterable[str]) -> nn.Module:
    """Returns the module that replaces `block` once `removed` components are gone (cumulative
    with what `block` already had removed). Surviving submodules are shared with `block`, not copied."""
    prev = set(getattr(block, "removed", ()))
    if isinstance(block, RemovedBlock):
        return block
    has_attn2 = bool(getattr(block, "use_dual_attention", False))
    removed = normalise_removed(kind, prev | set(removed), has_attn2=has_attn2)
    if removed == frozenset(prev):
        return block
    if "block" in removed:
        return RemovedBlock(kind, context_pre_only=kind == SD3_LAST)
    if any(hasattr(m, "logical_numel") for m in block.modules()):
        from hprune.errors import PlanError

        raise PlanError(f"cannot remove {', '.join(sorted(removed - prev))} from a block with quantised (4-bit) "
                        f"layers: prune before quantising (whole blocks can still be removed)")
    if kind == FLUX_SINGLE:
        return PrunedSingleBlock(block, removed)
    return PrunedJointBlock(block, kind, removed)
