"""Pre-encode the train shards into the latent cache so training reads tensors only.

    python -m experiments.cache_latents --config C [--set data.latent_cache=DIR] [--reuse]

Runs the frozen autoencoder and text encoder once over the train split and writes latent + text
embedding shards to `data.latent_cache`, keyed by the data, the autoencoder and the text encoder.
"""

from __future__ import annotations

from tqdm import tqdm

from mmdit_core.autoencoder import Autoencoder
from mmdit_core.data.latents import StaleCacheError, write_latent_cache
from mmdit_core.data.shards import SkipCounts, make_loader, read_manifest, split_shards
from mmdit_core.data.training import latent_cache_shards
from mmdit_core.errors import InputError
from mmdit_core.text import TextEncoder

from .cli import config_parser, resolve_config, run_command


def reuse_or_build(cfg) -> dict:
    """The cache at data.latent_cache if it was built from this data and these encoders, else a new one."""
    try:
        latent_cache_shards(cfg)
        print(f"reusing the latent cache at {cfg.data.latent_cache}")
        return read_manifest(cfg.data.latent_cache)
    except StaleCacheError as exc:
        print(f"{exc}\n  -> building the latent cache now")
        return build(cfg)


def build(cfg) -> dict:
    if not cfg.data.latent_cache:
        raise InputError("set data.latent_cache to the directory the cache should go to")
    counts = SkipCounts()
    loader = make_loader(
        split_shards(cfg.data.root, "train"),
        64,
        num_workers=cfg.data.num_workers,
        counts=counts,
        image_size=cfg.data.image_size,
    )
    total = read_manifest(cfg.data.root)["splits"]["train"]["samples"]
    batches = tqdm(loader, total=-(-total // 64), desc="encoding", unit="batch")
    manifest = write_latent_cache(
        cfg, cfg.data.latent_cache, batches, Autoencoder.load(cfg.autoencoder), TextEncoder(cfg.text)
    )
    print(
        f"latent cache {cfg.data.latent_cache}: {manifest['splits']['train']['samples']} samples, "
        f"key {manifest['source']['cache_key']}; {counts.report()}"
    )
    return manifest


def main(argv=None) -> dict:
    parser = config_parser(__doc__)
    parser.add_argument("--reuse", action="store_true", help="keep a cache built from this data and these encoders")
    args = parser.parse_args(argv)
    cfg = resolve_config(args)
    return reuse_or_build(cfg) if args.reuse else build(cfg)


if __name__ == "__main__":
    run_command(main)
