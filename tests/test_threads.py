"""CPU threads are chosen on purpose: --threads, then OMP_NUM_THREADS, then the usable CPUs less
the machine's load; `hprune info` says what is used."""
import os

import pytest
import torch

from hprune.cli import main
from hprune.errors import HpruneError
from hprune.threads import choose_threads, usable_cpus


@pytest.fixture(autouse=True)
def keep_torch_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_order_of_the_rules(monkeypatch):
    monkeypatch.delenv("HPRUNE_THREADS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert choose_threads(5).threads == 5 and choose_threads(5).reason == "--threads"
    assert (choose_threads().threads, choose_threads().reason) == (3, "OMP_NUM_THREADS")
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert choose_threads().threads == usable_cpus()  # idle: every usable CPU
    monkeypatch.setattr(os, "getloadavg", lambda: (1000.0, 0.0, 0.0))
    assert choose_threads().threads == 1  # busy: never oversubscribe, never below 1
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(2 * usable_cpus()))
    assert choose_threads().threads == 1  # torchrun: the node's CPUs are shared among its processes


@pytest.mark.parametrize("bad", ["0", "-2", "many"])
def test_bad_counts_are_refused(monkeypatch, bad):
    monkeypatch.setenv("OMP_NUM_THREADS", bad)
    with pytest.raises(HpruneError, match="OMP_NUM_THREADS"):
        choose_threads()
    with pytest.raises(HpruneError, match="--threads"):
        choose_threads(int(bad) if bad.lstrip("-").isdigit() else 0)


def test_cli_option_sets_torch_and_info_reports_it(capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert main(["--threads", "3", "info", "tiny-sd3"]) == 0
    assert torch.get_num_threads() == 3
    assert "CPU threads: 3 (--threads)" in capsys.readouterr().out
    assert main(["info", "tiny-sd3", "--threads", "2"]) == 0  # after the command too
    assert "CPU threads: 2 (--threads)" in capsys.readouterr().out
    assert main(["info", "tiny-sd3"]) == 0
    assert torch.get_num_threads() == 1
    assert "CPU threads: 1 (OMP_NUM_THREADS)" in capsys.readouterr().out
    assert main(["--threads", "0", "info", "tiny-sd3"]) == 1
    assert "--threads must be a whole number" in capsys.readouterr().err
