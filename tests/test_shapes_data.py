"""ShapesBench generator, grammar, tokenizer and scorer: exact on synthetic ground truth."""
from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch

from hprune.errors import HpruneError
from hprune.shapes import data as D
from hprune.shapes.score import detect, psnr, score_image, summarise
from hprune.shapes.text import Tokenizer, TextEncoder, encode_captions


def _samples(n_per_template: int, seed: int = 0) -> list[D.Sample]:
    rng = random.Random(seed)
    return [D.make_sample(D.random_caption_spec(rng, "any", t), rng) for t in D.TEMPLATES for _ in range(n_per_template)]


def test_every_caption_parses_back_to_its_spec():
    caps = D.all_captions()
    assert len(caps) == len(set(caps)) > 1000
    for c in caps:
        assert D.parse_caption(c).text() == c


@pytest.mark.parametrize("bad", ["", "a purple circle", "a red hexagon", "two red", "a red circle beside a blue square",
                                 "a red circle left of a blue", "a red circle left of a blue square please"])
def test_bad_captions_raise_a_clear_error(bad):
    with pytest.raises(HpruneError, match="caption"):
        D.parse_caption(bad)


def test_split_is_fixed_and_disjoint():
    caps = D.all_captions()
    held = [c for c in caps if D.is_heldout(c)]
    assert 0.10 < len(held) / len(caps) < 0.20
    assert D.is_heldout(held[0]) and D.is_heldout("  " + held[0].upper())  # normalised text
    train = {s.caption for s in D.dataset(300, seed=3, split="train")}
    assert not train & set(held)
    assert all(D.is_heldout(s.caption) for s in D.heldout_set(20))


def test_layouts_keep_their_margins():
    for s in _samples(40, seed=1):
        objs = s.objects
        for o in objs:
            assert D.MARGIN <= o.x0 and o.x0 + o.w <= D.SIZE - D.MARGIN
        for i, a in enumerate(objs):
            for b in objs[i + 1:]:
                assert D._separated(a, b)
        if s.spec.relation:
            assert D.relation_holds(objs[0].centre, objs[1].centre, s.spec.relation)
        if s.spec.position:
            assert D.position_holds(*objs[0].centre, s.spec.position)


@pytest.mark.parametrize("shape", D.SHAPES)
def test_rendered_shapes_are_recognised_at_every_size(shape):
    for side in range(6, 13):
        img = D.render([D.PlacedObject("cyan", shape, 3, 5, side, side)])
        (d,) = detect(img)
        assert (d.shape, d.colour, d.box, d.iou) == (shape, "cyan", (3, 5, side, side), 1.0)
        assert d.size_word == ("small" if side <= D.SIZE_SPLIT else "large")


def test_rendered_image_has_only_palette_colours():
    img = D.render(_samples(1, seed=2)[2].objects)
    assert img.shape == (3, D.SIZE, D.SIZE) and img.dtype == np.float32
    colours = {tuple(v) for v in img.reshape(3, -1).T.tolist()}
    assert colours <= {D.BACKGROUND, *D.PALETTE.values()}


def test_ground_truth_scores_exactly_one():
    samples = _samples(60, seed=4)
    res = [score_image(s.image(), s.caption) for s in samples]
    assert all(r["score"] == 1.0 for r in res)
    summ = summarise(res, [s.caption for s in samples])
    assert summ["score"] == summ["exact"] == 1.0
    assert set(summ["attributes"]) == {"present", "colour", "shape", "size", "position", "count"}
    assert all(v == 1.0 for v in summ["attributes"].values())


def _replace(objs, j, **kw):
    objs = list(objs)
    objs[j] = dataclasses.replace(objs[j], **kw)
    return objs


def _failed(r):
    return {k for k, v in r["checks"].items() if v == 0}


def test_a_wrong_colour_loses_exactly_that_attribute():
    for s in _samples(30, seed=5):
        spec = s.spec
        used = {o.colour for o in spec.objects}
        other = next(c for c in D.COLOURS if c not in used)
        r = score_image(D.render(_replace(s.objects, 0, colour=other)), s.caption)
        n = len(r["checks"])
        if spec.template == "count":  # identical objects: any one of them may take the blame
            assert len(_failed(r)) == 1 and next(iter(_failed(r))).startswith("colour_")
        else:
            assert _failed(r) == {"colour_0"}, s.caption
        assert r["score"] == pytest.approx((n - 1) / n)


