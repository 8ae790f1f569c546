"""hprune's environment variables: one parser for the boolean flags, one list of the known names
(a typo such as HPRUNE_BAKEND gets a warning naming the closest known one) and the torchrun
variables checked before any work."""
from __future__ import annotations

import difflib
import os
import warnings

from hprune.errors import HpruneError

# Every HPRUNE_* variable hprune reads (HPRUNE_BACKEND_<OP> for each op too); add new ones here.
KNOWN = ("HPRUNE_BACKEND", "HPRUNE_CUTLASS_INCLUDE", "HPRUNE_NO_EXT", "HPRUNE_PROGRESS", "HPRUNE_PROGRESS_INTERVAL",
         "HPRUNE_SELFTEST", "HPRUNE_SELFTEST_ISOLATE", "HPRUNE_SELFTEST_TIMEOUT", "HPRUNE_CACHE_DIR",
         "HPRUNE_TRITON_AUTOTUNE", "HPRUNE_THREADS",
         # build-time switches (setup.py, the GPU suite), often left set in a shell
         "HPRUNE_NO_CUDA", "HPRUNE_NO_CUTLASS", "HPRUNE_REQUIRE_EXT", "HPRUNE_BUILD_ONLY",
         "HPRUNE_TEST_LINES", "HPRUNE_TEST_TIMEOUT")
KNOWN_PREFIXES = ("HPRUNE_BACKEND_",)
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}


def flag(name: str, default: bool = False) -> bool:
    """A boolean environment flag: 1 / true / yes / on, or 0 / false / no / off / empty (any case);
    `default` when unset. HpruneError names the variable for anything else."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    v = raw.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise HpruneError(f"{name}={raw!r}: expected 1/true/yes/on or 0/false/no/off")


def unknown_variables(environ: dict[str, str] | None = None) -> list[tuple[str, str | None]]:
    """[(unknown HPRUNE_* name, closest known name or None)] in `environ` (default os.environ)."""
    environ = os.environ if environ is None else environ
    out = []
    for name in sorted(environ):
        if not name.startswith("HPRUNE_") or name in KNOWN or name.startswith(KNOWN_PREFIXES):
            continue
        close = difflib.get_close_matches(name, KNOWN, n=1, cutoff=0.6)
        out.append((name, close[0] if close else None))
    return out


def warn_unknown_variables() -> None:
    """One warning per unknown HPRUNE_* variable, naming the closest known one."""
    for name, close in unknown_variables():
        hint = f" (did you mean {close}?)" if close else f" (known: {', '.join(KNOWN)})"
        warnings.warn(f"{name} is not an hprune setting and is ignored{hint}", UserWarning, stacklevel=2)


def world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when unset); HpruneError when it is not a positive integer,
    or when it is above 1 without the rest of torchrun's variables (RANK, MASTER_ADDR, MASTER_PORT)."""
    raw = os.environ.get("WORLD_SIZE")
    if raw is None:
        return 1
    try:
        world = int(raw)
    except ValueError:
        world = 0
    if world < 1:
        raise HpruneError(f"WORLD_SIZE={raw!r}: expected a positive integer (the number of processes torchrun "
                          f"starts); unset it for one process")
    if world > 1:
        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise HpruneError(f"WORLD_SIZE={world} without {', '.join(missing)}: start the processes with "
                              f"`torchrun --nproc-per-node {world} -m hprune ...`, or unset WORLD_SIZE")
        rank = os.environ["RANK"]
        if not rank.isdigit() or int(rank) >= world:
            raise HpruneError(f"RANK={rank!r}: expected an integer in [0, {world})")
    return world


def check_environment() -> None:
    """What the CLI checks before any command: the torchrun variables and the HPRUNE_* flags."""
    world_size()
    for name in ("HPRUNE_NO_EXT", "HPRUNE_PROGRESS", "HPRUNE_TRITON_AUTOTUNE"):
        flag(name)
    selftest = os.environ.get("HPRUNE_SELFTEST")
    if selftest is not None:
        flag("HPRUNE_SELFTEST")
    warn_unknown_variables()
