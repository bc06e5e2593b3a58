"""Webdataset shards: writing them with a manifest, and streaming them back split by rank and worker.

A sample is `KEY.png` (RGB), `KEY.txt` (caption) and optionally `KEY.json` (attributes). A dataset
directory holds `train-NNNNNN.tar`, `val-NNNNNN.tar` and `manifest.json` (counts, per-shard sha256,
the config that made it, what its import counted); its `key` identifies the data for every cache built
on it. The reader also takes shards written elsewhere (any image member PIL reads).

Reading never stops on bad data: an unreadable or truncated shard, undecodable image bytes, a
missing or empty caption, or unreadable attributes skips what it spoils, is counted by kind in
`SkipCounts`, and is reported.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import io
import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.filters import _shuffle
from webdataset.tariterators import tarfile_samples

from ..errors import InputError, MissingInput
from ..files import atomic_directory, sha256_file
from .images import to_tensor

MANIFEST = "manifest.json"


# ---- writing ------------------------------------------------------------------------------------

def encode_sample(key: str, image: Image.Image, caption: str, attributes: dict | None = None) -> dict[str, Any]:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    sample = {"__key__": key, "png": buffer.getvalue(), "txt": caption.encode()}
    if attributes is not None:
        sample["json"] = json.dumps(attributes).encode()
    return sample


def write_split(directory: Path, split: str, samples: Iterable[dict[str, Any]], samples_per_shard: int) -> dict[str, Any]:
    """Write encoded samples as `{split}-NNNNNN.tar` shards; return the split's manifest entry."""
    directory.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    # A fixed mtime makes shards byte-reproducible, so equal data gets an equal key.
    with wds.ShardWriter(str(directory / f"{split}-%06d.tar"), maxcount=samples_per_shard, verbose=0, mtime=0) as writer:
        for sample in samples:
            writer.write(sample)
            name = Path(writer.fname).name
            counts[name] = counts.get(name, 0) + 1
    shards = [{"name": name, "samples": n, "sha256": sha256_file(directory / name)} for name, n in counts.items()]
    return {"samples": sum(counts.values()), "shards": shards}


def dataset_key(splits: dict[str, Any]) -> str:
    """16 hex digits over every shard's checksum: names the data in cache keys."""
    digest = hashlib.sha256()
    for split in sorted(splits):
        for shard in splits[split]["shards"]:
            digest.update(f"{split}/{shard['name']}:{shard['sha256']};".encode())
    return digest.hexdigest()[:16]


