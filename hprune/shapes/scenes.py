"""ShapesBench scenes generated and rendered in torch, in batches, on any device (the GPU training
path: no CPU data loader between the sampler and the model).

Same task as hprune.shapes.data, tensor by tensor:

- captions come from a table of every caption of the grammar (`SceneTable`), drawn with the
  probabilities `data.random_caption_spec` gives them (template weights, uniform colours / shapes,
  size words, the train / held-out split by the same hash);
- layouts are drawn by the rules of `data.layout` (side ranges, border margin, gaps, position and
  relation margins), by rejection like it: the first acceptable one of independent proposals,
  which has the same distribution;
- rendering uses `data.shape_mask`'s rule (a pixel is inside when its centre is) in exact integer
  arithmetic, so an image is pixel-for-pixel the one `data.render` draws for the same objects
  (tests/test_shapes_scenes.py checks equality, and that the scorer reads every generated image
  as a perfect 1).

Two training options change which captions are drawn (hprune.shapes.train documents why):
`same_colour` (the share of two-object captions whose objects have one colour, so only the shape
words tell them apart) and shape twins (`shape_swap`: the caption with the first object's shape,
all shapes for counts, replaced; the layout can be kept, since boxes do not depend on shape).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from hprune.errors import HpruneError
from hprune.shapes import data as D

MAX_OBJECTS = 3
_PALETTE = torch.tensor([D.PALETTE[c] for c in D.COLOURS], dtype=torch.float32)  # (6, 3)


@dataclass
class Scenes:
    """A batch of B scenes (on one device). Object slots beyond a caption's count are inactive.

    caption_index (B,) int64 row of the SceneTable; ids (B, T) int64 token ids;
    colour, shape (B, 3) int64 indices into data.COLOURS / data.SHAPES; x0, y0, side (B, 3) int64
    boxes in pixels; active (B, 3) bool."""
    caption_index: torch.Tensor
    ids: torch.Tensor
    colour: torch.Tensor
    shape: torch.Tensor
    x0: torch.Tensor
    y0: torch.Tensor
    side: torch.Tensor
    active: torch.Tensor

    def objects(self, b: int) -> list[D.PlacedObject]:
        """Scene b as data.PlacedObject's (for the CPU renderer and scorer)."""
        return [D.PlacedObject(D.COLOURS[int(self.colour[b, j])], D.SHAPES[int(self.shape[b, j])],
                               int(self.x0[b, j]), int(self.y0[b, j]), int(self.side[b, j]), int(self.side[b, j]))
                for j in range(MAX_OBJECTS) if bool(self.active[b, j])]


