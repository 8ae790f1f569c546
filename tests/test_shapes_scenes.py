"""ShapesBench scenes in torch (hprune.shapes.scenes, the GPU training path's data) against the
reference generator and renderer (hprune.shapes.data) and the scorer. The bound for the renderer is
exact equality: both decide a pixel by its centre, the torch one in integer arithmetic."""
from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
import torch

from hprune.errors import HpruneError
from hprune.shapes import data as D
from hprune.shapes import scenes as S
from hprune.shapes.score import score_image


@pytest.fixture(scope="module")
def table():
    return S.SceneTable()


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_torch_renderer_equals_the_reference_on_the_same_objects():
    rng = random.Random(0)
    layouts = [s.objects for s in D.dataset(150, seed=11, split="any")]
    # and boxes of every size and aspect (1-14 px), every shape and colour, anywhere in the image
    for _ in range(150):
        objs = []
        for _ in range(rng.randint(1, 3)):
            w, h = rng.randint(1, 14), rng.randint(1, 14)
            objs.append(D.PlacedObject(rng.choice(D.COLOURS), rng.choice(D.SHAPES), rng.randint(0, D.SIZE - w),
                                       rng.randint(0, D.SIZE - h), w, h))
        layouts.append(objs)  # overlapping objects too: painted in order by both
    got = S.render_objects(layouts)
    want = torch.from_numpy(np.stack([D.render(o) for o in layouts]))
    assert got.dtype == torch.float32 and got.shape == (300, 3, D.SIZE, D.SIZE)
    assert torch.equal(got, want)  # bit-exact
    with pytest.raises(HpruneError, match="does not fit"):
        S.render_objects([[D.PlacedObject("red", "circle", 28, 0, 6, 6)]])
    with pytest.raises(HpruneError, match="unknown colour"):
        S.render_objects([[D.PlacedObject("purple", "circle", 0, 0, 6, 6)]])


def test_generated_scenes_are_ground_truth_for_the_scorer(table):
    sc = S.sample_scenes(table, 160, _gen(1))
    img = S.render(sc)
    assert img.shape == (160, 3, D.SIZE, D.SIZE)
    assert not table.heldout[sc.caption_index].any()
    for b in range(160):
        cap = table.captions[int(sc.caption_index[b])]
        objs = sc.objects(b)
        assert torch.equal(img[b], torch.from_numpy(D.render(objs))), cap
        assert score_image(img[b], cap)["score"] == 1.0, cap  # the scorer reads it as the caption says
        spec = D.parse_caption(cap)
        assert [(o.colour, o.shape) for o in objs] == [(o.colour, o.shape) for o in spec.objects]
        for o in objs:  # the layout rules of data.layout
            assert D.MARGIN <= min(o.x0, o.y0) and max(o.x0, o.y0) + o.w <= D.SIZE - D.MARGIN
            assert D._side_range(spec.objects[0], spec.count > 1)[0] <= o.w <= D._side_range(spec.objects[0], spec.count > 1)[1]
        if spec.position:
            cx, cy = objs[0].centre
            assert {"left": D.SIZE / 2 - cx, "right": cx - D.SIZE / 2, "top": D.SIZE / 2 - cy,
                    "bottom": cy - D.SIZE / 2}[spec.position] >= D.POS_MARGIN
        for i, a in enumerate(objs):
            for c in objs[i + 1:]:
                assert D._separated(a, c)
    # ids are the tokenizer's
    from hprune.shapes.text import Tokenizer
    assert torch.equal(sc.ids, Tokenizer().encode([table.captions[i] for i in sc.caption_index.tolist()]))


def test_caption_and_layout_distribution_matches_the_reference(table):
    n = 3000
    sc = S.sample_scenes(table, n, _gen(2))
    ref = D.dataset(n, seed=5, split="train")
    mine = [D.parse_caption(table.captions[i]) for i in sc.caption_index.tolist()]
    theirs = [s.spec for s in ref]
    # shares of templates, size words, shapes and colours agree within 0.035 (about 4 standard
    # errors of a share from 3,000 draws each)
    for key in (lambda s: s.template, lambda s: s.objects[0].size, lambda s: s.objects[0].shape,
                lambda s: s.objects[0].colour, lambda s: s.count):
        a, b = Counter(map(key, mine)), Counter(map(key, theirs))
        for k in set(a) | set(b):
            assert abs(a[k] / n - b[k] / n) < 0.035, (k, a[k], b[k])
    # object sides and positions: means within 0.25 px (sd of a side ~2 px, of a position ~6 px)
    sides = sc.side[sc.active].float()
    ref_sides = torch.tensor([float(o.w) for s in ref for o in s.objects])
    assert abs(float(sides.mean()) - float(ref_sides.mean())) < 0.15
    xs = (sc.x0[sc.active] * 2 + sc.side[sc.active]).float() / 2
    ref_xs = torch.tensor([o.centre[0] for s in ref for o in s.objects])
    assert abs(float(xs.mean()) - float(ref_xs.mean())) < 0.4


def test_splits_templates_and_same_colour_share(table):
    held = S.sample_captions(table, 400, _gen(3), split="heldout")
    assert table.heldout[held].all()
    rows = S.sample_captions(table, 12, _gen(3), templates=("count", "pair", "single"))
    assert [D.TEMPLATES[int(t)] for t in table.template[rows]] == ["count", "pair", "single"] * 4
    for share, lo, hi in ((None, 0.07, 0.17), (1.0, 1.0, 1.0), (0.5, 0.44, 0.56), (0.0, 0.0, 0.0)):
        r = S.sample_captions(table, 2000, _gen(4), same_colour=share)
        two = table.two_object[r]
        frac = float(table.same_colour[r][two].float().mean())
        assert lo <= frac <= hi, (share, frac)
    with pytest.raises(HpruneError, match="unknown template"):
        S.sample_captions(table, 4, _gen(0), templates=("triangles",))
    with pytest.raises(HpruneError, match="same-colour share"):
        S.sample_captions(table, 4, _gen(0), same_colour=1.5)


def test_shape_twins_differ_only_in_shape(table):
    sc = S.sample_scenes(table, 200, _gen(6))
    tw, ok = S.shape_twins(table, sc, _gen(7))
    assert ok.float().mean() > 0.9
    a, b = S.render(sc), S.render(tw)
    for i in range(200):
        ca, cb = table.captions[int(sc.caption_index[i])], table.captions[int(tw.caption_index[i])]
        if not ok[i]:
            assert ca == cb
            continue
        sa, sb = D.parse_caption(ca), D.parse_caption(cb)
        assert (sa.template, sa.position, sa.relation) == (sb.template, sb.position, sb.relation)
        assert [o.colour for o in sa.objects] == [o.colour for o in sb.objects]
        changed = [j for j in range(sa.count) if sa.objects[j].shape != sb.objects[j].shape]
        assert changed == (list(range(sa.count)) if sa.template == "count" else [0]), (ca, cb)
        assert not table.heldout[tw.caption_index[i]]  # a twin stays in the training split
        assert score_image(b[i], cb)["score"] == 1.0
        # same boxes and colours: the images agree outside the changed objects' boxes
        outside = torch.ones(D.SIZE, D.SIZE, dtype=torch.bool)
        for j in changed:
            x0, y0, s = int(sc.x0[i, j]), int(sc.y0[i, j]), int(sc.side[i, j])
            outside[y0:y0 + s, x0:x0 + s] = False
        assert torch.equal(a[i][:, outside], b[i][:, outside]) and not torch.equal(a[i], b[i])
