"""Benchmarks (numbers for the README; never run as timed tests).

    python -m experiments.bench --config C [--set k=v ...] [--seconds 10] [--out bench.json]

Today: loader throughput in samples/s from the image shards (PNG decode) and from the latent cache
(tensors only), with 0 and `data.num_workers` DataLoader workers, after one warm-up batch; sampling
throughput of the config's model at 4, 8 and 25 Euler steps (CFG batched, and CFG 1 with no null pass);
Inception-v3 feature throughput at 299×299 and the time of one FID from 2048-d statistics.
Timings are medians of `--repeats` runs after a warm-up.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from eval.evaluate import Setting
from eval.fid import Inception, Statistics, fid
from mmdit_core.config import ExperimentConfig
from mmdit_core.data.latents import decode_latent_sample
from mmdit_core.data.shards import make_loader, split_shards
from mmdit_core.flow import Conditioning, RectifiedFlow, generate
from mmdit_core.model import MMDiT

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


def median_seconds(run, repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def sampling_throughput(cfg: ExperimentConfig, steps: int, cfg_scale: float, batch: int, repeats: int) -> float:
    """Images/s of sampling with the config's model shape (weights do not change the speed)."""
    model, flow = MMDiT(cfg.model).eval(), RectifiedFlow(cfg.flow)
    m = cfg.model
    noise = torch.randn(batch, m.in_channels, m.input_size, m.input_size)
    text = Conditioning(torch.randn(batch, cfg.text.max_length, m.text_dim), torch.ones(batch, cfg.text.max_length, dtype=torch.bool),
                        torch.randn(batch, m.pooled_dim))
    sample = Setting("euler", steps, cfg_scale).sample_config(cfg.sample)
    return batch / median_seconds(lambda: generate(model, flow, noise, text, text[:1], sample), repeats)


def inception_throughput(batch: int, repeats: int) -> tuple[float, float]:
    """(Inception images/s at 299×299, seconds of one FID from two sets of 2048-d features)."""
    inception = Inception()
    images = torch.rand(batch, 3, 299, 299) * 255
    per_s = batch / median_seconds(lambda: inception(images), repeats)
    rng = np.random.default_rng(0)
    a, b = (Statistics(rng.normal(size=(512, 2048))) for _ in range(2))
    return per_s, median_seconds(lambda: fid(Statistics(a.features), Statistics(b.features)), repeats)


def main(argv=None) -> dict:
    parser = config_parser(__doc__)
    parser.add_argument("--seconds", type=float, default=10.0, help="loader measurement time")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (after a warm-up) of each other measurement")
    parser.add_argument("--inception-batch", type=int, default=32)
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
    results["sampling_img_per_s"] = {
        f"{steps} steps, {'CFG 1 (no null pass)' if scale == 1 else 'CFG batched'}":
            round(sampling_throughput(cfg, steps, scale, cfg.eval.batch_size, args.repeats), 1)
        for steps in (4, 8, 25) for scale in (1.0, cfg.sample.cfg_scale)}
    inception_per_s, fid_s = inception_throughput(args.inception_batch, args.repeats)
    results["inception_img_per_s"], results["fid_seconds"] = round(inception_per_s, 2), round(fid_s, 2)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
