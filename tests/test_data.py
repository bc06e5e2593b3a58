import gzip
import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmdit_core.config import DataConfig
from mmdit_core.data.images import to_tensor
from mmdit_core.data.scenes import PALETTE, describe, make_scene, render
from mmdit_core.data.shards import (
    ShardStream,
    SkipCounts,
    encode_sample,
    make_loader,
    read_manifest,
    split_shards,
    write_dataset,
)
from mmdit_core.data.sources import DEFAULT_PATHS, FASHION_CAPTIONS, records

# ---- scenes -------------------------------------------------------------------------------------


def test_scenes_are_deterministic():
    a, b = make_scene(3, 17), make_scene(3, 17)
    assert a == b and render(a, 32).tobytes() == render(b, 32).tobytes()
    assert make_scene(3, 18) != a and make_scene(4, 17) != a


def test_attributes_agree_with_pixels():
    for index in range(40):
        scene = make_scene(0, index, max_objects=3)
        pixels = np.asarray(render(scene, 96)).astype(int)
        cells = {(o.row, o.col) for o in scene.objects}
        assert len(cells) == len(scene.objects)  # one object per cell
        for obj in scene.objects:
            x, y = int(obj.cx * 96), int(obj.cy * 96)
            assert np.abs(pixels[y, x] - PALETTE[obj.colour]).max() <= 12, (index, obj)
            assert obj.col == min(int(obj.cx * 3), 2) and obj.row == min(int(obj.cy * 3), 2)  # jitter stays in the cell
            assert describe(obj) in scene.caption


def test_positions_are_jittered_within_cells():
    centres = {
        (round(o.cx, 3), round(o.cy, 3))
        for i in range(60)
        for o in make_scene(1, i).objects
        if (o.row, o.col) == (1, 1)
    }
    assert len(centres) > 5


# ---- shards -------------------------------------------------------------------------------------


def scene_samples(n: int, start: int = 0, size: int = 16):
    for i in range(start, start + n):
        scene = make_scene(0, i)
        yield encode_sample(f"s{i:05d}", render(scene, size), scene.caption, scene.attributes())


@pytest.fixture
def dataset(tmp_path) -> Path:
    """15 train samples in 3 shards of 5, 4 val samples in 1 shard."""
    write_dataset(tmp_path / "ds", {"train": scene_samples(15), "val": scene_samples(4, start=100)}, 5, {"test": 1})
    return tmp_path / "ds"


def test_shard_round_trip(dataset):
    manifest = read_manifest(dataset)
    assert manifest["splits"]["train"]["samples"] == 15 and len(manifest["splits"]["train"]["shards"]) == 3
    samples = list(ShardStream(split_shards(dataset, "train")))
    assert [s["key"] for s in samples] == [f"s{i:05d}" for i in range(15)]
    for i, sample in enumerate(samples):
        scene = make_scene(0, i)
        assert sample["caption"] == scene.caption and sample["attributes"] == scene.attributes()
        assert torch.equal(sample["image"], to_tensor(render(scene, 16)))


def test_streams_from_pipe_urls(dataset):
    urls = [f"pipe:cat {path}" for path in split_shards(dataset, "train")]
    assert [s["key"] for s in ShardStream(urls)] == [f"s{i:05d}" for i in range(15)]


def test_failed_write_keeps_the_old_dataset_and_leaves_no_debris(dataset):
    def broken():
        yield from scene_samples(3)
        raise OSError("disk full")

    before = read_manifest(dataset)
    with pytest.raises(OSError, match="disk full"):
        write_dataset(dataset, {"train": broken()}, 5, {})
    assert read_manifest(dataset) == before
    assert sorted(p.name for p in dataset.parent.iterdir()) == ["ds"]


