"""Peak host memory of one piece of work, measured from /proc (Linux).

Method: the kernel's high-water mark of the process's resident set (VmHWM in /proc/self/status),
reset just before the work by writing "5" to /proc/self/clear_refs; the peak is VmHWM minus the
resident set at the reset. The kernel updates the mark on every page it maps, so short spikes
between two samples are not missed (unlike polling); torch's CPU allocator hands big blocks back
to the OS, so memory freed before the peak does not count twice. It counts touched pages only
(an allocated but untouched tensor costs nothing, as for the OS). Used by tests/test_memory_plan.py
(in a fresh process each) and benchmarks/bench_scale.py (which samples RssAnon of a child instead).
"""
from __future__ import annotations

from typing import Any, Callable


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{key} not in /proc/self/status")


def peak_during(fn: Callable[[], Any]) -> tuple[int, Any]:
    """(peak resident bytes above the start, fn's result) of fn() in this process."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    base = _status("VmRSS")
    out = fn()
    return _status("VmHWM") - base, out


def anon_peak_during(fn: Callable[[], Any], interval: float = 0.0005) -> tuple[int, Any]:
    """(peak anonymous resident bytes above the start, fn's result) of fn() in this process:
    RssAnon (/proc/self/status) polled by a thread every `interval` seconds. Unlike peak_during it
    leaves out file pages: weights memory-mapped from safetensors or an hprune spill file that fn
    reads count there, not here. A spike shorter than the interval (or than a stretch of Python
    code holding the GIL, ~5 ms) can be missed: for peaks made of tensors that live a while."""
    import threading
    import time

    base = _status("RssAnon")
    peak = [base]
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _status("RssAnon"))
            time.sleep(interval)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    try:
        out = fn()
    finally:
        done.set()
        th.join()
    peak[0] = max(peak[0], _status("RssAnon"))
    return peak[0] - base, out
