"""Benchmarks (numbers for the README; never run as timed tests). `make bench` runs the demo config.

    python -m experiments.bench --config C [--set k=v ...] [--full] [--larger k=v ...] [--precisions fp32,bf16]
                                [--no-compile] [--device cpu|cuda] [--repeats 5] [--out outputs/bench.json]

In one process: the training step of this project's MMDiT (eager and with activation checkpointing; with
--full also torch.compile'd, and at a larger config) against diffusers'
SD3Transformer2DModel at equal shapes, in each precision: median
ms/step, images/s, counted FLOPs, MFU against the matmul peak measured in the same run, peak memory
(bench_step.py); with --full, this MMDiT's step time and memory over 64 → 1024 image tokens and over depth;
sampling at 4, 8 and 25 Euler steps (CFG batched, and CFG 1 with no null pass); the real training step
with the loss in latent space against image space (through the frozen decoder); the loader from image
shards and from the latent cache with 0 and `data.num_workers` workers; Inception-v3 features at
299×299 and one FID from 2048-d statistics. Writes JSON and a Markdown table next to it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from importlib.metadata import version
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from mmdit_core.config import ExperimentConfig
from mmdit_core.errors import InputError
from mmdit_core.flow import Conditioning, RectifiedFlow, generate
from mmdit_core.machine import cpu_name
from mmdit_core.model import MMDiT
from mmdit_core.trainer import Trainer

from .bench_step import alternating_medians, compare_models, matmul_peak, median_seconds, peak_memory_mib, scaling
from .cli import config_parser, resolve_config, run_command

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def larger_overrides(cfg: ExperimentConfig) -> list[str]:
    """Twice the width and depth at the same head size: about 8× the default's FLOPs per image."""
    m = cfg.model
    return [f"model.width={2 * m.width}", f"model.depth={2 * m.depth}", f"model.num_heads={2 * m.num_heads}"]


def loader_throughput(
    urls: dict[str, int], batch_size: int, workers: int, seconds: float, **stream_args
) -> tuple[float, float]:
    """(samples/s from an endless (resampled) stream, measured for `seconds` after a warm-up batch; peak MiB
    of one batch in this process)."""
    from mmdit_core.data.shards import make_loader

    batches = iter(make_loader(urls, batch_size, num_workers=workers, resampled=True, **stream_args))
    next(batches)
    peak = peak_memory_mib(lambda: next(batches), torch.device("cpu"))
    samples, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        samples += len(next(batches)["key"])
    return samples / (time.perf_counter() - started), peak


def sampling_throughput(
    cfg: ExperimentConfig, steps: int, cfg_scale: float, batch: int, repeats: int, device: torch.device
) -> tuple[float, float]:
    """(images/s, peak MiB) of sampling with the config's model shape (weights do not change the speed)."""
    model, flow = MMDiT(cfg.model).to(device).eval(), RectifiedFlow(cfg.flow)
    m = cfg.model
    noise = torch.randn(batch, m.in_channels, m.input_size, m.input_size, device=device)
    text = Conditioning(
        torch.randn(batch, cfg.text.max_length, m.text_dim),
        torch.ones(batch, cfg.text.max_length, dtype=torch.bool),
        torch.randn(batch, m.text_dim),
    ).to(device)
    sample = cfg.sample.model_copy(update={"sampler": "euler", "steps": steps, "cfg_scale": cfg_scale})

    def run():
        generate(model, flow, noise, text, text[:1], sample)

    return batch / median_seconds(run, repeats, device), peak_memory_mib(run, device)


def inception_throughput(batch: int, repeats: int) -> tuple[float, float, float]:
    """(Inception images/s at 299×299, its peak MiB, seconds of one FID from two sets of 2048-d features)."""
    from eval.fid import Inception, Statistics, fid

    inception = Inception()
    images = torch.rand(batch, 3, 299, 299) * 255

    def run():
        inception(images)

    per_s = batch / median_seconds(run, repeats)
    rng = np.random.default_rng(0)
    a, b = (Statistics(rng.normal(size=(512, 2048))) for _ in range(2))
    return (
        per_s,
        peak_memory_mib(run, torch.device("cpu")),
        median_seconds(lambda: fid(Statistics(a.features), Statistics(b.features)), repeats),
    )


