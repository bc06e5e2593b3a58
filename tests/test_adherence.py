"""The exact adherence oracle on real renders (near perfect) and on mismatched captions (near chance)."""

from dataclasses import replace

import torch
from conftest import render_split

from eval.adherence import judge_scene, score_batch
from eval.clip_validation import derangement
from mmdit_core.config import DataConfig
from mmdit_core.data.images import to_tensor
from mmdit_core.data.scenes import Scene, SceneObject, render


def test_oracle_is_right_on_renders_and_near_chance_on_shuffled_captions():
    images, _, scenes = render_split(DataConfig(num_train=1, num_val=160, max_objects=3), "val")
    real = score_batch(images, scenes)
    assert real.colour == real.position == real.whole == 1.0 and real.shape >= 0.99 and real.whole_shape >= 0.98
    mismatched = score_batch(images, [scenes[i] for i in derangement(len(scenes), 0)])
    assert mismatched.position < 0.1 and mismatched.whole < 0.1
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    assert score_batch(noise, scenes).position < 0.02


def test_oracle_counts_a_misplaced_object_as_wrong_position_right_colour():
    images, _, scenes = render_split(DataConfig(num_train=1, num_val=40, max_objects=1), "val")
    moved = torch.roll(images, shifts=11, dims=-1)  # one cell to the right (wrapping)
    result = score_batch(moved, scenes)
    assert result.colour > 0.9 and result.position < 0.1


def test_an_object_missing_beside_a_same_coloured_one_is_judged_from_its_own_pixels():
    """Two red objects, only one drawn: the missing one has no colour, position or shape of its own (the
    drawn one's blob, in its own cell, must not stand in for it)."""
    first = SceneObject("circle", "red", "large", 0, 0, 1 / 6, 1 / 6)
    second = SceneObject("square", "red", "large", 2, 2, 5 / 6, 5 / 6)
    drawn = Scene((first,), "plain", 0)
    captioned = Scene((first, second), "plain", 0)
    image = to_tensor(render(drawn, 32))
    present, missing = judge_scene(image, captioned)
    assert present.colour and present.position and present.shape
    assert not (missing.colour or missing.position or missing.shape)
    assert score_batch(image[None], [captioned]).colour == 0.5


def test_binding_scores_captions_of_two_objects_only_and_catches_exchanged_colours():
    images, _, scenes = render_split(DataConfig(num_train=1, num_val=120, max_objects=2), "val")
    multi = [i for i, s in enumerate(scenes) if len(s.objects) == 2 and s.objects[0].colour != s.objects[1].colour]
    assert len(multi) > 10 and score_batch(images, scenes).binding == 1.0
    exchanged = [
        Scene((replace(a, colour=b.colour), replace(b, colour=a.colour)), s.background, s.texture_seed)
        for s in (scenes[i] for i in multi)
        for a, b in [s.objects]
    ]
    swapped = score_batch(images[multi], exchanged)
    assert swapped.colour == 1.0 and swapped.binding == 0.0  # every colour is drawn, each in the other's cell
    singles = [i for i, s in enumerate(scenes) if len(s.objects) == 1]
    assert score_batch(images[singles], [scenes[i] for i in singles]).binding is None
