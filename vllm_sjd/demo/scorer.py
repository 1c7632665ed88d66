"""Prompt adherence from the pixels: does an image show what its caption says?

For captions of the demo grammar (`vllm_sjd.demo.scenes`). No learned model:

1. Background: the median grey level of the achromatic pixels (chroma
   max(RGB) - min(RGB) below CHROMA_THRESHOLD) -> black / gray / white.
2. Objects: chromatic pixels, each labelled with the nearest colour hue;
   4-connected components per colour; components of at least MIN_AREA px
   are objects.
3. Per object: shape from the fill ratio of its bounding box (square ~1,
   circle pi/4, triangle 1/2), size from the bounding box's longer side,
   position from the box centre (nearest of the five anchors).

A caption object is matched to the largest object of its colour. Scored
attributes: background, count (objects found = objects named), and per
named object colour (an object of that colour exists), shape, size and
position (each wrong when the colour is missing). The caption is satisfied
when every attribute is right.
"""

from __future__ import annotations

import colorsys
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from vllm_sjd.demo import scenes as sc

CHROMA_THRESHOLD = 0.15
MIN_AREA = 60  # px; the smallest drawn object covers about 190
BACKGROUND_LEVELS = (("black", 0.28), ("gray", 0.72), ("white", 1.01))
SQUARE_FILL, TRIANGLE_FILL = 0.9, 0.64  # fill ratio >= square, < triangle, else circle
LARGE_SIDE = 34.0  # px: bounding-box side of small shapes <= 31, of large ones >= 38

ATTRIBUTES = ("background", "count", "colour", "shape", "size", "position")


@dataclass(frozen=True)
class Detected:
    colour: str
    area: int
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (inclusive)
    fill: float
    shape: str
    size: str
    position: str


@dataclass
class Score:
    caption: str
    checks: dict[str, list[bool]] = field(default_factory=dict)  # attribute -> per item
    detected: list[Detected] = field(default_factory=list)
    background: str = ""

    @property
    def ok(self) -> bool:
        return all(all(v) for v in self.checks.values())

    def attribute_ok(self, name: str) -> bool:
        return all(self.checks.get(name, [True]))


def parse_caption(caption: str) -> tuple[list[dict], str]:
    """Inverse of the caption grammar: ([{size, colour, shape, position}], background)."""
    words = caption.strip().split()
    if len(words) < 4 or words[-1] != "background" or words[-4:-2] != ["on", "a"]:
        raise ValueError(f"not a demo caption: {caption!r}")
    background = words[-2]
    phrase_to_position = {v: k for k, v in sc.POSITION_PHRASES.items()}
    objects = []
    for part in " ".join(words[:-4]).split(" and "):
        w = part.split()
        if len(w) != 7 or w[0] != "a":
            raise ValueError(f"not a demo object phrase: {part!r}")
        position = phrase_to_position.get(" ".join(w[4:]))
        if (w[1] not in sc.SIZES or w[2] not in sc.COLOURS or w[3] not in sc.SHAPES
                or position is None):
            raise ValueError(f"unknown words in {part!r}")
        objects.append(dict(size=w[1], colour=w[2], shape=w[3], position=position))
    if background not in sc.BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}")
    return objects, background


