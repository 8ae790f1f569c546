"""The GPU suite: everything a lent GPU should run, in one command, within a time budget.

    ../shared/tools/device-wheels.sh nvidia-cutlass==4.2.0.0   # once, here: wheels the GPU machine lacks -> .whl/
    python -m benchmarks.gpu_suite --budget-min 9 --out gpu-results     # on the GPU machine
    python -m benchmarks.gpu_suite --dry-run --out /tmp/gpu-dry          # the same steps on the CPU, tiny

Steps, in order, each timed and each a subprocess (one failing does not stop the others):
  env        the machine (GPU, capability, SMs, torch / triton / CUDA, cores); installs .whl/ into
             a private folder put on PYTHONPATH (see device-wheels.sh)
  build      hprune._C for this GPU's arch only: TORCH_CUDA_ARCH_LIST from the device, MAX_JOBS =
             cores, HPRUNE_REQUIRE_EXT=1 (a failed build is an error, not silently skipped kernels)
  tests      pytest -m gpu: the tests marked gpu and the CUDA variants of the device-parametrised ones
  selftest   hprune selftest: every kernel against the reference on this GPU (table)
  bench_w4a16  heuristic Triton configs (no autotuning), M in {1, 16, 256, 1024, 4096}, SD3.5
             (2432x2432, 2432x9728) and FLUX (3072x3072, 3072x12288) shapes; bf16 cuBLAS,
             bitsandbytes NF4 and the peers whose wheels were carried (gemlite, torchao)
  bench_optim  the fused AdamW, fp32 then bf16 parameters, against AdamW(fused=True) and a device copy

Before each step the suite compares the time left with the step's expected time (EXPECTED_S) and
skips the rest, saying so, when it does not fit; a running step is stopped when it would eat into
the expected time of the steps after it (or the budget ends).
Results: one JSON per step (6) and a summary (JSON with the table, and the table in Markdown):
8 files in --out, what a device run returns at most. --dry-run runs the same steps on the CPU at tiny sizes
(the build step only checks that the extension loads; the tests step collects the GPU selection
without running it): tests/test_gpu_suite.py runs it in CI.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
BENCH_W4A16_M = "1,16,256,1024,4096"
BENCH_W4A16_SHAPES = "2432x2432,2432x9728,3072x3072,3072x12288"
# Expected seconds of each step on an H200 (16 cores): estimates, not measurements (no GPU has run
# this suite yet); the suite prints the measured ones and README states them once measured.
EXPECTED_S = {"env": 15, "build": 150, "tests": 150, "selftest": 30, "bench_w4a16": 120, "bench_optim": 80}
DRY_EXPECTED_S = {"env": 5, "build": 5, "tests": 15, "selftest": 15, "bench_w4a16": 20, "bench_optim": 20}
SUMMARY_RESERVE_S = 10  # kept back for writing the summary
MAX_FILES = 8


def _tail(text: str, n: int = 4000) -> str:
    return text[-n:] if text else ""


def _run(cmd: list[str], env: dict[str, str], timeout: float) -> tuple[int, str, float]:
    """(return code, stdout+stderr, seconds); 124 when the timeout stopped it."""
    start = time.perf_counter()
    try:
        res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(1.0, timeout))
        return res.returncode, res.stdout + res.stderr, time.perf_counter() - start
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err = (exc.stderr or b"").decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        return 124, out + err + f"\n[stopped: the budget ran out after {timeout:.0f} s]", time.perf_counter() - start


class Suite:
    def __init__(self, out: Path, budget_s: float, dry_run: bool) -> None:
        self.out = out
        self.budget_s = budget_s
        self.dry = dry_run
        self.start = time.perf_counter()
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = str(ROOT) + os.pathsep + self.env.get("PYTHONPATH", "")
        self.env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
        self.env["HPRUNE_TRITON_AUTOTUNE"] = "0"  # fixed heuristic configs: no minutes of autotuning
        if self.dry:
            self.env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU, even on a GPU machine
        self.steps: list[dict[str, Any]] = []
        self.skipped_from: Optional[str] = None
        self.tmp = Path(tempfile.mkdtemp(prefix="hprune-gpu-suite-"))

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)

    def step(self, name: str, fn: Callable[[float], dict[str, Any]]) -> None:
        table = DRY_EXPECTED_S if self.dry else EXPECTED_S
        expected = table[name]
        later = list(table)[list(table).index(name) + 1:]
        # a step may overrun its estimate only into the slack: the later steps keep their estimates
        limit = max(float(expected), self.left() - SUMMARY_RESERVE_S - sum(table[s] for s in later))
        if self.skipped_from is None and self.left() - SUMMARY_RESERVE_S < expected:
            self.skipped_from = name
            print(f"[suite] {self.left():.0f} s left < {expected} s expected for '{name}': skipping it and the "
                  f"rest", flush=True)
        if self.skipped_from is not None:
            self.steps.append({"step": name, "status": "skipped", "seconds": 0.0, "expected_s": expected,
                               "note": f"budget: skipped from '{self.skipped_from}' on"})
            return
        print(f"[suite] step {name} (expected ~{expected} s, {self.left():.0f} s left)", flush=True)
        t0 = time.perf_counter()
        try:
            rec = fn(min(limit, self.left() - SUMMARY_RESERVE_S))
        except Exception as exc:  # noqa: BLE001 - a broken step is a result
            rec = {"status": "error", "note": f"{type(exc).__name__}: {exc}"}
        rec = {"step": name, "seconds": round(time.perf_counter() - t0, 1), "expected_s": expected, **rec}
        self.steps.append(rec)
        idx = len(self.steps)
        (self.out / f"{idx}-{name}.json").write_text(json.dumps(rec, indent=1, default=str) + "\n")
        print(f"[suite] step {name}: {rec['status']} in {rec['seconds']} s", flush=True)

    # ---- the steps ------------------------------------------------------------------------------

    def env_step(self, timeout: float) -> dict[str, Any]:
        import torch

        info: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform(),
                                "cores": os.cpu_count(), "torch": torch.__version__, "cuda": torch.version.cuda,
                                "dry_run": self.dry}
        wheels = sorted(glob.glob(str(ROOT / ".whl" / "*.whl")))
        info["wheels"] = [Path(w).name for w in wheels]
        if wheels and not self.dry:
            site = self.tmp / "site"
            code, log, _ = _run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                 "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(site), *wheels],
                                self.env, timeout)
            info["wheels_install"] = "ok" if code == 0 else _tail(log, 1500)
            if code == 0:
                self.env["PYTHONPATH"] = self.env["PYTHONPATH"] + os.pathsep + str(site)
        probe = ("import json, torch\n"
                 "from importlib import metadata\n"
                 "d = {'cuda_available': torch.cuda.is_available()}\n"
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
        code, log, _ = _run([sys.executable, "-c", probe], self.env, timeout)
        found = [ln for ln in log.splitlines() if ln.startswith("PROBE ")]
        if code == 0 and found:
            info.update(json.loads(found[-1][len("PROBE "):]))
        else:
            info["probe_error"] = _tail(log, 1500)
        probe_ok = "probe_error" not in info
        code, log, _ = _run(["nvcc", "--version"], self.env, timeout) if _which("nvcc") else (1, "no nvcc", 0)
        info["nvcc"] = log.strip().splitlines()[-1] if code == 0 else None
        self.info = info
        ok = probe_ok
        if not self.dry and not info.get("cuda_available"):
            return {"status": "error", "result": info, "note": "no CUDA device visible: use --dry-run on a CPU"}
        return {"status": "ok" if ok else "error", "result": info}

    def build_step(self, timeout: float) -> dict[str, Any]:
        if self.dry:
            cmd = [sys.executable, "-c", "from hprune._ext import load_extension, build_info; "
                                         "print(build_info()); assert load_extension() is not None"]
            code, log, _ = _run(cmd, self.env, timeout)
            return {"status": "ok" if code == 0 else "error", "cmd": "(dry run: the extension loads)",
                    "log_tail": _tail(log, 1500)}
        arch = self.info.get("capability", "9.0")
        arch_list = arch + ("a" if arch == "9.0" else "")  # sm_90a: the wgmma / TMA instructions
        env = dict(self.env, TORCH_CUDA_ARCH_LIST=arch_list, MAX_JOBS=str(os.cpu_count() or 4),
                   HPRUNE_REQUIRE_EXT="1")
        cmd = [sys.executable, "setup.py", "build_ext", "--inplace"]
        code, log, _ = _run(cmd, env, timeout)
        if code == 0:
            c2, info, _ = _run([sys.executable, "-c", "from hprune._ext import build_info; print(build_info())"],
                               self.env, 60)
            log += "\n" + info
        return {"status": "ok" if code == 0 else ("timeout" if code == 124 else "error"),
                "cmd": f"TORCH_CUDA_ARCH_LIST={arch_list} MAX_JOBS={env['MAX_JOBS']} HPRUNE_REQUIRE_EXT=1 "
                       + " ".join(cmd[1:]), "log_tail": _tail(log, 3000)}

    def tests_step(self, timeout: float) -> dict[str, Any]:
        junit = self.tmp / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "tests", "-m", "gpu", "-q", "-p", "no:cacheprovider",
               f"--junitxml={junit}"]
        if self.dry:
            cmd = [sys.executable, "-m", "pytest", "tests", "-m", "gpu", "-q", "--collect-only", "-p",
                   "no:cacheprovider"]
        code, log, _ = _run(cmd, self.env, timeout)
        res: dict[str, Any] = {"cmd": " ".join(cmd[1:]), "log_tail": _tail(log, 5000)}
        if junit.exists():
            res["result"] = _junit_summary(junit)
        elif self.dry:
            last = [ln for ln in log.strip().splitlines() if "collected" in ln or "selected" in ln]
            res["result"] = {"collected": last[-1] if last else None}
        ok = code == 0 or (self.dry and code in (0, 5))
        return {"status": "ok" if ok else ("timeout" if code == 124 else "failed"), **res}

    def selftest_step(self, timeout: float) -> dict[str, Any]:
        cmd = [sys.executable, "-m", "hprune", "selftest", "--json"]
        if self.dry:
            cmd += ["--op", "scaled_adamw_"]  # the fast one: the interpreter is slow
        code, log, _ = _run(cmd, self.env, timeout)
        try:
            result = json.loads(log[log.index("{"):log.rindex("}") + 1])
        except ValueError:
            result = None
        return {"status": "ok" if code == 0 else ("timeout" if code == 124 else "failed"),
                "cmd": " ".join(cmd[1:]), "result": result, "log_tail": "" if code == 0 else _tail(log, 3000)}

    def _bench(self, script: str, args: list[str], pattern: str, timeout: float) -> dict[str, Any]:
        out_dir = self.tmp / script
        out_dir.mkdir(exist_ok=True)
        cmd = [sys.executable, f"benchmarks/{script}.py", *args]
        code, log, _ = _run(cmd, self.env, timeout)
        files = sorted(out_dir.glob(pattern))
        result = json.loads(files[-1].read_text()) if files else None
        return {"status": "ok" if code == 0 and result else ("timeout" if code == 124 else "failed"),
                "cmd": " ".join(cmd[1:]), "result": result, "log_tail": _tail(log, 6000)}

    def bench_w4a16_step(self, timeout: float) -> dict[str, Any]:
        out = str(self.tmp / "bench_w4a16")
        if self.dry:
            args = ["--device", "cpu", "--m", "1,16", "--shapes", "256x256", "--out", out]
        else:
            args = ["--m", BENCH_W4A16_M, "--shapes", BENCH_W4A16_SHAPES, "--backends", "triton,cuda", "--peers",
                    "--out", out]
        return self._bench("bench_w4a16", args, "bench_w4a16-*.json", timeout)

    def bench_optim_step(self, timeout: float) -> dict[str, Any]:
        parts = {}
        deadline = time.perf_counter() + timeout
        for dtype in ("fp32", "bf16"):
            out = str(self.tmp / "bench_optim")
            args = ["--dtype", dtype, "--out-dir", out]
            if self.dry:
                args += ["--device", "cpu", "--blocks", "1", "--frozen-blocks", "0", "--hidden", "64", "--rep", "2",
                         "--rounds", "1"]
            else:
                args += ["--blocks", "4"]
            name = "bench_optim" + ("" if dtype == "fp32" else f"-{dtype}")
            parts[dtype] = self._bench("bench_optim", args, f"{name}-*.json", deadline - time.perf_counter())
        status = "ok" if all(p["status"] == "ok" for p in parts.values()) else \
            next(p["status"] for p in parts.values() if p["status"] != "ok")
        return {"status": status, "result": {d: p.pop("result") for d, p in parts.items()}, "runs": parts}

    # ---- summary --------------------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        from hprune.report import format_table

        rows = []
        for s in self.steps:
            rows.append({"step": s["step"], "status": s["status"], "seconds": s["seconds"],
                         "expected_s": s["expected_s"], "note": _note(s)})
        title = (f"GPU suite{' (DRY RUN on the CPU, tiny sizes)' if self.dry else ''}: "
                 f"{getattr(self, 'info', {}).get('gpu', 'no GPU')}, budget {self.budget_s:.0f} s, "
                 f"used {time.perf_counter() - self.start:.0f} s")
        table = format_table(rows, ["step", "status", "seconds", "expected_s", "note"], title)
        payload = {"suite": "hprune gpu_suite", "dry_run": self.dry, "budget_s": self.budget_s,
                   "seconds": round(time.perf_counter() - self.start, 1), "steps": rows, "table": table,
                   "skipped_from": self.skipped_from}
        (self.out / "summary.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
        (self.out / "summary.md").write_text(table + "\n")
        print(table, flush=True)
        return payload


def _which(name: str) -> bool:
    import shutil

    return shutil.which(name) is not None


def _junit_summary(path: Path) -> dict[str, Any]:
    import xml.etree.ElementTree as ET

    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    res: dict[str, Any] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = []
    for case in suite.iter("testcase"):
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            failed.append({"test": f"{case.get('classname')}::{case.get('name')}",
                           "message": (bad.get("message") or "")[:300]})
    res["failed"] = failed[:50]
    return res


def _note(step: dict[str, Any]) -> str:
    r = step.get("result")
    if step["step"] == "tests" and isinstance(r, dict):
        if "tests" in r:
            return f"{r['tests']} tests, {r['failures']} failed, {r['errors']} errors, {r['skipped']} skipped"
        return str(r.get("collected") or "")
    if step["step"] == "selftest" and isinstance(r, dict):
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
    for old in [*out.glob("*.json"), out / "summary.md"]:
        old.unlink(missing_ok=True)
    suite = Suite(out, args.budget_min * 60.0, args.dry_run)
    suite.step("env", suite.env_step)
    suite.step("build", suite.build_step)
    suite.step("tests", suite.tests_step)
    suite.step("selftest", suite.selftest_step)
    suite.step("bench_w4a16", suite.bench_w4a16_step)
    suite.step("bench_optim", suite.bench_optim_step)
    payload = suite.summary()
    assert len(list(out.iterdir())) <= MAX_FILES, "more result files than a device run returns"
    return 0 if all(s["status"] in ("ok", "skipped") for s in payload["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())
