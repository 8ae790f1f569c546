"""Test setup: Triton runs in interpreter mode when there is no GPU, so every kernel is checked on
the CPU too; tests that need CUDA are marked `gpu` and skipped without one."""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Must be set before triton is first imported (torch does not import it on its own).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# pytest-xdist runs one process per worker: give each its share of the cores. With the default
# (every worker using all cores) the intra-op thread pools oversubscribe the CPU and small ops
# spin-wait on each other: measured 6 min instead of under 1 for tests/test_obs_*.py on 2 cores.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))


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
