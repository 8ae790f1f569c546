"""torch.distributed plumbing: the same code runs on one process or on N under `torchrun`.

Under torchrun (WORLD_SIZE > 1) `setup()` joins the process group (NCCL on GPUs, gloo on the
CPU); the student is sharded with FSDP2 (`fully_shard` per block, then the root), the teacher is
replicated (it only runs under no_grad)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn as nn


def local_device(device: torch.device | str) -> torch.device:
    """The device this process should use: a bare "cuda" under torchrun means this process's GPU,
    cuda:LOCAL_RANK (otherwise every rank would load onto GPU 0)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def setup(device: torch.device | str = "cpu") -> tuple[int, int]:
    """Joins the process group when launched by torchrun; returns (rank, world_size)."""
    from hprune.env import world_size as env_world_size

    world = env_world_size()  # HpruneError for WORLD_SIZE=abc, or WORLD_SIZE=2 without torchrun
    if world > 1 and dist.is_available() and not dist.is_initialized():
        device = local_device(device)
        if device.type == "cuda":  # before the process group, so NCCL binds this rank's GPU
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank(), world_size()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def barrier() -> None:
    if active():
        dist.barrier()


def mean(value: torch.Tensor) -> torch.Tensor:
    """Average of a tensor over the ranks (itself on one process)."""
    return total(value) / world_size()


def total(value: torch.Tensor) -> torch.Tensor:
    """Sum of a tensor over the ranks (itself on one process)."""
    return total_(value.detach().clone()) if active() else value


def total_(value: torch.Tensor) -> torch.Tensor:
    """In place: `value` becomes its sum over the ranks (no copy: for large buffers)."""
    if active():
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def shard(model: nn.Module, device: torch.device | str = "cpu") -> nn.Module:
    """FSDP2: each block that still has parameters is its own unit, then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from hprune.models import get_adapter

    mesh = init_device_mesh(torch.device(device).type, (world_size(),))
    ad = get_adapter(model)
    for i in range(ad.num_blocks(model)):
        blk = ad.get_block(model, i)
        if any(True for _ in blk.parameters()):
            fully_shard(blk, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard, or the tensor itself."""
    return t._local_tensor if hasattr(t, "_local_tensor") else t


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict (collective under FSDP: every rank must call it)."""
    out = {}
    for k, v in model.state_dict().items():
        v = v.full_tensor() if hasattr(v, "full_tensor") else v
        out[k] = v.detach().cpu().clone()
    return out