class SceneTable:
    """Every caption of the grammar as tensors on `device`, with its sampling probability.

    Rows follow data.all_captions(). Per row: template (index into data.TEMPLATES), n objects,
    per slot colour / shape / side range (-1 / 0 for unused slots), position and relation (index
    into data.POSITIONS / data.RELATIONS, -1 if none), token ids, held-out flag, the probability
    data.random_spec gives the caption (float64), and the rows of its shape twins."""

    def __init__(self, device: str | torch.device = "cpu", max_len: int | None = None):
        from hprune.shapes.text import MAX_LEN, Tokenizer

        self.device = torch.device(device)
        self.captions = D.all_captions()
        specs = [D.parse_caption(c) for c in self.captions]
        n = len(specs)
        row = {c: i for i, c in enumerate(self.captions)}
        colour = torch.full((n, MAX_OBJECTS), -1, dtype=torch.long)
        shape = torch.full((n, MAX_OBJECTS), -1, dtype=torch.long)
        lo = torch.zeros((n, MAX_OBJECTS), dtype=torch.long)
        hi = torch.zeros((n, MAX_OBJECTS), dtype=torch.long)
        position = torch.full((n,), -1, dtype=torch.long)
        relation = torch.full((n,), -1, dtype=torch.long)
        prob = torch.zeros(n, dtype=torch.float64)
        twin = torch.full((n, 2), -1, dtype=torch.long)  # shape moved on by 1 and by 2
        size_p = {None: 0.5, "small": 0.25, "large": 0.25}
        n_obj = len(D.COLOURS) * len(D.SHAPES)
        for i, s in enumerate(specs):
            for j, o in enumerate(s.objects):
                colour[i, j] = D.COLOURS.index(o.colour)
                shape[i, j] = D.SHAPES.index(o.shape)
                lo[i, j], hi[i, j] = D._side_range(o, s.count > 1)
            if s.position is not None:
                position[i] = D.POSITIONS.index(s.position)
            if s.relation is not None:
                relation[i] = D.RELATIONS.index(s.relation)
            p = D.TEMPLATE_WEIGHTS[s.template]
            if s.template in ("single", "position"):
                p *= size_p[s.objects[0].size] / n_obj / (len(D.POSITIONS) if s.template == "position" else 1)
            elif s.template == "count":
                p /= n_obj * len(D.NUMBERS)
            else:  # two distinct objects, uniformly
                p /= n_obj * (n_obj - 1) * (len(D.RELATIONS) if s.template == "relation" else 1)
            prob[i] = p
            for k in (1, 2):
                swap_all = s.template == "count"
                objs = [D.ObjectSpec(o.colour, D.SHAPES[(D.SHAPES.index(o.shape) + k) % 3], o.size)
                        if (j == 0 or swap_all) else o for j, o in enumerate(s.objects)]
                if len(set(objs)) < len(objs) and not swap_all:
                    continue  # the two objects of a pair / relation would be the same
                twin[i, k - 1] = row[D.CaptionSpec(s.template, tuple(objs), s.position, s.relation).text()]
        tok = Tokenizer(max_len=max_len or MAX_LEN)
        d = self.device
        self.template = torch.tensor([D.TEMPLATES.index(s.template) for s in specs], device=d)
        self.count = torch.tensor([s.count for s in specs], device=d)
        self.colour, self.shape, self.side_lo, self.side_hi = colour.to(d), shape.to(d), lo.to(d), hi.to(d)
        self.position, self.relation = position.to(d), relation.to(d)
        self.ids = tok.encode(self.captions).to(d)
        self.heldout = torch.tensor([D.is_heldout(c) for c in self.captions], device=d)
        self.prob = prob.to(d)
        self.twin = twin.to(d)
        two = self.count == 2
        self.same_colour = two & (self.colour[:, 0] == self.colour[:, 1])
        self.two_object = two & (self.template != D.TEMPLATES.index("count"))
        self.cdf_cache: dict[tuple, torch.Tensor] = {}  # sample_captions' cumulative weights per setting

    def __len__(self) -> int:
        return len(self.captions)

    def weights(self, split: str = "train", same_colour: float | None = None) -> torch.Tensor:
        """(N,) float64 sampling weights of the rows in `split` ("train" | "heldout" | "any"); with
        `same_colour` in [0, 1], the same-colour two-object captions get that share of each
        two-object template's weight (None: the grammar's own share, 2 in 17)."""
        if split not in ("train", "heldout", "any"):
            raise HpruneError(f"split must be train, heldout or any, not {split!r}")
        w = self.prob.clone()
        if split != "any":
            w = w * (self.heldout == (split == "heldout"))
        if same_colour is not None:
            if not 0.0 <= same_colour <= 1.0:
                raise HpruneError(f"same-colour share must lie in [0, 1], got {same_colour}")
            for t in ("pair", "relation"):
                in_t = self.template == D.TEMPLATES.index(t)
                same, other = in_t & self.same_colour, in_t & ~self.same_colour
                total, ws, wo = w[in_t].sum(), w[same].sum(), w[other].sum()
                if ws > 0:
                    w[same] *= same_colour * total / ws
                if wo > 0:
                    w[other] *= (1 - same_colour) * total / wo
        return w


