"""Procedurally drawn captioned scenes: the demo model's training data.

A scene is one or two flat-ish shapes on a textured achromatic background,
128x128 px, drawn with 2x supersampling (smooth edges). Everything the caption
says is exact; everything it does not say is random (shade, gradient or
texture of each shape, the background's gradient or texture, jitter of
position and size), so the model has real choices to make.

Caption grammar (fixed; `parse_caption` inverts it):

    caption  := object [" and " object] " on a " BACKGROUND " background"
    object   := "a " SIZE " " COLOUR " " SHAPE " " POSITION
    SIZE     := small | large
    COLOUR   := red | orange | yellow | green | cyan | blue | purple
    SHAPE    := circle | square | triangle
    POSITION := on the left | on the right | at the top | at the bottom | in the center
    BACKGROUND := black | gray | white

Two objects always sit on opposite sides (left/right or top/bottom), never in
the center, and have different colours. Backgrounds are achromatic (a faint
random tint at most), shapes are saturated, which is what lets the scorer
segment them by chroma.

Example: "a large red circle on the left and a small blue triangle on the
right on a gray background".
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np

# The grammar (positions, sizes, textures) is in units of a 128-px canvas;
# images are rendered at IMAGE_SIZE px, which the demo model's 4-px VQ codes
# turn into a 16x16 grid.
CANVAS = 128.0
IMAGE_SIZE = 64
SUPERSAMPLE = 2

# Hue (degrees) of each shape colour; the scorer classifies by nearest hue.
COLOURS: dict[str, float] = {
    "red": 0.0,
    "orange": 28.0,
    "yellow": 55.0,
    "green": 120.0,
    "cyan": 185.0,
    "blue": 228.0,
    "purple": 280.0,
}
HUE_JITTER = 5.0
SHAPES = ("circle", "square", "triangle")
# Half-extent of a shape in px (radius of a circle, half side of a square).
SIZES: dict[str, tuple[float, float]] = {"small": (10.0, 14.0), "large": (21.0, 26.0)}
# Anchor (x, y) of each position, in px on the 128 px canvas.
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (32.0, 64.0),
    "right": (96.0, 64.0),
    "top": (64.0, 32.0),
    "bottom": (64.0, 96.0),
    "center": (64.0, 64.0),
}
POSITION_JITTER = 5.0
POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
PAIRS = (("left", "right"), ("top", "bottom"))
# Background base grey level (0..1).
BACKGROUNDS: dict[str, float] = {"black": 0.07, "gray": 0.5, "white": 0.93}
# Textures coarse enough for 4-px codes at 64 px (finer ones only add noise
# that no 16x16 grid can carry).
BACKGROUND_STYLES = ("flat", "vgradient", "hgradient", "dgradient", "checker")
FILL_STYLES = ("flat", "gradient", "radial")

CAPTION_WORDS = sorted(
    {"a", "and", "on", "the", "at", "in", "background", *SIZES, *COLOURS, *SHAPES, *BACKGROUNDS}
    | {w for p in POSITION_PHRASES.values() for w in p.split()}
)


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    position: str
    # Unstated details, drawn at random.
    half: float  # half-extent, px
    cx: float  # centre, px
    cy: float
    hue: float  # degrees
    saturation: float
    value: float
    fill: str  # one of FILL_STYLES
    fill_angle: float  # radians, direction of a gradient or stripes
    fill_amount: float  # strength of the gradient/texture
    fill_period: float  # stripe period, px

    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} {POSITION_PHRASES[self.position]}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: str
    bg_style: str
    bg_level: float
    bg_tint: tuple[float, float, float]
    bg_amount: float
    bg_angle: float
    bg_period: float

    @property
    def caption(self) -> str:
        return " and ".join(o.phrase() for o in self.objects) + f" on a {self.background} background"


def sample_scene(rng: np.random.Generator) -> Scene:
    """A random scene (all choices from `rng`)."""
    count = 1 if rng.random() < 0.5 else 2
    if count == 1:
        positions = [str(rng.choice(list(POSITIONS)))]
    else:
        pair = PAIRS[int(rng.integers(len(PAIRS)))]
        positions = list(pair) if rng.random() < 0.5 else [pair[1], pair[0]]
    colours = rng.choice(list(COLOURS), size=count, replace=False)
    objects = []
    for position, colour in zip(positions, colours):
        size = str(rng.choice(list(SIZES)))
        lo, hi = SIZES[size]
        ax, ay = POSITIONS[position]
        objects.append(
            SceneObject(
                shape=str(rng.choice(SHAPES)),
                colour=str(colour),
                size=size,
                position=position,
                half=float(rng.uniform(lo, hi)),
                cx=float(ax + rng.uniform(-POSITION_JITTER, POSITION_JITTER)),
                cy=float(ay + rng.uniform(-POSITION_JITTER, POSITION_JITTER)),
                hue=float((COLOURS[str(colour)] + rng.uniform(-HUE_JITTER, HUE_JITTER)) % 360.0),
                saturation=float(rng.uniform(0.75, 1.0)),
                value=float(rng.uniform(0.8, 1.0)),
                fill=str(rng.choice(FILL_STYLES)),
                fill_angle=float(rng.uniform(0, 2 * np.pi)),
                fill_amount=float(rng.uniform(0.15, 0.35)),
                fill_period=float(rng.uniform(10.0, 16.0)),
            )
        )
    background = str(rng.choice(list(BACKGROUNDS)))
    return Scene(
        objects=tuple(objects),
        background=background,
        bg_style=str(rng.choice(BACKGROUND_STYLES)),
        bg_level=float(BACKGROUNDS[background] + rng.uniform(-0.04, 0.04)),
        bg_tint=tuple(float(t) for t in rng.uniform(-0.025, 0.025, size=3)),
        bg_amount=float(rng.uniform(0.04, 0.1)),
        bg_angle=float(rng.uniform(0, 2 * np.pi)),
        bg_period=float(rng.uniform(16.0, 32.0)),
    )


def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x, y) in canvas units on an n x n grid."""
    coords = (np.arange(n, dtype=np.float32) + 0.5) * (CANVAS / n)
    return np.meshgrid(coords, coords)  # x varies along columns


