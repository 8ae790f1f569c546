"""benchmarks/gpu_suite.py: the dry run goes through every step on the CPU at tiny sizes (what CI
can check of the suite a GPU will run), writes at most 8 files (one JSON per step, the summary and
one log archive), and a budget too small for a step skips it and the rest, saying so. The plan,
played with a simulated clock at the measured step times (docs/gpu-readiness.md), finishes every
step within --budget-min 9, and a step cut at its cap keeps its partial results; a step out of
time has its whole process group killed; bench_w4a16 rewrites its JSON after every (shape, M)."""
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
    assert len(files) <= 8 and "summary.json" in files and "logs.tar.gz" in files
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["dry_run"] and [s["step"] for s in summary["steps"]] == STEPS
    assert all(s["status"] == "ok" and s["seconds"] > 0 for s in summary["steps"]), summary["table"]
    steps = {json.loads(p.read_text())["step"]: json.loads(p.read_text()) for p in tmp_path.glob("[0-9]-*.json")}
    assert set(steps) == set(STEPS)
    assert steps["env"]["result"]["cuda_available"] is False
    assert "gpu" in steps["tests"]["cmd"] and "cutlass" in steps["tests"]["result"]["groups"]
    assert all(r["result"] == "ok" for r in steps["selftest"]["result"]["results"])
    assert steps["bench_w4a16"]["result"]["rows"] and steps["bench_w4a16"]["result"]["ms"] == [1, 16]
    assert set(steps["bench_optim"]["result"]) == {"fp32", "bf16"}
    assert "| step" in summary["table"]
    import tarfile

    with tarfile.open(tmp_path / "logs.tar.gz") as tar:
        names = tar.getnames()
    assert "logs/selftest.log" in names and any(n.startswith("logs/tests-") for n in names)


def test_budget_too_small_skips_the_rest_and_says_so(tmp_path):
    res = _suite(tmp_path, "--dry-run", "--budget-min", "0.2")
    assert "skipping it and the rest" in res.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["skipped_from"] == "env"
    assert [s["status"] for s in summary["steps"]] == ["skipped"] * len(STEPS)


# ---- the plan with a simulated clock ------------------------------------------------------------

