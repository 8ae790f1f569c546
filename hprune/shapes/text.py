"""The ShapesBench text encoder: a word-level tokenizer over the caption grammar's fixed vocabulary
and a small transformer encoder whose outputs fit SD3Transformer2DModel's conditioning inputs.

    ids                     (B, MAX_LEN) int64: <bos>, the words, <pad>...
    encoder_hidden_states   (B, MAX_LEN, joint_attention_dim) float32
    pooled_projections      (B, pooled_projection_dim) float32 (mean over <bos> and the words)

The unconditional input of classifier-free guidance is all-zero embeddings (both tensors), as in
SD3 training, where a dropped text encoder contributes zeros. That is also what hprune's calibration
and OBS loops pass as negative embeddings, so the teacher works with them unchanged.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from hprune.errors import HpruneError
from hprune.shapes.data import COLOURS, NUMBERS, PLURAL, POSITION_PHRASE, RELATIONS, SHAPES, SIZES

SPECIALS = ("<pad>", "<bos>")
MAX_LEN = 12  # <bos> + the longest caption ("a small red circle on the left" has 7 words; relations 8)


def _vocab() -> tuple[str, ...]:
    words: list[str] = ["a", "and"]
    words += list(NUMBERS) + list(SIZES) + list(COLOURS) + list(SHAPES) + list(PLURAL.values())
    for phrase in list(POSITION_PHRASE.values()) + list(RELATIONS):
        words += phrase.split()
    seen: list[str] = []
    for w in words:
        if w not in seen:
            seen.append(w)
    return SPECIALS + tuple(seen)


VOCAB = _vocab()


class Tokenizer:
    """Word-level tokenizer over VOCAB (lower-cased, commas ignored)."""

    def __init__(self, vocab: Sequence[str] = VOCAB, max_len: int = MAX_LEN):
        self.vocab = tuple(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.max_len = max_len
        self.pad, self.bos = self.index["<pad>"], self.index["<bos>"]

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, captions: Sequence[str]) -> torch.Tensor:
        """(B, max_len) int64 token ids; raises HpruneError on an unknown word or a long caption."""
        if isinstance(captions, str):
            captions = [captions]
        out = torch.full((len(captions), self.max_len), self.pad, dtype=torch.long)
        for b, cap in enumerate(captions):
            words = cap.lower().replace(",", " ").split()
            if len(words) + 1 > self.max_len:
                raise HpruneError(f"caption {cap!r} has {len(words)} words; at most {self.max_len - 1} fit")
            unknown = [w for w in words if w not in self.index]
            if unknown:
                raise HpruneError(f"caption {cap!r}: unknown word {unknown[0]!r} (not in the ShapesBench vocabulary)")
            out[b, 0] = self.bos
            out[b, 1:len(words) + 1] = torch.tensor([self.index[w] for w in words])
        return out


class _Block(nn.Module):
    """Pre-norm self-attention + MLP over (B, T, width); pad tokens are never attended to."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, t, w = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        mask = keep[:, None, None, :]  # (B, 1, 1, T) bool: True = may be attended to
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        h = h + self.out(a.transpose(1, 2).reshape(b, t, w))
        return h + self.mlp(self.norm2(h))


class TextEncoder(nn.Module):
    """Token embedding + learned positions -> `layers` pre-norm transformer layers -> projection to
    `joint_dim`; pooled = MLP of the mean over the non-pad tokens."""

    def __init__(self, vocab_size: int = len(VOCAB), max_len: int = MAX_LEN, width: int = 64,
                 joint_dim: int = 64, pooled_dim: int = 64, layers: int = 1, heads: int = 2):
        super().__init__()
        self.config = dict(vocab_size=vocab_size, max_len=max_len, width=width, joint_dim=joint_dim,
                           pooled_dim=pooled_dim, layers=layers, heads=heads)
        self.tok = nn.Embedding(vocab_size, width)
        self.pos = nn.Parameter(torch.randn(max_len, width) * 0.02)
        self.blocks = nn.ModuleList(_Block(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, joint_dim)
        self.pooled = nn.Sequential(nn.Linear(width, pooled_dim), nn.SiLU(), nn.Linear(pooled_dim, pooled_dim))

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (B, T) int64 (pad = 0, <bos> first) -> (encoder_hidden_states (B, T, joint_dim),
        pooled (B, pooled_dim)), float32."""
        keep = ids != 0
        h = self.tok(ids) + self.pos[: ids.shape[1]]
        for blk in self.blocks:
            h = blk(h, keep)
        h = self.norm(h)
        k = keep.unsqueeze(-1).to(h.dtype)
        mean = (h * k).sum(1) / k.sum(1).clamp_min(1.0)
        return self.proj(h), self.pooled(mean)


def encode_captions(encoder: TextEncoder, captions: Sequence[str], tokenizer: Tokenizer | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Conditioning for `captions`: ((B, T, joint_dim), (B, pooled_dim)) float32, no grad. An empty
    caption gets the unconditional input: all zeros (what caption dropout trained)."""
    captions = [captions] if isinstance(captions, str) else list(captions)
    tok = tokenizer or Tokenizer(max_len=encoder.config["max_len"])
    empty = torch.tensor([not c.strip() for c in captions])
    ids = tok.encode([c if c.strip() else "a" for c in captions]).to(next(encoder.parameters()).device)
    with torch.no_grad():
        enc, pooled = encoder(ids)
    keep = (~empty).to(enc.device, enc.dtype)
    return enc * keep.view(-1, 1, 1), pooled * keep.view(-1, 1)