def test_manifest_key_tracks_content(tmp_path):
    a = write_dataset(tmp_path / "a", {"train": scene_samples(3)}, 5, {})
    b = write_dataset(tmp_path / "b", {"train": scene_samples(3)}, 5, {})
    c = write_dataset(tmp_path / "c", {"train": scene_samples(3, start=1)}, 5, {})
    assert a["key"] == b["key"] != c["key"]


@pytest.mark.parametrize("num_shards", [3, 8])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("workers", [0, 1, 2])
def test_every_sample_read_exactly_once_per_epoch(tmp_path, num_shards, world_size, workers):
    write_dataset(tmp_path / "ds", {"train": scene_samples(num_shards * 2)}, 2, {})
    urls = split_shards(tmp_path / "ds", "train")
    assert len(urls) == num_shards
    seen = Counter()
    for rank in range(world_size):
        loader = make_loader(urls, 3, num_workers=workers, rank=rank, world_size=world_size, shuffle=4)
        for batch in loader:
            seen.update(batch["key"])
    assert seen == Counter(f"s{i:05d}" for i in range(num_shards * 2))


def test_resampled_stream_is_endless_and_seeded(dataset):
    def first(n, seed):
        stream = iter(ShardStream(split_shards(dataset, "train"), resampled=True, seed=seed, shuffle=4))
        return [next(stream)["key"] for _ in range(n)]

    keys = first(60, seed=0)
    assert len(keys) == 60 and first(60, seed=0) == keys and first(60, seed=1) != keys


def test_skip_resumes_the_stream(dataset):
    urls = split_shards(dataset, "train")
    full = [s["key"] for s in ShardStream(urls, shuffle=6, seed=3)]
    resumed = list(ShardStream(urls, shuffle=6, seed=3, skip=7))
    assert [s["key"] for s in resumed] == full[7:] and resumed[0]["index"] == 7


