"""benchmarks/gpu_suite.py: the dry run goes through every step on the CPU at tiny sizes (what CI
can check of the suite a GPU will run), writes at most 8 files (one JSON per step and the summary),
and a budget too small for a step skips it and the rest, saying so."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["env", "build", "tests", "selftest", "bench_w4a16", "bench_optim"]


def _suite(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu_suite", "--out", str(tmp_path), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_dry_run_runs_every_step_on_the_cpu(tmp_path):
    res = _suite(tmp_path, "--dry-run", "--budget-min", "8")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) <= 8 and "summary.json" in files and "summary.md" in files
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["dry_run"] and [s["step"] for s in summary["steps"]] == STEPS
    assert all(s["status"] == "ok" and s["seconds"] > 0 for s in summary["steps"]), summary["table"]
    steps = {json.loads(p.read_text())["step"]: json.loads(p.read_text()) for p in tmp_path.glob("[0-9]-*.json")}
    assert set(steps) == set(STEPS)
    assert steps["env"]["result"]["cuda_available"] is False
    assert "gpu" in steps["tests"]["cmd"] and "selected" in steps["tests"]["result"]["collected"]
    assert all(r["result"] == "ok" for r in steps["selftest"]["result"]["results"])
    assert steps["bench_w4a16"]["result"]["rows"] and steps["bench_w4a16"]["result"]["ms"] == [1, 16]
    assert set(steps["bench_optim"]["result"]) == {"fp32", "bf16"}
    assert "| step" in (tmp_path / "summary.md").read_text()


def test_budget_too_small_skips_the_rest_and_says_so(tmp_path):
    res = _suite(tmp_path, "--dry-run", "--budget-min", "0.2")
    assert "skipping it and the rest" in res.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["skipped_from"] == "env"
    assert [s["status"] for s in summary["steps"]] == ["skipped"] * len(STEPS)
