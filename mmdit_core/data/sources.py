"""Where shard samples come from: `data.source` is read here and nowhere else.

scenes         the built-in procedural scenes (no input needed)
fashion_mnist  idx files (Debian's dataset-fashion-mnist puts them in /usr/share/datasets/fashion-mnist)
folder         images with same-name .txt captions, or a CSV / JSONL / Parquet table of path + caption
emoji          a colour-emoji font (Debian's fonts-noto-color-emoji), captioned by Unicode names
webdataset     shards written elsewhere, img2dataset's KEY.jpg + KEY.txt + KEY.json the reference case:
               paths, a folder of .tar files, brace patterns, pipe: and http(s) URLs, and any URL fsspec
               opens where its backend is installed (s3://, gs://, ...)
urls           a CSV / JSONL / Parquet table of image URLs and captions, fetched into shards (urls.py)
               that are then read as webdataset

Every image is made 8-bit RGB (images.to_rgb), centre-cropped to a square and resized to data.image_size
with PIL's bicubic filter (which antialiases when shrinking). Splits are seeded random subsets, never the
first N in name or stream order. `read_source` gives each split's records (key, image, caption,
attributes) and counts what it could not use, by kind; both go into the dataset's manifest.
"""

from __future__ import annotations

import gzip
import hashlib
import heapq
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator
from urllib.parse import urlparse

import numpy as np
import pandas as pd
import requests
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm
from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys, tar_file_expander

from ..config import DataConfig
from ..errors import InputError, MissingInput
from .images import fit
from .scenes import make_scene, render, split_indices
from .shards import SkipCounts, sample_members
from .urls import fetch_table

Record = tuple[str, Image.Image, str, "dict | None"]
SPLITS = ("train", "val")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}
FASHION_CAPTIONS = ("a t-shirt", "a pair of trousers", "a pullover", "a dress", "a coat", "a sandal", "a shirt",
                    "a sneaker", "a bag", "an ankle boot")
DEFAULT_PATHS = {"fashion_mnist": "/usr/share/datasets/fashion-mnist",
                 "emoji": "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"}


def _input_path(cfg: DataConfig) -> Path:
    path = Path(cfg.import_path or DEFAULT_PATHS.get(cfg.source, ""))
    if not cfg.import_path and cfg.source not in DEFAULT_PATHS:
        raise InputError(f"data.import_path is required for data.source={cfg.source}")
    if not path.exists():
        raise MissingInput(f"data.import_path={path} does not exist (data.source={cfg.source})")
    return path


# ---- sources ------------------------------------------------------------------------------------

def scene_records(cfg: DataConfig, split: str, counts: SkipCounts) -> Iterator[Record]:
    for i in split_indices(cfg, split):
        scene = make_scene(cfg.seed, i, cfg.min_objects, cfg.max_objects, cfg.background)
        yield f"scene{i:08d}", render(scene, cfg.image_size), scene.caption, scene.attributes()