from benchmarks import gpu_suite as G  # noqa: E402


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _arg(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def fake_runner(clock: FakeClock, seconds: dict[str, float], cutlass: bool = True):
    """Plays each step's processes: a job takes seconds[step] (split evenly over its units of
    work: tests, (shape, M) rows, self-test verdicts), writes its output as the real one does, and
    at the timeout is cut (code 124) with only the units it finished written."""

    def runner(jobs: list[G.Job], timeout: float) -> list[int]:
        spent = 0.0
        codes = []
        for job in jobs:
            name = job.stdout.name.rsplit(".", 1)[0]
            step = "build" if name.startswith("build") else name.split("-")[0]
            total = {"env": seconds["env"] if name == "env-probe" else 0.0,
                     "build": seconds["build"] if name.startswith("build_c") else 0.0,
                     "tests": seconds["tests"], "selftest": seconds["selftest"],
                     "bench_w4a16": seconds["bench_w4a16"], "bench_optim": seconds["bench_optim"] / 2}[step]
            units = 10
            done = units if total <= timeout else int(units * timeout / total)
            cut = total > timeout
            out = ""
            if name == "env-probe":
                out = 'PROBE {"cuda_available": true, "capability": "9.0", "gpu": "H100 (simulated)"}'
            elif name == "env-nvcc":
                out = "Cuda compilation tools, release 13.0, V13.0.88"
            elif name.startswith("build_c"):
                out = "hprune: CUDA kernels of hprune._C: prebuilt main objects (9.0a, nvcc 13.0)"
            elif name == "build-check":
                out = 'BUILD {"cuda": true, "cutlass": %s}' % ("true" if cutlass else "false")
            elif step == "tests":
                with open(job.env["HPRUNE_TEST_LINES"], "w") as f:
                    for i in range(done + (1 if cut else 0)):
                        f.write(json.dumps({"event": "start", "test": f"{name}::t{i}"}) + "\n")
                        if i < done:
                            f.write(json.dumps({"event": "end", "test": f"{name}::t{i}", "outcome": "passed"}) + "\n")
            elif step == "selftest":
                cache = Path(job.env["HPRUNE_CACHE_DIR"])
                cache.mkdir(parents=True, exist_ok=True)
                verdicts = {f"op|b{i}|sm_90|bfloat16|": {"status": "ok"} for i in range(done)}
                (cache / "selftest-x.json").write_text(json.dumps({"verdicts": verdicts}))
                if not cut:
                    out = json.dumps({"device": "H100", "results": [{"result": "ok"}] * done})
            elif step in ("bench_w4a16", "bench_optim"):
                folder = Path(_arg(job.cmd, "--out" if step == "bench_w4a16" else "--out-dir"))
                folder.mkdir(parents=True, exist_ok=True)
                if step == "bench_w4a16":
                    rows = [{"M": i, "method": "hprune auto", "config": "cutlass: 128x128x64"} for i in range(done)]
                    (folder / "bench_w4a16-cuda.json").write_text(json.dumps({"rows": rows, "complete": not cut}))
                elif not cut:
                    dtype = _arg(job.cmd, "--dtype")
                    stem = "bench_optim" + ("" if dtype == "fp32" else f"-{dtype}")
                    (folder / f"{stem}-cuda.json").write_text(json.dumps({"dtype": dtype}))
            job.stdout.write_text(out + "\n")
            if job.stderr:
                job.stderr.write_text("")
            spent = max(spent, min(total, timeout))  # the jobs of one call run side by side
            codes.append(124 if cut else 0)
        clock.t += spent
        return codes

    return runner


def _play(tmp_path: Path, seconds: dict[str, float], budget_min: float = 9.0, cutlass: bool = True):
    clock = FakeClock()
    suite = G.Suite(tmp_path, budget_min * 60, dry_run=False, clock=clock,
                    runner=fake_runner(clock, seconds, cutlass))
    payload = G.run_plan(suite)
    return payload, {s["step"]: s for s in suite.steps}, clock.t - 1000.0


def test_the_caps_fit_the_budget_and_cover_the_measured_times():
    assert sum(G.CAP_S.values()) + G.SUMMARY_RESERVE_S <= 9 * 60
    assert all(G.MEASURED_S[s] <= G.CAP_S[s] for s in G.STEPS)


def test_at_the_measured_times_every_step_finishes_within_nine_minutes(tmp_path):
    payload, steps, used = _play(tmp_path, G.MEASURED_S)
    assert [s["status"] for s in payload["steps"]] == ["ok"] * len(G.STEPS), payload["table"]
    assert used <= 9 * 60 - G.SUMMARY_RESERVE_S
    assert all(steps[s]["seconds"] <= G.CAP_S[s] for s in G.STEPS)
    assert len(list(tmp_path.iterdir())) <= G.MAX_FILES


def test_a_step_cut_at_its_cap_keeps_its_partial_results_and_the_rest_still_runs(tmp_path):
    slow = dict(G.MEASURED_S, tests=10 * G.CAP_S["tests"], bench_w4a16=10 * G.CAP_S["bench_w4a16"])
    payload, steps, used = _play(tmp_path, slow)
    assert used <= 9 * 60 - G.SUMMARY_RESERVE_S
    assert steps["tests"]["status"] == "timeout" and steps["bench_w4a16"]["status"] == "timeout"
    tests = steps["tests"]["result"]
    assert 0 < tests["passed"] < 10 * len(G.KERNEL_TEST_GROUPS)  # the tests that finished, counted
    assert all(g["running"] for g in tests["groups"].values())  # and the one each process was in
    bench = steps["bench_w4a16"]["result"]
    assert bench and bench["rows"] and not bench["complete"]  # the (shape, M) rows measured so far
    assert steps["selftest"]["status"] == "ok" and steps["bench_optim"]["status"] == "ok"  # later steps ran
    # cut at its cap plus what the steps before it left over, never into the caps of the steps after it
    after = sum(G.CAP_S[s] for s in G.STEPS[G.STEPS.index("tests") + 1:])
    assert G.CAP_S["tests"] <= steps["tests"]["seconds"] <= 9 * 60 - G.SUMMARY_RESERVE_S - after


def test_a_selftest_cut_short_reports_the_verdicts_its_children_stored(tmp_path):
    payload, steps, _ = _play(tmp_path, dict(G.MEASURED_S, selftest=5 * G.CAP_S["selftest"]))
    res = steps["selftest"]["result"]
    assert steps["selftest"]["status"] == "timeout" and res["partial"] and res["verdicts"]


def test_an_sm90_build_without_the_cutlass_module_is_an_error(tmp_path):
    _, steps, _ = _play(tmp_path, G.MEASURED_S, cutlass=False)
    assert steps["build"]["status"] == "error" and "CUTLASS" in steps["build"]["note"]


def test_a_step_out_of_time_has_its_whole_process_group_killed(tmp_path):
    """A child that started a grandchild (as setup.py starts ninja and nvcc): both end at the cap."""
    pidfile = tmp_path / "grandchild.pid"
    script = (f"import subprocess, time; p = subprocess.Popen(['sleep', '300']); "
              f"open({str(pidfile)!r}, 'w').write(str(p.pid)); time.sleep(300)")
    job = G.Job([sys.executable, "-c", script], dict(os.environ), tmp_path / "job.log")
    import time

    start = time.monotonic()
    assert G.run_jobs([job], 3.0) == [124]
    assert time.monotonic() - start < 30
    pid = int(pidfile.read_text())
    time.sleep(0.5)
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            alive = f.read().split()[2] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        alive = False
    assert not alive, "the grandchild outlived the step"


def test_bench_w4a16_writes_its_json_after_every_shape_and_m(tmp_path, monkeypatch):
    from benchmarks import bench_w4a16 as B

    snapshots = []
    real = B.write_results

    def spy(name, payload, device, out_dir=None, quiet=False):
        snapshots.append((len(payload["rows"]), payload["complete"]))
        return real(name, payload, device, out_dir, quiet)

    monkeypatch.setattr(B, "write_results", spy)
    assert B.main(["--device", "cpu", "--shapes", "64x128,128x64", "--m", "1,3", "--w4a8-backends", "",
                   "--out", str(tmp_path)]) == 0
    assert [c for _, c in snapshots] == [False] * 4 + [True]  # after each (shape, M), then the end
    assert [n for n, _ in snapshots] == sorted(n for n, _ in snapshots) and snapshots[0][0] > 0
    data = json.loads(next(tmp_path.glob("bench_w4a16-*.json")).read_text())
    ref = [r for r in data["rows"] if r["method"] == "hprune reference"]
    assert ref and all(r["config"] == "reference" and r["max_rel_err"] == 0 for r in ref)


def test_the_per_test_lines_survive_a_hung_test(tmp_path):
    """benchmarks/pytest_lines.py: a line per test as it starts and ends; a test past the per-test
    timeout ends the process, and its start line without an end names it."""
    (tmp_path / "test_toy.py").write_text(
        "import time, pytest\n"
        "def test_a(): pass\n"
        "def test_b(): assert 1 == 2\n"
        "@pytest.mark.skip(reason='no')\n"
        "def test_c(): pass\n"
        "def test_d(): time.sleep(600)\n"
        "def test_e(): pass\n")
    lines = tmp_path / "lines.jsonl"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HPRUNE_TEST_LINES=str(lines), HPRUNE_TEST_TIMEOUT="5")
    res = subprocess.run([sys.executable, "-m", "pytest", str(tmp_path / "test_toy.py"), "-q", "-p", "no:cacheprovider",
                          "-p", "benchmarks.pytest_lines"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode != 0
    summary = G._test_lines(lines)
    assert (summary["passed"], summary["failed"], summary["skipped"]) == (1, 1, 1)
    assert summary["running"] and summary["running"][0].endswith("test_d")
    assert "assert 1 == 2" in summary["failures"][0]["message"]
