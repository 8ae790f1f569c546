"""Property-based sweep (issue 24): edited recipes (hprune.json) through load_compressed and
`hprune info`, and the CLI's numeric flags, give a one-line HpruneError or succeed: never another
exception, never a hang. Derandomized (the same examples on every run) with a per-example alarm,
on the tiny models, so it stays a few seconds per property."""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from hprune.cli import main  # noqa: E402
from hprune.errors import HpruneError  # noqa: E402

SECONDS = 60  # per example: far above what any example takes; only a hang reaches it
SWEEP = settings(max_examples=25, derandomize=True, deadline=None, database=None,
                 suppress_health_check=list(HealthCheck))


class Hang(Exception):
    pass


@contextlib.contextmanager
def alarm(seconds: int = SECONDS):
    def fire(*_):
        raise Hang(f"no answer in {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def one_line(exc: BaseException) -> bool:
    return isinstance(exc, HpruneError) and "\n" not in str(exc) and bool(str(exc))


# -- the recipe --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A tiny-flux artifact with a prune and a quantize step in its recipe."""
    from hprune.artifacts import save_compressed
    from hprune.models import PrunePlan, apply_plan
    from hprune.quant import quantize_model
    from util import fresh

    model = fresh("tiny-flux")
    apply_plan(model, PrunePlan.from_dict({"model": "tiny-flux", "entries": [{"block": 1, "component": "block"}]}))
    quantize_model(model, group_size=32, fmt="int4")
    return save_compressed(model, tmp_path_factory.mktemp("fuzz") / "art")


ODD = st.one_of(
    st.none(), st.booleans(), st.sampled_from([0, -1, 1, 3, 10**5, 10**9, 2**63, -2**63]),
    st.integers(-2**70, 2**70), st.sampled_from([math.nan, math.inf, -math.inf, 1e30, -0.0, 0.5]),
    st.sampled_from(["", "abc", "\x00", "../x", "int4", "nf4", "block"]),
    st.lists(st.integers(-5, 10**6), max_size=4), st.dictionaries(st.sampled_from(["a", "op", "fmt"]),
                                                                    st.integers(), max_size=2),
    st.just("<delete>"))


def _paths(doc, prefix=()):
    """Every path to a value in the JSON document (dict keys and list indices)."""
    out = [prefix] if prefix else []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc[:6]):
            out += _paths(v, prefix + (i,))
    return out


def _mutate(doc, path, value):
    doc = json.loads(json.dumps(doc))
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    if value == "<delete>":
        if isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent.pop(path[-1])
    else:
        parent[path[-1]] = value
    return doc


def _edited(artifact, tmp_path_factory, path, value):
    doc = json.loads((artifact / "hprune.json").read_text())
    where = tmp_path_factory.mktemp("edit") / "art"
    where.mkdir()
    os.link(artifact / "model.safetensors", where / "model.safetensors")
    text = json.dumps(_mutate(doc, path, value), allow_nan=True)
    (where / "hprune.json").write_text(text)
    return where


TALLY: dict[str, int] = {"clean error": 0, "loaded": 0}


@given(data=st.data())
@SWEEP
def test_an_edited_recipe_loads_or_is_one_line(artifact, tmp_path_factory, data):
    from hprune.artifacts import load_compressed

    doc = json.loads((artifact / "hprune.json").read_text())
    paths = [p for p in _paths(doc) if p[0] in ("class_name", "base_config", "recipe", "weights", "format")]
    path = data.draw(st.sampled_from(paths), label="path")
    value = data.draw(ODD, label="value")
    where = _edited(artifact, tmp_path_factory, path, value)
    try:
        with alarm():
            load_compressed(where)
        TALLY["loaded"] += 1
    except HpruneError as exc:
        assert one_line(exc), repr(exc)
        TALLY["clean error"] += 1
    finally:
        shutil.rmtree(where.parent, ignore_errors=True)


@given(data=st.data())
@settings(SWEEP, max_examples=10)
def test_info_on_an_edited_recipe_is_one_line(artifact, tmp_path_factory, capsys, data):
    doc = json.loads((artifact / "hprune.json").read_text())
    path = data.draw(st.sampled_from([p for p in _paths(doc) if p[0] in ("base_config", "recipe")]), label="path")
    value = data.draw(ODD, label="value")
    where = _edited(artifact, tmp_path_factory, path, value)
    try:
        with alarm():
            code = main(["info", str(where)])
        err = capsys.readouterr().err
        lines = [ln for ln in err.strip().splitlines() if ln.startswith("hprune:")]
        assert code == 0 or (code == 1 and len(lines) == 1 and "Traceback" not in err), err
    finally:
        shutil.rmtree(where.parent, ignore_errors=True)


# -- the CLI's numeric flags ----------------------------------------------------------------------------------
def _small_or_wild(small_lo: int, small_hi: int):
    """Valid values kept small (fast), plus anything far outside: the bounds are what is swept."""
    return st.one_of(st.none(), st.integers(small_lo, small_hi), st.integers(-2**80, 2**80),
                     st.sampled_from([0, -1, 2**31, 2**63, 10**23]))


def _run_cli(capsys, argv):
    try:
        with alarm():
            code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse: a value that is not a number; its own one-line usage error
        code = 2 if exc.code else 0
    cap = capsys.readouterr()
    lines = [ln for ln in cap.err.strip().splitlines() if ln.startswith("hprune")]
    assert "Traceback" not in cap.err, cap.err
    assert code == 0 or (code in (1, 2) and len(lines) == 1), (argv, cap.err)
    return code


@given(steps=_small_or_wild(1, 2), size=st.one_of(st.none(), st.sampled_from([8, 9, 16, 33, 64, 256, 65536]),
                                                    st.integers(-2**40, 2**40)),
       seed=_small_or_wild(0, 5), guidance=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)))
@settings(SWEEP, max_examples=20)
def test_generate_numeric_flags(tmp_path_factory, capsys, steps, size, seed, guidance):
    out = tmp_path_factory.mktemp("gen") / "out"
    argv = ["generate", "tiny-sd3", "--prompt", "a fox", "--out", out]
    for flag, v in (("--steps", steps), ("--size", size), ("--seed", seed), ("--guidance", guidance)):
        if v is not None:
            argv += [f"{flag}={v}"]
    _run_cli(capsys, argv)


def _given_small_or_wild(lo: int, hi: int):
    """As _small_or_wild, never absent (the defaults, 8 prompts x 8 steps, are not what is swept)."""
    return st.one_of(st.integers(lo, hi), st.integers(-2**80, 2**80), st.sampled_from([0, -1, 2**31, 2**63, 10**23]))


@given(n=_given_small_or_wild(1, 2), steps=_given_small_or_wild(1, 2),
       size=st.one_of(st.none(), st.integers(-2**40, 2**40)), seed=_small_or_wild(0, 3))
@settings(SWEEP, max_examples=15)
def test_calib_numeric_flags(tmp_path_factory, capsys, n, steps, size, seed):
    out = tmp_path_factory.mktemp("cal") / "c.safetensors"
    argv = ["calib", "tiny-sd3", "--out", out]
    for flag, v in (("--num-prompts", n), ("--steps", steps), ("--size", size), ("--seed", seed)):
        if v is not None:
            argv += [f"{flag}={v}"]
    _run_cli(capsys, argv)
