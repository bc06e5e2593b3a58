"""How far a CLIP score can be trusted on a dataset: measured on real held-out images, against their captions.

retrieval          top-1 image->text and text->image over the split; a hit is a caption equal to the
                   query's own (scenes repeat captions, so the exact index would count right answers as
                   misses); beside chance: the mean share of the split's captions equal to a query's
own_vs_shuffled    the CLIP score of the images with their own captions and with other images'
                   captions (a seeded permutation without fixed points), as torchmetrics computes it
                   (100 × cosine, averaged, the mean floored at 0); the gap of the cosines paired per
                   image, with a 95% CI
attribute_swaps    on the built-in scenes, per attribute (colour, shape, position, size): the right
                   caption against the same caption with that one attribute of one object changed
                   (a position only to a free cell);
                   `separation` is the share of images whose right caption scores higher (0.5: the
                   CLIP does not see that attribute), with the paired score gap and its CI
binding            on scenes of two or more objects of different colours: the right caption against
                   the one with two objects' colours exchanged (the same words, bound otherwise),
                   which a CLIP that reads captions as a bag of words cannot tell apart
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

import torch

from mmdit_core.data.scenes import CELL_NAMES, PALETTE, SHAPES, SIZES, Scene, SceneObject

from .clip_score import ClipScorer
from .stats import mean_interval

ATTRIBUTES = ("colour", "shape", "position", "size")
CELLS = [(row, col) for row in range(len(CELL_NAMES)) for col in range(len(CELL_NAMES[0]))]


def similarities(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """100 × cosine of each row's image with the same row's caption: (N,)."""
    return 100 * (image_features * text_features).sum(-1)


def clip_score(similarity: torch.Tensor) -> float:
    """The CLIP score of a set as torchmetrics' CLIPScore computes it: the mean, floored at 0."""
    return max(similarity.mean().item(), 0.0)


def interval(values: torch.Tensor) -> dict[str, float]:
    i = mean_interval(values.tolist())
    return {"mean": i.mean, "low": i.low, "high": i.high}


def retrieval(image_features: torch.Tensor, text_features: torch.Tensor, captions: list[str]) -> dict[str, float]:
    similarity = image_features @ text_features.T  # (N images, N captions)
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    caption_id = torch.tensor([ids[c] for c in captions])
    same = caption_id[:, None] == caption_id[None, :]
    return {
        "image_to_text": (caption_id[similarity.argmax(1)] == caption_id).float().mean().item(),
        "text_to_image": (caption_id[similarity.argmax(0)] == caption_id).float().mean().item(),
        "chance": same.float().mean().item(),
    }


def derangement(n: int, seed: int) -> torch.Tensor:
    """A seeded permutation of range(n) that moves every index."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    shuffled = torch.empty(n, dtype=torch.long)
    shuffled[order] = order.roll(1)
    return shuffled


def swapped(scene: Scene, attribute: str, rng: random.Random) -> str:
    """The scene's caption with one attribute of one of its objects changed to another value."""
    k = rng.randrange(len(scene.objects))
    obj = scene.objects[k]
    if attribute == "colour":
        changed = replace(obj, colour=rng.choice([c for c in PALETTE if c != obj.colour]))
    elif attribute == "shape":
        changed = replace(obj, shape=rng.choice([s for s in SHAPES if s != obj.shape]))
    elif attribute == "size":
        changed = replace(obj, size=rng.choice([s for s in SIZES if s != obj.size]))
    else:  # to a cell no object of the scene holds
        row, col = rng.choice([cell for cell in CELLS if cell not in {(o.row, o.col) for o in scene.objects}])
        changed = replace(obj, row=row, col=col)
    objects: tuple[SceneObject, ...] = (*scene.objects[:k], changed, *scene.objects[k + 1 :])
    return replace(scene, objects=objects).caption


def colours_exchanged(scene: Scene, rng: random.Random) -> str | None:
    """The caption with the colours of two differently coloured objects exchanged; None if there are none."""
    pairs = [
        (i, j)
        for i in range(len(scene.objects))
        for j in range(i + 1, len(scene.objects))
        if scene.objects[i].colour != scene.objects[j].colour
    ]
    if not pairs:
        return None
    i, j = rng.choice(pairs)
    objects = list(scene.objects)
    objects[i], objects[j] = (
        replace(objects[i], colour=objects[j].colour),
        replace(objects[j], colour=objects[i].colour),
    )
    return replace(scene, objects=tuple(objects)).caption


def swap_result(own: torch.Tensor, changed: torch.Tensor) -> dict[str, Any]:
    return {"images": len(own), "separation": (own > changed).float().mean().item(), "gap": interval(own - changed)}


def validate(
    scorer: ClipScorer, images: torch.Tensor, captions: list[str], scenes: list[Scene] | None, seed: int = 0
) -> dict[str, Any]:
    """images: (N >= 2, 3, H, W) uint8 of a held-out split, with their captions (and scenes, when built-in)."""
    if len(captions) < 2:
        raise ValueError(
            f"validating a CLIP needs at least 2 held-out images (got {len(captions)}): raise data.num_val"
        )
    image_features, text_features = scorer.embed_images(images), scorer.embed_captions(captions)
    own = similarities(image_features, text_features)
    shuffled = similarities(image_features, text_features[derangement(len(captions), seed)])
    result: dict[str, Any] = {
        "images": len(captions),
        "retrieval": retrieval(image_features, text_features, captions),
        "own_vs_shuffled": {"own": clip_score(own), "shuffled": clip_score(shuffled), "gap": interval(own - shuffled)},
    }
    if scenes is not None:
        rng = random.Random(seed)
        result["attribute_swaps"] = {}
        for attribute in ATTRIBUTES:
            changed = similarities(image_features, scorer.embed_captions([swapped(s, attribute, rng) for s in scenes]))
            result["attribute_swaps"][attribute] = swap_result(own, changed)
        exchanged = {i: c for i, c in enumerate(colours_exchanged(s, rng) for s in scenes) if c is not None}
        if len(exchanged) >= 2:
            rows = torch.tensor(list(exchanged))
            changed = similarities(image_features[rows], scorer.embed_captions(list(exchanged.values())))
            result["binding"] = swap_result(own[rows], changed)
    return result


def describe(validation: dict[str, Any]) -> str:
    """One line: retrieval, the own-vs-shuffled gap and, on scenes, the separation per attribute."""
    r, o = validation["retrieval"], validation["own_vs_shuffled"]
    gap = o["gap"]
    text = (
        f"val retrieval top-1 image->text {100 * r['image_to_text']:.1f}%, text->image {100 * r['text_to_image']:.1f}% "
        f"(chance {100 * r['chance']:.1f}%); CLIP score own {o['own']:.1f} vs shuffled {o['shuffled']:.1f} "
        f"(gap {gap['mean']:.1f} [{gap['low']:.1f}, {gap['high']:.1f}])"
    )
    if "attribute_swaps" in validation:
        text += "; right over one-attribute-swapped caption: " + ", ".join(
            f"{a} {100 * v['separation']:.0f}%" for a, v in validation["attribute_swaps"].items()
        )
    if "binding" in validation:
        binding = validation["binding"]
        text += f"; over two objects' colours exchanged: {100 * binding['separation']:.0f}% of {binding['images']}"
    return text