def write_tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.timeout(60)
def test_corrupt_data_is_skipped_counted_and_never_hangs(dataset, tmp_path):
    urls = split_shards(dataset, "train")
    truncated = list(urls)[1]
    data = Path(truncated).read_bytes()
    Path(truncated).write_bytes(data[: len(data) // 2])
    good = encode_sample("g1", render(make_scene(0, 0), 16), "a caption")
    bad = tmp_path / "bad.tar"
    write_tar(
        bad,
        {
            "b1.png": b"not a png",
            "b1.txt": b"bad bytes",
            "b2.png": good["png"],
            "b2.txt": b"   ",
            "b3.png": good["png"],
            "b4.png": good["png"],
            "b4.txt": b"fine",
            "b4.json": b"{not json",
            "g1.png": good["png"],
            "g1.txt": good["txt"],
        },
    )
    (tmp_path / "garbage.tar").write_bytes(b"\x00garbage" * 100)
    counts = SkipCounts()
    loader = make_loader({**urls, str(bad): 5, str(tmp_path / "garbage.tar"): 1}, 4, num_workers=2, counts=counts)
    keys = [key for batch in loader for key in batch["key"]]
    totals = counts.totals()
    assert "g1" in keys and all(k.startswith("s") or k == "g1" for k in keys)
    assert 10 <= len([k for k in keys if k.startswith("s")]) < 15  # the truncated shard lost some samples
    # b1's image; b2's blank and b3's missing caption (plus any sample the truncation cut in half);
    # the truncated and the garbage shard.
    read = len([k for k in keys if k.startswith("s")])
    assert totals["image"] == 1 and totals["json"] == 1 and totals["caption"] >= 2 and totals["shard"] >= 2
    # Every promised sample is accounted for: 15 scene samples and the 1 the garbage shard promised.
    assert read + totals["missing"] + (totals["caption"] - 2) + totals["no_image"] == 15 + 1
    assert "1 undecodable images" in counts.report() and "missing or empty captions" in counts.report()


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_any_image_format_is_read_and_a_foreign_size_never_reaches_a_batch(tmp_path):
    scene = render(make_scene(0, 0), 16)
    shard = tmp_path / "foreign.tar"
    write_tar(
        shard,
        {
            "a.jpg": encoded(scene, "JPEG"),
            "a.txt": b"a jpeg",
            "b.png": encoded(scene.convert("L"), "PNG"),
            "b.txt": b"a grey png",
            "c.webp": encoded(scene.convert("RGBA"), "WEBP"),
            "c.txt": b"an rgba webp",
            "d.jpg": encoded(render(make_scene(0, 1), 24), "JPEG"),
            "d.txt": b"another size",
            "e.jpg": encoded(scene, "JPEG"),
            "e.txt": "caf\xe9".encode("latin-1"),
            "f.gif.json": b"{}",
            "f.txt": b"no image at all",
        },
    )
    counts = SkipCounts()
    batches = list(make_loader([str(shard)], 8, counts=counts, image_size=16))
    assert [k for b in batches for k in b["key"]] == ["a", "b", "c"] and batches[0]["image"].shape == (3, 3, 16, 16)
    assert (batches[0]["image"][1, 0] == batches[0]["image"][1, 1]).all()  # grey converted to RGB
    totals = counts.totals()
    assert (totals["size"], totals["utf8"], totals["no_image"], totals["image"]) == (1, 1, 1, 0)
    report = counts.report()
    assert "1 images of another size" in report and "1 captions that are not UTF-8" in report
    assert "hint:" in report and "prepare_data" in report


# ---- importers ----------------------------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_importer(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 6), ("t10k", 3)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    cfg = DataConfig(source="fashion_mnist", import_path=str(tmp_path), image_size=32, num_train=5, num_val=10)
    train, val = list(records(cfg, "train")), list(records(cfg, "val"))
    assert len(train) == 5 and len(val) == 3
    assert set(r[2] for r in train) < set(FASHION_CAPTIONS[:6]) and train[0][1].size == (32, 32)  # a seeded subset
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x09\x01"))
    with pytest.raises(ValueError, match="truncated"):
        list(records(cfg, "train"))


def test_folder_importer_reads_txt_csv_and_jsonl(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(6):
        Image.new("RGB", (40, 20), (i * 40, 0, 0)).save(folder / f"im{i}.png")
        (folder / f"im{i}.txt").write_text(f"caption {i}\n")
    cfg = DataConfig(source="folder", import_path=str(folder), image_size=16, num_train=10, num_val=2)
    train, val = list(records(cfg, "train")), list(records(cfg, "val"))
    assert len(train) == 4 and len(val) == 2 and {r[2] for r in train + val} == {f"caption {i}" for i in range(6)}
    assert train[0][1].size == (16, 16)
    (tmp_path / "list.csv").write_text("path,caption\n" + "".join(f"imgs/im{i}.png,row {i}\n" for i in range(4)))
    (tmp_path / "list.jsonl").write_text(
        "".join(json.dumps({"path": f"imgs/im{i}.png", "caption": f"row {i}"}) + "\n" for i in range(4))
    )
    for listing in ("list.csv", "list.jsonl"):
        cfg = DataConfig(source="folder", import_path=str(tmp_path / listing), image_size=16, num_train=10, num_val=1)
        assert sorted(r[2] for r in [*records(cfg, "train"), *records(cfg, "val")]) == [f"row {i}" for i in range(4)]


def test_a_folder_import_lists_the_folder_once(tmp_path, monkeypatch):
    from mmdit_core.data import sources

    for i in range(4):
        Image.new("RGB", (8, 8)).save(tmp_path / f"im{i}.png")
        (tmp_path / f"im{i}.txt").write_text(f"caption {i}")
    listings, folder_items = [], sources.folder_items
    monkeypatch.setattr(sources, "folder_items", lambda *args: listings.append(args) or folder_items(*args))
    cfg = DataConfig(source="folder", import_path=str(tmp_path), image_size=8, num_train=10, num_val=1)
    imported = sources.read_source(cfg)
    assert sum(len(list(split)) for split in imported.splits.values()) == 4 and imported.details["available"] == 4
    assert len(listings) == 1


def test_a_class_sorted_folder_gives_every_split_every_class_interleaved(tmp_path):
    from experiments.prepare_data import prepare
    from mmdit_core.config import load_config

    folder = tmp_path / "digits"
    folder.mkdir()
    for c in range(10):  # named so that name order is class order: 0_0000.png ... 9_0019.png
        for k in range(20):
            Image.new("RGB", (8, 8), (25 * c, 0, 0)).save(folder / f"{c}_{k:04d}.png")
            (folder / f"{c}_{k:04d}.txt").write_text(f"digit {c}")
    cfg = load_config(
        None,
        [
            "data.source=folder",
            f"data.import_path={folder}",
            f"data.root={tmp_path / 'ds'}",
            "data.image_size=8",
            "data.num_train=100",
            "data.num_val=20",
            "data.samples_per_shard=25",
        ],
    )
    manifest = prepare(cfg)
    assert manifest["available"] == 200 and manifest["splits"]["train"]["samples"] == 100
    for split, n in (("train", 100), ("val", 20)):
        classes = Counter(r[2] for r in records(cfg.data, split))
        assert sum(classes.values()) == n and (len(classes) == 10 or split == "val" and len(classes) >= 7)
        assert split == "val" or min(classes.values()) >= n / 10 / 2  # in proportion, not the first classes whole
    first_shard = Counter(
        b for batch in make_loader([sorted(split_shards(cfg.data.root, "train"))[0]], 25) for b in batch["caption"]
    )
    assert len(first_shard) >= 6  # classes interleaved across shards
    train_keys = {r[0] for r in records(cfg.data, "train")}
    assert not train_keys & {r[0] for r in records(cfg.data, "val")}


def test_evaluation_samples_a_split_at_random_however_its_shards_were_written(tmp_path):
    from eval.fid import write_split_images
    from mmdit_core.data.training import read_split

    def by_class():  # shards written in class order, as a sorted folder would have been before
        for c in range(10):
            for k in range(20):
                yield encode_sample(f"c{c}k{k:02d}", Image.new("RGB", (8, 8), (25 * c, 0, 0)), f"digit {c}")

    write_dataset(tmp_path / "ds", {"val": by_class()}, 20, {"image_size": 8})
    _, captions, _ = read_split(str(tmp_path / "ds"), "val", 20, seed=0)
    assert len(captions) == 20 and len(set(captions)) >= 7  # the first 20 would be one class
    assert read_split(str(tmp_path / "ds"), "val", 20, seed=0)[1] == captions  # seeded
    assert read_split(str(tmp_path / "ds"), "val", 20, seed=1)[1] != captions
    assert sorted(read_split(str(tmp_path / "ds"), "val", 500, seed=0)[1]) == sorted(
        f"digit {c}" for c in range(10) for _ in range(20)
    )
    out = tmp_path / "pngs"
    out.mkdir()
    assert write_split_images(tmp_path / "ds", "val", 20, 0, out) == 20
    reds = {Image.open(f).getpixel((0, 0))[0] for f in out.iterdir()}
    assert reds == {25 * int(c.split()[1]) for c in captions}  # the same sample, as the stored PNG files


@pytest.mark.skipif(not Path(DEFAULT_PATHS["emoji"]).exists(), reason="fonts-noto-color-emoji is not installed")
def test_emoji_importer():
    cfg = DataConfig(source="emoji", image_size=32, num_train=1, num_val=1)
    ((key, image, caption, attributes),) = records(cfg, "train")
    assert image.size == (32, 32) and caption and chr(attributes["codepoint"])
    assert np.asarray(image).std() > 10  # something coloured was drawn


def test_missing_importer_input_is_named():
    with pytest.raises(FileNotFoundError, match="data.import_path=/nowhere"):
        list(records(DataConfig(source="folder", import_path="/nowhere"), "train"))
