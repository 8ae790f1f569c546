"""Crash isolation of the self-test (issue 26, item 2): each (op, backend) is checked in a child
process with a timeout; a kernel that kills that process (abort, segfault), hangs or exits without
an answer is disabled with one warning and the next backend runs, while this process goes on;
verdicts are cached on disk per environment (a second process does not re-run the child); and
`hprune selftest` prints the table from the same child checks.

The fake backends (tests/selftest_fakes.py) are registered at import through the public
`dispatch.register`, so the child, which imports the module of the backend it checks, has them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

import selftest_fakes as fakes
from hprune.kernels import dispatch, verdicts

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    monkeypatch.setenv("HPRUNE_SELFTEST", "1")
    monkeypatch.setenv("HPRUNE_SELFTEST_ISOLATE", "1")
    monkeypatch.setenv("HPRUNE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HPRUNE_SELFTEST_TIMEOUT", "60")
    dispatch.reset_checks()
    yield
    dispatch.reset_checks()


@pytest.mark.parametrize("op, why", [(fakes.OP_CRASH, "crashed its process (SIGABRT)"),
                                     (fakes.OP_SEGV, "crashed its process (SIGSEGV)"),
                                     (fakes.OP_EXIT, "exited with code 3 and no answer")])
def test_a_kernel_that_kills_its_process_is_disabled_and_the_next_backend_runs(op, why):
    pid = os.getpid()
    with pytest.warns(RuntimeWarning) as rec:
        assert dispatch.select(op, "cpu", dtype=torch.float32).name == "cpp"
    msgs = [str(w.message) for w in rec if "self-test" in str(w.message)]
    assert len(msgs) == 1 and "'cuda'" in msgs[0] and why in msgs[0]
    assert os.getpid() == pid  # still here
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, no second child
        assert dispatch.select(op, "cpu", dtype=torch.float32).name == "cpp"
    assert torch.ones(2).sum().item() == 2  # this process computes on


def test_a_hanging_kernel_is_stopped_at_the_timeout_and_disabled(monkeypatch):
    # the right backend checked first under the generous timeout (a child's start alone can take
    # seconds on a busy machine), then the short one for the hanging kernel
    assert dispatch.select(fakes.OP_HANG, "cpu", backend="cpp", dtype=torch.float32).name == "cpp"
    monkeypatch.setenv("HPRUNE_SELFTEST_TIMEOUT", "8")
    start = time.monotonic()
    with pytest.warns(RuntimeWarning, match="hung: no answer within 8 s"):
        assert dispatch.select(fakes.OP_HANG, "cpu", dtype=torch.float32).name == "cpp"
    assert time.monotonic() - start < 60  # not the hour it sleeps


def test_verdicts_are_cached_on_disk_per_environment(tmp_path, monkeypatch):
    with pytest.warns(RuntimeWarning):
        dispatch.select(fakes.OP_CRASH, "cpu", dtype=torch.float32)
    env = verdicts.environment(torch.device("cpu"))
    cached = verdicts.load(env)
    keys = {k.split("|")[1]: v["status"] for k, v in cached.items() if k.startswith(fakes.OP_CRASH)}
    assert keys == {"cuda": "FAIL", "cpp": "ok"}
    assert set(env) == {"gpu", "capability", "driver", "torch", "triton", "hprune", "extensions"}
    # a fresh process state: the verdicts come from the disk, no child runs
    dispatch.reset_checks()
    monkeypatch.setattr(verdicts, "run_child", lambda *a, **k: pytest.fail("ran a child despite the cache"))
    with pytest.warns(RuntimeWarning, match="crashed its process"):
        assert dispatch.select(fakes.OP_CRASH, "cpu", dtype=torch.float32).name == "cpp"
    # another environment (e.g. a new driver or torch) does not see them
    other = dict(env, torch="0.0")
    assert verdicts.load(other) == {}
    files = list((tmp_path / "cache").iterdir())
    assert len(files) == 1 and not [f for f in files if f.name.startswith(".")]  # atomic: no temp left
    json.loads(files[0].read_text())


def test_isolation_is_on_for_cuda_by_default_and_an_env_var_turns_it_off(monkeypatch):
    monkeypatch.delenv("HPRUNE_SELFTEST_ISOLATE")
    assert verdicts.isolation_on(torch.device("cuda")) and not verdicts.isolation_on(torch.device("cpu"))
    monkeypatch.setenv("HPRUNE_SELFTEST_ISOLATE", "0")
    assert not verdicts.isolation_on(torch.device("cuda"))
    monkeypatch.setenv("HPRUNE_SELFTEST_ISOLATE", "1")
    assert verdicts.isolation_on(torch.device("cpu"))
    from hprune.errors import HpruneError

    monkeypatch.setenv("HPRUNE_SELFTEST_ISOLATE", "maybe")
    with pytest.raises(HpruneError, match="HPRUNE_SELFTEST_ISOLATE='maybe'"):
        verdicts.isolation_on(torch.device("cuda"))
    for bad in ("abc", "0", "-5", "inf"):
        monkeypatch.setenv("HPRUNE_SELFTEST_TIMEOUT", bad)
        with pytest.raises(HpruneError, match="HPRUNE_SELFTEST_TIMEOUT"):
            verdicts.timeout_s()


def test_the_child_gets_cuda_launch_blocking_and_answers_on_stdout_alone(monkeypatch):
    seen = {}
    real = subprocess.Popen

    def spy(cmd, **kw):
        seen["env"], seen["cmd"] = kw["env"], cmd
        return real(cmd, **kw)

    monkeypatch.setattr(subprocess, "Popen", spy)
    (res,) = dispatch.run_selftest_isolated(fakes.OP_CRASH, "cpp", "cpu", [torch.float32])
    assert res.status == "ok" and res.max_error == 0
    assert seen["env"]["CUDA_LAUNCH_BLOCKING"] == "1" and seen["cmd"][1:3] == ["-m", "hprune.kernels.selftest"]


def test_cli_selftest_prints_the_child_checks_and_fails(tmp_path):
    """`hprune selftest` in a fresh process, isolation on: the crashing fake is a FAIL row, the
    exit code is non-zero, and the JSON result is read from stdout alone."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
               HPRUNE_SELFTEST_ISOLATE="1", HPRUNE_CACHE_DIR=str(tmp_path), OMP_NUM_THREADS="1")
    code = ("import sys, selftest_fakes; from hprune.cli import main; "
            f"sys.exit(main(['selftest', '--device', 'cpu', '--op', '{fakes.OP_SEGV}', '--json']))")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stderr[-2000:]
    rep = json.loads(res.stdout)
    rows = {r["backend"]: r for r in rep["results"]}
    assert rows["cuda"]["result"] == "FAIL" and "SIGSEGV" in rows["cuda"]["error"]
    assert rows["cpp"]["result"] == "ok"
