"""The CLIP trained here: it saves and reloads offline through load_clip_score, is reused when made from
the same settings and data, learns (own captions above shuffled ones, which random weights cannot do),
and its validation measures what it claims."""

import random
import re

import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from eval import clip_validation
from eval.clip_score import WEIGHTS, load_clip_score, trained_clip, trained_clip_dir
from experiments import prepare_data, train_clip
from mmdit_core.config import TRAINED_CLIP, ConfigError, load_config
from mmdit_core.data.images import to_uint8
from mmdit_core.data.scenes import make_scene
from mmdit_core.data.shards import encode_sample, write_dataset
from mmdit_core.data.training import read_split

TINY_CLIP = ["clip.width=32", "clip.depth=1", "clip.num_heads=2", "clip.batch_size=16"]


def scenes_settings(root) -> list[str]:
    return [
        f"data.root={root}",
        "data.image_size=16",
        "data.num_train=48",
        "data.num_val=16",
        "data.samples_per_shard=16",
        "data.num_workers=0",
        "clip.train_steps=4",
        *TINY_CLIP,
    ]


def scenes_config(tmp_path, *extra):
    return load_config(None, [*scenes_settings(tmp_path / "scenes"), *extra])


def test_trained_clip_saves_reloads_offline_is_tracked_and_reused(tmp_path, monkeypatch):
    cfg = scenes_config(tmp_path)
    manifest = prepare_data.prepare(cfg)
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    summary = train_clip.train_and_save(cfg, uri)

    assert summary["made_from"] == {"clip": cfg.clip.model_dump(), "dataset": manifest["key"], "seed": 0}
    assert summary["steps"] == 4 and summary["params"] > 0 and summary["vocab"] < cfg.clip.vocab_size
    validation = summary["validation"]
    assert validation["images"] == 16 and 0 < validation["retrieval"]["chance"] <= 1
    assert set(validation["attribute_swaps"]) == {"colour", "shape", "position", "size"}
    gap = validation["own_vs_shuffled"]["gap"]
    assert gap["low"] <= gap["mean"] <= gap["high"]

    # offline (HF_HUB_OFFLINE=1 in the tests), from the directory beside the data, as eval.clip_model=trained
    scorer, notice = load_clip_score(TRAINED_CLIP, data_root=cfg.data.root)
    assert notice is None and manifest["key"] in scorer.name and summary["weights_sha256"][:8] in scorer.name
    images = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    captions = [make_scene(0, i, max_objects=1).caption for i in range(5)]
    by_torchmetrics = scorer(images, captions)
    by_features = clip_validation.clip_score(
        clip_validation.similarities(scorer.embed_images(images), scorer.embed_captions(captions))
    )
    assert by_torchmetrics == pytest.approx(by_features, abs=1e-3)
    long_caption = " and ".join(make_scene(0, i, max_objects=1).caption for i in range(8))  # far past 32 tokens
    with pytest.warns(UserWarning, match="truncated"):
        scorer(images[:1], [long_caption])
    assert scorer.processor.truncated == 1

    (run,) = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("clip").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["dataset"] == manifest["key"]
    assert {"train/loss", "val/retrieval_image_to_text", "val/gap_shuffled", "val/separation_colour"} <= set(
        run.data.metrics
    )

    monkeypatch.setattr(
        train_clip, "train", lambda *a: pytest.fail("a CLIP made from these settings and data was trained again")
    )
    assert train_clip.reuse_or_train(cfg, uri)["weights_sha256"] == summary["weights_sha256"]
    common = [arg for item in scenes_settings(cfg.data.root) for arg in ("--set", item)]
    measured = train_clip.main([*common, "--revalidate", "--tracking-uri", uri])  # measured again, weights untouched
    assert measured["validation"] == validation and measured["weights_sha256"] == summary["weights_sha256"]
    assert trained_clip(cfg.data.root)[0] is not None

    other = scenes_config(tmp_path, "data.seed=1")  # other scenes in the same place: that CLIP no longer scores them
    prepare_data.prepare(other)
    assert trained_clip(other.data.root)[0] is None and "trained on other data" in trained_clip(other.data.root)[1]
    (trained_clip_dir(cfg.data.root) / WEIGHTS).write_bytes(b"not the weights")
    assert "no CLIP trained on" in load_clip_score(TRAINED_CLIP, data_root=cfg.data.root)[1]