def sample_captions(table: SceneTable, n: int, generator: torch.Generator, *, split: str = "train",
                    templates: Sequence[str] = (), same_colour: float | None = None) -> torch.Tensor:
    """(n,) int64 table rows drawn from `split` by data.random_caption_spec's distribution; with
    `templates`, row i is of template templates[i % len(templates)] (as data.dataset cycles them)."""
    dev = table.device
    key = (split, tuple(templates), same_colour)
    cdf = table.cdf_cache.get(key)
    if cdf is None:  # built once per setting: training asks for the same one every step
        w = table.weights(split, same_colour)
        if templates:
            unknown = [t for t in templates if t not in D.TEMPLATES]
            if unknown:
                raise HpruneError(f"unknown template {unknown[0]!r}; choose from {', '.join(D.TEMPLATES)}")
            groups = torch.stack([w * (table.template == D.TEMPLATES.index(t)) for t in templates])
        else:
            groups = w[None]
        if (groups.sum(1) <= 0).any():
            raise HpruneError(f"no caption of templates {list(templates)} in split {split!r}")
        cdf = groups.cumsum(1)
        cdf = table.cdf_cache[key] = cdf / cdf[:, -1:]
    which = torch.arange(n, device=dev) % cdf.shape[0]
    u = torch.rand(n, 1, generator=generator, device=dev, dtype=torch.float64)
    idx = torch.searchsorted(cdf[which].contiguous(), u).squeeze(1)
    return idx.clamp_max(len(table) - 1)


def _acceptable(table: SceneTable, rows: torch.Tensor, x0: torch.Tensor, y0: torch.Tensor, side: torch.Tensor,
                size: int) -> torch.Tensor:
    """(P, K) bool: which proposals (P, K, 3) satisfy data.layout's rules for caption `rows` (P,).
    Centres are compared doubled (2 cx = 2 x0 + w), so every test is exact integer arithmetic."""
    count = table.count[rows][:, None]  # (P, 1)
    ok = torch.ones(x0.shape[:2], dtype=torch.bool, device=x0.device)
    for a in range(MAX_OBJECTS):
        for b in range(a + 1, MAX_OBJECTS):
            sep = ((x0[..., a] + side[..., a] + D.GAP <= x0[..., b]) | (x0[..., b] + side[..., b] + D.GAP <= x0[..., a])
                   | (y0[..., a] + side[..., a] + D.GAP <= y0[..., b]) | (y0[..., b] + side[..., b] + D.GAP <= y0[..., a]))
            ok &= sep | (count <= b)
    cx, cy = 2 * x0 + side, 2 * y0 + side  # doubled centres
    m2 = 2 * D.POS_MARGIN
    pos = table.position[rows][:, None]
    off = torch.stack([size - cx[..., 0], cx[..., 0] - size, size - cy[..., 0], cy[..., 0] - size], -1)  # l r t b
    pos_ok = off.gather(-1, pos.clamp_min(0).expand(-1, x0.shape[1])[..., None]).squeeze(-1) >= m2
    ok &= pos_ok | (pos < 0)
    rel = table.relation[rows][:, None]
    dx, dy = cx[..., 0] - cx[..., 1], cy[..., 0] - cy[..., 1]
    horizontal = rel <= 1  # "left of", "right of"
    main, other = torch.where(horizontal, dx, dy), torch.where(horizontal, dy, dx)
    sign = torch.where((rel == 0) | (rel == 2), -1, 1)  # "left of", "above" point the negative way
    rel_ok = (sign * main >= m2) & (main.abs() >= other.abs() + m2)
    return ok & (rel_ok | (rel < 0))


