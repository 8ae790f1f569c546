"""Progress in logs: when stderr is not a terminal, every long stage writes plain lines (start,
every HPRUNE_PROGRESS_INTERVAL seconds, end) with the stage, step/total, rate and ETA."""
import copy
import re
import subprocess
import sys

import pytest

from hprune.errors import HpruneError
from hprune.report import LogProgress, progress_interval, tqdm
from util import fresh

LINE = re.compile(r"^\[hprune\] (?P<desc>[^:]+): (?P<n>\d+)/(?P<total>\d+) (?P<unit>\S+) \(\d+%\)")


def lines(text: str, desc: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith(f"[hprune] {desc}")]


def test_log_lines_have_stage_step_rate_and_eta(capsys, monkeypatch):
    monkeypatch.setenv("HPRUNE_PROGRESS_INTERVAL", "0")
    bar = tqdm(total=4, desc="distilling", unit="step")
    assert isinstance(bar, LogProgress)  # captured stderr is not a terminal
    for _ in range(4):
        bar.set_postfix(loss="0.5")
        bar.update(1)
    bar.close()
    got = lines(capsys.readouterr().err, "distilling")
    assert got[0] == "[hprune] distilling started: 0/4 step (0%)"
    assert len(got) == 6  # start, 4 periodic lines (interval 0), end
    assert all(LINE.match(g) for g in got)
    mid = got[2]
    assert "2/4 step (50%)" in mid and ("step/s" in mid or "s/step" in mid)
    assert "ETA" in mid and "loss=0.5" in mid and "elapsed" in mid
    assert got[-1].startswith("[hprune] distilling done: 4/4 step (100%)")


def test_interval_spaces_the_lines(capsys, monkeypatch):
    monkeypatch.setenv("HPRUNE_PROGRESS_INTERVAL", "3600")
    for _ in tqdm(range(50), desc="probing"):
        pass
    assert len(lines(capsys.readouterr().err, "probing")) == 2  # start and end only
    for _ in tqdm(range(50), desc="inner", leave=False):  # an inner loop (a bar tqdm clears) too
        pass
    assert len(lines(capsys.readouterr().err, "inner")) == 2


def test_disable_and_env_switches(capsys, monkeypatch):
    monkeypatch.setenv("HPRUNE_PROGRESS_INTERVAL", "0")
    for _ in tqdm(range(3), desc="quiet", disable=True):
        pass
    monkeypatch.setenv("HPRUNE_PROGRESS", "0")
    for _ in tqdm(range(3), desc="off"):
        pass
    assert "[hprune]" not in capsys.readouterr().err
    monkeypatch.setenv("HPRUNE_PROGRESS_INTERVAL", "soon")
    monkeypatch.delenv("HPRUNE_PROGRESS")
    with pytest.raises(HpruneError, match="HPRUNE_PROGRESS_INTERVAL"):
        progress_interval()


def test_distill_writes_progress_lines_to_a_log(capsys, monkeypatch):
    from hprune.calib import synthetic
    from hprune.distill import DistillConfig, distill
    from hprune.hpp import plan_hpp
    from hprune.models import apply_plan
    from hprune.probe import probe_sensitivity

    monkeypatch.setenv("HPRUNE_PROGRESS_INTERVAL", "0")
    teacher = fresh("tiny-sd3")
    cal = synthetic(teacher, n_prompts=2, num_steps=2, seed=0, progress=True)
    table = probe_sensitivity(teacher, cal, max_samples=2, progress=True)
    student = copy.deepcopy(teacher)
    apply_plan(student, plan_hpp(table, 0.3))
    distill(teacher, student, cal, DistillConfig(steps=3, batch_size=2), table=table, progress=True)
    err = capsys.readouterr().err
    for stage in ("calibration", "probing", "distilling"):
        got = lines(err, stage)
        assert len(got) >= 3, (stage, err)
        assert "started" in got[0] and "done" in got[-1]
    assert any("3/3 step" in g and "loss=" in g for g in lines(err, "distilling"))


def test_quantize_cli_in_a_pipe_reports_progress(tmp_path):
    """A real non-TTY run (stdout and stderr are pipes) of a long stage: RTN quantisation."""
    env = {**__import__("os").environ, "HPRUNE_PROGRESS_INTERVAL": "0"}
    r = subprocess.run([sys.executable, "-m", "hprune", "quantize", "tiny-sd3", "--out", str(tmp_path / "q")],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    got = lines(r.stderr, "quantising (RTN)")
    assert got and "started" in got[0] and "done" in got[-1] and "layer/s" in got[-1] + got[-2]


def test_gptq_progress_counts_blocks_and_trajectories_never_its(capsys, monkeypatch):
    """Block by block GPTQ reports per block with an ETA; the resident path's calibration loop per
    trajectory and its solver per unit: no bar says "it"."""
    from hprune.calib import builtin_calibration
    from hprune.quant.model import quantize_model

    monkeypatch.setenv("HPRUNE_PROGRESS_INTERVAL", "0")
    m = fresh("tiny-sd3")
    calib = builtin_calibration("tiny-sd3", m, n_prompts=1, num_steps=1)
    capsys.readouterr()
    quantize_model(fresh("tiny-sd3"), method="gptq", calib=calib, offload="cpu", progress=True)
    got = [g for g in lines(capsys.readouterr().err, "GPTQ") if LINE.match(g)]
    assert got and all(LINE.match(g)["unit"] == "block" for g in got), got
    assert any("ETA" in g for g in got)
    quantize_model(fresh("tiny-sd3"), method="gptq", calib=calib, progress=True)
    got = [g for g in capsys.readouterr().err.splitlines() if LINE.match(g)]
    units = {LINE.match(g)["desc"].split(" started")[0].split(" done")[0]: LINE.match(g)["unit"] for g in got}
    assert any(u == "trajectory" for u in units.values()) and any(u == "unit" for u in units.values()), units
    assert "it" not in units.values(), units
