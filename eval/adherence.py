"""Exact caption-adherence oracle for the built-in scenes.

Every pixel of a generated image is labelled with its nearest colour among the scene palette and the
plain background. For each object its caption names, the oracle then asks three questions:

    colour    is there a blob of the object's colour anywhere in the image (outside the cells of other
              captioned objects of that colour, which are theirs)?
    position  is that colour in the object's grid cell (most of its pixels, not just a stray few)?
    shape     does the blob in the cell match the named shape best among the four template shapes?

Whole-caption adherence needs colour and position (and, for `whole_shape`, shape) of every object;
`binding` is whole-caption adherence over the captions of two or more objects only, where each colour
must land in its own object's cell rather than just somewhere.
Scores are exact in the sense that ground truth comes from the scene attributes, not a learned model.
Scenes on the plain background only (a textured background is not in the label map).

    result = score_batch(images, scenes)     # images (B, 3, H, W) in [-1, 1] or (B, H, W, 3) uint8
    print(result.summary())
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw
from scipy import ndimage

from mmdit_core.data.scenes import (
    PALETTE,
    PLAIN_BACKGROUND,
    SHAPES,
    SIZES,
    SUPERSAMPLE,
    Scene,
    SceneObject,
    draw_object,
)

COLOURS = tuple(PALETTE)
BACKGROUND = len(COLOURS)  # label of the background in a label map
EDGE_ALPHAS = (0.6, 0.4)  # anti-aliased edges: a colour blended with the background still labels as that colour


def _references() -> tuple[np.ndarray, np.ndarray]:
    """Reference RGB values and the label each stands for: the palette, the background, and each palette
    colour blended into the background (so a yellow edge is not read as a speck of orange)."""
    colours = [np.array(PALETTE[c], np.float32) for c in COLOURS]
    background = np.array(PLAIN_BACKGROUND, np.float32)
    refs, labels = colours + [background], list(range(len(COLOURS))) + [BACKGROUND]
    for alpha in EDGE_ALPHAS:
        refs += [alpha * c + (1 - alpha) * background for c in colours]
        labels += list(range(len(COLOURS)))
    return np.stack(refs), np.array(labels)


_REFERENCE, _REFERENCE_LABEL = _references()

MIN_PIXELS = 6  # fewest pixels (at 32×32) of a colour that count as an object; scaled by image area
TEMPLATE_COVERAGE = 0.25  # a template pixel is 'in' the shape from this coverage (edges label as the colour)
MIN_CELL_SHARE = 0.5  # share of a colour's pixels that must lie in the object's cell


# ---- pixels -------------------------------------------------------------------------------------


def to_pixels(image) -> np.ndarray:
    """A (3, H, W) float tensor/array in [-1, 1] or an (H, W, 3) uint8 array -> (H, W, 3) float32 in 0..255."""
    if isinstance(image, torch.Tensor):
        image = image.detach().float().cpu().numpy()
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image.astype(np.float32)
    if image.ndim == 3 and image.shape[0] == 3:
        image = image.transpose(1, 2, 0)
    return (np.clip(image, -1, 1) + 1) * 127.5


def label_map(pixels: np.ndarray) -> np.ndarray:
    """(H, W, 3) pixels -> (H, W) index of the nearest palette colour (or its blend into the
    background), or BACKGROUND."""
    distance = ((pixels[:, :, None, :] - _REFERENCE[None, None]) ** 2).sum(-1)  # (H, W, 9)
    return _REFERENCE_LABEL[distance.argmin(-1)]


def cell_slices(row: int, col: int, size: int) -> tuple[slice, slice]:
    """Pixel rows and columns of grid cell (row, col) in a size × size image (3×3 grid)."""
    edges = [round(i * size / 3) for i in range(4)]
    return slice(edges[row], edges[row + 1]), slice(edges[col], edges[col + 1])


# ---- shape templates ----------------------------------------------------------------------------


def template(shape: str, size: str, cx: float, cy: float, px: int) -> np.ndarray:
    """Binary mask (px × px) of `shape` drawn as the renderer draws it, centred at (cx, cy) in [0, 1]."""
    big = px * SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    obj = SceneObject(shape, "white", size, 0, 0, cx, cy)
    draw_object(_GreyDraw(canvas), obj, big)
    coverage = np.asarray(canvas.resize((px, px), Image.Resampling.BOX), dtype=np.float32) / 255
    return coverage >= TEMPLATE_COVERAGE


class _GreyDraw:
    """ImageDraw on an L image that ignores the RGB fill the renderer passes and paints 255."""

    def __init__(self, canvas: Image.Image):
        self._draw = ImageDraw.Draw(canvas)

    def ellipse(self, xy, fill):
        self._draw.ellipse(xy, fill=255)

    def rectangle(self, xy, fill):
        self._draw.rectangle(xy, fill=255)

    def polygon(self, xy, fill):
        self._draw.polygon(xy, fill=255)


def _centroid(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    return float(xs.mean()), float(ys.mean())


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


NUDGES = (-0.5, 0.0, 0.5)  # sub-pixel moves of a template around the centroid placement


def best_shape(mask: np.ndarray) -> str:
    """The shape whose template (either size, centred on the mask's centroid, nudged by up to half a
    pixel: where a threshold falls on an edge depends on the sub-pixel placement) overlaps `mask` best."""
    px = mask.shape[0]
    mx, my = _centroid(mask)
    best, best_iou = SHAPES[0], -1.0
    for shape in SHAPES:
        for size in SIZES:
            # place the template so that its own centroid falls on the mask's centroid
            probe = template(shape, size, 0.5, 0.5, px)
            tx, ty = _centroid(probe)
            for dx in NUDGES:
                for dy in NUDGES:
                    cx, cy = 0.5 + (mx - tx + dx) / px, 0.5 + (my - ty + dy) / px
                    score = iou(template(shape, size, cx, cy, px), mask)
                    if score > best_iou:
                        best, best_iou = shape, score
    return best


# ---- judging ------------------------------------------------------------------------------------


@dataclass
class ObjectVerdict:
    colour: bool
    position: bool
    shape: bool


def solid(mask: np.ndarray, min_pixels: int) -> np.ndarray:
    """`mask` without its specks: an opening with a 2×2 square (an object's pixels have same-colour
    neighbours; a noise pixel rarely does), then only 8-connected blobs of at least `min_pixels`
    pixels, so an image of noise (every colour somewhere, in ones and twos) shows no object."""
    mask = ndimage.binary_opening(mask, structure=np.ones((2, 2), bool))
    blobs, count = ndimage.label(mask, structure=np.ones((3, 3)))
    sizes = np.bincount(blobs.ravel(), minlength=count + 1)
    keep = sizes >= min_pixels
    keep[0] = False
    return keep[blobs]


def judge_object(labels: np.ndarray, obj: SceneObject, others: tuple[SceneObject, ...]) -> ObjectVerdict:
    """Colour, position and shape verdicts for one captioned object, given the image's label map.

    Each object is judged from its own blobs: pixels of its colour inside the cells of *other* captioned
    objects of the same colour belong to those objects and are ignored (two red objects neither count
    against each other nor stand in for each other). colour: a blob of the colour remains; position: at
    least `min_pixels` of those blob pixels lie in the object's cell and they are at least
    MIN_CELL_SHARE of them all.
    """
    px = labels.shape[0]
    min_pixels = max(2, round(MIN_PIXELS * px * px / 32**2))
    colour_mask = labels == COLOURS.index(obj.colour)
    for other in others:
        if other.colour == obj.colour:
            rows, cols = cell_slices(other.row, other.col, px)
            colour_mask[rows, cols] = False
    colour_mask = solid(colour_mask, min_pixels)
    rows, cols = cell_slices(obj.row, obj.col, px)
    in_cell = np.zeros_like(colour_mask)
    in_cell[rows, cols] = colour_mask[rows, cols]
    total, inside = int(colour_mask.sum()), int(in_cell.sum())
    colour = total > 0
    position = inside >= min_pixels and inside >= MIN_CELL_SHARE * total
    shape = position and best_shape(in_cell) == obj.shape
    return ObjectVerdict(colour, position, shape)


def judge_scene(image, scene: Scene) -> list[ObjectVerdict]:
    """Verdicts for every object of `scene` in one generated image."""
    labels = label_map(to_pixels(image))
    return [judge_object(labels, obj, tuple(o for o in scene.objects if o is not obj)) for obj in scene.objects]


FRACTIONS = ("colour", "position", "shape", "whole", "whole_shape", "binding")  # Adherence's accuracies
HEADLINE = FRACTIONS[:4]  # what a one-line summary shows


@dataclass
class Adherence:
    """Per-object accuracies and whole-caption accuracies (fractions in [0, 1])."""

    colour: float
    position: float
    shape: float
    whole: float  # every object right in colour and position
    whole_shape: float  # every object right in colour, position and shape
    binding: float | None  # `whole` over the images of two or more objects; None where there are none
    objects: int
    images: int
    verdicts: list[list[ObjectVerdict]] = field(default_factory=list, repr=False)

    def summary(self) -> str:
        return (
            f"colour {100 * self.colour:.1f}%  position {100 * self.position:.1f}%  shape {100 * self.shape:.1f}%  "
            f"whole caption {100 * self.whole:.1f}% (with shape {100 * self.whole_shape:.1f}%)  "
            + (f"binding {100 * self.binding:.1f}%  " if self.binding is not None else "")
            + f"[{self.objects} objects, {self.images} images]"
        )

    def fractions(self) -> dict[str, float]:
        """The accuracies measured (binding only where a caption has two objects), by field name."""
        return {k: getattr(self, k) for k in FRACTIONS if getattr(self, k) is not None}


def score_batch(images, scenes: list[Scene]) -> Adherence:
    """Adherence of generated `images` (B, 3, H, W) in [-1, 1], or (B, H, W, 3) uint8, to their scenes."""
    if len(images) != len(scenes):
        raise ValueError(f"{len(images)} images but {len(scenes)} scenes")
    verdicts = [judge_scene(image, scene) for image, scene in zip(images, scenes)]
    flat = [v for per_image in verdicts for v in per_image]
    mean = lambda values: float(np.mean(values)) if len(values) else 0.0  # noqa: E731
    whole = [all(v.colour and v.position for v in vs) for vs in verdicts]
    multi = [right for right, vs in zip(whole, verdicts) if len(vs) > 1]
    return Adherence(
        colour=mean([v.colour for v in flat]),
        position=mean([v.position for v in flat]),
        shape=mean([v.shape for v in flat]),
        whole=mean(whole),
        whole_shape=mean([all(v.colour and v.position and v.shape for v in vs) for vs in verdicts]),
        binding=mean(multi) if multi else None,
        objects=len(flat),
        images=len(verdicts),
        verdicts=verdicts,
    )