def loss_space_cost(cfg: ExperimentConfig, repeats: int, device: torch.device) -> dict | None:
    """The real training step (Trainer, the config's autoencoder) with flow.loss_space=latent against image
    (the predicted x0 decoded, MSE in pixels, backward through the frozen decoder): ms/step and peak
    memory of each, timed in turn. None in pixel space, where the two differ by weighting only."""
    from mmdit_core.autoencoder import Autoencoder

    if cfg.autoencoder.kind == "identity":
        return None
    autoencoder = Autoencoder.load(cfg.autoencoder).to(device)
    m, batch, g = cfg.model, cfg.train.batch_size, torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, m.in_channels, m.input_size, m.input_size, generator=g)
    cond = Conditioning(
        torch.randn(batch, cfg.text.max_length, cfg.text.dim, generator=g),
        torch.ones(batch, cfg.text.max_length, dtype=torch.bool),
        torch.randn(batch, cfg.text.dim, generator=g),
    )
    steps = {}
    for space in ("latent", "image"):
        arm = cfg.model_copy(update={"flow": cfg.flow.model_copy(update={"loss_space": space})})
        trainer = Trainer(
            arm, MMDiT(arm.model).to(device), RectifiedFlow(arm.flow, decode=autoencoder.decode), cond[:1]
        )
        steps[space] = lambda trainer=trainer: trainer.train_step(x0, cond)
    seconds = alternating_medians(steps, repeats, device)
    rows = {
        space: {"ms_per_step": round(1e3 * seconds[space], 1), "peak_mib": round(peak_memory_mib(run, device), 1)}
        for space, run in steps.items()
    }
    return {
        **rows,
        "time_ratio": round(seconds["image"] / seconds["latent"], 2),
        "memory_ratio": round(rows["image"]["peak_mib"] / max(rows["latent"]["peak_mib"], 1e-9), 2),
    }


def training_benchmarks(
    cfg: ExperimentConfig,
    larger: ExperimentConfig,
    precisions: list[str],
    repeats: int,
    device: torch.device,
    full: bool,
    compiled: bool,
    matmul_size: int | None = None,
) -> dict:
    """Matmul peaks, the model comparison at every precision (with `full`: also at the larger config, and
    the scaling rows)."""
    batch, text_tokens = cfg.train.batch_size, cfg.text.max_length
    sizes = (matmul_size,) if matmul_size else (2048, 4096, 8192) if device.type == "cuda" else (256, 512, 1024)
    peaks = {p: matmul_peak(DTYPES[p], device, repeats, sizes) for p in precisions}  # p -> (FLOP/s, n)
    rows, speedups = [], {}
    for name, model in (("default", cfg.model), ("larger", larger.model))[: 2 if full else 1]:
        for precision in precisions:
            compared = compare_models(
                model, batch, text_tokens, precision, peaks[precision][0], repeats, device, compiled
            )
            seconds = {row["model"]: row["seconds_per_step"] for row in compared}
            speedups[f"{name} {precision}"] = {
                k: seconds["diffusers_sd3"] / v for k, v in seconds.items() if k.startswith("mmdit")
            }
            rows += [{"setting": name, **row} for row in compared]
    return {
        "matmul_peak": {p: {"gflop_per_s": round(rate / 1e9, 1), "n": n} for p, (rate, n) in peaks.items()},
        "training_step": rows,
        "speedup_vs_diffusers": speedups,
        **({"scaling": scaling(cfg.model, batch, text_tokens, precisions[0], repeats, device)} if full else {}),
    }


