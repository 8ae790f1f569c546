"""Shared benchmark plumbing: environment record, timing, the results table and JSON."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def _version(mod: str) -> str | None:
    try:
        m = __import__(mod)
        return getattr(m, "__version__", "unknown")
    except Exception:  # noqa: BLE001
        return None


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.+)", f.read())
            cpu = m.group(1).strip() if m else cpu
    except OSError:
        pass
    return f"CPU: {cpu} ({os.cpu_count()} cores)"


def env_info(device: torch.device | str) -> dict[str, Any]:
    device = torch.device(device)
    info = {
        "device": device_name(device),
        "device_type": device.type,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "diffusers": _version("diffusers"),
        "bitsandbytes": _version("bitsandbytes"),
        "hprune": _version("hprune"),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info["sm"] = f"{p.major}.{p.minor}"
        info["gpu_memory_gib"] = round(p.total_memory / 2**30, 1)
    try:
        from hprune._ext import build_info

        info["hprune_ext"] = build_info()
    except Exception:  # noqa: BLE001
        pass
    return info


def bench(fn: Callable[[], Any], device: torch.device | str, warmup: int = 10, rep: int = 50,
          min_time_s: float = 0.0) -> float:
    """Median milliseconds of `fn()`: CUDA events on a GPU (after warm-up, with an L2 flush left to
    the caller), wall clock on the CPU."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    times: list[float] = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
        end = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
        for i in range(rep):
            start[i].record()
            fn()
            end[i].record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in zip(start, end)]
    else:
        t_end = time.perf_counter() + min_time_s
        i = 0
        while i < rep or time.perf_counter() < t_end:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
            i += 1
    return statistics.median(times)


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], title: str | None = None) -> str:
    """Prints and returns a Markdown table (see hprune.report.format_table)."""
    from hprune.report import format_table

    text = format_table(rows, columns, title)
    print(text, flush=True)
    return text


def results_path(name: str, device: torch.device | str, out_dir: str | os.PathLike | None = None) -> Path:
    """benchmarks/results/<name>-<device>.json (or under `out_dir`)."""
    out = Path(out_dir) if out_dir else RESULTS
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device_name(device)).strip("-").lower()[:40]
    return out / f"{name}-{slug}.json"


def write_results(name: str, payload: dict[str, Any], device: torch.device | str,
                  out_dir: str | os.PathLike | None = None, quiet: bool = False) -> Path:
    """Writes benchmarks/results/<name>-<device>.json atomically; returns the path."""
    path = results_path(name, device, out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    if not quiet:
        print(f"wrote {path}", flush=True)
    return path
