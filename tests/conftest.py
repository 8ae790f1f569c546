"""Test setup: Triton runs in interpreter mode when there is no GPU, so every kernel is checked on
the CPU too; tests that need CUDA are marked `gpu` and skipped without one (the CUDA variants of
tests taking the `device` fixture too): `pytest -m gpu` selects everything that runs on a GPU."""
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


# The CUDA variant carries the `gpu` mark, so `pytest -m gpu` (the GPU suite) selects it along
# with the tests marked gpu, and a machine without CUDA skips it like those.
@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request):
    """Each test using it runs on the CPU, and on the GPU as well (skipped where there is none)."""
    return torch.device(request.param)
