"""The ShapesBench training script on a tiny configuration, on the CPU, through the code path a GPU
run takes (scenes drawn and rendered in torch on the training device, autocast, time budget,
snapshots, resume): seeded runs are reproducible, the output is the teacher layout hprune loads,
an interrupted run resumed from its snapshot ends where the uninterrupted one does, and every
shape-binding option is recorded and changes the run."""
from __future__ import annotations

import pytest
import torch

from hprune.shapes import checkpoint as C
from hprune.shapes import data as D
from hprune.shapes.scenes import SceneTable
from hprune.shapes.train import MODEL_SIZES, TrainConfig, batch, build, lr_at, main, train

TINY = dict(num_layers=2, num_heads=1, head_dim=16, text_width=32, steps=4, batch_size=4, warmup=2,
            eval_captions=2, eval_steps=2, log_every=2, monitor_every=0, monitor_captions=4, threads=1, device="cpu")
QUIET = dict(log=lambda *_: None)


def _state(folder):
    return C.load_transformer(folder).state_dict(), C.load_text_encoder(folder).state_dict()


def _max_diff(a, b):
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _cli(cfg):
    return [f"--{k.replace('_', '-')}={v}" for k, v in cfg.items()]


@pytest.fixture(scope="module")
def table():
    return SceneTable()


