"""Small formatting helpers shared by the CLI, the stages' reports and the benchmarks."""
from __future__ import annotations

import sys
from typing import Any, Sequence


DEFAULT_PROGRESS_INTERVAL = 30.0  # seconds between plain progress lines in a log


def progress_interval() -> float:
    """Seconds between the plain progress lines written when stderr is not a terminal:
    HPRUNE_PROGRESS_INTERVAL (default 30)."""
    import os

    from hprune.errors import HpruneError

    raw = os.environ.get("HPRUNE_PROGRESS_INTERVAL", "")
    if not raw:
        return DEFAULT_PROGRESS_INTERVAL
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value >= 0 or value == float("inf"):
        raise HpruneError(f"HPRUNE_PROGRESS_INTERVAL must be a number of seconds >= 0, got {raw!r}")
    return value


def _clock(seconds: float) -> str:
    s = int(max(seconds, 0.0) + 0.5)
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class LogProgress:
    """The plain-line twin of a tqdm bar, for logs (nohup, slurm, CI, `| tee`): no redraws, one line
    at the start, one every `interval` seconds of work and one at the end, each with the stage,
    step/total, rate and ETA, e.g.

        [hprune] distilling: 40/200 step (20%), 1.31 step/s, elapsed 0:30, ETA 2:02, loss=0.0012

    It takes the subset of tqdm's interface that hprune uses: iteration, update, set_postfix,
    set_description, close, and use as a context manager."""

    def __init__(self, iterable: Any = None, total: float | None = None, desc: str | None = None,
                 unit: str = "it", initial: float = 0, leave: bool = True, file: Any = None,
                 interval: float | None = None, **_ignored: Any) -> None:
        import time

        if total is None and iterable is not None:
            try:
                total = len(iterable)
            except TypeError:
                total = None
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc or "working", unit
        self.n = self.initial = initial
        self.leave, self._file = leave, file
        self.interval = progress_interval() if interval is None else interval
        self._postfix = ""
        self._t0 = self._last = time.monotonic()
        self._closed = False
        self._emit("start")

    # tqdm's interface --------------------------------------------------------------------------
    def __iter__(self) -> Any:
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return int(self.total or 0)

    def __enter__(self) -> "LogProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        import time

        self.n += n
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._emit()

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None:
        items = dict(ordered_dict or {}, **kwargs)
        self._postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self._postfix = s

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or self.desc

    def refresh(self) -> None:
        pass

    def write(self, s: str) -> None:
        print(s, file=self._file or sys.stderr, flush=True)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._emit("done")

    # the line ----------------------------------------------------------------------------------
    def line(self, state: str = "") -> str:
        """The progress line for the current count (state: "start", "done" or "")."""
        import time

        elapsed = time.monotonic() - self._t0
        done = self.n - self.initial
        unit = self.unit
        parts = [f"{self.n:g}/{self.total:g} {unit}" if self.total else f"{self.n:g} {unit}"]
        if self.total:
            parts[0] += f" ({100.0 * self.n / self.total:.0f}%)"
        if state != "start":
            if done > 0 and elapsed > 0:
                rate = done / elapsed
                parts.append(f"{rate:.3g} {unit}/s" if rate >= 1 else f"{1 / rate:.3g} s/{unit}")
            parts.append(f"elapsed {_clock(elapsed)}")
            if state != "done" and self.total and done > 0:
                parts.append(f"ETA {_clock((self.total - self.n) * elapsed / done)}")
        if self._postfix:
            parts.append(self._postfix)
        head = f"[hprune] {self.desc}" + (" started" if state == "start" else " done" if state == "done" else "")
        return f"{head}: " + ", ".join(parts)

    def _emit(self, state: str = "") -> None:
        print(self.line(state), file=self._file or sys.stderr, flush=True)


def tqdm(*args: Any, **kwargs: Any) -> Any:
    """The progress helper of every long stage; call it like tqdm (iterable and/or total=, desc=,
    unit=, initial=, leave=, disable=).

    On a terminal (stderr is a TTY) it is tqdm.auto.tqdm, a redrawn bar. Otherwise (nohup, slurm,
    CI, `| tee`, a captured run) it is a LogProgress: plain lines on stderr at the start, every
    HPRUNE_PROGRESS_INTERVAL seconds (default 30) and at the end, with step/total, rate and ETA.
    HPRUNE_PROGRESS=1 forces the bar, HPRUNE_PROGRESS=0 silences both; disable=True silences it
    (e.g. on every rank but the first)."""
    import os

    from tqdm.auto import tqdm as _tqdm

    from hprune.env import flag

    mode = os.environ.get("HPRUNE_PROGRESS", "")
    forced = flag("HPRUNE_PROGRESS") if mode.strip() else None  # 1/true: the bar; 0/false: nothing
    if forced is False:
        kwargs["disable"] = True
    if kwargs.get("disable") or forced or sys.stderr.isatty():
        return _tqdm(*args, **kwargs)
    kwargs.pop("disable", None)
    return LogProgress(*args, **kwargs)


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
