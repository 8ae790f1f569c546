"""The shipped ShapesBench teacher: loads, scores above threshold on held-out captions, its sampler
agrees with diffusers' SD3 pipeline, and `hprune eval` / `hprune compress` work with it."""
from __future__ import annotations

import copy
import functools
import json

import pytest
import torch

from hprune.cli import main
from hprune.loading import load_model
from hprune.models.registry import BUILTINS, model_config
from hprune.shapes import checkpoint as C
from hprune.shapes.evaluate import evaluate

# The shipped teacher scores 0.7137 at this test's settings (30 held-out captions, 6 per template,
# 20 sampling steps; 2-core CPU, torch 2.13) and 0.741 on the 96-caption evaluation in its recipe.
# The target for the teacher is 0.8: NOT met yet (README, ShapesBench). The threshold sits
# below the measurement with a margin for float differences across platforms (a changed pixel can
# flip a check); a broken or untrained checkpoint scores far lower (random weights: 0).
MEASURED = 0.7137
THRESHOLD = 0.65


@functools.lru_cache(maxsize=None)
def _teacher():
    return C.load_transformer(), C.load_text_encoder()


def test_teacher_loads_as_builtin_and_matches_its_recipe():
    model = load_model("shapes-teacher")
    cfg = {k: v for k, v in model_config(model).items() if not k.startswith("_")}
    want = json.loads(json.dumps(BUILTINS["shapes-teacher"].config, default=list))
    assert {k: cfg[k] for k in want} == want
    assert next(model.parameters()).dtype == torch.float32
    rec = C.load_recipe()
    assert rec["transformer_config"]["num_layers"] >= 12
    for k in ("seed", "steps", "train_seconds", "device", "torch", "final"):
        assert k in rec
    assert rec["final"]["n"] >= 96 and rec["final"]["score"] >= THRESHOLD
    total = sum(f.stat().st_size for f in C.TEACHER_DIR.rglob("*") if f.is_file())
    assert total < 16 * 2**20  # small enough to ship in the package (a --model-size medium teacher: 13.4 MiB)


def test_teacher_scores_above_threshold_on_heldout_captions():
    model, text = _teacher()
    res = evaluate(model, text, n_captions=30, steps=20, guidance=C.default_guidance())
    assert res["n"] == 30
    assert res["score"] >= THRESHOLD, (res["score"], MEASURED, res["attributes"])


def test_word_sensitivity_measures_what_the_model_reads():
    from hprune.errors import HpruneError
    from hprune.shapes.evaluate import word_sensitivity

    model, text = _teacher()
    ws = word_sensitivity(model, text, n=12, times=(0.5, 0.8))
    assert set(ws) == {"colour", "shape", "caption", "image_shape", "image_shape_swapped"}
    assert all(set(v) == {0.5, 0.8} for v in ws.values())
    assert all(ws[k][t] > 0 for k in ("colour", "shape", "caption") for t in (0.5, 0.8))
    # the README's diagnosis of this teacher's blobs: it reads the colour word, barely the shape
    # word; from a partly denoised image it completes the image's shape whatever the word says
    assert all(ws["shape"][t] < ws["colour"][t] / 5 for t in (0.5, 0.8)), ws
    assert ws["image_shape"][0.5] >= 0.75 and ws["image_shape_swapped"][0.5] >= 0.75, ws
    # a transformer that cannot see the caption: no swap changes anything
    blind = copy.deepcopy(model)
    with torch.no_grad():
        for mod in (blind.context_embedder, blind.time_text_embed.text_embedder):
            for p in mod.parameters():
                p.zero_()
    wb = word_sensitivity(blind, text, n=4, times=(0.7,))
    assert all(wb[k][0.7] == 0.0 for k in ("colour", "shape", "caption"))
    assert wb["image_shape"] == wb["image_shape_swapped"]
    for kw, match in (({"n": 0}, "at least one caption"), ({"times": (0.0,)}, "flow times"),
                      ({"times": (1.5,)}, "flow times")):
        with pytest.raises(HpruneError, match=match):
            word_sensitivity(model, text, **kw)


