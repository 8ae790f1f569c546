"""The hprune CLI: commands, and one-line errors with a non-zero exit for bad input."""
import argparse
import json
import os
import subprocess
import sys

import pytest

from hprune.cli import main
from util import run


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "info" in text and "demo" in text


def test_entry_point_runs_as_a_program():
    r = subprocess.run([sys.executable, "-m", "hprune", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("hprune ")


def test_info_tiny_and_real_size(capsys):
    code, out, _ = run(capsys, "info", "tiny-flux")
    assert code == 0
    assert "single_transformer_blocks.3" in out and "flux_single" in out and "INT4 g64" in out
    code, out, _ = run(capsys, "info", "sd3.5-large", "--json")
    assert code == 0
    rep = json.loads(out)
    assert rep["num_blocks"] == 38 and 8.0e9 < rep["params"] < 8.15e9
    assert rep["bytes_int4"] < rep["bytes_bf16"] / 3


@pytest.mark.parametrize("argv,match", [
    (["info", "sd9"], "unknown model 'sd9'"),
    (["info", "/nonexistent/model"], "model path not found"),
    (["demo", "--ratio", "1.5"], "--ratio must be in (0, 1)"),
])
def test_bad_input_is_one_line_and_nonzero(capsys, argv, match):
    code, out, err = run(capsys, *argv)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hprune: error:") and match in lines[0]


def test_info_corrupted_weights(capsys, tmp_path):
    from util import fresh

    fresh("tiny-sd3").save_pretrained(tmp_path / "m")
    w = tmp_path / "m" / "diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    code, _, err = run(capsys, "info", str(tmp_path / "m"))
    assert code == 1 and "truncated" in err and len(err.strip().splitlines()) == 1


def test_demo_end_to_end(capsys, tmp_path):
    out_dir = tmp_path / "demo"
    code, out, _ = run(capsys, "demo", "--out", str(out_dir), "--steps", "30")
    assert code == 0
    assert sorted(os.listdir(out_dir)) == [".hprune-output", "artifact", "distill_loss.png", "images.png", "plan.json", "report.json",
                                           "report.md", "sensitivity.json", "sensitivity.png"]
    rep = json.loads((out_dir / "report.json").read_text())
    assert rep["reload_bit_identical"] is True
    stages = {r["stage"]: r for r in rep["stages"]}
    assert list(stages) == ["original", "pruned", "distilled", "quantised (hprune int4, GPTQ)"]
    assert stages["pruned"]["params"] < stages["original"]["params"]
    assert 0 < stages["distilled"]["rel_mse"] < stages["pruned"]["rel_mse"] < 1
    assert stages["quantised (hprune int4, GPTQ)"]["bytes"] < stages["distilled"]["bytes"] / 2
    assert rep["schedule"]["sgd"] and rep["schedule"]["pwp"]
    assert (out_dir / "images.png").read_bytes()[:4] == b"\x89PNG"
    # the output folder now exists: a second run refuses, nothing changes
    before = (out_dir / "report.json").read_bytes()
    code, _, err = run(capsys, "demo", "--out", str(out_dir))
    assert code == 1 and "output path exists" in err
    assert (out_dir / "report.json").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["demo"]


def _subparsers():
    from hprune.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices


def test_help_shows_every_default():
    for name, p in _subparsers().items():
        fmt = p._get_formatter()
        for a in p._actions:
            if a.option_strings and a.default not in (None, False, argparse.SUPPRESS):
                assert a.help and "default" in fmt._get_help_string(a), (name, a.dest)
    assert "(default: 200)" in _subparsers()["compress"].format_help()


def test_demo_compress_and_probe_share_their_defaults():
    """The demo runs as `hprune compress` does: same ratio, steps, batch, lr, quantisation and
    probe sample cap; standalone `hprune probe` caps the samples the same way."""
    from dataclasses import fields

    from hprune.compress import CompressOptions
    from hprune.probe import DEFAULT_MAX_SAMPLES

    subs = _subparsers()
    comp = vars(subs["compress"].parse_args(["m", "--out", "x"]))
    demo = vars(subs["demo"].parse_args([]))
    probe = vars(subs["probe"].parse_args(["m", "--out", "x"]))
    opts = CompressOptions()
    shared = [f.name for f in fields(CompressOptions) if f.name in comp]
    assert {"ratio", "steps", "batch_size", "lr", "quant", "group_size", "max_probe_samples"} <= set(shared)
    for k in shared:
        assert comp[k] == getattr(opts, k), k
    for k in ("ratio", "steps", "quant"):
        assert demo[k] == getattr(opts, k), k
    import inspect

    from hprune.demo import run_demo

    sig = inspect.signature(run_demo).parameters
    assert (sig["ratio"].default, sig["steps"].default, sig["quant"].default) == (opts.ratio, opts.steps, opts.quant)
    assert probe["max_samples"] == DEFAULT_MAX_SAMPLES == opts.max_probe_samples


def test_progress_bars_stay_out_of_redirected_logs(tmp_path):
    """A log redirected to a file gets the command's lines, not progress-bar redraws."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    env.pop("HPRUNE_PROGRESS", None)
    r = subprocess.run([sys.executable, "-m", "hprune", "calib", "tiny-sd3", "--num-prompts", "1", "--steps", "2",
                        "--out", str(tmp_path / "c.safetensors")], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "\r" not in r.stderr and "it/s" not in r.stderr and "%|" not in r.stderr, r.stderr
    assert "wrote" in r.stdout
