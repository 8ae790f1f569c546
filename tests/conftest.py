"""Test setup: Triton runs in interpreter mode when there is no GPU, so every kernel is checked on
the CPU too; tests that need CUDA are marked `gpu` and skipped without one."""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
# Each xdist worker gets its share of the cores: oversubscribed OpenMP threads spin and make the
# small CPU matmuls of the tiny models ~10x slower.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, (os.cpu_count() or 1) // _workers))
if not HAS_CUDA:
    # Must be set before triton is first imported (torch does not import it on its own).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _devices():
    return ["cpu", "cuda"] if HAS_CUDA else ["cpu"]


@pytest.fixture(params=_devices())
def device(request):
    """Each test using it runs on the CPU, and on the GPU as well when one is present."""
    return torch.device(request.param)
