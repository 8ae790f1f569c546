"""How many CPU threads torch uses, chosen on purpose.

torch's default (one thread per physical core) is right on an idle machine and very wrong on a
busy one: its OpenMP threads spin while they wait for each other, so when other processes hold
the cores, 2 threads can be ten times slower than 1. The CLI therefore picks, in order:

1. `--threads N` (hprune's global option; also HPRUNE_THREADS=N),
2. OMP_NUM_THREADS, when set (torch reads it too; hprune only reports it),
3. otherwise the CPUs this process may use (affinity mask and cgroup quota), less the load the
   machine already carries (the 1-minute load average), and at least 1; under torchrun the
   result is shared among the processes of the node (LOCAL_WORLD_SIZE).

`hprune info` prints the choice and why.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

from hprune.errors import HpruneError


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    reason: str

    def describe(self) -> str:
        return f"CPU threads: {self.threads} ({self.reason})"


def usable_cpus() -> int:
    """CPUs this process may run on: the affinity mask, capped by a cgroup v2 CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def _positive(raw: str, what: str) -> int:
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise HpruneError(f"{what} must be a whole number of threads >= 1, got {raw!r}")
    return n


def choose_threads(requested: int | None = None) -> ThreadChoice:
    """The thread count for this process, and the rule that gave it (see the module docstring).
    HpruneError for a non-positive request."""
    if requested is not None:
        return ThreadChoice(_positive(str(requested), "--threads"), "--threads")
    if os.environ.get("HPRUNE_THREADS"):
        return ThreadChoice(_positive(os.environ["HPRUNE_THREADS"], "HPRUNE_THREADS"), "HPRUNE_THREADS")
    if os.environ.get("OMP_NUM_THREADS"):
        return ThreadChoice(_positive(os.environ["OMP_NUM_THREADS"], "OMP_NUM_THREADS"), "OMP_NUM_THREADS")
    cpus = usable_cpus()
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = 0.0
    procs = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    free = max(1, int(cpus - load + 0.5))
    n = max(1, free // procs)
    why = f"default: {cpus} usable CPU(s), load {load:.1f}"
    if procs > 1:
        why += f", {procs} processes on this node"
    return ThreadChoice(n, why + "; set --threads or OMP_NUM_THREADS to choose")


def apply_threads(requested: int | None = None) -> ThreadChoice:
    """Chooses the thread count and gives it to torch (intra-op threads)."""
    import torch

    choice = choose_threads(requested)
    torch.set_num_threads(choice.threads)
    global _APPLIED
    _APPLIED = choice
    return choice


_APPLIED: ThreadChoice | None = None


def current() -> ThreadChoice:
    """What this process uses: the CLI's choice, or torch's own default when nothing chose."""
    import torch

    if _APPLIED is not None and torch.get_num_threads() == _APPLIED.threads:
        return _APPLIED
    return ThreadChoice(torch.get_num_threads(), "torch's default")