def read_idx(path: Path) -> np.ndarray:
    """An idx file (optionally .gz) as an array: MNIST's format, magic 0x08 then the dimension count."""
    data = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise InputError(f"{path} is not an unsigned-byte idx file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise InputError(f"{path} is truncated: {body.size} bytes for shape {shape}")
    return body.reshape(shape)


def _find(directory: Path, stem: str) -> Path:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.exists():
            return candidate
    raise MissingInput(f"{directory} has no {stem}[.gz]")


def fashion_mnist_records(cfg: DataConfig, split: str, counts: SkipCounts) -> Iterator[Record]:
    directory = _input_path(cfg)
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(_find(directory, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find(directory, f"{prefix}-labels-idx1-ubyte"))
    limit = cfg.num_train if split == "train" else cfg.num_val
    for i in np.random.default_rng(cfg.seed).permutation(len(labels))[:limit].tolist():
        label = int(labels[i])
        yield f"fmnist-{prefix}-{i:06d}", fit(Image.fromarray(images[i]), cfg.image_size), FASHION_CAPTIONS[label], {"label": label}


URL_COLUMNS = ("url", "URL")
CAPTION_COLUMNS = ("caption", "TEXT", "text")


def read_table(path: Path, item_columns: tuple[str, ...], caption_field: str | None = None) -> tuple[list[str], list[str]]:
    """(items, captions) of a CSV / JSONL / Parquet table: the first of `item_columns` it has, and
    `caption_field` or the first of CAPTION_COLUMNS it has; empty cells become ''."""
    readers = {".csv": pd.read_csv, ".jsonl": lambda p: pd.read_json(p, lines=True), ".parquet": pd.read_parquet}
    if path.suffix not in readers:
        raise InputError(f"data.import_path={path}: expected a .csv, .jsonl or .parquet table")
    table = readers[path.suffix](path)
    item_column = next((c for c in item_columns if c in table.columns), None)
    caption_column = caption_field or next((c for c in CAPTION_COLUMNS if c in table.columns), None)
    if item_column is None or caption_column not in table.columns:
        raise InputError(f"{path} needs a column {' or '.join(item_columns)} and a caption column "
                         f"{caption_field or ' or '.join(CAPTION_COLUMNS)}; it has {list(table.columns)}")
    cells = lambda column: ["" if pd.isna(v) else str(v).strip() for v in table[column]]  # noqa: E731
    return cells(item_column), cells(caption_column)


def folder_items(path: Path, caption_field: str | None = None) -> list[tuple[Path, str]]:
    """(image path, caption) pairs from a folder of image + .txt files, or a table of path + caption
    (paths relative to the table's folder)."""
    if path.is_dir():
        images = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        return [(p, p.with_suffix(".txt").read_text().strip() if p.with_suffix(".txt").exists() else "") for p in images]
    paths, captions = read_table(path, ("path",), caption_field)
    return [(path.parent / item, caption) for item, caption in zip(paths, captions)]


def seeded_split(count: int, cfg: DataConfig, split: str) -> list[int]:
    """Which of `count` items a split takes, in a seeded random order: the val split first (never more than
    half), the train split from the rest; never the first N in name order, so a folder sorted by class
    gives every split every class in proportion, interleaved across its shards."""
    order = np.random.default_rng(cfg.seed).permutation(count).tolist()
    n_val = min(cfg.num_val, count // 2)
    return order[:n_val] if split == "val" else order[n_val:n_val + cfg.num_train]


def folder_records(
    cfg: DataConfig, split: str, counts: SkipCounts, items: list[tuple[Path, str]] | None = None
) -> Iterator[Record]:
    """An image that does not open, or one without a caption, is counted and skipped. `items`: the folder
    as folder_items lists it (default: listed here)."""
    items = folder_items(_input_path(cfg), cfg.caption_field) if items is None else items
    for i in seeded_split(len(items), cfg, split):
        image_path, caption = items[i]
        if not caption:
            counts.add("caption")
            continue
        try:
            with Image.open(image_path) as image:
                fitted = fit(image, cfg.image_size)
        except Exception:  # PIL raises many types on bad files; any of them spoils only this item
            counts.add("image")
            continue
        yield f"item{i:08d}", fitted, caption, {"path": str(image_path)}


EMOJI_RANGES = ((0x2600, 0x27BF), (0x1F300, 0x1FAFF))
EMOJI_FONT_SIZE = 109  # the one bitmap size Noto Color Emoji carries


def emoji_records(cfg: DataConfig, split: str, counts: SkipCounts) -> Iterator[Record]:
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


# ---- webdataset shards written elsewhere ---------------------------------------------------------

def shard_urls(import_path: str) -> list[str]:
    """Shards named by data.import_path: a folder's .tar files, or paths / URLs with brace patterns
    (`shards/{000000..000099}.tar`) and '::' between several. A local path that is missing is an error."""
    if Path(import_path).is_dir():
        urls = sorted(str(p) for p in Path(import_path).glob("*.tar"))
        if not urls:
            raise MissingInput(f"data.import_path={import_path} holds no .tar shards")
        return urls
    urls = expand_urls(import_path)
    missing = [u for u in urls if urlparse(u).scheme in ("", "file") and not Path(urlparse(u).path).exists()]
    if missing:
        raise MissingInput(f"data.import_path: {len(missing)} of {len(urls)} shards do not exist, "
                                f"the first {missing[0]}")
    return urls


def open_shard(url: str, timeout_s: float) -> BinaryIO:
    """A shard as a byte stream: http(s) through requests, paths and pipe: through webdataset, any other
    scheme through fsspec (its backend for that scheme must be installed)."""
    scheme = urlparse(url).scheme
    if scheme in ("http", "https"):
        response = requests.get(url, stream=True, timeout=timeout_s)
        response.raise_for_status()
        response.raw.decode_content = True
        return response.raw
    if scheme in ("", "file", "pipe"):
        return gopen(url)
    import fsspec  # object stores; imported only when named

    return fsspec.open(url, "rb").open()


def shard_samples(urls: list[str], counts: SkipCounts, timeout_s: float) -> Iterator[dict[str, Any]]:
    """Raw samples of every shard in turn; a shard that does not open or read to its end is counted once
    (what it held before the damage is kept)."""
    for url in urls:
        errors: list[Exception] = []
        try:
            stream = open_shard(url, timeout_s)
        except Exception:
            counts.add("shard")
            continue
        try:
            files = tar_file_expander([{"url": url, "stream": stream}], handler=lambda e: errors.append(e) or True)
            yield from group_by_keys(files, handler=lambda e: errors.append(e) or True)
        finally:
            try:
                stream.close()
            except Exception as exc:  # a pipe: command that failed says so only when closed
                errors.append(exc)
            if errors:
                counts.add("shard")


def webdataset_records(urls: list[str], cfg: DataConfig, counts: SkipCounts) -> Iterator[Record]:
    """Every usable sample, fitted; attributes say where it came from (source key, shard, and the
    image URL when its .json names one, as img2dataset's does)."""
    for n, sample in enumerate(shard_samples(urls, counts, cfg.fetch.timeout_s)):
        members = sample_members(sample, counts, cfg.caption_field)
        if members is None:
            continue
        caption, image, attributes = members
        try:
            fitted = fit(image, cfg.image_size)
        except Exception:  # e.g. an image with a zero side
            counts.add("image")
            continue
        origin = {"key": sample["__key__"], "shard": sample["__url__"]}
        if isinstance(attributes, dict) and isinstance(attributes.get("url"), str):
            origin["url"] = attributes["url"]
        yield f"item{n:09d}", fitted, caption, origin


def key_rank(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{key}".encode()).digest()[:8], "big")


def choose(stream: Iterable[Record], cfg: DataConfig) -> tuple[dict[str, list[Record]], int]:
    """Both splits from a stream read once, and how many usable records it had: the num_train + num_val
    records whose seeded hash of their source key is least (a uniform random subset whatever the
    stream's length or order), in that hash's order, val first (never more than half). Holds the
    chosen records' images in memory (3 KB each at 32 px, 190 KB at 256 px)."""
    kept: list[tuple[int, int, Record]] = []  # a max-heap on rank of the best-ranked records so far
    limit, available = cfg.num_train + cfg.num_val, 0
    for available, record in enumerate(stream, 1):
        entry = (-key_rank(cfg.seed, record[3]["key"]), -available, record)
        if len(kept) < limit:
            heapq.heappush(kept, entry)
        elif entry[:2] > kept[0][:2]:
            heapq.heapreplace(kept, entry)
    ordered = [record for *_, record in sorted(kept, key=lambda e: e[:2], reverse=True)]
    n_val = min(cfg.num_val, available // 2)
    return {"val": ordered[:n_val], "train": ordered[n_val:n_val + cfg.num_train]}, available


# ---- every source -------------------------------------------------------------------------------

SOURCES = {"scenes": scene_records, "fashion_mnist": fashion_mnist_records, "folder": folder_records, "emoji": emoji_records}


def records(cfg: DataConfig, split: str, counts: SkipCounts | None = None) -> Iterator[Record]:
    """One split of a source read item by item (not webdataset or urls, which read_source reads once)."""
    return SOURCES[cfg.source](cfg, split, counts if counts is not None else SkipCounts())


@dataclass
class Import:
    """One reading of a source: each split's records, what reading them skipped (complete once they
    are consumed), and facts for the manifest (how many items were available, what fetching did)."""

    splits: dict[str, Iterable[Record]]
    skipped: SkipCounts = field(default_factory=SkipCounts)
    details: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        skipped = {kind: n for kind, n in self.skipped.totals().items() if n}
        return {**self.details, **({"skipped": skipped} if skipped else {})}


def read_source(cfg: DataConfig) -> Import:
    counts = SkipCounts()
    if cfg.source in ("webdataset", "urls"):
        if not cfg.import_path:
            raise InputError(f"data.import_path is required for data.source={cfg.source}")
        details: dict[str, Any] = {}
        if cfg.source == "urls":
            table = _input_path(cfg)
            urls, details["fetch"] = fetch_table(cfg, table, *read_table(table, URL_COLUMNS, cfg.caption_field))
        else:
            urls = shard_urls(cfg.import_path)
        stream = tqdm(webdataset_records(urls, cfg, counts), desc="reading shards", unit="img")
        splits, details["available"] = choose(stream, cfg)
        return Import(splits, counts, details)
    if cfg.source == "folder":  # listed once, for every split and the count
        items = folder_items(_input_path(cfg), cfg.caption_field)
        splits = {split: folder_records(cfg, split, counts, items) for split in SPLITS}
        return Import(splits, counts, {"available": len(items)})
    return Import({split: records(cfg, split, counts) for split in SPLITS}, counts)
