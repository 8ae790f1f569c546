"""Self-test verdicts checked in a child process and kept on disk (issue 26).

A kernel that makes an illegal memory access leaves the CUDA context dead (a sticky error: every
later kernel of the process fails), and one that hangs never returns. So the self-test of an
(op, backend, dtype) runs in a fresh Python process (`python -m hprune.kernels.selftest --child`: a new
interpreter, never a fork of one that initialised CUDA) with a timeout and CUDA_LAUNCH_BLOCKING=1;
its verdicts come back as one JSON line on its stdout (stdout alone is read: warnings and
compiler chatter go to stderr). A crash (signal, non-zero exit), a hang (timeout: the child's whole
process group is killed) or unreadable output is a failure of that kernel.

Verdicts are cached in `cache_dir()` (HPRUNE_CACHE_DIR, else $XDG_CACHE_HOME/hprune, else
~/.cache/hprune), one JSON file per environment: GPU name, compute capability, driver, torch,
triton, hprune version and the compiled extensions' identity (a rebuilt extension is re-checked).
Writes are atomic (temp + rename; concurrent writers merge what they read).

Nothing here imports the dispatch point (it imports this module): the child is started by module
name and answers in plain JSON.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Optional

import torch

from hprune._version import __version__
from hprune.env import flag
from hprune.errors import HpruneError
from hprune.io import write_json

CHILD_MODULE = "hprune.kernels.selftest"
RESULT_MARK = "HPRUNE-SELFTEST-RESULT "
DEFAULT_TIMEOUT_S = 600.0  # cold Triton compiles of every configuration of one op on a GPU
_lock = threading.Lock()


def _flag(name: str) -> Optional[bool]:
    """The project's boolean flag (hprune.env.flag), with unset or empty kept apart as None: that
    picks the per-device default."""
    return flag(name) if os.environ.get(name, "").strip() else None


def isolation_on(device: torch.device) -> bool:
    """Run the first-call check in a child process? HPRUNE_SELFTEST_ISOLATE=0 turns it off (the
    check then runs in the user's process), =1 on for every device; unset: on for CUDA devices."""
    mode = _flag("HPRUNE_SELFTEST_ISOLATE")
    return mode if mode is not None else device.type == "cuda"


def timeout_s() -> float:
    """Seconds a child check may take (HPRUNE_SELFTEST_TIMEOUT, default DEFAULT_TIMEOUT_S)."""
    raw = os.environ.get("HPRUNE_SELFTEST_TIMEOUT", "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not value > 0 or math.isinf(value):
        raise HpruneError(f"HPRUNE_SELFTEST_TIMEOUT={raw!r}: expected a number of seconds > 0")
    return value


def cache_dir() -> Path:
    if os.environ.get("HPRUNE_CACHE_DIR"):
        return Path(os.environ["HPRUNE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hprune"


def _driver() -> str:
    try:  # Linux: the kernel module's version line ("... Kernel Module  580.159.04 ...")
        return Path("/proc/driver/nvidia/version").read_text().split("\n")[0].strip()
    except OSError:
        return "none"


def _extension_identity() -> str:
    ids = []
    pkg = Path(__file__).resolve().parents[1]
    for pattern in ("_C*.so", "_C*.pyd"):
        for f in sorted(pkg.glob(pattern)):
            st = f.stat()
            ids.append(f"{f.name}:{st.st_size}:{int(st.st_mtime)}")
    return ",".join(ids) or "none"


def environment(device: torch.device) -> dict[str, str]:
    """What a verdict holds for: the GPU, its driver and the software that compiled the kernels."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - missing or broken install
        triton_version = "none"
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        cap = torch.cuda.get_device_capability(idx)
        gpu, capability = torch.cuda.get_device_name(idx), f"sm_{cap[0]}{cap[1]}"
    else:
        gpu, capability = device.type, "-"
    return {"gpu": gpu, "capability": capability, "driver": _driver() if device.type == "cuda" else "-",
            "torch": torch.__version__, "triton": triton_version, "hprune": __version__,
            "extensions": _extension_identity()}


def _cache_file(env: dict[str, str]) -> Path:
    digest = hashlib.sha256(json.dumps(env, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / f"selftest-{digest}.json"


def load(env: dict[str, str]) -> dict[str, dict]:
    """The cached verdicts for this environment: {verdict key: result fields}; {} if none/unreadable."""
    try:
        data = json.loads(_cache_file(env).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("environment") != env or not isinstance(data.get("verdicts"), dict):
        return {}
    return data["verdicts"]


def store(env: dict[str, str], verdicts: dict[str, dict]) -> None:
    """Adds `verdicts` to the cache of this environment (read, merge, atomic replace). A cache that
    cannot be written only costs a re-check in the next process."""
    with _lock:
        merged = load(env)
        merged.update(verdicts)
        try:
            write_json(_cache_file(env), {"environment": env, "verdicts": merged})
        except Exception:  # noqa: BLE001 - read-only home, full disk: the check still holds here
            pass


def run_child(request: dict[str, Any], timeout: Optional[float] = None) -> tuple[Optional[dict], str]:
    """Runs the self-test `request` (op, backend, device, dtypes, specs, modules) in a child
    process. Returns (answer, "") or (None, why it gave none: crashed / hung / no answer)."""
    timeout = timeout_s() if timeout is None else timeout
    env = dict(os.environ)
    env["CUDA_LAUNCH_BLOCKING"] = "1"  # the faulting launch reports itself, not a later one
    env["HPRUNE_SELFTEST_ISOLATE"] = "0"  # the child checks in its own process
    env["PYTHONPATH"] = os.pathsep.join(p for p in [*sys.path, env.get("PYTHONPATH", "")] if p)
    cmd = [sys.executable, "-m", CHILD_MODULE, "--child", json.dumps(request)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)  # its own process group: a hang is killed whole
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        proc.communicate()
        return None, f"the check hung: no answer within {timeout:g} s (its process was killed)"
    for line in reversed(out.splitlines()):
        if line.startswith(RESULT_MARK):
            try:
                return json.loads(line[len(RESULT_MARK):]), ""
            except ValueError:
                break
    tail = " | ".join(err.strip().splitlines()[-3:])[-300:]
    if proc.returncode < 0:
        try:
            sig = signal.Signals(-proc.returncode).name
        except ValueError:
            sig = str(-proc.returncode)
        return None, f"the check crashed its process ({sig})" + (f": {tail}" if tail else "")
    return None, f"the check's process exited with code {proc.returncode} and no answer" + (
        f": {tail}" if tail else "")


__all__ = ["isolation_on", "timeout_s", "cache_dir", "environment", "load", "store", "run_child", "RESULT_MARK"]
