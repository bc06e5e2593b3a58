"""Built-in captioned scenes: one to three coloured shapes placed on a 3×3 grid.

Deterministic from (seed, index) at any resolution. Each object sits in its own grid cell, jittered at
random inside it, so image tokens must agree with each other on where the object is; captions name
every object's size, colour, shape and cell, so positions matter and a model that cannot place
objects scores visibly worse. The attributes are kept next to the image for an exact oracle.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

from ..config import DataConfig

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 90, 230), "yellow": (240, 215, 30),
    "purple": (150, 60, 200), "orange": (250, 140, 20), "white": (245, 245, 245), "cyan": (40, 200, 215),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = {"small": 0.55, "large": 0.9}  # object extent as a fraction of a grid cell
CELL_NAMES = (("top left", "top", "top right"), ("left", "center", "right"), ("bottom left", "bottom", "bottom right"))
PLAIN_BACKGROUND = (24, 24, 28)
SUPERSAMPLE = 4  # render larger, then downsample: anti-aliased edges at any size


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    row: int  # grid cell, 0..2 top to bottom
    col: int  # 0..2 left to right
    cx: float  # centre in [0, 1] image coordinates (x right, y down)
    cy: float

    @property
    def cell_name(self) -> str:
        return CELL_NAMES[self.row][self.col]


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: str  # "plain" or "textured"
    texture_seed: int

    @property
    def caption(self) -> str:
        return caption(self.objects)

    def attributes(self) -> dict:
        return {"background": self.background, "objects": [asdict(o) | {"cell": o.cell_name} for o in self.objects]}

    @classmethod
    def from_attributes(cls, attributes: dict) -> Scene:
        """A scene read back from its stored attributes: enough to judge an image against it (the texture
        seed is not stored, so a textured background cannot be re-rendered)."""
        names = SceneObject.__dataclass_fields__
        objects = tuple(SceneObject(**{k: v for k, v in o.items() if k in names}) for o in attributes["objects"])
        return cls(objects, attributes["background"], texture_seed=0)


SCENE_KEYS = {"objects", "background"}


def scenes_of(attributes: list[dict | None]) -> list[Scene] | None:
    """The built-in scenes these samples' attributes describe, or None unless every sample is one (imported
    data carries where each image came from instead). Every stage asks this, and only this, whether its
    data has scene attributes."""
    if not attributes or not all(isinstance(a, dict) and SCENE_KEYS <= a.keys() for a in attributes):
        return None
    return [Scene.from_attributes(a) for a in attributes]


def describe(obj: SceneObject) -> str:
    where = {"center": "in the center", "top": "at the top", "bottom": "at the bottom",
             "left": "on the left", "right": "on the right"}.get(obj.cell_name, f"in the {obj.cell_name}")
    return f"a {obj.size} {obj.colour} {obj.shape} {where}"


def caption(objects: tuple[SceneObject, ...]) -> str:
    parts = [describe(o) for o in objects]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def make_scene(seed: int, index: int, min_objects: int = 1, max_objects: int = 3, background: str = "plain") -> Scene:
    """Scene `index` of the set drawn from `seed`: same arguments, same scene, on any machine."""
    rng = np.random.default_rng([seed, index])
    count = int(rng.integers(min_objects, max_objects + 1))
    cells = rng.choice(9, size=count, replace=False)
    objects = []
    for cell in cells:
        row, col = divmod(int(cell), 3)
        size = str(rng.choice(list(SIZES)))
        slack = (1 - SIZES[size]) / 2  # how far the centre may move inside its cell
        cx, cy = ((c + 0.5 + rng.uniform(-slack, slack)) / 3 for c in (col, row))
        objects.append(SceneObject(str(rng.choice(SHAPES)), str(rng.choice(list(PALETTE))), size, row, col, float(cx), float(cy)))
    if background == "mixed":
        background = "textured" if rng.random() < 0.5 else "plain"
    return Scene(tuple(objects), background, int(rng.integers(2**31)))


def _background(scene: Scene, px: int) -> Image.Image:
    if scene.background == "plain":
        return Image.new("RGB", (px, px), PLAIN_BACKGROUND)
    # Textured: soft diagonal stripes plus fine noise in dark tones that no palette colour is close to.
    rng = np.random.default_rng(scene.texture_seed)
    yy, xx = np.mgrid[0:px, 0:px] / px
    angle, freq = rng.uniform(0, np.pi), rng.uniform(4, 10)
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)))
    base = np.array(PLAIN_BACKGROUND, dtype=np.float64)
    img = base + 22 * stripes[..., None] + rng.normal(0, 4, (px, px, 1))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, px: int) -> None:
    half = SIZES[obj.size] * px / 6  # half-extent: a cell is px/3 wide
    x, y = obj.cx * px, obj.cy * px
    colour = PALETTE[obj.colour]
    if obj.shape == "circle":
        draw.ellipse([x - half, y - half, x + half, y + half], fill=colour)
    elif obj.shape == "square":
        side = half * 0.85  # equal area-ish with the circle
        draw.rectangle([x - side, y - side, x + side, y + side], fill=colour)
    elif obj.shape == "triangle":
        draw.polygon([(x, y - half), (x + half, y + half * 0.8), (x - half, y + half * 0.8)], fill=colour)
    else:  # cross
        arm = half / 3
        draw.rectangle([x - half, y - arm, x + half, y + arm], fill=colour)
        draw.rectangle([x - arm, y - half, x + arm, y + half], fill=colour)


def render(scene: Scene, size: int) -> Image.Image:
    """The scene as a size × size RGB image."""
    px = size * SUPERSAMPLE
    img = _background(scene, px)
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        draw_object(draw, obj, px)
    return img.resize((size, size), Image.Resampling.BOX)


def split_indices(cfg: DataConfig, split: str) -> range:
    """Scene indices of a split: train and val are disjoint ranges of the same seeded stream."""
    return range(cfg.num_train) if split == "train" else range(cfg.num_train, cfg.num_train + cfg.num_val)
