"""What a training rank reads: an endless, resumable stream of (x0, conditioning) batches.

From the latent cache when `data.latent_cache` is set (tensors only; refused when stale), else from
the image shards, encoded on the fly by the frozen autoencoder and text encoder. The stream is
resampled (shards drawn with replacement, seeded per rank and loader worker), so every rank always
has a next batch, and its StreamPosition makes a restarted reader continue with the same samples.
"""

from __future__ import annotations

import functools
from typing import Any, Iterator

import torch

from ..autoencoder import Autoencoder
from ..config import ExperimentConfig
from ..errors import InputError
from ..flow import Conditioning
from ..text import TextEncoder, text_key
from .latents import cache_components, check_latent_cache, decode_latent_sample
from .shards import SkipCounts, StreamPosition, decode, make_loader, read_manifest, sample_of_split, split_shards


def latent_cache_shards(cfg: ExperimentConfig) -> dict[str, int]:
    """The cache's train shards, after checking it was built from this data, autoencoder and text encoder."""
    expected = cache_components(cfg, read_manifest(cfg.data.root)["key"], text_key(cfg.text))
    manifest = check_latent_cache(cfg.data.latent_cache, expected)
    return {f"{cfg.data.latent_cache}/{s['name']}": s["samples"] for s in manifest["splits"]["train"]["shards"]}


class TrainingData:
    """Batches for one rank of `world_size`, in model inputs, continuing from `position`."""

    def __init__(self, cfg: ExperimentConfig, autoencoder: Autoencoder, encoder: TextEncoder, *, rank: int = 0,
                 world_size: int = 1, position: dict[str, Any] | None = None):
        self.cfg, self.autoencoder, self.encoder = cfg, autoencoder, encoder
        self.counts = SkipCounts()
        self.position = (StreamPosition(**position) if position is not None
                         else StreamPosition.start(cfg.data.num_workers))
        if cfg.data.latent_cache:
            urls = latent_cache_shards(cfg)
            transform = decode_latent_sample(cfg.text.max_length)
        else:
            urls, transform = split_shards(cfg.data.root, "train"), functools.partial(decode, image_size=cfg.data.image_size)
        self.loader = make_loader(urls, cfg.train.batch_size, num_workers=cfg.data.num_workers, drop_last=True,
                                  rank=rank, world_size=world_size, resampled=True, shuffle=cfg.data.shuffle_buffer,
                                  seed=cfg.data.seed, counts=self.counts, transform=transform,
                                  **self.position.stream_args())

    def model_inputs(self, batch: dict[str, Any]) -> tuple[torch.Tensor, Conditioning]:
        if "latent" in batch:
            return self.autoencoder.normalise(batch["latent"]), Conditioning(batch["text"], batch["mask"], batch["pooled"])
        return self.autoencoder.encode(batch["image"]), self.encoder.encode(batch["caption"])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, Conditioning]]:
        for batch in self.loader:
            self.position.advance(batch)
            yield self.model_inputs(batch)


def read_split(root: str, split: str, limit: int, seed: int) -> tuple[torch.Tensor, list[str], list[dict | None]]:
    """A seeded random sample of `limit` samples of a split (shards.sample_of_split): pixels (N, 3, H, W),
    captions, attributes."""
    image_size = read_manifest(root)["source"].get("image_size")
    samples = sample_of_split(root, split, limit, seed, functools.partial(decode, image_size=image_size))
    if not samples:
        raise InputError(f"{root} split {split!r} has no readable samples")
    return (torch.stack([s["image"] for s in samples]), [s["caption"] for s in samples],
            [s["attributes"] for s in samples])


def validation_set(cfg: ExperimentConfig, autoencoder: Autoencoder, encoder: TextEncoder,
                   limit: int) -> tuple[torch.Tensor, Conditioning, list[str]]:
    """A seeded sample of `limit` val samples as model inputs (fixed: comparable across steps and runs)."""
    pixels, captions, _ = read_split(cfg.data.root, "val", limit, cfg.data.seed)
    latents = torch.cat([autoencoder.encode(chunk) for chunk in pixels.split(64)])
    return latents, encoder.encode(captions), captions
