"""SensitivityAdamW on FSDP2-sharded parameters: a 2-process gloo run (CPU) equals the 1-process run.

FSDP2 (`torch.distributed.fsdp.fully_shard`) turns every parameter into a DTensor sharded on
dim 0; the optimizer updates each rank's local shard and keeps its moments as DTensors with the
same placement. Both ranks train on the same batch, so the averaged gradient equals the
single-process gradient exactly and any difference would come from the sharded step (the model
is sized so some ranks hold uneven or empty shards). Tolerance 1e-6 relative, 1e-7 absolute.
"""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hprune.kernels import dispatch
from hprune.kernels import scaled_adamw as sa
from hprune.optim import SensitivityAdamW

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

# 9 and 5 rows over 2 ranks: uneven shards; the last layer's single row leaves rank 1 empty.
SCALES = {"0.weight": 1.0, "0.bias": 0.5, "2.weight": 0.0, "2.bias": 0.25, "4.weight": 0.75, "4.bias": 1.0}
FROZEN = "2.weight"
STEPS = 6


def build() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 9), torch.nn.Tanh(), torch.nn.Linear(9, 5), torch.nn.Tanh(),
                               torch.nn.Linear(5, 1))


def train(model: torch.nn.Module, backend: str) -> SensitivityAdamW:
    opt = SensitivityAdamW(model.named_parameters(), lr=1e-2, weight_decay=0.05, scales=SCALES, backend=backend)
    for t in range(STEPS):
        g = torch.Generator().manual_seed(100 + t)
        x, y = torch.randn(16, 12, generator=g), torch.randn(16, 1, generator=g)
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
    return opt


def _worker(rank: int, world: int, port: int, out_dir: str, backends: list) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor

        mesh = init_device_mesh("cpu", (world,))
        results = {}
        for backend in backends:
            model = build()
            for layer in model:
                if isinstance(layer, torch.nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            opt = train(model, backend)
            params = dict(model.named_parameters())
            results[backend] = {
                "params": {n: p.full_tensor().detach().clone() for n, p in params.items()},
                "all_dtensor": all(isinstance(p, DTensor) for p in params.values()),
                "local_numel": {n: p.to_local().numel() for n, p in params.items()},
                "states_dtensor": all(isinstance(opt.state[p][k], DTensor) for n, p in params.items()
                                      if n != FROZEN for k in ("exp_avg", "exp_avg_sq")),
                "frozen_state": len(opt.state[params[FROZEN]]),
                "steps": {n: opt.state[p]["step"].item() for n, p in params.items() if n != FROZEN},
            }
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp2_two_processes_equal_one_process(tmp_path):
    backends = dispatch.available(sa.OP, "cpu")  # reference, cpp if built, triton under the interpreter
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), backends), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    init = dict(build().named_parameters())
    for backend in backends:
        single = build()
        train(single, backend)
        for r, res in enumerate(ranks):
            res = res[backend]
            assert res["all_dtensor"] and res["states_dtensor"], "FSDP2 did not shard the parameters"
            assert res["frozen_state"] == 0
            assert all(s == STEPS for s in res["steps"].values())
            for name, p in single.named_parameters():
                torch.testing.assert_close(res["params"][name], p.detach(), rtol=1e-6, atol=1e-7,
                                           msg=lambda m: f"{backend}, rank {r}, {name}: {m}")
            assert torch.equal(res["params"][FROZEN], init[FROZEN].detach())
        assert ranks[0][backend]["local_numel"]["4.weight"] == 5
        assert ranks[1][backend]["local_numel"]["4.weight"] == 0  # an empty shard takes part too
