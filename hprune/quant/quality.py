"""Output-error study of 4-bit formats: hprune INT4 / NF4 against bitsandbytes NF4 / FP4.

Each configuration quantises the same bf16 weight and runs its own forward (hprune W4A16Linear;
bitsandbytes Linear4bit) on the same bf16 activations; the error is
    ||y - y_exact|| / ||y_exact||,   y_exact = x.float() @ W.float().T (the unquantised bf16 layer),
and the storage is the layer's bytes without its bias, per weight (bitsandbytes' per-layer
constants, e.g. its 16-value code table, are included).

Weights: Gaussian and Student-t (heavy tails: real transformer weights lie in between).
Activations ("realistic"): Gaussian tokens with log-normal per-channel scales and 1% outlier
channels 8x larger, the shape of hidden states of diffusion transformers after modulation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn as nn

WEIGHTS = ("gaussian", "student_t5", "student_t3")


@dataclass(frozen=True)
class QConfig:
    backend: str  # "hprune" | "bnb"
    fmt: str  # hprune: int4 / int4_sym / nf4; bnb: nf4 / fp4
    group: int
    double_quant: bool = False  # bnb compress_statistics

    @property
    def name(self) -> str:
        s = f"{self.backend} {self.fmt} g{self.group}"
        return s + (" dq" if self.double_quant else "")


HPRUNE_DEFAULT = QConfig("hprune", "int4", 64)
BNB_PAPER = QConfig("bnb", "nf4", 64)  # diffusers BitsAndBytesConfig nf4 default (no double quant)


def default_configs() -> list[QConfig]:
    out = [QConfig("hprune", f, g) for f in ("int4", "int4_sym", "nf4") for g in (32, 64, 128)]
    out += [QConfig("bnb", f, g, dq) for f in ("nf4", "fp4") for g in (64, 128) for dq in (False, True)]
    return out


def make_weight(kind: str, n: int, k: int, seed: int = 0, std: float = 0.02) -> torch.Tensor:
    """(n, k) float32 weight of distribution `kind` (see WEIGHTS), scaled to standard deviation ~std."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        w = torch.randn(n, k, generator=gen)
    elif kind.startswith("student_t"):
        nu = float(kind[len("student_t"):])
        # t = z / sqrt(chi2_nu / nu), chi2 from a sum of squared normals (seeded, no scipy)
        z = torch.randn(n, k, generator=gen)
        chi2 = torch.randn(int(nu), n, k, generator=gen).square().sum(0)
        w = z / torch.sqrt(chi2 / nu)
    else:
        raise ValueError(f"unknown weight distribution {kind!r}; choose from {WEIGHTS}")
    return w * (std / w.std())


def realistic_activations(m: int, k: int, seed: int = 1) -> torch.Tensor:
    """(m, k) float32: Gaussian tokens, log-normal channel scales, 1% outlier channels (x8)."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.exp(0.5 * torch.randn(k, generator=gen))
    outliers = torch.randperm(k, generator=gen)[: max(1, k // 100)]
    scale[outliers] *= 8.0
    return torch.randn(m, k, generator=gen) * scale


def _layer(cfg: QConfig, w: torch.Tensor) -> tuple[nn.Module, int]:
    """The quantised layer and its bytes without bias."""
    from hprune.quant.linear import quantize_linear
    from hprune.quant.model import _bnb_linear

    lin = nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
    if cfg.backend == "hprune":
        q = quantize_linear(lin, cfg.group, cfg.fmt)
        return q, q.nbytes
    q = _bnb_linear(lin, cfg.group, cfg.fmt, cfg.double_quant)
    return q, sum(t.numel() * t.element_size() for t in q.state_dict().values())


def output_error(cfg: QConfig, w: torch.Tensor, x: torch.Tensor) -> tuple[float, float]:
    """(relative output error, bytes per weight) of `cfg` for weight w (N, K) and activations x
    (M, K), both cast to bf16 first."""
    wb, xb = w.to(torch.bfloat16), x.to(torch.bfloat16)
    layer, nbytes = _layer(cfg, wb)
    with torch.no_grad():
        y = layer(xb).float()
    exact = xb.double() @ wb.double().t()
    err = float((y.double() - exact).norm() / exact.norm())
    return err, nbytes / w.numel()


def quality_study(n: int = 1024, k: int = 1024, m: int = 256, weights: Iterable[str] = WEIGHTS,
                  configs: Iterable[QConfig] | None = None, seed: int = 0) -> list[dict]:
    """Rows {weights, config, backend, fmt, group, double_quant, bytes_per_param, rel_error}."""
    configs = list(configs) if configs is not None else default_configs()
    x = realistic_activations(m, k, seed=seed + 1)
    rows = []
    for kind in weights:
        w = make_weight(kind, n, k, seed=seed)
        for cfg in configs:
            err, bpp = output_error(cfg, w, x)
            rows.append({"weights": kind, "config": cfg.name, "backend": cfg.backend, "fmt": cfg.fmt,
                         "group": cfg.group, "double_quant": cfg.double_quant, "bytes_per_param": bpp,
                         "rel_error": err})
    return rows