def _shape_mask(obj: SceneObject, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    dx, dy = x - obj.cx, y - obj.cy
    if obj.shape == "circle":
        return dx * dx + dy * dy <= obj.half**2
    if obj.shape == "square":
        side = obj.half * 0.9
        return (np.abs(dx) <= side) & (np.abs(dy) <= side)
    # Upward isosceles triangle: apex at top, base at the bottom, bbox 2.2h x 2h.
    h = obj.half
    t = (dy + h) / (2 * h)  # 0 at apex, 1 at base
    return (t >= 0) & (t <= 1) & (np.abs(dx) <= t * h * 1.1)


def _modulation(style: str, x, y, angle, amount, period) -> np.ndarray:
    """A brightness offset field in about [-amount, amount]."""
    u = (x - CANVAS / 2) * np.cos(angle) + (y - CANVAS / 2) * np.sin(angle)
    if style == "flat":
        return np.zeros_like(x)
    if style in ("gradient", "vgradient", "hgradient", "dgradient"):
        if style == "vgradient":
            u = y - CANVAS / 2
        elif style == "hgradient":
            u = x - CANVAS / 2
        return amount * np.clip(u / (CANVAS / 2), -1, 1) * (1 if np.cos(angle) >= 0 else -1)
    if style == "checker":
        cell = period
        return amount * 0.8 * np.where(((x // cell) + (y // cell)) % 2 == 0, 1.0, -1.0)
    if style == "radial":
        r = np.sqrt((x - CANVAS / 2) ** 2 + (y - CANVAS / 2) ** 2)
        return amount * np.cos(2 * np.pi * r / (period * 2))
    raise ValueError(style)


def render(scene: Scene) -> np.ndarray:
    """The scene as an [IMAGE_SIZE, IMAGE_SIZE, 3] uint8 RGB array (deterministic)."""
    n = IMAGE_SIZE * SUPERSAMPLE
    x, y = _grid(n)
    bg = scene.bg_level + _modulation(
        scene.bg_style, x, y, scene.bg_angle, scene.bg_amount, scene.bg_period
    )
    image = np.repeat(bg[..., None], 3, axis=2) + np.asarray(scene.bg_tint, dtype=np.float32)
    for obj in scene.objects:
        mask = _shape_mask(obj, x, y)
        # Object-local coordinates so the fill pattern moves with the object.
        local_x, local_y = x - obj.cx + CANVAS / 2, y - obj.cy + CANVAS / 2
        offset = _modulation(
            obj.fill, local_x, local_y, obj.fill_angle, obj.fill_amount, obj.fill_period
        )
        if obj.fill == "gradient":
            # Stretch the gradient over the object's own extent, not the canvas.
            offset = offset * (CANVAS / 2) / max(obj.half, 1.0)
            offset = np.clip(offset, -obj.fill_amount, obj.fill_amount)
        value = np.clip(obj.value + offset - obj.fill_amount * 0.5, 0.35, 1.0)
        r, g, b = colorsys.hsv_to_rgb(obj.hue / 360.0, obj.saturation, 1.0)
        colour = np.stack([value * r, value * g, value * b], axis=-1)
        image = np.where(mask[..., None], colour, image)
    image = np.clip(image, 0.0, 1.0)
    # Box filter down to IMAGE_SIZE px: anti-aliased edges.
    image = image.reshape(IMAGE_SIZE, SUPERSAMPLE, IMAGE_SIZE, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return (image * 255.0 + 0.5).astype(np.uint8)


def object_coverage(scene: Scene, cells: int) -> np.ndarray:
    """[objects, cells, cells]: the share of each cell of a cells x cells grid
    that each object covers, measured at the renderer's supersampled resolution."""
    n = IMAGE_SIZE * SUPERSAMPLE
    x, y = _grid(n)
    step = n // cells
    masks = np.stack([_shape_mask(obj, x, y) for obj in scene.objects]).astype(np.float32)
    return masks.reshape(len(scene.objects), cells, step, cells, step).mean(axis=(2, 4))


def scene_image(scene: Scene):
    """The scene as a PIL image."""
    from PIL import Image

    return Image.fromarray(render(scene))


def sample_dataset(seed: int, count: int) -> list[Scene]:
    """`count` scenes from one seeded generator (the training script's data)."""
    rng = np.random.default_rng(seed)
    return [sample_scene(rng) for _ in range(count)]
