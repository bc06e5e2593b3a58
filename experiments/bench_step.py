"""The training-step benchmark: this project's MMDiT against diffusers' SD3 transformer at equal shapes,
model FLOPs and MFU against the matmul peak measured in the same process, peak memory, scaling.

A step is the same for every model: forward on fixed inputs, MSE to a fixed target, backward, AdamW.
Models are timed in turn (A B A B ...), so a slow patch of the machine hits all of them alike.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from mmdit_core.config import ModelConfig
from mmdit_core.machine import autocast
from mmdit_core.model import MMDiT


@dataclass
class StepInputs:
    x: torch.Tensor  # (B, C, H, W) noisy latents
    t: torch.Tensor  # (B,) in [0, 1]
    text: torch.Tensor  # (B, L, D_text)
    mask: torch.Tensor  # (B, L), all True: both models attend to every text token
    pooled: torch.Tensor  # (B, D_text): the masked mean of the text states, or what the encoder pools
    target: torch.Tensor  # (B, C, H, W)

    @classmethod
    def random(cls, cfg: ModelConfig, batch: int, text_tokens: int, device: torch.device) -> StepInputs:
        g = torch.Generator().manual_seed(0)
        image = (batch, cfg.in_channels, cfg.input_size, cfg.input_size)
        return cls(
            torch.randn(image, generator=g),
            torch.rand(batch, generator=g),
            torch.randn(batch, text_tokens, cfg.text_dim, generator=g),
            torch.ones(batch, text_tokens, dtype=torch.bool),
            torch.randn(batch, cfg.text_dim, generator=g),
            torch.randn(image, generator=g),
        ).to(device)

    def to(self, device: torch.device) -> StepInputs:
        return StepInputs(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def mmdit(cfg: ModelConfig) -> tuple[torch.nn.Module, Callable[[StepInputs], torch.Tensor]]:
    model = MMDiT(cfg)
    return model, lambda i: model(i.x, i.t, i.text, i.mask, i.pooled)


def sd3_transformer(cfg: ModelConfig) -> tuple[torch.nn.Module, Callable[[StepInputs], torch.Tensor]]:
    """diffusers' SD3Transformer2DModel at the config's width, depth, heads, patch, token counts and
    text widths (its fixed sin-cos table sized to the image grid; SD3 timesteps run 0..1000)."""
    model = SD3Transformer2DModel(
        sample_size=cfg.input_size,
        patch_size=cfg.patch_size,
        in_channels=cfg.in_channels,
        out_channels=cfg.in_channels,
        num_layers=cfg.depth,
        attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.num_heads,
        joint_attention_dim=cfg.text_dim,
        caption_projection_dim=cfg.width,
        pooled_projection_dim=cfg.text_dim,
        pos_embed_max_size=cfg.input_size // cfg.patch_size,
    )
    return model, lambda i: model(
        hidden_states=i.x,
        encoder_hidden_states=i.text,
        pooled_projections=i.pooled,
        timestep=1000 * i.t,
        return_dict=False,
    )[0]


MODELS = {"mmdit": mmdit, "diffusers_sd3": sd3_transformer}
# This MMDiT under its performance switches; MFU credits them the model FLOPs of "mmdit" (not the forward
# that checkpointing recomputes).
CHECKPOINTED = "mmdit+checkpointing"  # model.activation_checkpointing=blocks
COMPILED = "mmdit+compile"  # train.compile=inductor


def as_sd3(cfg: ModelConfig) -> ModelConfig:
    """The config's shapes with SD3's choices on every architecture switch (fixed sin-cos positions: a
    RoPE or learned table would compare different work), so both models compute the same function class."""
    return ModelConfig.model_validate(
        {
            **cfg.model_dump(),
            "block": "joint",
            "time_cond": "adaln_zero",
            "pos_emb": "sincos",
            "qk_norm": "none",
            "sdpa_layout": "heads_first",
            "mlp_ratio": 4.0,
        }
    )


def training_step(
    build, cfg: ModelConfig, inputs: StepInputs, precision: str, compiled: bool = False
) -> tuple[Callable[[], None], torch.nn.Module]:
    """One optimisation step of the model `build` makes, as a closure over its own weights and optimizer;
    and the model."""
    model, forward = build(cfg)
    model.to(inputs.x.device).train()
    if compiled:
        model.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        with autocast(precision, inputs.x.device):
            loss = F.mse_loss(forward(inputs).float(), inputs.target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, model


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def alternating_medians(
    runs: dict[str, Callable[[], None]], repeats: int, device: torch.device, warmup: int = 2
) -> dict[str, float]:
    """Median seconds of each run, timed in turn (A B A B ...) after `warmup` untimed calls of each."""
    for run in runs.values():
        for _ in range(warmup):
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            synchronize(device)
            started = time.perf_counter()
            run()
            synchronize(device)
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(ts) for name, ts in times.items()}


def median_seconds(run: Callable[[], None], repeats: int, device: torch.device = torch.device("cpu")) -> float:
    return alternating_medians({"run": run}, repeats, device, warmup=1)["run"]


def _cpu_attention(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_attention_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# The CPU flash-attention kernels, which torch's counter has no formula for (shapes (B, H, S, D) as on GPU)
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward,
}


def counted_flops(run: Callable[[], None]) -> int:
    """FLOPs of one call, counted per operator (matmuls, convolutions, attention), not timed."""
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        run()
    return counter.get_total_flops()


def matmul_peak(dtype: torch.dtype, device: torch.device, repeats: int, sizes: tuple[int, ...]) -> tuple[float, int]:
    """(FLOP/s, n) of the fastest n × n × n matmul in `dtype` over `sizes`: the peak MFU is measured against.
    Taken as nn.Linear computes it (x · Wᵀ): on CPU a bf16 `a @ b` takes a path 5-10× slower than that."""
    rates = {}
    for n in sizes:
        x, weight = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
        rates[n] = 2 * n**3 / median_seconds(lambda: F.linear(x, weight), repeats, device)
    best = max(rates, key=rates.get)
    return rates[best], best


def peak_memory_mib(run: Callable[[], None], device: torch.device) -> float:
    """Peak tensor memory one call allocates above what was live before it: the CUDA allocator's
    high-water mark, or on CPU the profiler's allocation trace."""
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = [e for e in json.loads(trace.read_text())["traceEvents"] if e.get("name") == "[memory]"]
    if not events:
        return 0.0
    events.sort(key=lambda e: e["ts"])
    before = events[0]["args"]["Total Allocated"] - events[0]["args"]["Bytes"]
    return (max(e["args"]["Total Allocated"] for e in events) - before) / 2**20


