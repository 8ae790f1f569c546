"""Sparsity patterns understood by the OBS-Diff stage, and the checks shared by every method."""
from __future__ import annotations

import re
from dataclasses import dataclass

from hprune.errors import HpruneError, ShapeError

PATTERN_NAMES = ("unstructured", "2:4", "4:8", "N:M", "structured")
METHODS = ("obs", "wanda", "magnitude")


@dataclass(frozen=True)
class Pattern:
    """kind: "unstructured" | "nm" | "structured"; for "nm": at most `n` nonzeros in every `m`
    consecutive weights of a row (along the input dimension), i.e. `m - n` of them are pruned."""

    kind: str
    n: int = 0
    m: int = 0

    @property
    def name(self) -> str:
        return f"{self.n}:{self.m}" if self.kind == "nm" else self.kind

    @property
    def implied_sparsity(self) -> float | None:
        return 1.0 - self.n / self.m if self.kind == "nm" else None


def parse_pattern(pattern: str | Pattern) -> Pattern:
    """"unstructured", "structured" or "N:M" (e.g. "2:4", "4:8") -> Pattern; HpruneError otherwise."""
    if isinstance(pattern, Pattern):
        return pattern
    if pattern in ("unstructured", "structured"):
        return Pattern(pattern)
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern))
    if m:
        n, mm = int(m.group(1)), int(m.group(2))
        if 0 < n < mm:
            return Pattern("nm", n, mm)
        raise HpruneError(f"pattern {pattern!r}: N:M needs 0 < N < M (N nonzeros kept in every M weights)")
    raise HpruneError(f"unknown sparsity pattern {pattern!r}; choose unstructured, structured or N:M "
                      f"(e.g. 2:4, 4:8)")


def resolve_sparsity(sparsity: float | None, pattern: Pattern) -> float:
    """The fraction of weights (or heads/neurons) to remove. N:M patterns imply 1 - N/M; an
    explicit `sparsity` must agree with it. Others default to 0.5 and must lie in (0, 1)."""
    implied = pattern.implied_sparsity
    if implied is not None:
        if sparsity is not None and abs(float(sparsity) - implied) > 1e-9:
            raise HpruneError(f"pattern {pattern.name} removes {implied:g} of the weights; sparsity "
                              f"{sparsity:g} contradicts it (leave sparsity unset for N:M patterns)")
        return implied
    s = 0.5 if sparsity is None else float(sparsity)
    if not 0.0 < s < 1.0:
        raise HpruneError(f"sparsity must be in (0, 1), got {sparsity}")
    return s


def check_method(method: str) -> str:
    if method not in METHODS:
        raise HpruneError(f"unknown pruning method {method!r}; choose from {', '.join(METHODS)}")
    return method


def check_nm_fits(in_features: int, pattern: Pattern, what: str = "weight") -> None:
    """N:M groups run along the input dimension, so it must be a multiple of M."""
    if pattern.kind == "nm" and in_features % pattern.m:
        raise ShapeError(f"{what}: {in_features} input features are not divisible by M={pattern.m}, "
                         f"so the {pattern.name} pattern cannot tile its rows")
