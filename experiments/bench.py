"""Benchmarks (numbers for the README; never run as timed tests).

    python -m experiments.bench --config C [--set k=v ...] [--seconds 10] [--out bench.json]

Today: loader throughput in samples/s from the image shards (PNG decode) and from the latent cache
(tensors only), with 0 and `data.num_workers` DataLoader workers, after one warm-up batch.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from mmdit_core.data.latents import decode_latent_sample
from mmdit_core.data.shards import make_loader, split_shards

from .cli import config_parser, resolve_config


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def loader_throughput(urls: dict[str, int], batch_size: int, workers: int, seconds: float, **stream_args) -> float:
    """Samples per second from an endless (resampled) stream, measured for `seconds` after a warm-up batch."""
    batches = iter(make_loader(urls, batch_size, num_workers=workers, resampled=True, **stream_args))
    next(batches)
    samples, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        samples += len(next(batches)["key"])
    return samples / (time.perf_counter() - started)


def main(argv=None) -> dict:
    parser = config_parser(__doc__)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--out", default="outputs/bench.json")
    args = parser.parse_args(argv)
    cfg = resolve_config(args)
    batch = cfg.train.batch_size
    results: dict = {"machine": {"cpu": cpu_name(), "threads": torch.get_num_threads(),
                                 "torch": torch.__version__}, "loader_samples_per_s": {}}
    sources = {"shards": (split_shards(cfg.data.root, "train"), {})}
    if cfg.data.latent_cache:
        sources["latent_cache"] = (split_shards(cfg.data.latent_cache, "train"),
                                   {"transform": decode_latent_sample(cfg.text.max_length)})
    for name, (urls, extra) in sources.items():
        for workers in sorted({0, cfg.data.num_workers}):
            rate = loader_throughput(urls, batch, workers, args.seconds, shuffle=cfg.data.shuffle_buffer, **extra)
            results["loader_samples_per_s"][f"{name}, {workers} workers"] = round(rate, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