def describe(cfg: ModelConfig, batch: int, text_tokens: int) -> str:
    return (
        f"width {cfg.width}, depth {cfg.depth}, {cfg.num_heads} heads, {cfg.num_patches} image + {text_tokens} "
        f"text tokens, batch {batch}"
    )


def compare_models(
    cfg: ModelConfig,
    batch: int,
    text_tokens: int,
    precision: str,
    peak: float,
    repeats: int,
    device: torch.device,
    compiled: bool,
) -> list[dict]:
    """A row per model, and for this MMDiT with activation checkpointing (and compiled, with `compiled`), at
    SD3's architecture choices: step time, images/s, parameters, counted FLOPs, MFU against `peak` FLOP/s,
    peak memory."""
    cfg = as_sd3(cfg)
    inputs = StepInputs.random(cfg, batch, text_tokens, device)
    arms = {name: (build, cfg, False) for name, build in MODELS.items()}  # name -> (build, config, compiled)
    arms[CHECKPOINTED] = (mmdit, cfg.model_copy(update={"activation_checkpointing": "blocks"}), False)
    if compiled:
        arms[COMPILED] = (mmdit, cfg, True)
    steps = {
        name: training_step(build, arm_cfg, inputs, precision, arm_compiled)
        for name, (build, arm_cfg, arm_compiled) in arms.items()
    }
    runs = {name: run for name, (run, _) in steps.items()}
    seconds = alternating_medians(runs, repeats, device)
    model_flops = {name: counted_flops(runs[name]) for name in MODELS}
    flops = {name: model_flops.get(name, model_flops["mmdit"]) for name in arms}
    rows = []
    for name, run in runs.items():
        rows.append(
            {
                "config": describe(cfg, batch, text_tokens),
                "precision": precision,
                "model": name,
                "params": sum(p.numel() for p in steps[name][1].parameters()),
                "seconds_per_step": seconds[name],
                "img_per_s": batch / seconds[name],
                "gflop_per_step": flops[name] / 1e9,
                "mfu": flops[name] / seconds[name] / peak,
                "peak_mib": peak_memory_mib(run, device),
            }
        )
    return rows


def scaling(
    cfg: ModelConfig,
    batch: int,
    text_tokens: int,
    precision: str,
    repeats: int,
    device: torch.device,
    grids: tuple[int, ...] = (8, 16, 32),
    depths: tuple[int, ...] = (2, 4, 8),
) -> list[dict]:
    """This MMDiT's step time and peak memory as image tokens grow (grid² = 64 → 1024) and as depth grows."""
    shapes = [{"input_size": g * cfg.patch_size} for g in grids] + [{"depth": d} for d in depths]
    rows = []
    for change in shapes:
        shaped = ModelConfig.model_validate({**cfg.model_dump(), **change})
        step, _ = training_step(mmdit, shaped, StepInputs.random(shaped, batch, text_tokens, device), precision)
        rows.append(
            {
                "config": describe(shaped, batch, text_tokens),
                "precision": precision,
                "image_tokens": shaped.num_patches,
                "depth": shaped.depth,
                "seconds_per_step": median_seconds(step, repeats, device),
                "gflop_per_step": counted_flops(step) / 1e9,
                "peak_mib": peak_memory_mib(step, device),
            }
        )
    return rows