def test_a_wrong_shape_or_size_loses_exactly_that_attribute():
    for s in _samples(30, seed=6):
        other = next(sh for sh in D.SHAPES if sh != s.spec.objects[0].shape)
        r = score_image(D.render(_replace(s.objects, 0, shape=other)), s.caption)
        assert len(_failed(r)) == 1 and next(iter(_failed(r))).startswith("shape_"), s.caption
    spec = D.parse_caption("a small red circle")
    big = D.render([D.PlacedObject("red", "circle", 4, 4, 11, 11)])
    assert _failed(score_image(big, spec)) == {"size_0"}


def test_position_relation_count_and_missing_objects():
    left = D.PlacedObject("red", "circle", 2, 10, 8, 8)
    right = D.PlacedObject("blue", "square", 20, 10, 8, 8)
    img = D.render([left, right])
    assert score_image(img, "a red circle left of a blue square")["score"] == 1.0
    r = score_image(img, "a red circle right of a blue square")
    assert _failed(r) == {"position"}
    assert _failed(score_image(D.render([left]), "a red circle on the right")) == {"position"}
    # an extra object costs only the count
    assert _failed(score_image(img, "a red circle")) == {"count"}
    # a missing object: its present / colour / shape, the relation and the count
    r = score_image(D.render([left]), "a red circle left of a blue square")
    assert _failed(r) == {"present_1", "colour_1", "shape_1", "position", "count"}
    assert r["score"] == pytest.approx(3 / 8)
    # an empty image scores 0
    assert score_image(np.zeros((3, 32, 32), np.float32), "two red circles")["score"] == 0.0


def test_scorer_accepts_layouts_and_tolerates_small_noise():
    s = _samples(1, seed=7)[2]
    img = s.image()
    hwc_uint8 = (np.moveaxis(img, 0, -1) * 255).astype(np.uint8)
    assert score_image(hwc_uint8, s.caption)["score"] == 1.0
    assert score_image(torch.from_numpy(img), s.caption)["score"] == 1.0
    noisy = np.clip(img + np.random.default_rng(0).normal(0, 0.08, img.shape), 0, 1)
    assert score_image(noisy, s.caption)["score"] == 1.0
    with pytest.raises(HpruneError, match="RGB image"):
        score_image(np.zeros((32, 32)), s.caption)


def test_psnr():
    a = torch.zeros(3, 4, 4)
    assert psnr(a, a) == float("inf")
    assert psnr(a, a + 0.1) == pytest.approx(20.0)
    with pytest.raises(HpruneError):
        psnr(a, torch.zeros(3, 4, 5))


def test_tokenizer_and_text_encoder_shapes():
    tok = Tokenizer()
    ids = tok.encode(["a red circle left of a blue square", "two red circles"])
    assert ids.shape == (2, tok.max_len) and ids[:, 0].eq(tok.bos).all() and ids[1, 4:].eq(tok.pad).all()
    with pytest.raises(HpruneError, match="unknown word"):
        tok.encode(["a red dodecahedron"])
    enc = TextEncoder(joint_dim=16, pooled_dim=8)
    e, p = encode_captions(enc, ["a red circle", "", "two red circles"])
    assert e.shape == (3, tok.max_len, 16) and p.shape == (3, 8)
    assert e[1].abs().sum() == 0 and p[1].abs().sum() == 0  # empty caption: the unconditional input
    assert e[0].abs().sum() > 0


def test_thin_fringes_and_specks_are_not_objects():
    """A generated object's edge can drift towards a neighbouring palette colour; such a fringe
    (and a speck) has no interior, so it neither counts nor takes part in the assignment."""
    img = D.render([D.PlacedObject("yellow", "square", 8, 8, 10, 10)])
    ring = np.zeros((32, 32), dtype=bool)
    ring[6:20, 6:20] = True
    ring[8:18, 8:18] = False  # a 2-pixel wide red frame: 96 pixels, no interior
    img[:, ring] = np.asarray(D.PALETTE["red"], dtype=np.float32)[:, None]
    img[:, 25:27, 25:27] = np.asarray(D.PALETTE["green"], dtype=np.float32)[:, None, None]
    assert [d.colour for d in detect(img)] == ["yellow"]
    assert score_image(img, "a large yellow square")["score"] == 1.0
    img[:, 22:26, 22:26] = np.asarray(D.PALETTE["green"], dtype=np.float32)[:, None, None]  # 4x4: an object
    assert _failed(score_image(img, "a large yellow square")) == {"count"}
