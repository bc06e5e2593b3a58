"""Where shard samples come from: `data.source` is read here and nowhere else.

scenes         the built-in procedural scenes (no input needed)
fashion_mnist  idx files (Debian's dataset-fashion-mnist puts them in /usr/share/datasets/fashion-mnist)
folder         images with same-name .txt captions, or a CSV / JSONL file of path,caption rows
emoji          a colour-emoji font (Debian's fonts-noto-color-emoji), captioned by Unicode names

Every image is converted to RGB and resized to data.image_size with PIL's bicubic filter (which
antialiases when shrinking); non-square images are centre-cropped first. Each source yields
(key, image, caption, attributes) for the train and val splits.
"""

from __future__ import annotations

import csv
import gzip
import json
import unicodedata
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..config import DataConfig
from .scenes import make_scene, render, split_indices

Record = tuple[str, Image.Image, str, "dict | None"]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}
FASHION_CAPTIONS = ("a t-shirt", "a pair of trousers", "a pullover", "a dress", "a coat", "a sandal", "a shirt",
                    "a sneaker", "a bag", "an ankle boot")
DEFAULT_PATHS = {"fashion_mnist": "/usr/share/datasets/fashion-mnist",
                 "emoji": "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"}


def fit(image: Image.Image, size: int) -> Image.Image:
    """RGB, centre-cropped to a square, resized to size × size with PIL bicubic."""
    image = image.convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)


def _input_path(cfg: DataConfig) -> Path:
    path = Path(cfg.import_path or DEFAULT_PATHS.get(cfg.source, ""))
    if not cfg.import_path and cfg.source not in DEFAULT_PATHS:
        raise ValueError(f"data.import_path is required for data.source={cfg.source}")
    if not path.exists():
        raise FileNotFoundError(f"data.import_path={path} does not exist (data.source={cfg.source})")
    return path


# ---- sources ------------------------------------------------------------------------------------

def scene_records(cfg: DataConfig, split: str) -> Iterator[Record]:
    for i in split_indices(cfg, split):
        scene = make_scene(cfg.seed, i, cfg.min_objects, cfg.max_objects, cfg.background)
        yield f"scene{i:08d}", render(scene, cfg.image_size), scene.caption, scene.attributes()


def read_idx(path: Path) -> np.ndarray:
    """An idx file (optionally .gz) as an array: MNIST's format, magic 0x08 then the dimension count."""
    data = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte idx file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: {body.size} bytes for shape {shape}")
    return body.reshape(shape)


def _find(directory: Path, stem: str) -> Path:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"{directory} has no {stem}[.gz]")


def fashion_mnist_records(cfg: DataConfig, split: str) -> Iterator[Record]:
    directory = _input_path(cfg)
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(_find(directory, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find(directory, f"{prefix}-labels-idx1-ubyte"))
    limit = cfg.num_train if split == "train" else cfg.num_val
    for i in range(min(limit, len(labels))):
        label = int(labels[i])
        yield f"fmnist-{prefix}-{i:06d}", fit(Image.fromarray(images[i]), cfg.image_size), FASHION_CAPTIONS[label], {"label": label}


def folder_items(path: Path) -> list[tuple[Path, str]]:
    """(image path, caption) pairs from a folder of image + .txt files, or a CSV / JSONL listing."""
    if path.is_dir():
        images = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        return [(p, p.with_suffix(".txt").read_text().strip() if p.with_suffix(".txt").exists() else "") for p in images]
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    elif path.suffix == ".csv":
        rows = list(csv.DictReader(path.open()))
    else:
        raise ValueError(f"data.import_path={path}: expected a folder, a .csv or a .jsonl file")
    return [((path.parent / row["path"]), str(row.get("caption", "")).strip()) for row in rows]


def seeded_split(count: int, cfg: DataConfig, split: str) -> list[int]:
    """Which of `count` items a split takes, in a seeded random order: the val split first (never more than
    half), the train split from the rest; never the first N in name order, so a folder sorted by class
    gives every split every class in proportion, interleaved across its shards."""
    order = np.random.default_rng(cfg.seed).permutation(count).tolist()
    n_val = min(cfg.num_val, count // 2)
    return order[:n_val] if split == "val" else order[n_val:n_val + cfg.num_train]


def folder_records(cfg: DataConfig, split: str) -> Iterator[Record]:
    items = folder_items(_input_path(cfg))
    for i in seeded_split(len(items), cfg, split):
        image_path, caption = items[i]
        with Image.open(image_path) as image:
            yield f"item{i:08d}", fit(image, cfg.image_size), caption, {"path": str(image_path)}


EMOJI_RANGES = ((0x2600, 0x27BF), (0x1F300, 0x1FAFF))
EMOJI_FONT_SIZE = 109  # the one bitmap size Noto Color Emoji carries


def emoji_records(cfg: DataConfig, split: str) -> Iterator[Record]:
    from fontTools.ttLib import TTFont  # comes with matplotlib

    path = _input_path(cfg)
    cmap = TTFont(str(path), lazy=True).getBestCmap()
    chars = [chr(c) for lo, hi in EMOJI_RANGES for c in range(lo, hi + 1) if c in cmap and unicodedata.name(chr(c), "")]
    font = ImageFont.truetype(str(path), EMOJI_FONT_SIZE)
    for i in seeded_split(len(chars), cfg, split):
        char = chars[i]
        canvas = Image.new("RGB", (160, 160), "white")  # the glyph bitmap is about 136 × 128
        ImageDraw.Draw(canvas).text((12, 16), char, font=font, embedded_color=True)
        yield f"emoji-{ord(char):05x}", fit(canvas, cfg.image_size), unicodedata.name(char).lower(), {"codepoint": ord(char)}


SOURCES = {"scenes": scene_records, "fashion_mnist": fashion_mnist_records, "folder": folder_records, "emoji": emoji_records}


def records(cfg: DataConfig, split: str) -> Iterator[Record]:
    return SOURCES[cfg.source](cfg, split)


def available(cfg: DataConfig) -> int | None:
    """How many items an imported folder or table offers (recorded in the manifest beside how many each
    split took); None for the other sources."""
    return len(folder_items(_input_path(cfg))) if cfg.source == "folder" else None

