"""A newcomer's path: load_pipeline takes built-in names, a pipeline without text encoders says
what to do in one line, save_compressed(as_pipeline=...) prints nothing stray, `hprune demo
--quick` runs every stage on less work, and the CLI's figures are readable."""
import json
import logging
import warnings

import pytest
import torch

import hprune
from hprune.errors import HpruneError
from hprune.models import PrunePlan, apply_plan
from hprune.quant import quantize_model
from util import fresh


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    m = fresh("tiny-sd3")
    apply_plan(m, PrunePlan.manual({2: ["block"]}, m))
    quantize_model(m, 32, refine=False)
    path = tmp_path_factory.mktemp("art") / "hprune-demo" / "artifact"
    hprune.save_compressed(m, path)
    return path, m


def test_load_pipeline_takes_a_builtin_name(artifact):
    from hprune.pipelines import generate, stand_in_prompts

    path, m = artifact
    pipe = hprune.load_pipeline("tiny-sd3", path)
    x = {k: v for k, v in stand_in_prompts(m, 1).items()}
    ref = generate(hprune.pipelines.build_pipeline(hprune.load_compressed(path)), **x, steps=2)
    assert torch.equal(generate(pipe, **x, steps=2), ref)
    assert hasattr(pipe, "load_lora_weights")  # hprune's LoRA route, as for pipeline folders
    with pytest.raises(HpruneError, match="tiny-flux"):
        hprune.load_pipeline("tiny-flux", path)  # an artifact of another model: one line
    with pytest.raises(HpruneError, match="without weights"):
        hprune.load_pipeline("sd3.5-large", path)


def test_text_prompt_without_text_encoders_names_the_route(artifact, tmp_path):
    from hprune.pipelines import build_pipeline

    path, m = artifact
    for pipe in (hprune.load_pipeline("tiny-sd3", path), build_pipeline(fresh("tiny-flux"))):
        with pytest.raises(HpruneError, match="no text encoders.*prompt_embeds.*hprune generate") as e:
            pipe("a fox in the snow", num_inference_steps=1)
        assert "\n" not in str(e.value)
    # a pipeline folder written with as_pipeline from such a pipeline: the same message
    hprune.save_compressed(m, tmp_path / "pipe", as_pipeline=build_pipeline(fresh("tiny-sd3")))
    with pytest.raises(HpruneError, match="no text encoders"):
        hprune.load_pipeline(tmp_path / "pipe")("a fox in the snow", num_inference_steps=1)


def test_as_pipeline_prints_no_stray_diffusers_line(artifact, tmp_path, capsys, caplog):
    from hprune.pipelines import build_pipeline

    _, m = artifact
    caplog.set_level(logging.INFO)
    hprune.save_compressed(m, tmp_path / "p", as_pipeline=build_pipeline(fresh("tiny-sd3")))
    captured = capsys.readouterr()
    assert "cannot be saved" not in captured.out + captured.err + caplog.text
    assert logging.getLogger("diffusers.pipelines.pipeline_utils").level == logging.NOTSET  # restored


def test_heatmap_note_sits_below_the_rotated_labels():
    from hprune.plots import heatmap_figure

    fig = heatmap_figure([[1e-3, 2e-4, None], [5e-4, 1e-5, 3e-4]], ["0 joint", "1 last"],
                         ["block", "context", "context_ff"], blank_note="blank cell: no such component " * 3)
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    ax = fig.axes[0]
    note = ax.xaxis.label.get_window_extent(r)
    ticks = [t.get_window_extent(r) for t in ax.get_xticklabels()]
    assert ax.xaxis.label.get_text().startswith("blank cell")
    assert all(note.y1 <= t.y0 + 0.5 for t in ticks)  # entirely below every tick label (y grows upwards)


def test_loss_plot_has_a_smoothed_line_over_faint_raw_values():
    from hprune.plots import ema, line_figure

    assert ema([2.0, 2.0, 2.0], 5) == [2.0, 2.0, 2.0]  # bias-corrected: no pull towards 0
    assert ema([1.0, 3.0], 1) == [1.0, 3.0]
    ys = [1e-3 * (1 + (-1) ** i * 0.8) for i in range(100)]  # a flat trend under step-to-step noise
    fig = line_figure({"loss": ys}, logy=True, smooth=10)
    raw, smooth = fig.axes[0].get_lines()
    assert raw.get_alpha() < 0.5 and smooth.get_label() == "loss (EMA 10)"
    jumps = lambda v: sum(abs(a - b) for a, b in zip(v[1:], v[:-1]))  # noqa: E731
    assert jumps(list(smooth.get_ydata())) < 0.2 * jumps(list(raw.get_ydata()))


def test_demo_quick_runs_every_stage_on_less_work(tmp_path, capsys):
    from hprune.cli import main

    assert main(["demo", "--quick", "--out", str(tmp_path / "d")]) == 0
    rep = json.loads((tmp_path / "d" / "report.json").read_text())
    assert [r["stage"] for r in rep["stages"]] == ["original", "pruned", "distilled", "quantised (hprune int4, GPTQ)"]
    assert rep["options"]["steps"] == 30 and rep["options"]["max_probe_samples"] == 8
    assert len(rep["distill_history"]) == 30 and rep["reload_bit_identical"]
    # 6 prompts x 4 steps, two transformer calls a step (guided and unguided halves), not 10 x 8
    assert rep["calibration"]["train_samples"] + rep["calibration"]["eval_samples"] == 6 * 4 * 2
    for f in ("images.png", "sensitivity.png", "distill_loss.png", "artifact"):
        assert (tmp_path / "d" / f).exists()
    assert "[--quick]" in capsys.readouterr().out
    # --steps still wins over --quick's
    from hprune.cli import build_parser

    args = build_parser().parse_args(["demo", "--quick", "--steps", "7"])
    assert args.steps == 7 and args.steps_given


def test_info_on_an_artifact_says_what_it_is(artifact, capsys):
    from hprune.cli import main

    path, _ = artifact
    assert main(["info", str(path.parent)]) == 0  # the folder `hprune compress` writes
    out = capsys.readouterr().out
    assert f"hprune artifact {path}" in out and "base: SD3Transformer2DModel" in out
    assert "1. prune (manual plan" in out and "1 block removed [2]" in out
    assert "2. quantize:" in out and "int4 group 32, round to nearest -> W4A16Linear" in out
    assert "INT4 g64" not in out  # no estimate row repeating the bf16 one for a model already 4-bit
    assert "4-bit block Linears (int4 g32: packed codes + scales), the rest at float32" in out
    assert main(["info", "tiny-sd3"]) == 0
    out = capsys.readouterr().out
    assert "hprune artifact" not in out and "estimate: what `hprune quantize` would store" in out
    assert main(["info", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["quantized"] == "int4 g32"