def _hue_class(hue_deg: np.ndarray) -> np.ndarray:
    names = list(sc.COLOURS)
    centres = np.array([sc.COLOURS[n] for n in names])
    diff = np.abs(hue_deg[..., None] - centres)
    diff = np.minimum(diff, 360.0 - diff)
    return diff.argmin(-1)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, as arrays of (y, x)."""
    try:
        from scipy import ndimage
    except ImportError:  # scipy is a test extra; the flood fill gives the same answer
        return _flood_components(mask)
    labels, count = ndimage.label(mask)  # default structure: 4-connected
    ys, xs = np.nonzero(labels)
    order = np.argsort(labels[ys, xs], kind="stable")
    ys, xs, lab = ys[order], xs[order], labels[ys, xs][order]
    cuts = np.flatnonzero(np.diff(lab)) + 1
    return [np.stack([y, x], 1) for y, x in zip(np.split(ys, cuts), np.split(xs, cuts))] if count else []


def _flood_components(mask: np.ndarray) -> list[np.ndarray]:
    seen = np.zeros_like(mask, dtype=bool)
    h, w = mask.shape
    out = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue = deque([(y0, x0)])
        pixels = []
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        out.append(np.array(pixels))
    return out


def _classify(colour: str, pixels: np.ndarray, scale: float) -> Detected:
    ys, xs = pixels[:, 0], pixels[:, 1]
    x0, x1, y0, y1 = int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())
    area = len(pixels)
    fill = area / float((x1 - x0 + 1) * (y1 - y0 + 1))
    shape = "square" if fill >= SQUARE_FILL else "triangle" if fill < TRIANGLE_FILL else "circle"
    side = max(x1 - x0 + 1, y1 - y0 + 1) / scale
    cx, cy = (x0 + x1 + 1) / 2 / scale, (y0 + y1 + 1) / 2 / scale
    position = min(sc.POSITIONS, key=lambda p: (sc.POSITIONS[p][0] - cx) ** 2 + (sc.POSITIONS[p][1] - cy) ** 2)
    return Detected(colour=colour, area=area, box=(x0, y0, x1, y1), fill=round(fill, 3),
                    shape=shape, size="large" if side >= LARGE_SIDE else "small",
                    position=position)


def analyse(image) -> tuple[str, list[Detected]]:
    """(background, objects found, largest first) of a PIL image or uint8 array."""
    rgb = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    rgb = rgb.astype(np.float32) / 255.0
    scale = rgb.shape[1] / sc.CANVAS  # the grammar's px are canvas units
    hi, lo = rgb.max(-1), rgb.min(-1)
    chroma = hi - lo
    chromatic = chroma >= CHROMA_THRESHOLD
    grey = rgb.mean(-1)[~chromatic]
    level = float(np.median(grey)) if grey.size else float(np.median(rgb.mean(-1)))
    background = next(name for name, top in BACKGROUND_LEVELS if level < top)
    # Hue of the chromatic pixels.
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    safe = np.where(chroma > 0, chroma, 1.0)
    hue = np.where(hi == r, ((g - b) / safe) % 6.0,
                   np.where(hi == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0)) * 60.0
    classes = np.where(chromatic, _hue_class(hue), -1)
    found = []
    for k, name in enumerate(sc.COLOURS):
        mask = classes == k
        if mask.sum() < MIN_AREA * scale * scale:
            continue
        for pixels in _components(mask):
            if len(pixels) >= MIN_AREA * scale * scale:
                found.append(_classify(name, pixels, scale))
    found.sort(key=lambda d: -d.area)
    return background, found


def score(caption: str, image) -> Score:
    """Check `image` against `caption` (see the module docstring)."""
    objects, background = parse_caption(caption)
    seen_background, found = analyse(image)
    result = Score(caption=caption, detected=found, background=seen_background)
    result.checks["background"] = [seen_background == background]
    result.checks["count"] = [len(found) == len(objects)]
    for attribute in ("colour", "shape", "size", "position"):
        result.checks[attribute] = []
    for wanted in objects:
        match = next((d for d in found if d.colour == wanted["colour"]), None)
        result.checks["colour"].append(match is not None)
        for attribute in ("shape", "size", "position"):
            result.checks[attribute].append(match is not None and getattr(match, attribute) == wanted[attribute])
    return result


def summarise(scores: list[Score]) -> dict:
    """Per-attribute accuracy (over items: objects for colour/shape/size/position,
    images for background/count) and whole-caption accuracy."""
    out = {}
    for attribute in ATTRIBUTES:
        items = [v for s in scores for v in s.checks.get(attribute, [])]
        out[attribute] = round(sum(items) / len(items), 4) if items else None
    out["caption"] = round(sum(s.ok for s in scores) / len(scores), 4) if scores else None
    out["n"] = len(scores)
    return out


def hue_of(colour: str) -> tuple[float, float, float]:
    """A pure RGB (0..1) of a named colour; for tests and examples."""
    return colorsys.hsv_to_rgb(sc.COLOURS[colour] / 360.0, 1.0, 1.0)