def sample_layouts(table: SceneTable, rows: torch.Tensor, generator: torch.Generator, *, size: int = D.SIZE,
                   proposals: int = 16, max_rounds: int = 500) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Boxes (x0, y0, side), each (B, 3) int64, for caption rows (B,): data.layout's distribution
    (uniform side in the caption's range, uniform position inside the margin, the caption's
    constraints by rejection). Unused slots are zeros."""
    dev = rows.device
    b = rows.shape[0]
    x0 = torch.zeros((b, MAX_OBJECTS), dtype=torch.long, device=dev)
    y0, side = torch.zeros_like(x0), torch.zeros_like(x0)
    pending = torch.arange(b, device=dev)
    for _ in range(max_rounds):
        if pending.numel() == 0:
            return x0, y0, side
        r = rows[pending]
        lo, hi = table.side_lo[r][:, None], table.side_hi[r][:, None]  # (P, 1, 3)
        def uniform(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:  # integers in [low, high]
            u = torch.rand(high.shape, generator=generator, device=dev)
            return low + (u * (high - low + 1)).long().clamp_max(high - low)

        s = uniform(lo, hi.expand(-1, proposals, -1))
        px = uniform(torch.full_like(s, D.MARGIN), size - D.MARGIN - s)
        py = uniform(torch.full_like(s, D.MARGIN), size - D.MARGIN - s)
        used = torch.arange(MAX_OBJECTS, device=dev) < table.count[r][:, None, None]
        s, px, py = s * used, px * used, py * used
        ok = _acceptable(table, r, px, py, s, size)
        found = ok.any(1)
        first = ok.long().argmax(1)  # the first acceptable proposal
        take = pending[found]
        k = first[found]
        x0[take], y0[take], side[take] = px[found, k], py[found, k], s[found, k]
        pending = pending[~found]
    raise HpruneError(f"could not lay out {pending.numel()} scenes in {max_rounds} rounds "
                      f"(e.g. {table.captions[int(rows[pending[0]])]!r})")


def render_boxes(colour: torch.Tensor, shape: torch.Tensor, x0: torch.Tensor, y0: torch.Tensor, w: torch.Tensor,
                 h: torch.Tensor, active: torch.Tensor, size: int = D.SIZE, check: bool = True) -> torch.Tensor:
    """Images (B, 3, size, size) float32 in [0, 1] on the inputs' device: black background, the
    active objects painted in slot order, pixel-for-pixel as data.render. All inputs (B, K) int64
    (colour / shape: indices into data.COLOURS / data.SHAPES), active (B, K) bool.

    Masks in integers (pixel (x, y) of a w x h box, centre (x + 1/2, y + 1/2)):
      circle    (2x + 1 - w)^2 h^2 + (2y + 1 - h)^2 w^2 <= w^2 h^2
      triangle  |2x + 1 - w| h <= (y + 1) w
      square    the whole box
    `check=False` skips the range checks (a host sync; sampled layouts are in range by construction)."""
    dev = colour.device
    if check and ((x0 < 0) | (y0 < 0) | (x0 + w > size) | (y0 + h > size))[active].any():
        raise HpruneError(f"an object does not fit a {size}x{size} image")
    if check and ((shape < 0) | (shape >= len(D.SHAPES)) | (colour < 0) | (colour >= len(D.COLOURS)))[active].any():
        raise HpruneError("a colour or shape index is out of range")
    grid = torch.arange(size, device=dev)
    ys, xs = grid.view(1, size, 1), grid.view(1, 1, size)
    bg = torch.tensor(D.BACKGROUND, dtype=torch.float32, device=dev)
    img = bg.view(1, 3, 1, 1).expand(colour.shape[0], 3, size, size).clone()
    palette = _PALETTE.to(dev)
    circle, square, triangle = (D.SHAPES.index(s) for s in ("circle", "square", "triangle"))
    for j in range(colour.shape[1]):
        wj, hj = w[:, j].view(-1, 1, 1), h[:, j].view(-1, 1, 1)
        x, y = xs - x0[:, j].view(-1, 1, 1), ys - y0[:, j].view(-1, 1, 1)  # (B, S, S) box coordinates
        inside = (x >= 0) & (x < wj) & (y >= 0) & (y < hj) & active[:, j].view(-1, 1, 1)
        ex, ey = 2 * x + 1 - wj, 2 * y + 1 - hj
        sj = shape[:, j].view(-1, 1, 1)
        m = torch.where(sj == circle, ex * ex * hj * hj + ey * ey * wj * wj <= wj * wj * hj * hj,
                        torch.where(sj == triangle, ex.abs() * hj <= (y + 1) * wj, sj == square))
        paint = (inside & m).unsqueeze(1)  # (B, 1, S, S)
        c = palette[colour[:, j].clamp(0, len(D.COLOURS) - 1)].view(-1, 3, 1, 1)
        img = torch.where(paint, c, img)
    return img


def render_objects(scenes: Sequence[Sequence[D.PlacedObject]], size: int = D.SIZE,
                   device: str | torch.device = "cpu") -> torch.Tensor:
    """render_boxes for lists of data.PlacedObject's: (B, 3, size, size) float32."""
    k = max((len(s) for s in scenes), default=0) or 1
    b = len(scenes)
    t = {name: torch.zeros((b, k), dtype=torch.long) for name in ("colour", "shape", "x0", "y0", "w", "h")}
    active = torch.zeros((b, k), dtype=torch.bool)
    for i, objs in enumerate(scenes):
        for j, o in enumerate(objs):
            if o.colour not in D.PALETTE:
                raise HpruneError(f"unknown colour {o.colour!r}; choose from {', '.join(D.COLOURS)}")
            if o.shape not in D.SHAPES:
                raise HpruneError(f"unknown shape {o.shape!r}; choose from {', '.join(D.SHAPES)}")
            for name, v in (("colour", D.COLOURS.index(o.colour)), ("shape", D.SHAPES.index(o.shape)),
                            ("x0", o.x0), ("y0", o.y0), ("w", o.w), ("h", o.h)):
                t[name][i, j] = v
            active[i, j] = True
    dev = torch.device(device)
    return render_boxes(*(t[k].to(dev) for k in ("colour", "shape", "x0", "y0", "w", "h")), active.to(dev), size)