def markdown(results: dict) -> str:
    """The README's tables, of the sections that ran."""
    m = results["machine"]
    lines = [
        f"Measured {results['date']} on {m['cpu']}, {m['threads']} threads, torch {m['torch']}, "
        f"diffusers {m['diffusers']}, device {m['device']}; medians of {results['repeats']} after warm-up.",
        "",
    ]
    if "training_step" in results:
        lines += [
            "Matmul peak (the fastest n³ matmul measured): "
            + ", ".join(f"{p} {v['gflop_per_s']:g} GFLOP/s (n={v['n']})" for p, v in results["matmul_peak"].items()),
            "",
            "| setting | precision | model | ms/step | img/s | M params | GFLOP/step | MFU | peak MiB |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['setting']} | {r['precision']} | {r['model']} | {1e3 * r['seconds_per_step']:.1f} | "
            f"{r['img_per_s']:.1f} | "
            f"{r['params'] / 1e6:.2f} | {r['gflop_per_step']:.2f} | {100 * r['mfu']:.1f}% | {r['peak_mib']:.0f} |"
            for r in results["training_step"]
        ]
        lines += [
            "",
            "Configs: "
            + "; ".join(
                f"{r['setting']} = {r['config']}"
                for r in results["training_step"]
                if r["model"] == "mmdit" and r["precision"] == results["training_step"][0]["precision"]
            ),
            "",
            "Speed-up over diffusers SD3 (its ms/step over this MMDiT's): "
            + "; ".join(
                f"{setting}: " + ", ".join(f"{model} {v:.2f}×" for model, v in by_model.items())
                for setting, by_model in results["speedup_vs_diffusers"].items()
            ),
            "",
        ]
    if "scaling" in results:
        lines += ["| image tokens | depth | ms/step | GFLOP/step | peak MiB |", "|---|---|---|---|---|"]
        lines += [
            f"| {r['image_tokens']} | {r['depth']} | {1e3 * r['seconds_per_step']:.1f} | {r['gflop_per_step']:.2f} | "
            f"{r['peak_mib']:.0f} |"
            for r in results["scaling"]
        ]
        lines.append("")
    lines += ["| pipeline | throughput | peak MiB |", "|---|---|---|"]
    lines += [
        f"| sampling, {k} | {v['img_per_s']:g} img/s | {v['peak_mib']:g} |"
        for k, v in results.get("sampling", {}).items()
    ]
    lines += [
        f"| loader, {k} | {v['samples_per_s']:g} samples/s | {v['peak_mib']:g} |"
        for k, v in results.get("loader", {}).items()
    ]
    if results.get("loss_space"):
        cost = results["loss_space"]
        lines += [
            f"| training step, flow.loss_space={space} | {cost[space]['ms_per_step']:g} ms/step | "
            f"{cost[space]['peak_mib']:g} |"
            for space in ("latent", "image")
        ]
    if "inception" in results:
        lines += [
            f"| Inception-v3 features, 299×299 | {results['inception']['img_per_s']:g} img/s | "
            f"{results['inception']['peak_mib']:g} |",
            f"| one FID from 2048-d statistics | {results['inception']['fid_seconds']:g} s | |",
        ]
    lines += [f"\nNot measured: {name} ({why})." for name, why in results["skipped"].items()]
    return "\n".join(lines) + "\n"


def sampling_benchmarks(cfg: ExperimentConfig, repeats: int, device: torch.device) -> dict:
    rows = {}
    for steps in (4, 8, 25):
        for scale in (1.0, cfg.sample.cfg_scale):
            rate, peak = sampling_throughput(cfg, steps, scale, cfg.eval.batch_size, repeats, device)
            label = f"{steps} steps, {'CFG 1 (no null pass)' if scale == 1 else 'CFG batched'}"
            rows[label] = {"img_per_s": round(rate, 1), "peak_mib": round(peak, 1)}
    return rows


def loader_benchmarks(cfg: ExperimentConfig, seconds: float) -> dict:
    from mmdit_core.data.latents import decode_latent_sample
    from mmdit_core.data.shards import split_shards

    sources = {"shards": (split_shards(cfg.data.root, "train"), {})}
    if cfg.data.latent_cache:
        sources["latent_cache"] = (
            split_shards(cfg.data.latent_cache, "train"),
            {"transform": decode_latent_sample(cfg.text.max_length)},
        )
    rows = {}
    for name, (urls, extra) in sources.items():
        for workers in sorted({0, cfg.data.num_workers}):
            rate, peak = loader_throughput(
                urls, cfg.train.batch_size, workers, seconds, shuffle=cfg.data.shuffle_buffer, **extra
            )
            rows[f"{name}, {workers} workers"] = {"samples_per_s": round(rate, 1), "peak_mib": round(peak, 1)}
    return rows


