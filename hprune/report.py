"""Small formatting helpers shared by the CLI, the stages' reports and the benchmarks."""
from __future__ import annotations

import sys
from typing import Any, Sequence


def tqdm(*args: Any, **kwargs: Any) -> Any:
    """tqdm.auto.tqdm, shown only on a terminal: a log redirected to a file gets no progress-bar
    redraws (set HPRUNE_PROGRESS=1 to force them)."""
    import os

    from tqdm.auto import tqdm as _tqdm

    from hprune.env import flag

    if not (sys.stderr.isatty() or flag("HPRUNE_PROGRESS")):
        kwargs["disable"] = True
    return _tqdm(*args, **kwargs)


def human_bytes(n: float) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


def human_count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
    return "" if v is None else str(v)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], title: str | None = None) -> str:
    """A Markdown table of `rows` (dicts) with the given columns; numbers right-aligned."""
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = [title] if title else []
    lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        lines.append("| " + " | ".join(v.rjust(w) for v, w in zip(row, widths)) + " |")
    return "\n".join(lines)
