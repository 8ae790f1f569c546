"""Helpers shared by the tests."""
from __future__ import annotations

import copy
import functools

import torch
import torch.nn as nn

from hprune.loading import load_model
from hprune.models import get_adapter, sample_inputs

TINY = ["tiny-sd3", "tiny-sd35", "tiny-flux"]


def run(capsys, *argv) -> tuple[int, str, str]:
    """`hprune ARGV...` in this process: (exit code, stdout, stderr)."""
    from hprune.cli import main

    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def one_line_error(code: int, err: str, match: str, alone: bool = False) -> None:
    """The CLI failed with exit 1 and exactly one `hprune: error: ...` line containing `match`, no
    traceback; `alone`: that line is all of stderr (no warning beside it either)."""
    lines = err.strip().splitlines()
    lines = lines if alone else [ln for ln in lines if ln.startswith("hprune:")]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("hprune: error:") and match in lines[0], err
    assert "Traceback" not in err


@functools.lru_cache(maxsize=None)
def _base(name: str) -> nn.Module:
    return load_model(name)


def fresh(name: str) -> nn.Module:
    """A private copy of a built-in tiny model (surgery is in place)."""
    return copy.deepcopy(_base(name))


def inputs(model: nn.Module, seed: int = 0, t: float = 0.6, batch: int = 2) -> dict[str, torch.Tensor]:
    return sample_inputs(model, batch=batch, seed=seed, t=t)


@torch.no_grad()
def out(model: nn.Module, x: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**x, return_dict=False)[0]


def zero_branch_hooks(model: nn.Module, index: int, components: set[str]) -> list:
    """Hooks on the UNPRUNED model that make the given components' branches output zero: the
    oracle for what removal must compute (independent of the surgery code in blocks.py)."""
    from hprune.models.ablation import _hook_targets

    blk = get_adapter(model).get_block(model, index)
    return [mod.register_forward_hook(hook, with_kwargs=kw)
            for c in components for mod, hook, kw in _hook_targets(blk, c)]


def _gloo_worker(rank: int, world: int, port: int, fn, path: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        torch.save(fn(), f"{path}.{rank}")
    finally:
        dist.destroy_process_group()


def on_ranks(fn, world: int, folder) -> list:
    """Runs fn() (a module-level function) on `world` processes of a gloo group; returns each
    rank's result, in rank order. Skips the test where gloo is not available."""
    import socket

    import pytest
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("needs torch.distributed with gloo")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = str(folder / "rank")
    mp.spawn(_gloo_worker, args=(world, port, fn, path), nprocs=world, join=True)
    return [torch.load(f"{path}.{r}") for r in range(world)]
