"""Analytic GenEval-style scoring of ShapesBench images.

Detection (exact on rendered ground truth):
  1. every pixel goes to the nearest of the palette colours and the background, if it lies within
     `TOLERANCE` of it (else it is left out, as background);
  2. each colour's pixels split into 8-connected components; a component is a detected object when
     it has at least `MIN_AREA` pixels and at least `MIN_CORE` interior pixels (all 8 neighbours
     of its colour): thin colour fringes and speckles of a generated image have no interior and
     are not objects (the smallest rendered object, a 6-pixel triangle, has 4 interior pixels);
  3. an object's shape is the template (circle / square / triangle rendered into the object's own
     bounding box, hprune.shapes.data.shape_mask) with the highest IoU with its pixels; its size
     word is "small" when the box's longer side is at most SIZE_SPLIT pixels; its position is the
     box centre.

Scoring a caption: the stated objects are assigned one-to-one to detected objects (the assignment
that passes most checks; ties go to larger objects). The checks, each 0 or 1:
  present_j, colour_j, shape_j (and size_j when the caption states a size) for each stated object j,
  position (when the caption states a position or a relation), count (as many objects detected as
  stated). The caption's score is the mean of its checks; a perfect image scores exactly 1 and an
  object in the wrong colour loses exactly its colour check.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from hprune.errors import HpruneError
from hprune.shapes.data import (BACKGROUND, PALETTE, SHAPES, SIZE_SPLIT, CaptionSpec, parse_caption,
                                position_holds, relation_holds, shape_mask)

TOLERANCE = 0.5  # Euclidean RGB distance; palette colours are >= 1.0 apart, so assignment is unique
MIN_AREA = 10  # pixels; the smallest rendered object (a 6-pixel triangle) has 24
MIN_CORE = 3  # interior pixels; the smallest rendered object has 4
MAX_OBJECTS = 8  # only the largest detected objects take part in the assignment
ATTRIBUTES = ("present", "colour", "shape", "size", "position", "count")


@dataclass(frozen=True)
class Detected:
    """A detected object: colour, shape (best template), bounding box (x0, y0, w, h), area and IoU
    of the best template."""
    colour: str
    shape: str
    box: tuple[int, int, int, int]
    area: int
    iou: float

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, w, h = self.box
        return x0 + w / 2, y0 + h / 2

    @property
    def size_word(self) -> str:
        return "small" if max(self.box[2], self.box[3]) <= SIZE_SPLIT else "large"


def _as_hwc(image: Any) -> np.ndarray:
    """(3, H, W) or (H, W, 3), numpy or torch, float in [0, 1] or uint8 -> float64 (H, W, 3)."""
    a = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    if a.ndim != 3 or 3 not in (a.shape[0], a.shape[-1]):
        raise HpruneError(f"expected an RGB image (3, H, W) or (H, W, 3), got shape {tuple(a.shape)}")
    if a.shape[0] == 3:  # channels first (the torch layout) wins when both could be channels
        a = np.moveaxis(a, 0, -1)
    a = a.astype(np.float64)
    if a.max(initial=0) > 1.0 + 1e-6:  # uint8-style values
        a = a / 255.0
    return np.clip(a, 0.0, 1.0)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a boolean (H, W) mask, as arrays of (y, x) pixel coordinates."""
    h, w = mask.shape
    seen = np.zeros_like(mask)
    comps = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        stack, pix = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            pix.append((y, x))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    yy, xx = y + dy, x + dx
                    if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not seen[yy, xx]:
                        seen[yy, xx] = True
                        stack.append((yy, xx))
        comps.append(np.asarray(pix))
    return comps


def _interior(mask: np.ndarray) -> np.ndarray:
    """Pixels of `mask` whose 8 neighbours are all in `mask` (outside the image counts as not)."""
    m = np.pad(mask, 1)
    core = m.copy()
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            core &= np.roll(np.roll(m, dy, 0), dx, 1)
    return core[1:-1, 1:-1]


def classify_shape(pixels: np.ndarray) -> tuple[str, float, tuple[int, int, int, int]]:
    """Best template for a component's (y, x) pixels: (shape, IoU, box (x0, y0, w, h))."""
    ys, xs = pixels[:, 0], pixels[:, 1]
    x0, y0 = int(xs.min()), int(ys.min())
    w, h = int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1
    own = np.zeros((h, w), dtype=bool)
    own[ys - y0, xs - x0] = True
    best, best_iou = SHAPES[0], -1.0
    for shape in SHAPES:
        t = shape_mask(shape, w, h)
        iou = float((t & own).sum() / max((t | own).sum(), 1))
        if iou > best_iou:
            best, best_iou = shape, iou
    return best, best_iou, (x0, y0, w, h)


