"""The dispatch point: automatic choice by device, and forcing a backend (argument, context,
environment) with clear errors when the forced backend cannot run."""
import pytest
import torch

from hprune.errors import BackendUnavailableError
from hprune.kernels import dispatch


@pytest.fixture
def toy():
    op = "toy_op_for_tests"
    dispatch.register(op, "reference")(lambda: "reference")
    dispatch.register(op, "cpp", supports=lambda d: d.type == "cpu")(lambda: "cpp")
    dispatch.register(op, "cuda", supports=lambda d: d.type == "cuda",
                      why_not=lambda d: f"cuda backend needs a GPU tensor, got {d}")(lambda: "cuda")
    yield op
    dispatch._REGISTRY.pop(op)


def test_automatic_choice_follows_preference(toy):
    assert dispatch.select(toy, "cpu").name == "cpp"
    assert dispatch.backends(toy) == ["cuda", "cpp", "reference"]
    assert dispatch.available(toy, "cpu") == ["cpp", "reference"]


def test_forcing_by_argument_context_and_env(toy, monkeypatch):
    assert dispatch.select(toy, "cpu", backend="reference").name == "reference"
    with dispatch.use_backend("reference"):
        assert dispatch.select(toy, "cpu").name == "reference"
    monkeypatch.setenv("HPRUNE_BACKEND_TOY_OP_FOR_TESTS", "reference")
    assert dispatch.select(toy, "cpu").name == "reference"
    # the argument beats the environment
    assert dispatch.select(toy, "cpu", backend="cpp").name == "cpp"


def test_forced_backend_that_cannot_run_raises(toy, monkeypatch):
    with pytest.raises(BackendUnavailableError, match="needs a GPU tensor"):
        dispatch.select(toy, "cpu", backend="cuda")
    with pytest.raises(BackendUnavailableError, match="has no 'triton' backend"):
        dispatch.select(toy, "cpu", backend="triton")
    with pytest.raises(BackendUnavailableError, match="unknown backend 'fast'"):
        dispatch.select(toy, "cpu", backend="fast")
    # a global preference only applies to ops that have the backend
    monkeypatch.setenv("HPRUNE_BACKEND", "triton")
    assert dispatch.select(toy, "cpu").name == "cpp"


def test_triton_on_cpu_only_in_interpreter_mode(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.triton_supports(cpu) == dispatch.triton_importable()
    assert not dispatch.triton_auto(cpu)  # never chosen automatically on the CPU (too slow)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not dispatch.triton_supports(cpu)
    assert "TRITON_INTERPRET" in dispatch.triton_why_not(cpu) or "not installed" in dispatch.triton_why_not(cpu)
