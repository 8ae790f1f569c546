"""ShapesBench data: procedurally generated images of coloured shapes and the captions that state them.

An image is `SIZE` x `SIZE` RGB (float32 in [0, 1], layout (3, H, W)) on a black background with
one to three solid shapes (circle, square, triangle) in one of six saturated colours. Shapes are
rasterised without anti-aliasing so that a rendered image has exactly the palette's colours and the
scorer (hprune.shapes.score) can recover every object exactly.

Captions follow a small grammar (`TEMPLATES`), parsed into a `CaptionSpec` that says what must be
in the image:

    single     "a [small|large] red circle"
    position   "a [small|large] red circle on the left"    (on the left / on the right / at the top / at the bottom)
    relation   "a red circle left of a blue square"         (left of / right of / above / below)
    pair       "a red circle and a blue square"
    count      "two red circles", "three green squares"

A caption's split (train or held-out) is a pure function of its text (a hash), so held-out captions
are never shown to the teacher while it trains, and every process agrees on the split.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from hprune.errors import HpruneError

SIZE = 32  # image side in pixels
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0), "magenta": (1.0, 0.0, 1.0), "cyan": (0.0, 1.0, 1.0),
}
BACKGROUND = (0.0, 0.0, 0.0)
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
PLURAL = {s: s + "s" for s in SHAPES}
SIZES = ("small", "large")
# Bounding-box side in pixels that each size word allows when generating; the scorer splits at
# SIZE_SPLIT (side <= SIZE_SPLIT is small), one pixel away from both ranges.
SIZE_RANGE = {"small": (6, 8), "large": (10, 12), None: (6, 12)}
SIZE_SPLIT = 9
MULTI_RANGE = (6, 10)  # side of objects in multi-object scenes (no size word)
POSITIONS = ("left", "right", "top", "bottom")
POSITION_PHRASE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
RELATIONS = ("left of", "right of", "above", "below")
NUMBERS = {"two": 2, "three": 3}
TEMPLATES = ("single", "position", "relation", "pair", "count")
# Training mix: multi-object templates are harder, so they are drawn more often.
TEMPLATE_WEIGHTS = {"single": 0.15, "position": 0.2, "relation": 0.3, "pair": 0.15, "count": 0.2}
HELDOUT_FRACTION = 0.15
MARGIN = 1  # empty pixels kept at the image border
GAP = 2  # empty pixels kept between two objects' bounding boxes (so they never touch)
POS_MARGIN = 4  # a positioned object's centre is at least this far from the image's midline


@dataclass(frozen=True)
class ObjectSpec:
    """One object a caption asks for."""
    colour: str
    shape: str
    size: str | None = None  # "small" | "large" | None (not stated)


@dataclass(frozen=True)
class CaptionSpec:
    """What a caption states: the objects (in caption order), and at most one spatial constraint:
    `position` (single object relative to the image) or `relation` (objects[0] relative to
    objects[1])."""
    template: str
    objects: tuple[ObjectSpec, ...]
    position: str | None = None
    relation: str | None = None

    @property
    def count(self) -> int:
        return len(self.objects)

    def text(self) -> str:
        """The caption (the inverse of `parse_caption`)."""
        o = self.objects
        if self.template == "count":
            num = {v: k for k, v in NUMBERS.items()}[len(o)]
            return f"{num} {o[0].colour} {PLURAL[o[0].shape]}"
        if self.template == "relation":
            return f"{_phrase(o[0])} {self.relation} {_phrase(o[1])}"
        if self.template == "pair":
            return f"{_phrase(o[0])} and {_phrase(o[1])}"
        if self.template == "position":
            return f"{_phrase(o[0])} {POSITION_PHRASE[self.position]}"
        return _phrase(o[0])


def _phrase(o: ObjectSpec) -> str:
    return " ".join(["a"] + ([o.size] if o.size else []) + [o.colour, o.shape])


@dataclass(frozen=True)
class PlacedObject:
    """An object drawn in an image: its bounding box is [x0, x0 + w) x [y0, y0 + h) in pixels."""
    colour: str
    shape: str
    x0: int
    y0: int
    w: int
    h: int

    @property
    def centre(self) -> tuple[float, float]:
        return self.x0 + self.w / 2, self.y0 + self.h / 2


@dataclass
class Sample:
    spec: CaptionSpec
    objects: list[PlacedObject] = field(default_factory=list)

    @property
    def caption(self) -> str:
        return self.spec.text()

    def image(self) -> np.ndarray:
        return render(self.objects)


# ---- grammar -------------------------------------------------------------------------------------

def _parse_object(words: list[str], i: int, caption: str) -> tuple[ObjectSpec, int]:
    if i >= len(words) or words[i] != "a":
        raise HpruneError(f"cannot parse caption {caption!r}: expected 'a' at word {i + 1}")
    i += 1
    size = None
    if i < len(words) and words[i] in SIZES:
        size, i = words[i], i + 1
    if i >= len(words):
        raise HpruneError(f"cannot parse caption {caption!r}: it ends where a colour should be")
    if words[i] not in PALETTE:
        raise HpruneError(f"cannot parse caption {caption!r}: unknown colour {words[i]!r} "
                          f"(colours: {', '.join(COLOURS)})")
    if i + 1 >= len(words) or words[i + 1] not in SHAPES:
        got = words[i + 1] if i + 1 < len(words) else "nothing"
        raise HpruneError(f"cannot parse caption {caption!r}: expected a shape ({', '.join(SHAPES)}), got {got!r}")
    return ObjectSpec(words[i], words[i + 1], size), i + 2


def parse_caption(caption: str) -> CaptionSpec:
    """Parses a caption of the ShapesBench grammar; raises HpruneError saying what is wrong."""
    words = caption.lower().replace(",", " ").split()
    if not words:
        raise HpruneError("cannot parse an empty caption")
    if words[0] in NUMBERS:
        n = NUMBERS[words[0]]
        plural = {v: k for k, v in PLURAL.items()}
        if len(words) != 3 or words[1] not in PALETTE or words[2] not in plural:
            raise HpruneError(f"cannot parse caption {caption!r}: expected '<number> <colour> <shapes>', "
                              f"e.g. 'two red circles'")
        obj = ObjectSpec(words[1], plural[words[2]])
        return CaptionSpec("count", (obj,) * n)
    first, i = _parse_object(words, 0, caption)
    if i == len(words):
        return CaptionSpec("single", (first,))
    rest = " ".join(words[i:])
    for pos, phrase in POSITION_PHRASE.items():
        if rest == phrase:
            return CaptionSpec("position", (first,), position=pos)
    for rel in RELATIONS + ("and",):
        if rest.startswith(rel + " "):
            n_rel = len(rel.split())
            second, j = _parse_object(words, i + n_rel, caption)
            if j != len(words):
                raise HpruneError(f"cannot parse caption {caption!r}: unexpected words after the second object")
            if rel == "and":
                return CaptionSpec("pair", (first, second))
            return CaptionSpec("relation", (first, second), relation=rel)
    raise HpruneError(f"cannot parse caption {caption!r}: after the first object expect a position "
                      f"({', '.join(POSITION_PHRASE.values())}), a relation ({', '.join(RELATIONS)}) or 'and'")


def all_captions() -> list[str]:
    """Every caption of the grammar (sorted): the space the train / held-out split divides."""
    objs = [ObjectSpec(c, s, z) for c in COLOURS for s in SHAPES for z in (None,) + SIZES]
    plain = [ObjectSpec(c, s) for c in COLOURS for s in SHAPES]
    specs = [CaptionSpec("single", (o,)) for o in objs]
    specs += [CaptionSpec("position", (o,), position=p) for o in objs for p in POSITIONS]
    for a in plain:
        for b in plain:
            if a == b:
                continue
            specs += [CaptionSpec("relation", (a, b), relation=r) for r in RELATIONS]
            specs.append(CaptionSpec("pair", (a, b)))
    specs += [CaptionSpec("count", (o,) * n) for o in plain for n in NUMBERS.values()]
    return sorted(s.text() for s in specs)


def is_heldout(caption: str) -> bool:
    """Whether a caption belongs to the held-out split (a fixed hash of its normalised text)."""
    norm = " ".join(caption.lower().split())
    h = int.from_bytes(hashlib.sha256(norm.encode()).digest()[:8], "little")
    return (h % 10_000) < HELDOUT_FRACTION * 10_000


def random_spec(rng: random.Random, template: str | None = None) -> CaptionSpec:
    """A random caption spec (of `template`, or drawn from TEMPLATE_WEIGHTS)."""
    if template is None:
        template = rng.choices(list(TEMPLATE_WEIGHTS), weights=list(TEMPLATE_WEIGHTS.values()))[0]
    if template not in TEMPLATES:
        raise HpruneError(f"unknown template {template!r}; choose from {', '.join(TEMPLATES)}")

    def obj(sized: bool) -> ObjectSpec:
        size = rng.choice(SIZES) if sized and rng.random() < 0.5 else None
        return ObjectSpec(rng.choice(COLOURS), rng.choice(SHAPES), size)

    if template == "single":
        return CaptionSpec("single", (obj(True),))
    if template == "position":
        return CaptionSpec("position", (obj(True),), position=rng.choice(POSITIONS))
    if template == "count":
        o = obj(False)
        return CaptionSpec("count", (o,) * rng.choice(sorted(NUMBERS.values())))
    a = obj(False)
    b = obj(False)
    while b == a:
        b = obj(False)
    if template == "pair":
        return CaptionSpec("pair", (a, b))
    return CaptionSpec("relation", (a, b), relation=rng.choice(RELATIONS))


def random_caption_spec(rng: random.Random, split: str = "train", template: str | None = None) -> CaptionSpec:
    """A random spec whose caption is in `split` ("train" | "heldout" | "any")."""
    if split not in ("train", "heldout", "any"):
        raise HpruneError(f"split must be train, heldout or any, not {split!r}")
    for _ in range(100_000):
        spec = random_spec(rng, template)
        if split == "any" or is_heldout(spec.text()) == (split == "heldout"):
            return spec
    raise HpruneError(f"no caption of template {template!r} in split {split!r}")


# ---- layout --------------------------------------------------------------------------------------

def _side_range(o: ObjectSpec, multi: bool) -> tuple[int, int]:
    return MULTI_RANGE if multi and o.size is None else SIZE_RANGE[o.size]


def _separated(a: PlacedObject, b: PlacedObject) -> bool:
    return (a.x0 + a.w + GAP <= b.x0 or b.x0 + b.w + GAP <= a.x0 or
            a.y0 + a.h + GAP <= b.y0 or b.y0 + b.h + GAP <= a.y0)


def position_holds(cx: float, cy: float, position: str, size: int = SIZE) -> bool:
    """The scorer's rule for an object's position in the image (centre strictly in that half)."""
    mid = size / 2
    return {"left": cx < mid, "right": cx > mid, "top": cy < mid, "bottom": cy > mid}[position]


def relation_holds(a: tuple[float, float], b: tuple[float, float], relation: str) -> bool:
    """The scorer's rule for 'A <relation> B' from centres: the offset points the stated way and
    along its dominant axis (|dx| > |dy| for left/right, |dy| > |dx| for above/below)."""
    dx, dy = a[0] - b[0], a[1] - b[1]
    if relation == "left of":
        return dx < 0 and abs(dx) > abs(dy)
    if relation == "right of":
        return dx > 0 and abs(dx) > abs(dy)
    if relation == "above":
        return dy < 0 and abs(dy) > abs(dx)
    return dy > 0 and abs(dy) > abs(dx)


def layout(spec: CaptionSpec, rng: random.Random, size: int = SIZE, tries: int = 2000) -> list[PlacedObject]:
    """Random placement of the spec's objects that satisfies it with margins (rejection sampling):
    objects inside the border margin, pairwise separated by GAP pixels, positions POS_MARGIN
    pixels past the midline, relations with the dominant axis ahead by POS_MARGIN pixels."""
    multi = spec.count > 1
    for _ in range(tries):
        placed = []
        for o in spec.objects:
            lo, hi = _side_range(o, multi)
            s = rng.randint(lo, hi)
            placed.append(PlacedObject(o.colour, o.shape, rng.randint(MARGIN, size - MARGIN - s),
                                       rng.randint(MARGIN, size - MARGIN - s), s, s))
        if not all(_separated(a, b) for i, a in enumerate(placed) for b in placed[i + 1:]):
            continue
        if spec.position is not None:
            cx, cy = placed[0].centre
            off = {"left": size / 2 - cx, "right": cx - size / 2, "top": size / 2 - cy, "bottom": cy - size / 2}
            if off[spec.position] < POS_MARGIN:
                continue
        if spec.relation is not None:
            (ax, ay), (bx, by) = placed[0].centre, placed[1].centre
            dx, dy = ax - bx, ay - by
            main, other = (dx, dy) if spec.relation in ("left of", "right of") else (dy, dx)
            sign = -1 if spec.relation in ("left of", "above") else 1
            if sign * main < POS_MARGIN or abs(main) < abs(other) + POS_MARGIN:
                continue
        return placed
    raise HpruneError(f"could not lay out {spec.text()!r} in a {size}x{size} image")


def make_sample(spec: CaptionSpec, rng: random.Random, size: int = SIZE) -> Sample:
    return Sample(spec, layout(spec, rng, size))


# ---- rendering -----------------------------------------------------------------------------------

def shape_mask(shape: str, w: int, h: int) -> np.ndarray:
    """Boolean (h, w) mask of `shape` filling a w x h box: a pixel is inside when its centre is.
    Every row and column of the box is hit, so the mask's bounding box is the whole box."""
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    if shape == "square":
        return np.ones((h, w), dtype=bool)
    if shape == "circle":  # ellipse inscribed in the box
        return ((xs - w / 2) / (w / 2)) ** 2 + ((ys - h / 2) / (h / 2)) ** 2 <= 1.0 + 1e-9
    if shape == "triangle":  # apex up; row r spans (r + 1) / h of the base, centred
        half = (np.floor(ys) + 1) / h * (w / 2)
        return np.abs(xs - w / 2) <= half + 1e-9
    raise HpruneError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")