def sample_scenes(table: SceneTable, n: int, generator: torch.Generator, *, split: str = "train",
                  templates: Sequence[str] = (), same_colour: float | None = None, size: int = D.SIZE) -> Scenes:
    """n random scenes of `split` on the table's device (captions, then layouts)."""
    rows = sample_captions(table, n, generator, split=split, templates=templates, same_colour=same_colour)
    return scenes_for(table, rows, generator, size=size)


def scenes_for(table: SceneTable, rows: torch.Tensor, generator: torch.Generator, *, size: int = D.SIZE) -> Scenes:
    """Scenes for given caption rows (B,), with random layouts."""
    x0, y0, side = sample_layouts(table, rows, generator, size=size)
    active = torch.arange(MAX_OBJECTS, device=rows.device) < table.count[rows][:, None]
    return Scenes(rows, table.ids[rows], table.colour[rows], table.shape[rows], x0, y0, side, active)


def shape_twins(table: SceneTable, scenes: Scenes, generator: torch.Generator) -> tuple[Scenes, torch.Tensor]:
    """For each scene, its twin with the first object's shape (every object's, for counts) moved
    to another shape, caption and tokens to match, same boxes and colours. Returns (twins, ok):
    ok (B,) bool is False where no twin caption exists in the same split (the twin would be
    held out, or a pair / relation would name one object twice); those rows are the scene itself."""
    k = (torch.rand(scenes.caption_index.shape[0], generator=generator, device=table.device) < 0.5).long()
    cand = table.twin[scenes.caption_index]  # (B, 2)
    first = cand.gather(1, k[:, None]).squeeze(1)
    other = cand.gather(1, (1 - k)[:, None]).squeeze(1)
    src_held = table.heldout[scenes.caption_index]

    def usable(r: torch.Tensor) -> torch.Tensor:
        return (r >= 0) & (table.heldout[r.clamp_min(0)] == src_held)

    row = torch.where(usable(first), first, torch.where(usable(other), other, scenes.caption_index))
    ok = row != scenes.caption_index
    twins = Scenes(row, table.ids[row], table.colour[row], table.shape[row], scenes.x0, scenes.y0, scenes.side,
                   scenes.active)
    return twins, ok


def render(scenes: Scenes, size: int = D.SIZE) -> torch.Tensor:
    """The scenes' images (B, 3, size, size) float32 in [0, 1]."""
    return render_boxes(scenes.colour, scenes.shape, scenes.x0, scenes.y0, scenes.side, scenes.side, scenes.active,
                        size, check=False)