def write_dataset(directory: str | Path, splits: dict[str, Iterable[dict[str, Any]]], samples_per_shard: int,
                  source: dict[str, Any], imported: Callable[[], dict[str, Any]] = dict) -> dict[str, Any]:
    """Write every split and the manifest, with what the import counted (`imported()`, called once the
    splits are written: how many items were available, skipped, fetched); the directory appears
    complete or not at all."""
    with atomic_directory(directory) as tmp:
        entries = {split: write_split(tmp, split, samples, samples_per_shard) for split, samples in splits.items()}
        manifest = {"format": 1, "key": dataset_key(entries), "source": source, "splits": entries, **imported()}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def read_manifest(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise MissingInput(f"{path} not found: prepare the data first (python -m experiments.prepare_data)")
    return json.loads(path.read_text())


def split_shards(directory: str | Path, split: str) -> dict[str, int]:
    """{shard path: sample count} of a split, in order, from the manifest."""
    manifest = read_manifest(directory)
    if split not in manifest["splits"]:
        raise InputError(f"{directory} has no {split!r} split (has {sorted(manifest['splits'])})")
    return {str(Path(directory) / s["name"]): s["samples"] for s in manifest["splits"][split]["shards"]}


# ---- skip accounting ----------------------------------------------------------------------------

SKIP_KINDS = ("shard", "missing", "no_image", "image", "size", "caption", "utf8", "json")
# image members the reader accepts, in the order it looks for them (every format PIL reads)
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp", "tif", "tiff", "gif", "ppm")
MAX_WORKERS = 64


class SkipCounts:
    """Counts of skipped data by kind, in shared memory so DataLoader workers' counts reach the parent.

    Each worker writes only its own row; the parent sums them.
    """

    def __init__(self):
        self.table = torch.zeros(MAX_WORKERS + 1, len(SKIP_KINDS), dtype=torch.int64).share_memory_()

    def add(self, kind: str, n: int = 1) -> None:
        worker = get_worker_info()
        self.table[0 if worker is None else worker.id + 1, SKIP_KINDS.index(kind)] += n

    def shard_error(self, exn: Exception) -> bool:
        """webdataset handler for read errors (truncated tar, unreadable file): count, go on."""
        self.add("shard")
        return True

    def totals(self) -> dict[str, int]:
        return dict(zip(SKIP_KINDS, self.table.sum(0).tolist()))

    def report(self, own_shards: bool = True) -> str:
        """One line of what was skipped; reading this project's shards (`own_shards`, not an import), a
        foreign-looking sample adds the hint to import them instead."""
        totals = self.totals()
        if not any(totals.values()):
            return "no samples skipped"
        names = {"shard": "unreadable or short shards", "missing": "samples missing from short shards",
                 "no_image": "samples without an image member", "image": "undecodable images",
                 "size": "images of another size than the dataset's", "caption": "missing or empty captions",
                 "utf8": "captions that are not UTF-8", "json": "unreadable attribute files"}
        text = "skipped: " + ", ".join(f"{n} {names[kind]}" for kind, n in totals.items() if n)
        if own_shards and (totals["no_image"] or totals["size"]):  # foreign shards read as this project's
            text += ("; hint: these look like shards written elsewhere, not by prepare_data at data.image_size: "
                     "import them with python -m experiments.prepare_data --set data.source=webdataset "
                     "--set data.import_path=SHARDS (docs/data.md)")
        return text


# ---- reading ------------------------------------------------------------------------------------

def sample_members(sample: dict[str, Any], counts: SkipCounts,
                   caption_field: str | None = None) -> tuple[str, Image.Image, dict | None] | None:
    """(caption, loaded image, attributes) of a raw tar sample, or None with the reason counted.
    The caption is the .txt member, or `caption_field` of the .json member; the image is the first
    member in IMAGE_EXTENSIONS."""
    try:
        attributes = json.loads(sample["json"]) if "json" in sample else None
    except ValueError:
        counts.add("json")
        return None
    try:
        if caption_field is None:
            caption = sample.get("txt", b"").decode("utf-8")
        else:
            caption = attributes.get(caption_field) if isinstance(attributes, dict) else None
            caption = caption if isinstance(caption, str) else ""
    except UnicodeDecodeError:
        counts.add("utf8")
        return None
    if not caption.strip():
        counts.add("caption")
        return None
    member = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
    if member is None:
        counts.add("no_image")
        return None
    try:
        image = Image.open(io.BytesIO(sample[member]))
        image.load()
    except Exception:  # PIL raises many types on bad bytes; any of them spoils only this sample
        counts.add("image")
        return None
    return caption.strip(), image, attributes


def decode(sample: dict[str, Any], counts: SkipCounts,
           image_size: int | tuple[int, int] | None = None) -> dict[str, Any] | None:
    """Raw tar sample -> {"key", "image" (3, H, W) in [-1, 1], "caption", "attributes", "index"}, or
    None (counted). An image of another side than `image_size` (or another (width, height)) is skipped,
    never resized here (importers fit images to the dataset's size once, with one filter)."""
    members = sample_members(sample, counts)
    if members is None:
        return None
    caption, image, attributes = members
    if image_size is not None and image.size != ((image_size,) * 2 if isinstance(image_size, int) else image_size):
        counts.add("size")
        return None
    return {"key": sample["__key__"], "image": to_tensor(image), "caption": caption, "attributes": attributes,
            "index": sample["__index__"]}


def raw_png(sample: dict[str, Any], counts: SkipCounts) -> dict[str, Any] | None:
    """The stored PNG bytes of a sample of this project's shards, unchanged (FID reference images)."""
    if "png" not in sample:
        counts.add("no_image")
        return None
    return {"png": sample["png"], "index": sample["__index__"]}


def sample_of_split(root: str | Path, split: str, limit: int, seed: int,
                    transform: Callable[[dict[str, Any], SkipCounts], dict[str, Any] | None] = decode,
                    counts: SkipCounts | None = None) -> list[dict[str, Any]]:
    """A seeded random sample of `limit` readable samples of a split (all of them when it has fewer), in
    the sample's order: never the split's first N, so how the shards were written cannot narrow it."""
    urls = split_shards(root, split)
    rank = np.random.default_rng(seed).permutation(sum(urls.values()))  # rank[i]: place of stream position i
    kept: list[tuple[int, int, dict[str, Any]]] = []  # a max-heap on rank of the `limit` best-ranked so far
    for sample in ShardStream(urls, counts=counts, transform=transform):
        i = sample["index"]  # a shard longer than its manifest says ranks its extra samples last
        entry = (-(int(rank[i]) if i < len(rank) else i), i, sample)
        if len(kept) < limit:
            heapq.heappush(kept, entry)
        elif entry[0] > kept[0][0]:
            heapq.heapreplace(kept, entry)
    return [sample for _, _, sample in sorted(kept, key=lambda e: -e[0])]


@dataclass
class Consumer:
    """Which of `count` readers this is: rank-major, then dataloader worker."""

    index: int
    count: int


def current_consumer(rank: int, world_size: int, first_worker: int = 0) -> tuple[Consumer, int]:
    """This reader as a global consumer, and its role among the rank's workers.

    DataLoader worker w plays role (w + first_worker) % workers; the loader hands out batches from
    workers 0, 1, ... in turn, so a resumed loader whose next batch must come from role k starts at k.
    """
    worker = get_worker_info()
    worker_id, workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
    role = (worker_id + first_worker) % workers
    return Consumer(rank * workers + role, world_size * workers), role


@dataclass
class StreamPosition:
    """Where a rank's reader stands: the next stream index of each loader worker, and whose turn it is.

    Advanced with every batch consumed; a ShardStream built with `stream_args()` continues exactly
    there (same samples, same order, same shuffle), however many workers the loader has.
    """

    next_index: list[int]
    turn: int = 0

    @classmethod
    def start(cls, num_workers: int) -> StreamPosition:
        return cls([0] * max(num_workers, 1))

    def advance(self, batch: dict[str, Any]) -> None:
        self.next_index[self.turn] = int(batch["index"].max()) + 1
        self.turn = (self.turn + 1) % len(self.next_index)

    def stream_args(self) -> dict[str, Any]:
        return {"skip": list(self.next_index), "first_worker": self.turn}

    def to_dict(self) -> dict[str, Any]:
        return {"next_index": list(self.next_index), "turn": self.turn}


class ShardStream(IterableDataset):
    """Samples from shards, for one rank of `world_size` (and split again by DataLoader worker).

    Finite (resampled=False): each epoch every sample is read exactly once by exactly one consumer.
    With at least as many shards as consumers, consumers take disjoint shards; with fewer (a small
    dataset on many ranks and workers), every consumer reads every shard and keeps every count-th
    sample, so none is left with nothing to read and none waits forever.
    Resampled (resampled=True): shards drawn with replacement forever, seeded per consumer.
    Given {url: sample count} (a manifest's), a shard that delivers fewer samples than promised
    (truncated at a member boundary, which tar itself cannot tell) is counted with what it lost.
    `skip` drops the first `skip` samples of each consumer's stream (resume; a list gives one count per
    loader-worker role, see StreamPosition); every sample carries `index`, its position in that stream.
    """

    def __init__(self, urls: list[str] | dict[str, int], *, rank: int = 0, world_size: int = 1, resampled: bool = False,
                 shuffle: int = 0, seed: int = 0, skip: int | list[int] = 0, first_worker: int = 0,
                 counts: SkipCounts | None = None,
                 transform: Callable[[dict[str, Any], SkipCounts], dict[str, Any] | None] = decode):
        if not urls:
            raise ValueError("no shards to read")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.urls, self.rank, self.world_size = list(urls), rank, world_size
        self.expected = urls if isinstance(urls, dict) else {}
        self.resampled, self.shuffle, self.seed = resampled, shuffle, seed
        self.skip, self.first_worker = skip, first_worker
        self.counts = counts if counts is not None else SkipCounts()
        self.transform = transform

    def _shards(self, me: Consumer) -> tuple[Iterable[dict[str, str]], Callable[[int], bool]]:
        """The shards this consumer opens, and which of their samples (by position) it keeps."""
        if self.resampled:
            rng = random.Random(f"{self.seed}/{me.index}")
            return ({"url": rng.choice(self.urls)} for _ in itertools.count()), lambda i: True
        if len(self.urls) >= me.count:
            return [{"url": u} for u in self.urls[me.index::me.count]], lambda i: True
        return [{"url": u} for u in self.urls], lambda i: i % me.count == me.index

    def _samples(self, shards: Iterable[dict[str, str]]) -> Iterator[dict[str, Any]]:
        """Raw samples shard by shard, checking each shard's count against the manifest's."""
        for shard in shards:
            read = 0
            for sample in tarfile_samples([shard], handler=self.counts.shard_error):
                read += 1
                yield sample
            short = self.expected.get(shard["url"], read) - read
            if short > 0:
                self.counts.add("shard")
                self.counts.add("missing", short)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        me, role = current_consumer(self.rank, self.world_size, self.first_worker)
        if isinstance(self.skip, list) and len(self.skip) != me.count // self.world_size:
            raise ValueError(f"resume position has {len(self.skip)} loader workers, this loader "
                             f"{me.count // self.world_size}: resume with the same data.num_workers")
        skip = self.skip[role] if isinstance(self.skip, list) else self.skip
        shards, keep = self._shards(me)
        stream: Iterator[dict[str, Any]] = (s for i, s in enumerate(self._samples(shards)) if keep(i))
        if self.shuffle > 1:
            rng = random.Random(f"shuffle/{self.seed}/{me.index}")
            stream = _shuffle(stream, bufsize=self.shuffle, initial=self.shuffle, rng=rng)
        for index, sample in enumerate(stream):
            if index < skip:
                continue
            sample["__index__"] = index
            out = self.transform(sample, self.counts)
            if out is not None:
                yield out


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors (and indices) across samples; keep everything else as lists."""
    batch: dict[str, Any] = {}
    for name in samples[0]:
        values = [s[name] for s in samples]
        if isinstance(values[0], torch.Tensor):
            batch[name] = torch.stack(values)
        elif name == "index":
            batch[name] = torch.tensor(values)
        else:
            batch[name] = values
    return batch


def stream_image_size(urls: list[str] | dict[str, int]) -> int | tuple[int, int] | None:
    """The size the images of these shards should have: data.image_size from the dataset's manifest beside
    them, else the (width, height) of the first readable image; None when no image reads."""
    manifest = Path(next(iter(urls))).parent / MANIFEST
    if manifest.is_file():
        size = json.loads(manifest.read_text()).get("source", {}).get("image_size")
        if size:
            return size

    def image_size_of(sample: dict[str, Any], counts: SkipCounts) -> tuple[int, int] | None:
        members = sample_members(sample, counts)
        return None if members is None else members[1].size

    return next(iter(ShardStream(urls, transform=image_size_of)), None)


def make_loader(urls: list[str] | dict[str, int], batch_size: int, *, num_workers: int = 0, drop_last: bool = False,
                image_size: int | None = None, **stream_args: Any) -> torch.utils.data.DataLoader:
    """A DataLoader of collated batches over a ShardStream (stream_args go to ShardStream). Decoded images
    all have one size, so no batch mixes sizes: `image_size`, else the dataset's (stream_image_size); the
    others are counted and skipped. A `transform` of its own (latent shards) decides for itself."""
    if "transform" not in stream_args:
        size = image_size if image_size is not None else stream_image_size(urls)
        stream_args["transform"] = functools.partial(decode, image_size=size)
    stream = ShardStream(urls, **stream_args)
    return torch.utils.data.DataLoader(stream, batch_size=batch_size, num_workers=num_workers, collate_fn=collate,
                                       drop_last=drop_last, persistent_workers=False)