def render(objects: Iterable[PlacedObject], size: int = SIZE) -> np.ndarray:
    """The image (3, size, size) float32 in [0, 1]: black background, objects painted in order."""
    img = np.zeros((3, size, size), dtype=np.float32)
    img[:] = np.asarray(BACKGROUND, dtype=np.float32)[:, None, None]
    for o in objects:
        if o.colour not in PALETTE:
            raise HpruneError(f"unknown colour {o.colour!r}; choose from {', '.join(COLOURS)}")
        if o.x0 < 0 or o.y0 < 0 or o.x0 + o.w > size or o.y0 + o.h > size:
            raise HpruneError(f"object {o} does not fit a {size}x{size} image")
        m = shape_mask(o.shape, o.w, o.h)
        region = img[:, o.y0:o.y0 + o.h, o.x0:o.x0 + o.w]
        for c, v in enumerate(PALETTE[o.colour]):
            region[c][m] = v
    return img


def dataset(n: int, seed: int, split: str = "train", templates: Sequence[str] | None = None,
            size: int = SIZE) -> list[Sample]:
    """`n` seeded samples of `split`, templates drawn from TEMPLATE_WEIGHTS (or cycled through
    `templates`)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        tmpl = templates[i % len(templates)] if templates else None
        out.append(make_sample(random_caption_spec(rng, split, tmpl), rng, size))
    return out


def heldout_set(n: int, seed: int = 1234) -> list[Sample]:
    """The evaluation set: `n` held-out captions cycling through every template (each sample also
    carries one ground-truth layout, for reference images)."""
    return dataset(n, seed, "heldout", templates=TEMPLATES)


def split_counts() -> dict[str, int]:
    caps = all_captions()
    held = sum(is_heldout(c) for c in caps)
    return {"captions": len(caps), "heldout": held, "train": len(caps) - held}
