"""The GPU suite: everything a lent GPU should run, in one command, within a time budget.

    python tools/prebuild_cuda.py                                   # once, here: .prebuilt/cuda/*.o (nvcc 13)
    python -m benchmarks.gpu_suite --budget-min 9 --out gpu-results     # on the GPU machine (carry .prebuilt, .whl)
    python -m benchmarks.gpu_suite --dry-run --out /tmp/gpu-dry          # the same steps on the CPU, tiny

Steps, in order, each a subprocess in its own process group (one failing does not stop the others;
one out of time is killed whole: ninja / nvcc / pytest workers included):
  env        the machine (GPU, capability, SMs, torch / triton / CUDA, cores); installs .whl/ (optional
             peers) into a private folder put on PYTHONPATH
  build      hprune._C and hprune._C_cutlass for this GPU: the .cu objects prebuilt here are linked
             (hprune/kernels/prebuilt.py), only the torch bindings compile; HPRUNE_REQUIRE_EXT=1. On
             sm_90 a build without the CUTLASS module is an error
  tests      the kernel test files only (KERNEL_TEST_FILES, -m gpu), one pytest process per group in
             parallel, CUTLASS in its own; per-test timeout; one JSON line per test written as it goes
             (benchmarks/pytest_lines.py), so a stopped step keeps what ran
  selftest   hprune selftest --json: every kernel against the reference in child processes (in
             parallel); the result is read from stdout alone, or, if stopped, from the verdicts the
             children stored
  bench_w4a16  triton, cuda, cutlass and auto rows with their configuration and the error of the timed
             call's whole output, M in {1, 16, 256, 1024, 4096}, SD3.5 / FLUX shapes; its JSON is
             rewritten after every (shape, M)
  bench_optim  the fused AdamW, fp32 then bf16 parameters, against AdamW(fused=True) and a device copy

Each step runs under a cap (CAP_S); the caps come from compile and build times measured on the
CPU and scaled to the GPU machine's 16 cores (docs/gpu-readiness.md has the arithmetic) and add up
to less than `--budget-min 9`. A step may use the time earlier steps left over, never the time of
the steps after it; a step that no longer fits is skipped, saying so. tests/test_gpu_suite.py
plays the plan with a simulated clock at the measured times.
Results: one JSON per step (6), summary.json (with the table) and logs.tar.gz (every step's full
log): 8 files in --out, what a device run returns at most.
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
BENCH_W4A16_M = "1,16,256,1024,4096"
BENCH_W4A16_SHAPES = "2432x2432,2432x9728,3072x3072,3072x12288"
BENCH_W4A16_BACKENDS = "triton,cuda,cutlass,auto"
STEPS = ("env", "build", "tests", "selftest", "bench_w4a16", "bench_optim")
# Cap of each step, seconds, on the 16-core GPU machine: docs/gpu-readiness.md derives each from
# measured CPU compile / build times (MEASURED_S below, what the simulated-clock test plays).
CAP_S = {"env": 20, "build": 75, "tests": 150, "selftest": 70, "bench_w4a16": 140, "bench_optim": 60}
# Expected seconds per step (docs/gpu-readiness.md, "Budget"), each under its cap.
MEASURED_S = {"env": 8, "build": 60, "tests": 100, "selftest": 50, "bench_w4a16": 110, "bench_optim": 45}
DRY_CAP_S = {"env": 10, "build": 10, "tests": 60, "selftest": 40, "bench_w4a16": 40, "bench_optim": 40}
SUMMARY_RESERVE_S = 10  # kept back for the summary and the log archive
MAX_FILES = 8
KILL_GRACE_S = 3.0
# The kernel test files (-m gpu selects their CUDA tests), one pytest process per group, in
# parallel; the CUTLASS tests alone (a crash there must not take the others' results).
KERNEL_TEST_GROUPS = {
    "w4a16": ["tests/test_w4a16.py"],
    "w4a8": ["tests/test_w4a8.py"],
    "optim_dispatch": ["tests/test_scaled_adamw.py", "tests/test_dispatch.py", "tests/test_selftest.py",
                       "tests/test_sensitivity_adamw.py"],
    "cutlass": ["tests/test_cutlass_w4a16.py"],
}
# pytest-xdist workers per group where it is installed (the GPU image has it): the CUDA tests
# selected by -m gpu were 118 / 37 / 41 / 25 per group (pytest --collect-only, 2026-12-06)
TEST_WORKERS = {"w4a16": 4, "w4a8": 2, "optim_dispatch": 2, "cutlass": 1}
TEST_TIMEOUT_S = 90  # per test: a cold compile of every variant a test launches, with margin


def _tail(text: str, n: int = 4000) -> str:
    return text[-n:] if text else ""


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _kill_group(proc: subprocess.Popen) -> None:
    """Ends the process and everything it started (its own session): SIGTERM, then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except OSError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