def inception_benchmark(batch: int, repeats: int) -> dict:
    per_s, peak, fid_s = inception_throughput(batch, repeats)
    return {"img_per_s": round(per_s, 2), "peak_mib": round(peak, 1), "fid_seconds": round(fid_s, 2)}


def run_sections(sections: dict[str, Callable[[], dict | None]]) -> dict:
    """Each section's results under its name, with a line of progress before and after (a full run takes
    6-40 minutes). A section whose package is not installed, or whose data or autoencoder is not there
    (a lent GPU machine has neither Ray, MLflow nor the Inception weights' package), is skipped with a
    one-line notice and listed under "skipped"."""
    results: dict = {"skipped": {}}
    for index, (name, run) in enumerate(sections.items(), 1):
        print(f"[{index}/{len(sections)}] {name} ...", flush=True)
        started = time.perf_counter()
        try:
            results[name] = run()
        except ModuleNotFoundError as exc:
            results["skipped"][name] = f"{exc.name} is not installed"
        except FileNotFoundError as exc:
            results["skipped"][name] = str(exc)
        if name in results["skipped"]:
            print(f"[{index}/{len(sections)}] {name}: skipped ({results['skipped'][name]})", flush=True)
        else:
            print(f"[{index}/{len(sections)}] {name}: {time.perf_counter() - started:.0f} s", flush=True)
    return results


def main(argv=None) -> dict:
    parser = config_parser(__doc__)
    parser.add_argument(
        "--larger",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="overrides that make the larger config (default: twice the width, depth and heads)",
    )
    parser.add_argument(
        "--precisions", type=lambda s: s.split(","), default=["fp32", "bf16"], help="comma-separated: fp32,bf16"
    )
    parser.add_argument(
        "--full",
        action="store_true",
        help="the whole table (minutes more): the compiled arm, the larger config, scaling over tokens and depth",
    )
    parser.add_argument("--no-compile", dest="compiled", action="store_false", help="skip the torch.compile arm")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--matmul-size",
        type=int,
        default=None,
        help="n of the n³ matmul peak (default: the fastest of 256, 512, 1024 on CPU; 2048, 4096, 8192 on CUDA)",
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="loader measurement time")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs (after warm-up) of each other measurement")
    parser.add_argument("--inception-batch", type=int, default=32)
    parser.add_argument(
        "--out", default="outputs/bench.json", help="JSON path; the Markdown table goes next to it (.md)"
    )
    args = parser.parse_args(argv)
    cfg = resolve_config(args)
    unknown = set(args.precisions) - set(DTYPES)
    if unknown:
        raise InputError(f"--precisions: unknown {', '.join(sorted(unknown))} (known: {', '.join(DTYPES)})")
    larger = resolve_config(
        argparse.Namespace(config=args.config, overrides=[*args.overrides, *(args.larger or larger_overrides(cfg))])
    )
    device = torch.device(args.device)
    results: dict = {
        "date": datetime.date.today().isoformat(),
        "repeats": args.repeats,
        "machine": {
            "cpu": cpu_name(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "diffusers": version("diffusers"),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        },
    }
    results |= run_sections(
        {
            "training": lambda: training_benchmarks(
                cfg,
                larger,
                args.precisions,
                args.repeats,
                device,
                args.full,
                args.full and args.compiled,
                args.matmul_size,
            ),
            "sampling": lambda: sampling_benchmarks(cfg, args.repeats, device),
            "loader": lambda: loader_benchmarks(cfg, args.seconds),
            "loss_space": lambda: loss_space_cost(cfg, args.repeats, device),
            "inception": lambda: inception_benchmark(args.inception_batch, args.repeats),
        }
    )
    results |= results.pop("training", {})  # matmul_peak, training_step, speedup_vs_diffusers, scaling
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    out.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))
    return results


if __name__ == "__main__":
    run_command(main)
