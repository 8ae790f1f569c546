"""The ShapesBench training script on a tiny configuration: seeded runs are reproducible, the output
is the teacher layout hprune loads, snapshots are loadable, and --init continues a run with the
whole history in its recipe."""
from __future__ import annotations

import torch

from hprune.shapes import checkpoint as C
from hprune.shapes.train import TrainConfig, batch, main, train

TINY = dict(num_layers=2, num_heads=1, head_dim=16, text_width=32, steps=4, batch_size=4, warmup=2,
            eval_captions=2, eval_steps=2, log_every=2, threads=1)


def _state(folder):
    return C.load_transformer(folder).state_dict(), C.load_text_encoder(folder).state_dict()


def test_training_is_seeded_and_writes_a_loadable_teacher(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    ra = train(TrainConfig(**TINY), a, log=lambda *_: None)
    train(TrainConfig(**TINY), b, log=lambda *_: None)
    train(TrainConfig(**TINY, seed=1), c, log=lambda *_: None)
    (ma, ta), (mb, tb), (mc, _) = _state(a), _state(b), _state(c)
    # Same seed: the same weights. Not asserted bit-exact: BLAS may sum in another order when its
    # buffers are aligned differently, which can flip an fp16 rounding of the stored weights (one
    # ulp, ~1e-4 here); a different seed moves them by the size of the initialisation (~1e-2).
    for x, y in ((ma, mb), (ta, tb)):
        for k in x:
            torch.testing.assert_close(x[k], y[k], atol=2e-4, rtol=1e-3, msg=k)
    assert max(float((ma[k] - mc[k]).abs().max()) for k in ma) > 1e-2  # the seed matters
    rec = C.load_recipe(a)
    assert rec["steps"] == 4 and rec["samples_seen"] == 16 and rec["train_seconds"] >= 0
    assert rec["transformer_config"]["num_layers"] == 2 and 0 <= ra["final"]["score"] <= 1
    assert (a / "samples.png").is_file()
    assert set(rec["final"]["word_sensitivity"]) == {"colour", "shape", "caption"}
    # the flow-time distribution is an option: shifted to high noise, the same seed trains elsewhere
    d = tmp_path / "d"
    train(TrainConfig(**TINY, logit_mean=2.0), d, log=lambda *_: None)
    assert C.load_recipe(d)["config"]["logit_mean"] == 2.0
    assert max(float((ma[k] - _state(d)[0][k]).abs().max()) for k in ma) > 1e-4


def test_snapshots_and_continued_training(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["--out", str(first), "--num-layers", "2", "--num-heads", "1", "--head-dim", "16",
                 "--text-width", "32", "--steps", "4", "--batch-size", "4", "--warmup", "2", "--eval-captions", "2",
                 "--eval-steps", "2", "--threads", "1", "--snapshot-every", "2"]) == 0
    snapshot = tmp_path / "first-snapshot"
    snap = C.load_recipe(snapshot)
    assert snap["step"] == 4 and snap["snapshot"]
    C.load_transformer(snapshot)
    train(TrainConfig(**{**TINY, "steps": 2}, init=str(first)), second, log=lambda *_: None)
    rec = C.load_recipe(second)
    assert rec["init_from"]["steps"] == 4 and rec["total_steps"] == 6
    assert rec["total_train_seconds"] >= rec["train_seconds"]
    # a snapshot is a valid starting point too (a run stopped before its end goes on from it)
    third = tmp_path / "third"
    train(TrainConfig(**{**TINY, "steps": 2}, init=str(snapshot)), third, log=lambda *_: None)
    assert C.load_recipe(third)["total_steps"] == 6


def test_bad_training_input_is_refused_before_training(tmp_path, capsys):
    out = tmp_path / "t"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["--out", str(out), "--steps", "1"]) == 1  # exists, no --overwrite
    assert "output path exists" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
    first = tmp_path / "first"
    train(TrainConfig(**TINY), first, log=lambda *_: None)
    cfg = {**TINY, "num_layers": 3, "init": str(first)}
    assert main(["--out", str(tmp_path / "x")] + [f"--{k.replace('_', '-')}={v}" for k, v in cfg.items()]) == 1
    assert "architecture differs" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert main(["--out", str(tmp_path / "y"), "--templates", "single,triangles"]) == 1
    assert "unknown template 'triangles'" in capsys.readouterr().err and not (tmp_path / "y").exists()


def test_templates_option_chooses_the_training_captions():
    from hprune.shapes.data import parse_caption
    from hprune.shapes.text import VOCAB, Tokenizer

    def templates(cfg):  # of the batch's captions, read back from its token ids (<pad>, <bos> are 0, 1)
        _, ids = batch(3, cfg, Tokenizer())
        return [parse_caption(" ".join(VOCAB[i] for i in row if i > 1)).template for row in ids.tolist()]

    assert templates(TrainConfig(**TINY, templates="single,position")) == ["single", "position"] * 2
    assert len(set(templates(TrainConfig(**TINY)))) > 1  # the standard mix