def two_colour_set(root, n_train=96, n_val=32, size=16):
    """Red or blue squares on a dark background at random places, captioned by their colour."""
    rng = random.Random(0)

    def samples(n, offset):
        for i in range(n):
            colour = ("red", "blue")[i % 2]
            image = Image.new("RGB", (size, size), (20, 20, 24))
            x, y = rng.randrange(size - 6), rng.randrange(size - 6)
            image.paste({"red": (220, 40, 40), "blue": (40, 90, 230)}[colour], (x, y, x + 6, y + 6))
            yield encode_sample(f"{offset + i:06d}", image, f"a {colour} square")

    write_dataset(root, {"train": samples(n_train, 0), "val": samples(n_val, n_train)}, 64, {"source": "two colours"})


def test_a_short_training_scores_own_captions_above_shuffled_ones(tmp_path):
    two_colour_set(tmp_path / "toy")
    cfg = load_config(
        None,
        [
            f"data.root={tmp_path / 'toy'}",
            "data.image_size=16",
            "data.num_workers=0",
            "data.shuffle_buffer=96",
            "clip.train_steps=60",
            "clip.lr=2.0e-3",
            *TINY_CLIP,
        ],
    )
    summary = train_clip.train_and_save(cfg, f"sqlite:///{tmp_path / 'mlruns.db'}")

    validation = summary["validation"]
    assert validation["own_vs_shuffled"]["gap"]["low"] > 5  # own captions clearly above shuffled ones
    assert validation["retrieval"]["image_to_text"] > 0.9 and validation["retrieval"]["chance"] == pytest.approx(
        0.5, abs=0.02
    )
    assert "attribute_swaps" not in validation  # no scene attributes to swap on a foreign dataset

    # the same validation of the same CLIP untrained: no gap to speak of
    pixels, captions, _ = read_split(cfg.data.root, "val", 32, cfg.data.seed)
    tokenizer = train_clip.train_tokenizer(captions, cfg.clip.vocab_size, cfg.clip.context_length)
    untrained = clip_validation.ClipScorer(*train_clip.build_clip(cfg.clip, 16, tokenizer), name="untrained")
    images = torch.from_numpy(to_uint8(pixels)).permute(0, 3, 1, 2)
    random_gap = clip_validation.validate(untrained, images, captions, None)["own_vs_shuffled"]["gap"]
    assert random_gap["mean"] < validation["own_vs_shuffled"]["gap"]["mean"] / 3


def test_attribute_swaps_change_exactly_one_attribute():
    rng = random.Random(0)
    for index in range(50):
        scene = make_scene(3, index, max_objects=3)
        for attribute in clip_validation.ATTRIBUTES:
            before, after = (
                re.split(r", | and ", c) for c in (scene.caption, clip_validation.swapped(scene, attribute, rng))
            )
            (k,) = [i for i, (a, b) in enumerate(zip(before, after)) if a != b]  # one object's description changed
            words = before[k].split()[1:4]  # size, colour, shape
            changed_words = after[k].split()[1:4]
            moved = {"size": 0, "colour": 1, "shape": 2}.get(attribute)
            assert [i for i in range(3) if words[i] != changed_words[i]] == ([] if moved is None else [moved])


def test_exchanging_two_objects_colours_keeps_the_words_and_changes_the_binding():
    rng = random.Random(0)
    scenes = [make_scene(5, i, min_objects=2, max_objects=3) for i in range(40)]
    for scene in scenes:
        exchanged = clip_validation.colours_exchanged(scene, rng)
        if exchanged is None:  # every object of the same colour: nothing to exchange
            assert len({o.colour for o in scene.objects}) == 1
            continue
        assert exchanged != scene.caption and sorted(exchanged.split()) == sorted(scene.caption.split())
    assert clip_validation.colours_exchanged(make_scene(5, 0, max_objects=1), rng) is None


def test_retrieval_counts_an_equal_caption_as_a_hit_and_reports_chance():
    features = torch.eye(4)
    captions = ["a", "a", "b", "c"]
    swapped_duplicates = features[[1, 0, 2, 3]]  # image 0 nearest to caption 1, which reads the same
    result = clip_validation.retrieval(features, swapped_duplicates, captions)
    assert result["image_to_text"] == 1.0 and result["text_to_image"] == 1.0
    assert result["chance"] == pytest.approx((2 + 2 + 1 + 1) / 16)
    assert (clip_validation.derangement(7, 0) != torch.arange(7)).all()
    with pytest.raises(ValueError, match="at least 2 held-out images"):
        clip_validation.validate(None, torch.zeros(1, 3, 16, 16, dtype=torch.uint8), ["a"], None)


def test_clip_settings_are_validated():
    with pytest.raises(ConfigError, match="clip.width=30 is not divisible by clip.num_heads=4"):
        load_config(None, ["clip.width=30"])
    with pytest.raises(ConfigError, match="clip.patch_size=5"):
        load_config(None, ["clip.patch_size=5"])