def test_calibration_set_replays_through_the_sd3_pipeline():
    """The set's layout is hprune.calib.capture's, and diffusers' pipeline (as OBS-Diff's Hessian
    loop drives it) follows the same trajectories from the same noise."""
    from hprune.obs.hessian import calibration_schedule, negative_embeddings
    from hprune.pipelines import build_pipeline
    from hprune.shapes.sample import calibration_set
    from hprune.shapes.text import encode_captions

    model, text = _teacher()
    caps = ["a red circle left of a blue square", ""]
    enc, pooled = encode_captions(text, caps)
    cal = calibration_set(model, enc, pooled, captions=caps, steps=4, guidance=3.0, seed=5)
    assert len(cal) == 2 * 4 * 2 and cal.final.shape == (2, 3, 32, 32)
    e, p = cal.prompt_embeddings()
    assert torch.equal(e, enc) and torch.equal(p, pooled)
    ne, npool = negative_embeddings(cal)
    assert ne.abs().sum() == 0 and npool.abs().sum() == 0
    pipe = build_pipeline(model)
    sig = calibration_schedule(cal)
    for i in range(2):
        out = pipe(prompt_embeds=enc[i:i + 1], pooled_prompt_embeds=pooled[i:i + 1], negative_prompt_embeds=ne[i:i + 1],
                   negative_pooled_prompt_embeds=npool[i:i + 1], sigmas=sig, num_inference_steps=len(sig),
                   guidance_scale=3.0, height=64, width=64, output_type="latent",
                   generator=torch.Generator().manual_seed(5 + i)).images
        torch.testing.assert_close(out, cal.final[i:i + 1], atol=2e-4, rtol=0)


def test_eval_cli(tmp_path, capsys):
    out = tmp_path / "ev"
    assert main(["eval", "--captions", "3", "--steps", "3", "--out", str(out)]) == 0
    rep = json.loads((out / "eval.json").read_text())
    assert rep["n"] == 3 and 0 <= rep["score"] <= 1 and len(rep["per_caption"]) == 3
    assert (out / "grid.png").is_file() and len(list((out / "images").glob("*.png"))) == 3
    assert "ShapesBench score" in capsys.readouterr().out
    assert torch.is_grad_enabled()  # a command leaves the process as it found it
    assert main(["eval", "--captions", "3", "--out", str(out)]) == 1  # exists, no --overwrite
    assert main(["eval", "tiny-sd3", "--captions", "2", "--out", str(tmp_path / "x")]) == 1
    assert "not a ShapesBench model" in capsys.readouterr().err
    bad = tmp_path / "caps.txt"
    bad.write_text("a red circle\na purple circle\n")
    assert main(["eval", "--prompts", str(bad), "--out", str(tmp_path / "y")]) == 1
    assert "unknown colour 'purple'" in capsys.readouterr().err


def test_calib_compress_then_eval_the_artifact(tmp_path, capsys):
    """The built-in's calibration hook gives real captions; the whole pipeline runs on the teacher
    and `hprune eval` scores the artifact against the teacher (small settings: mechanics only)."""
    from hprune.calib import CalibrationSet

    cal = tmp_path / "cal.safetensors"
    assert main(["calib", "shapes-teacher", "--n", "2", "--steps", "2", "--out", str(cal)]) == 0
    c = CalibrationSet.load(cal)
    assert c.meta["source"] == "shapes" and all(C.is_caption(p) for p in c.meta["prompts"])
    out = tmp_path / "c"
    assert main(["compress", "shapes-teacher", "--calib", str(cal), "--ratio", "0.2", "--steps", "1",
                 "--batch-size", "2", "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["reload_bit_identical"] and rep["plan"]["meta"]["achieved_ratio"] >= 0.2
    ev = tmp_path / "ev"
    assert main(["eval", str(out / "artifact"), "--captions", "2", "--steps", "3", "--out", str(ev)]) == 0
    rep = json.loads((ev / "eval.json").read_text())
    assert 0 < rep["psnr"] < 100 and rep["n"] == 2