def test_training_is_seeded_and_writes_a_loadable_teacher(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    ra = train(TrainConfig(**TINY), a, **QUIET)
    train(TrainConfig(**TINY), b, **QUIET)
    train(TrainConfig(**TINY, seed=1), c, **QUIET)
    (ma, ta), (mb, tb), (mc, _) = _state(a), _state(b), _state(c)
    # Same seed: the same weights. Not asserted bit-exact: BLAS may sum in another order when its
    # buffers are aligned differently, which can flip an fp16 rounding of the stored weights (one
    # ulp, ~1e-4 here); a different seed moves them by the size of the initialisation (~1e-2).
    for x, y in ((ma, mb), (ta, tb)):
        for k in x:
            torch.testing.assert_close(x[k], y[k], atol=2e-4, rtol=1e-3, msg=k)
    assert _max_diff(ma, mc) > 1e-2  # the seed matters
    rec = C.load_recipe(a)
    assert rec["steps"] == 4 and rec["samples_seen"] == 16 and rec["train_seconds"] >= 0
    assert rec["stopped_by"] == "steps" and rec["autocast"] == "off" and "torch" in rec["data"]
    assert rec["transformer_config"]["num_layers"] == 2 and 0 <= ra["final"]["score"] <= 1
    assert rec["config"]["model_size"] == "small" and rec["config"]["num_heads"] == 1
    assert (a / "samples.png").is_file()
    assert set(rec["final"]["word_sensitivity"]) == {"colour", "shape", "caption", "image_shape",
                                                      "image_shape_swapped"}


def test_batches_are_drawn_on_the_device_per_step(table):
    cfg = TrainConfig(**TINY)
    x0, ids, eps, t, drop, twin = batch(3, cfg, table)
    assert x0.shape == eps.shape == (4, 3, 32, 32) and ids.shape == (4, 12) and t.shape == drop.shape == (4,)
    assert x0.min() == -1 and x0.max() == 1 and not twin.any()
    again = batch(3, cfg, table)
    assert all(torch.equal(u, v) for u, v in zip((x0, ids, eps, t, drop), again))  # a function of (seed, step)
    assert not torch.equal(batch(4, cfg, table)[0], x0)


def test_templates_option_chooses_the_training_captions(table):
    from hprune.shapes.text import VOCAB

    def templates(cfg):  # of the batch's captions, read back from its token ids (<pad>, <bos> are 0, 1)
        ids = batch(3, cfg, table)[1]
        return [D.parse_caption(" ".join(VOCAB[i] for i in row if i > 1)).template for row in ids.tolist()]

    assert templates(TrainConfig(**TINY, templates="single,position")) == ["single", "position"] * 2
    assert len(set(templates(TrainConfig(**{**TINY, "batch_size": 16})))) > 1  # the standard mix


def test_shape_binding_options_shape_the_batch(table):
    from hprune.shapes.text import VOCAB

    def captions(ids):
        return [" ".join(VOCAB[i] for i in row if i > 1) for row in ids.tolist()]

    cfg = TrainConfig(**{**TINY, "batch_size": 64, "same_colour": 1.0, "templates": "pair,relation"})
    specs = [D.parse_caption(c) for c in captions(batch(0, cfg, table)[1])]
    assert all(s.objects[0].colour == s.objects[1].colour for s in specs)  # only shape tells them apart
    cfg = TrainConfig(**{**TINY, "batch_size": 16, "shape_twins": 0.5})
    x0, ids, eps, t, drop, twin = batch(0, cfg, table)
    assert twin[12:].sum() >= 3 and not twin[:12].any()  # 4 twin pairs: rows 12-15 twin rows 0-3
    assert torch.equal(eps[12:], eps[:4]) and torch.equal(t[12:], t[:4]) and torch.equal(drop[12:], drop[:4])
    caps = captions(ids)
    for i in range(4):
        if twin[12 + i]:
            a, b = D.parse_caption(caps[i]), D.parse_caption(caps[12 + i])
            assert [o.colour for o in a.objects] == [o.colour for o in b.objects]
            assert a.objects[0].shape != b.objects[0].shape
            assert not torch.equal(x0[i], x0[12 + i])


def test_options_are_recorded_and_change_the_run(tmp_path):
    base = tmp_path / "base"
    train(TrainConfig(**TINY), base, **QUIET)
    m0 = _state(base)[0]
    for name, value in (("logit_mean", 2.0), ("high_noise_weight", 4.0), ("same_colour", 1.0),
                        ("shape_twins", 0.5), ("amp", "bf16")):
        out = tmp_path / name
        rec = train(TrainConfig(**{**TINY, name: value}), out, **QUIET)
        assert C.load_recipe(out)["config"][name] == value
        assert _max_diff(m0, _state(out)[0]) > 1e-4, name  # the option moved the weights
        if name == "amp":
            assert rec["autocast"] == "torch.bfloat16"


def test_model_sizes():
    for name, arch in MODEL_SIZES.items():
        cfg = TrainConfig(model_size=name)
        assert {k: getattr(cfg, k) for k in arch} == arch
    medium = TrainConfig(model_size="medium")
    model, text = build(medium)
    n = sum(p.numel() for p in model.parameters()) + sum(p.numel() for p in text.parameters())
    assert medium.num_heads * medium.head_dim == 128 and text.config["layers"] == 2
    assert 6e6 < n and 2 * n < 16 * 2**20  # bigger than today's 4 M, still a < 16 MiB fp16 file
    assert TrainConfig(model_size="medium", num_layers=8).num_layers == 8  # an explicit option wins


def test_time_budget_stops_the_run(tmp_path):
    cfg = {**TINY, "steps": 0, "minutes": 0.04, "log_every": 1000}  # 2.4 s, no step limit
    rec = train(TrainConfig(**cfg), tmp_path / "t", **QUIET)
    assert rec["stopped_by"] == "minutes" and rec["steps"] >= 1
    assert 2.4 <= rec["train_seconds"] < 60  # stops after the step that crosses the budget
    assert rec["loss_history"][-1]["step"] == rec["steps"]
    # the cosine follows the budget (after the warm-up steps): lr, lr / 2 (+ floor) half-way, floor at the end
    c = TrainConfig(**{**cfg, "minutes": 10.0, "warmup": 5, "lr": 1.0, "min_lr_ratio": 0.0})
    assert lr_at(2, c, 0.0) == pytest.approx(3 / 5)
    assert [lr_at(100, c, s) for s in (0.0, 300.0, 600.0)] == pytest.approx([1.0, 0.5, 0.0], abs=1e-9)
    # with both limits the one further along leads
    c = TrainConfig(**{**cfg, "minutes": 10.0, "steps": 1000, "warmup": 0, "lr": 1.0, "min_lr_ratio": 0.0})
    assert lr_at(500, c, 60.0) == pytest.approx(0.5) and lr_at(100, c, 300.0) == pytest.approx(0.5)


def test_interrupted_run_resumes_from_its_snapshot(tmp_path):
    cfg = {**TINY, "steps": 6, "log_every": 1, "snapshot_every": 2}
    whole = tmp_path / "whole"
    train(TrainConfig(**cfg), whole, **QUIET)

    def crash_after_step_4(msg):  # the process dies during step 5, after the step-4 snapshot
        if msg.startswith("step 5 "):
            raise KeyboardInterrupt

    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**cfg), part, log=crash_after_step_4)
    snap = tmp_path / "part-snapshot"
    assert not part.exists() and C.load_recipe(snap)["step"] == 4
    C.load_transformer(snap)  # the snapshot is a loadable teacher (EMA weights) too
    resumed = tmp_path / "resumed"
    rec = train(TrainConfig(**cfg, resume=str(snap)), resumed, **QUIET)
    assert rec["steps"] == 6 and rec["resumed_from"]["step"] == 4
    assert [h["step"] for h in rec["loss_history"]] == list(range(1, 7))
    (mw, tw), (mr, tr) = _state(whole), _state(resumed)
    for x, y in ((mw, mr), (tw, tr)):  # same batches, same optimiser state: the same weights
        for k in x:
            torch.testing.assert_close(x[k], y[k], atol=2e-4, rtol=1e-3, msg=k)
    # other training options than the snapshot's are refused, before anything is written
    with pytest.raises(Exception, match="other options.*lr"):
        train(TrainConfig(**{**cfg, "lr": 5e-4}, resume=str(snap)), tmp_path / "x", **QUIET)
    assert not (tmp_path / "x").exists()