@dataclass
class Job:
    """One process of a step: its command, environment and log files."""
    cmd: list[str]
    env: dict[str, str]
    stdout: Path
    stderr: Optional[Path] = None  # None: into stdout
    code: Optional[int] = None


def run_jobs(jobs: list[Job], timeout: float) -> list[int]:
    """Runs the jobs in parallel, each in its own process group, output to its log files as it
    comes; at `timeout` every job still running is killed with its whole group (code 124)."""
    procs = []
    for j in jobs:
        out = open(j.stdout, "w")
        err = open(j.stderr, "w") if j.stderr else subprocess.STDOUT
        procs.append((subprocess.Popen(j.cmd, cwd=ROOT, env=j.env, stdout=out, stderr=err,
                                       start_new_session=True), out, err))
    deadline = time.monotonic() + max(1.0, timeout)
    codes = []
    for p, out, err in procs:
        try:
            codes.append(p.wait(max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            _kill_group(p)
            codes.append(124)
        out.close()
        if err is not subprocess.STDOUT:
            err.close()
    for j, c in zip(jobs, codes):
        j.code = c
    return codes


class Suite:
    """Runs the steps in order under their caps. `clock` and `runner` are injected by the
    simulated-clock test (tests/test_gpu_suite.py); by default, time.monotonic and run_jobs."""

    def __init__(self, out: Path, budget_s: float, dry_run: bool,
                 clock: Callable[[], float] = time.monotonic,
                 runner: Callable[[list[Job], float], list[int]] = run_jobs) -> None:
        self.out = out
        self.budget_s = budget_s
        self.dry = dry_run
        self.clock = clock
        self.runner = runner
        self.start = clock()
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = str(ROOT) + os.pathsep + self.env.get("PYTHONPATH", "")
        self.env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
        self.env["HPRUNE_TRITON_AUTOTUNE"] = "0"  # fixed heuristic configs: no minutes of autotuning
        self.env["PYTHONUNBUFFERED"] = "1"  # logs as they come
        if self.dry:
            self.env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU, even on a GPU machine
        self.steps: list[dict[str, Any]] = []
        self.skipped_from: Optional[str] = None
        self.tmp = Path(tempfile.mkdtemp(prefix="hprune-gpu-suite-"))
        self.logs = self.tmp / "logs"
        self.logs.mkdir()
        self.info: dict[str, Any] = {}

    def caps(self) -> dict[str, float]:
        return DRY_CAP_S if self.dry else CAP_S

    def left(self) -> float:
        return self.budget_s - (self.clock() - self.start)

    def step(self, name: str, fn: Callable[[float], dict[str, Any]]) -> None:
        caps = self.caps()
        cap = caps[name]
        later = list(STEPS)[list(STEPS).index(name) + 1:]
        # a step may use what earlier steps left over, never the caps of the steps after it
        limit = self.left() - SUMMARY_RESERVE_S - sum(caps[s] for s in later)
        if self.skipped_from is None and limit < min(cap, 0.5 * cap + 1):
            self.skipped_from = name
            print(f"[suite] {self.left():.0f} s left: not enough for '{name}' (cap {cap} s) and the steps after "
                  f"it: skipping it and the rest", flush=True)
        if self.skipped_from is not None:
            self.steps.append({"step": name, "status": "skipped", "seconds": 0.0, "cap_s": cap,
                               "note": f"budget: skipped from '{self.skipped_from}' on"})
            self._write_step(self.steps[-1])
            return
        print(f"[suite] step {name} (cap {cap} s, may use {limit:.0f} s, {self.left():.0f} s left)", flush=True)
        t0 = self.clock()
        try:
            rec = fn(limit)
        except Exception as exc:  # noqa: BLE001 - a broken step is a result
            rec = {"status": "error", "note": f"{type(exc).__name__}: {exc}"}
        rec = {"step": name, "seconds": round(self.clock() - t0, 1), "cap_s": cap, **rec}
        self.steps.append(rec)
        self._write_step(rec)
        print(f"[suite] step {name}: {rec['status']} in {rec['seconds']} s", flush=True)

    def _write_step(self, rec: dict[str, Any]) -> None:
        idx = list(STEPS).index(rec["step"]) + 1
        (self.out / f"{idx}-{rec['step']}.json").write_text(json.dumps(rec, indent=1, default=str) + "\n")

    def _job(self, name: str, cmd: list[str], env: Optional[dict[str, str]] = None, split: bool = False) -> Job:
        return Job(cmd, env or self.env, self.logs / f"{name}.log", self.logs / f"{name}.err" if split else None)

    def _run1(self, name: str, cmd: list[str], timeout: float, env: Optional[dict[str, str]] = None,
              split: bool = False) -> tuple[int, str, str]:
        job = self._job(name, cmd, env, split)
        (code,) = self.runner([job], timeout)
        return code, _read(job.stdout), _read(job.stderr) if job.stderr else ""

    @staticmethod
    def _status(code: int, ok: bool = True) -> str:
        return "ok" if code == 0 and ok else ("timeout" if code == 124 else "failed")

    # ---- the steps ------------------------------------------------------------------------------

    def env_step(self, timeout: float) -> dict[str, Any]:
        info: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform(),
                                "cores": os.cpu_count(), "dry_run": self.dry}
        wheels = sorted(glob.glob(str(ROOT / ".whl" / "*.whl")))
        info["wheels"] = [Path(w).name for w in wheels]
        if wheels and not self.dry:
            site = self.tmp / "site"
            code, log, _ = self._run1("env-wheels", [sys.executable, "-m", "pip", "install", "-q", "--no-index",
                                                     "--no-deps", "--no-compile", "--no-cache-dir", "--upgrade",
                                                     "--target", str(site), *wheels], timeout / 2)
            info["wheels_install"] = "ok" if code == 0 else _tail(log, 1500)
            if code == 0:
                self.env["PYTHONPATH"] = self.env["PYTHONPATH"] + os.pathsep + str(site)
        probe = ("import json, torch\n"
                 "from importlib import metadata\n"
                 "d = {'torch': torch.__version__, 'cuda': torch.version.cuda, 'cuda_available': torch.cuda.is_available()}\n"
                 "if d['cuda_available']:\n"
                 "    p = torch.cuda.get_device_properties(0)\n"
                 "    d.update(gpu=p.name, capability=f'{p.major}.{p.minor}', sms=p.multi_processor_count,\n"
                 "             memory_gib=round(p.total_memory / 2**30, 1))\n"
                 "for m in ('triton', 'diffusers', 'bitsandbytes', 'transformers', 'nvidia-cutlass', 'gemlite', 'torchao'):\n"
                 "    try:\n"
                 "        d[m] = metadata.version(m)\n"
                 "    except metadata.PackageNotFoundError:\n"
                 "        d[m] = None\n"
                 "print('PROBE ' + json.dumps(d))\n")
        code, out, err = self._run1("env-probe", [sys.executable, "-c", probe], timeout / 2, split=True)
        found = [ln for ln in out.splitlines() if ln.startswith("PROBE ")]
        if code == 0 and found:
            info.update(json.loads(found[-1][len("PROBE "):]))
        else:
            info["probe_error"] = _tail(out + err, 1500)
        if _which("nvcc"):
            c, log, _ = self._run1("env-nvcc", ["nvcc", "--version"], 10)
            info["nvcc"] = log.strip().splitlines()[-1] if c == 0 and log.strip() else None
        self.info = info
        if not self.dry and not info.get("cuda_available"):
            return {"status": "error", "result": info, "note": "no CUDA device visible: use --dry-run on a CPU"}
        return {"status": "ok" if "probe_error" not in info else "error", "result": info}

    def build_step(self, timeout: float) -> dict[str, Any]:
        check = [sys.executable, "-c", "import json; from hprune._ext import load_extension, build_info; "
                                       "print('BUILD ' + json.dumps(build_info(), default=str))"]
        if self.dry:
            code, out, _ = self._run1("build-check", check, timeout, split=True)
            return {"status": self._status(code, "BUILD " in out), "cmd": "(dry run: the extension loads)",
                    "log_tail": _tail(out, 1500)}
        arch = self.info.get("capability", "9.0")
        arch_list = arch + ("a" if arch == "9.0" else "")  # sm_90a: the wgmma / TMA instructions
        env = dict(self.env, TORCH_CUDA_ARCH_LIST=arch_list, MAX_JOBS=str(os.cpu_count() or 4),
                   HPRUNE_REQUIRE_EXT="1")
        # hprune._C and hprune._C_cutlass side by side, one setup.py each (own build folder); ninja
        # compiles each one's files in parallel: the slowest torch-binding file sets the time
        jobs = []
        for mod in ("hprune._C", "hprune._C_cutlass"):
            tag = mod.split(".")[1].lower()
            cmd = [sys.executable, "setup.py", "build_ext", "--inplace", "--build-temp", f"build/temp-{tag}"]
            jobs.append(self._job(f"build{tag}", cmd, dict(env, HPRUNE_BUILD_ONLY=mod)))
        codes = self.runner(jobs, timeout - 15)
        code = next((c for c in codes if c != 0), 0)
        log = "\n".join(_read(j.stdout) for j in jobs)
        info: dict[str, Any] = {}
        if code == 0:
            c2, out, _ = self._run1("build-check", check, 15, split=True)
            found = [ln for ln in out.splitlines() if ln.startswith("BUILD ")]
            info = json.loads(found[-1][len("BUILD "):]) if c2 == 0 and found else {}
        status = self._status(code, bool(info.get("cuda")))
        note = ""
        if status == "ok" and arch == "9.0" and not info.get("cutlass"):
            status, note = "error", "sm_90 build without the CUTLASS module hprune._C_cutlass"
        prebuilt = [ln for ln in log.splitlines() if "prebuilt" in ln or "compiled from source" in ln]
        return {"status": status, "note": note, "result": info, "prebuilt": prebuilt[-3:],
                "cmd": f"TORCH_CUDA_ARCH_LIST={arch_list} MAX_JOBS={env['MAX_JOBS']} HPRUNE_REQUIRE_EXT=1 "
                       f"HPRUNE_BUILD_ONLY=<module> setup.py build_ext --inplace (two side by side)",
                "log_tail": _tail(log, 3000)}

    def tests_step(self, timeout: float) -> dict[str, Any]:
        jobs, lines = [], {}
        for group, files in KERNEL_TEST_GROUPS.items():
            files = [f for f in files if (ROOT / f).exists()]
            if not files:
                continue
            lines[group] = self.logs / f"tests-{group}.jsonl"
            env = dict(self.env, HPRUNE_TEST_LINES=str(lines[group]), HPRUNE_TEST_TIMEOUT=str(TEST_TIMEOUT_S))
            cmd = [sys.executable, "-m", "pytest", *files, "-m", "gpu", "-q", "-p", "no:cacheprovider",
                   "-p", "benchmarks.pytest_lines"]
            if self.dry:
                cmd.append("--collect-only")
            elif TEST_WORKERS.get(group, 1) > 1 and importlib.util.find_spec("xdist") is not None:
                cmd += ["-n", str(TEST_WORKERS[group])]
            jobs.append((group, self._job(f"tests-{group}", cmd, env)))
        codes = self.runner([j for _, j in jobs], timeout)
        procs = {}
        for (group, job), code in zip(jobs, codes):
            procs[group] = {"files": KERNEL_TEST_GROUPS[group], "code": code,
                            **_test_lines(lines[group]), "log_tail": _tail(_read(job.stdout), 1500)}
        # pytest exits 5 when -m gpu selects nothing in a group (e.g. a CPU-only file): not a failure
        bad = [g for g, p in procs.items() if p["code"] not in (0, 5) or p["failed"]]
        status = "timeout" if any(p["code"] == 124 for p in procs.values()) else ("failed" if bad else "ok")
        totals = {k: sum(p[k] for p in procs.values()) for k in ("passed", "failed", "skipped")}
        return {"status": status, "result": {**totals, "groups": procs},
                "cmd": "pytest <group files> -m gpu -p benchmarks.pytest_lines (one process per group)"}

    def selftest_step(self, timeout: float) -> dict[str, Any]:
        cache = self.tmp / "selftest-cache"
        env = dict(self.env, HPRUNE_CACHE_DIR=str(cache), HPRUNE_SELFTEST_TIMEOUT=str(int(max(10, timeout - 5))))
        cmd = [sys.executable, "-m", "hprune", "selftest", "--json", "--jobs", str(min(12, os.cpu_count() or 1))]
        if self.dry:
            cmd += ["--op", "scaled_adamw_"]  # the fast one: the interpreter is slow
        code, out, err = self._run1("selftest", cmd, timeout, env=env, split=True)
        result = _json_document(out)  # stdout alone: the --json document (stderr may say anything)
        if result is None:  # stopped or crashed: the verdicts its child processes stored so far
            result = {"partial": True, "verdicts": _cached_verdicts(cache)}
        return {"status": self._status(code, "results" in result), "cmd": " ".join(cmd[1:]), "result": result,
                "log_tail": "" if code == 0 else _tail(err, 3000)}

    def _bench(self, script: str, args: list[str], pattern: str, timeout: float, name: str) -> dict[str, Any]:
        out_dir = self.tmp / script
        out_dir.mkdir(exist_ok=True)
        cmd = [sys.executable, f"benchmarks/{script}.py", *args]
        code, log, _ = self._run1(name, cmd, timeout)
        files = sorted(out_dir.glob(pattern))
        try:
            result = json.loads(files[-1].read_text()) if files else None  # rewritten as it goes: partial if cut
        except ValueError:
            result = None
        return {"status": self._status(code, result is not None), "cmd": " ".join(cmd[1:]), "result": result,
                "log_tail": _tail(log, 4000)}

    def bench_w4a16_step(self, timeout: float) -> dict[str, Any]:
        out = str(self.tmp / "bench_w4a16")
        if self.dry:
            args = ["--device", "cpu", "--m", "1,16", "--shapes", "256x256", "--out", out]
        else:
            args = ["--m", BENCH_W4A16_M, "--shapes", BENCH_W4A16_SHAPES, "--backends", BENCH_W4A16_BACKENDS,
                    "--peers", "--out", out]
        return self._bench("bench_w4a16", args, "bench_w4a16-*.json", timeout, "bench_w4a16")

    def bench_optim_step(self, timeout: float) -> dict[str, Any]:
        parts = {}
        deadline = self.clock() + timeout
        for dtype in ("fp32", "bf16"):
            out = str(self.tmp / "bench_optim")
            args = ["--dtype", dtype, "--out-dir", out]
            if self.dry:
                args += ["--device", "cpu", "--blocks", "1", "--frozen-blocks", "0", "--hidden", "64", "--rep", "2",
                         "--rounds", "1"]
            else:
                args += ["--blocks", "4"]
            name = "bench_optim" + ("" if dtype == "fp32" else f"-{dtype}")
            parts[dtype] = self._bench("bench_optim", args, f"{name}-*.json", deadline - self.clock(),
                                       f"bench_optim-{dtype}")
        status = "ok" if all(p["status"] == "ok" for p in parts.values()) else \
            next(p["status"] for p in parts.values() if p["status"] != "ok")
        return {"status": status, "result": {d: p.pop("result") for d, p in parts.items()}, "runs": parts}

    # ---- summary --------------------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        from hprune.report import format_table

        rows = []
        for s in self.steps:
            rows.append({"step": s["step"], "status": s["status"], "seconds": s["seconds"], "cap_s": s["cap_s"],
                         "note": _note(s)})
        title = (f"GPU suite{' (DRY RUN on the CPU, tiny sizes)' if self.dry else ''}: "
                 f"{self.info.get('gpu', 'no GPU')}, budget {self.budget_s:.0f} s, "
                 f"used {self.clock() - self.start:.0f} s")
        table = format_table(rows, ["step", "status", "seconds", "cap_s", "note"], title)
        payload = {"suite": "hprune gpu_suite", "dry_run": self.dry, "budget_s": self.budget_s,
                   "seconds": round(self.clock() - self.start, 1), "steps": rows, "table": table,
                   "skipped_from": self.skipped_from, "caps_s": self.caps()}
        (self.out / "summary.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
        with tarfile.open(self.out / "logs.tar.gz", "w:gz") as tar:  # every full log, one file
            for f in sorted(self.logs.iterdir()):
                tar.add(f, arcname=f"logs/{f.name}")
        print(table, flush=True)
        return payload


def _test_lines(path: Path) -> dict[str, Any]:
    """Counts and failures from a pytest_lines file; `running`: a test that started and never ended
    (the one a timeout or a crash stopped)."""
    started, ended, failed = [], set(), []
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    for ln in _read(path).splitlines():
        try:
            rec = json.loads(ln)
        except ValueError:
            continue
        if rec.get("event") == "start":
            started.append(rec["test"])
        elif rec.get("event") == "end":
            ended.add(rec["test"])
            counts[rec["outcome"]] = counts.get(rec["outcome"], 0) + 1
            if rec["outcome"] == "failed":
                failed.append({"test": rec["test"], "message": rec.get("message", "")[-300:]})
    running = [t for t in started if t not in ended]
    return {**counts, "failures": failed[:30], "running": running[-1:]}


def _json_document(out: str) -> Optional[dict]:
    """The JSON object on stdout: all of it, or from the first line that opens one (a library may
    have printed a line before it)."""
    lines = out.splitlines()
    for i, ln in enumerate(lines):
        if ln.startswith("{"):
            try:
                doc = json.loads("\n".join(lines[i:]))
            except ValueError:
                continue
            return doc if isinstance(doc, dict) else None
    return None


def _cached_verdicts(cache: Path) -> list[dict]:
    out = []
    for f in sorted(cache.glob("selftest-*.json")):
        try:
            out += [{"key": k, "status": v.get("status"), "error": v.get("error", "")}
                    for k, v in json.loads(f.read_text()).get("verdicts", {}).items()]
        except (OSError, ValueError):
            continue
    return out


def _which(name: str) -> bool:
    import shutil

    return shutil.which(name) is not None


def _note(step: dict[str, Any]) -> str:
    r = step.get("result")
    if step["step"] == "tests" and isinstance(r, dict):
        return f"{r['passed']} passed, {r['failed']} failed, {r['skipped']} skipped"
    if step["step"] == "selftest" and isinstance(r, dict):
        if r.get("partial"):
            v = r.get("verdicts", [])
            return f"stopped: {sum(x['status'] == 'ok' for x in v)}/{len(v)} verdicts ok so far"
        res = r.get("results", [])
        return f"{sum(x['result'] == 'ok' for x in res)}/{len(res)} kernels ok on {r.get('device')}"
    if step["step"] == "env" and isinstance(r, dict):
        return f"{r.get('gpu', 'cpu')} sm {r.get('capability', '-')}, torch {r.get('torch')}, triton {r.get('triton')}"
    return step.get("note", "")[:120]


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget-min", type=float, default=9.0, help="wall-clock budget in minutes (default 9)")
    ap.add_argument("--out", required=True, help="folder for the results (at most 8 files)")
    ap.add_argument("--dry-run", action="store_true", help="the same steps on the CPU at tiny sizes (CI)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("[0-9]-*.json"), out / "summary.json", out / "logs.tar.gz"]:
        old.unlink(missing_ok=True)  # only the files this suite writes
    suite = Suite(out, args.budget_min * 60.0, args.dry_run)
    payload = run_plan(suite)
    assert len(list(out.iterdir())) <= MAX_FILES, "more result files than a device run returns"
    return 0 if all(s["status"] in ("ok", "skipped") for s in payload["steps"]) else 1


def run_plan(suite: Suite) -> dict[str, Any]:
    """Every step in order, then the summary (what main runs; the simulated-clock test too)."""
    for name in STEPS:
        suite.step(name, getattr(suite, f"{name}_step"))
    return suite.summary()


if __name__ == "__main__":
    sys.exit(main())