def detect(image: Any) -> list[Detected]:
    """Detected objects of an image ((3, H, W) or (H, W, 3); floats in [0, 1] or uint8), largest first."""
    a = _as_hwc(image)
    names = ["background"] + list(PALETTE)
    refs = np.asarray([BACKGROUND] + [PALETTE[n] for n in PALETTE])  # (K, 3)
    dist = np.linalg.norm(a[:, :, None, :] - refs[None, None], axis=-1)  # (H, W, K)
    label = dist.argmin(-1)
    label[dist.min(-1) > TOLERANCE] = 0
    found = []
    for k in range(1, len(names)):
        mask = label == k
        if not mask.any():
            continue
        core = _interior(mask)
        for pix in _components(mask):
            if len(pix) < MIN_AREA or core[pix[:, 0], pix[:, 1]].sum() < MIN_CORE:
                continue
            shape, iou, box = classify_shape(pix)
            found.append(Detected(names[k], shape, box, int(len(pix)), iou))
    found.sort(key=lambda d: (-d.area, d.box))
    return found


def _checks(spec: CaptionSpec, assigned: Sequence[Detected | None], n_found: int) -> dict[str, int]:
    c: dict[str, int] = {}
    for j, (o, d) in enumerate(zip(spec.objects, assigned)):
        c[f"present_{j}"] = int(d is not None)
        c[f"colour_{j}"] = int(d is not None and d.colour == o.colour)
        c[f"shape_{j}"] = int(d is not None and d.shape == o.shape)
        if o.size is not None:
            c[f"size_{j}"] = int(d is not None and d.size_word == o.size)
    if spec.position is not None:
        d = assigned[0]
        c["position"] = int(d is not None and position_holds(*d.centre, spec.position))
    if spec.relation is not None:
        a, b = assigned[0], assigned[1]
        c["position"] = int(a is not None and b is not None and relation_holds(a.centre, b.centre, spec.relation))
    c["count"] = int(n_found == spec.count)
    return c


def score_image(image: Any, caption: str | CaptionSpec) -> dict[str, Any]:
    """Scores one image against one caption. Returns {"score": mean of the checks in [0, 1],
    "checks": {name: 0|1}, "detected": [objects as dicts]}. See the module docstring."""
    spec = parse_caption(caption) if isinstance(caption, str) else caption
    found = detect(image)
    cand = found[:MAX_OBJECTS]
    k = spec.count
    slots: list[Detected | None] = list(cand) + [None] * k  # None: a stated object left unassigned
    best: tuple[int, int] | None = None
    best_checks: dict[str, int] = {}
    for perm in itertools.permutations(range(len(slots)), k):
        assigned = [slots[i] for i in perm]
        if sum(a is not None for a in assigned) != min(k, len(cand)):
            continue  # every stated object gets an object while there are any left
        checks = _checks(spec, assigned, len(found))
        key = (sum(checks.values()), sum(a.area for a in assigned if a is not None))
        if best is None or key > best:
            best, best_checks = key, checks
    total = len(best_checks)
    return {"score": sum(best_checks.values()) / total, "checks": best_checks,
            "detected": [{"colour": d.colour, "shape": d.shape, "box": list(d.box), "area": d.area,
                          "iou": round(d.iou, 4)} for d in found]}


def attribute_of(check: str) -> str:
    return check.split("_")[0]


def summarise(results: Sequence[dict[str, Any]], captions: Sequence[str]) -> dict[str, Any]:
    """Aggregates per-caption results: overall score (mean of caption scores), exact-match rate
    (every check passed), per-attribute accuracy (passed / stated checks of that attribute over all
    captions) and mean score per template."""
    if not results:
        raise HpruneError("nothing to summarise: no scored images")
    passed = {a: 0 for a in ATTRIBUTES}
    stated = {a: 0 for a in ATTRIBUTES}
    per_tmpl: dict[str, list[float]] = {}
    for r, cap in zip(results, captions):
        for name, v in r["checks"].items():
            a = attribute_of(name)
            passed[a] += v
            stated[a] += 1
        per_tmpl.setdefault(parse_caption(cap).template, []).append(r["score"])
    scores = [r["score"] for r in results]
    return {"score": float(np.mean(scores)), "exact": float(np.mean([s == 1.0 for s in scores])),
            "attributes": {a: passed[a] / stated[a] for a in ATTRIBUTES if stated[a]},
            "templates": {t: float(np.mean(v)) for t, v in sorted(per_tmpl.items())}, "n": len(results)}


def psnr(a: Any, b: Any) -> float:
    """Peak signal-to-noise ratio (dB, peak 1) between two images or batches in [0, 1]; inf if equal."""
    x = a.detach().cpu().double().numpy() if hasattr(a, "detach") else np.asarray(a, dtype=np.float64)
    y = b.detach().cpu().double().numpy() if hasattr(b, "detach") else np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise HpruneError(f"psnr needs equal shapes, got {x.shape} and {y.shape}")
    mse = float(np.mean((np.clip(x, 0, 1) - np.clip(y, 0, 1)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(1.0 / mse))