def test_snapshots_and_continued_training(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["--out", str(first)] + _cli({**TINY, "snapshot_every": 2})) == 0
    snapshot = tmp_path / "first-snapshot"
    snap = C.load_recipe(snapshot)
    assert snap["step"] == 4 and snap["snapshot"] and (snapshot / "train_state.pt").is_file()
    log = (tmp_path / "first.log").read_text()
    assert "final held-out score" in log and "word sensitivity" in log
    train(TrainConfig(**{**TINY, "steps": 2}, init=str(first), compare=str(first)), second, **QUIET)
    rec = C.load_recipe(second)
    assert rec["init_from"]["steps"] == 4 and rec["total_steps"] == 6
    assert rec["total_train_seconds"] >= rec["train_seconds"]
    # --compare scores the other teacher as the run scored its own (same captions, noise, device)
    cmp = rec["compared_with"]
    assert cmp["score"] == rec["init_from"]["final"]["score"] and cmp["n"] == rec["final"]["n"]
    assert cmp["this_meets_or_beats_it"] == (rec["final"]["score"] >= cmp["score"])
    # a snapshot is a valid starting point too
    third = tmp_path / "third"
    train(TrainConfig(**{**TINY, "steps": 2}, init=str(snapshot)), third, **QUIET)
    assert C.load_recipe(third)["total_steps"] == 6


def test_word_sensitivity_is_logged_during_training(tmp_path):
    lines = []
    rec = train(TrainConfig(**{**TINY, "monitor_every": 2}), tmp_path / "w", log=lines.append)
    logged = [ln for ln in lines if "word sensitivity at step" in ln]
    assert len(logged) == 1 and "shape/colour" in logged[0]  # at step 2 (step 4 is the final one)
    assert [m["step"] for m in rec["word_sensitivity_history"]] == [2]
    assert set(rec["word_sensitivity_history"][0]) >= {"colour", "shape", "caption"}


def test_bad_training_input_is_refused_before_training(tmp_path, capsys):
    out = tmp_path / "t"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["--out", str(out), "--steps", "1"]) == 1  # exists, no --overwrite
    assert "output path exists" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
    first = tmp_path / "first"
    train(TrainConfig(**TINY), first, **QUIET)
    cfg = {**TINY, "num_layers": 3, "init": str(first)}
    assert main(["--out", str(tmp_path / "x")] + _cli(cfg)) == 1
    assert "architecture differs" in capsys.readouterr().err and not (tmp_path / "x").exists()
    bad = (({"templates": "single,triangles"}, "unknown template 'triangles'"),
           ({"steps": 0}, "give --steps or --minutes"),
           ({"same_colour": 1.5}, "--same-colour must lie"),
           ({"shape_twins": -0.1}, "--shape-twins must lie"),
           ({"amp": "fp8"}, "--amp"),
           ({"model_size": "huge"}, "invalid choice"),
           ({"resume": str(first)}, "no train_state.pt"),
           ({"compare": str(tmp_path / "nowhere")}, "no ShapesBench teacher here"))
    if not torch.cuda.is_available():
        bad += (({"device": "cuda"}, "CUDA is not available"),)
    for opts, msg in bad:
        with pytest.raises(SystemExit) if opts.get("model_size") else _nothing():
            assert main(["--out", str(tmp_path / "y")] + _cli({**TINY, **opts})) == 1
        assert msg in capsys.readouterr().err, opts
        assert not (tmp_path / "y").exists() and not (tmp_path / "y-snapshot").exists()


def _nothing():
    import contextlib

    return contextlib.nullcontext()

