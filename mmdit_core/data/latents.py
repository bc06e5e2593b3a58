"""The latent cache: train shards pre-encoded to latents and caption embeddings.

Training from it reads tensors only: neither the autoencoder nor the text encoder runs in the loop.
Each sample holds `latent.npy` (C, h, w: the raw posterior mean, normalised when read), `text.npy` (valid tokens × D), `pooled.npy` and `txt`.
The cache's key covers everything that produced it (the dataset's checksum, the autoencoder's
weights, the text encoder and its settings); a cache whose key differs from the config's is
refused, naming what changed.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from ..autoencoder import Autoencoder, identity_key
from ..config import ExperimentConfig
from ..errors import InputError
from ..text import TextEncoder
from .shards import MANIFEST, SkipCounts, read_manifest, write_dataset


class StaleCacheError(InputError, RuntimeError):
    """A latent cache built from other data, another autoencoder or another text encoder."""


def cache_components(cfg: ExperimentConfig, dataset_key: str, text_key: str) -> dict[str, Any]:
    return {"dataset": dataset_key, "image_size": cfg.data.image_size, "autoencoder": identity_key(cfg.autoencoder),
            "autoencoder_kind": cfg.autoencoder.kind, "latents": "posterior_mean", "text_encoder": text_key}


def cache_key(components: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(components, sort_keys=True).encode()).hexdigest()[:16]


def _npy(array: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array.detach().cpu().float().numpy(), allow_pickle=False)
    return buffer.getvalue()


def encode_batches(batches: Iterable[dict[str, Any]], autoencoder: Autoencoder, encoder: TextEncoder):
    """Shard batches (image, caption) -> latent-cache samples."""
    for batch in batches:
        latents = autoencoder.encode_raw(batch["image"])
        cond = encoder.encode(batch["caption"])
        for i, key in enumerate(batch["key"]):
            length = int(cond.mask[i].sum())
            yield {"__key__": key, "latent.npy": _npy(latents[i]), "text.npy": _npy(cond.text[i, :length]),
                   "pooled.npy": _npy(cond.pooled[i]), "txt": batch["caption"][i].encode()}


def write_latent_cache(cfg: ExperimentConfig, directory: str | Path, batches: Iterable[dict[str, Any]],
                       autoencoder: Autoencoder, encoder: TextEncoder) -> dict[str, Any]:
    components = cache_components(cfg, read_manifest(cfg.data.root)["key"], encoder.key)
    manifest = write_dataset(directory, {"train": encode_batches(batches, autoencoder, encoder)},
                             cfg.data.samples_per_shard, {"cache": components, "cache_key": cache_key(components)})
    return manifest


def check_latent_cache(directory: str | Path, expected: dict[str, Any]) -> dict[str, Any]:
    """The cache's manifest if it was built for `expected`; else StaleCacheError naming the differences."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise StaleCacheError(f"no latent cache at {directory}: build it with python -m experiments.cache_latents")
    manifest = json.loads(path.read_text())
    found = manifest["source"]["cache"]
    changed = [f"{name} (cache: {found.get(name)!r}, now: {value!r})" for name, value in expected.items() if found.get(name) != value]
    if changed:
        raise StaleCacheError(f"latent cache at {directory} is stale: {'; '.join(changed)}. "
                              "Rebuild it with python -m experiments.cache_latents")
    return manifest


def decode_latent_sample(max_length: int):
    """A ShardStream transform: latent-cache sample -> tensors, text padded back to max_length."""

    def decode(sample: dict[str, Any], counts: SkipCounts) -> dict[str, Any] | None:
        try:
            latent, text, pooled = (torch.from_numpy(np.load(io.BytesIO(sample[f"{name}.npy"]), allow_pickle=False))
                                    for name in ("latent", "text", "pooled"))
        except Exception:  # a damaged array spoils only this sample
            counts.add("image")
            return None
        length = text.shape[0]
        padded = torch.zeros(max_length, text.shape[1])
        padded[:length] = text
        return {"key": sample["__key__"], "latent": latent, "text": padded, "mask": torch.arange(max_length) < length,
                "pooled": pooled, "caption": sample.get("txt", b"").decode(), "index": sample["__index__"]}

    return decode
