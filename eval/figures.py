"""Figures a run writes: captioned sample grids, denoising strips, loss curves."""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from mmdit_core.data.images import to_uint8  # noqa: E402

TILE = 128  # pixels per image in a figure, whatever the training resolution


def _tiles(images: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray(a).resize((TILE, TILE), Image.Resampling.NEAREST) for a in to_uint8(images)]


def sample_grid(images: torch.Tensor, captions: list[str], cols: int = 4) -> Image.Image:
    """(B, 3, H, W) in [-1, 1] -> one image: each sample above its caption."""
    font = ImageFont.load_default()
    lines = [textwrap.wrap(c, width=22)[:6] for c in captions]
    text_h = 11 * max(len(ls) for ls in lines) + 6
    rows = -(-len(captions) // cols)
    grid = Image.new("RGB", (cols * (TILE + 8) + 8, rows * (TILE + text_h + 8) + 8), "white")
    draw = ImageDraw.Draw(grid)
    for i, (tile, caption_lines) in enumerate(zip(_tiles(images), lines)):
        x, y = 8 + (i % cols) * (TILE + 8), 8 + (i // cols) * (TILE + text_h + 8)
        grid.paste(tile, (x, y))
        for j, line in enumerate(caption_lines):
            draw.text((x, y + TILE + 3 + 11 * j), line, fill="black", font=font)
    return grid


def titled_row(panels: list[tuple[str, Image.Image]]) -> Image.Image:
    """Images side by side, each under its title."""
    font, title_h = ImageFont.load_default(), 18
    width = sum(image.width for _, image in panels) + 8 * (len(panels) + 1)
    row = Image.new("RGB", (width, max(image.height for _, image in panels) + title_h + 8), "white")
    draw, x = ImageDraw.Draw(row), 8
    for title, image in panels:
        draw.text((x, 4), title, fill="black", font=font)
        row.paste(image, (x, title_h))
        x += image.width + 8
    return row


def trajectory_strip(trajectory: torch.Tensor, frames: int = 8) -> Image.Image:
    """(T, 3, H, W) states from noise (t=1) to data (t=0) -> `frames` evenly spaced tiles in a row."""
    picks = torch.linspace(0, trajectory.shape[0] - 1, frames).round().long()
    strip = Image.new("RGB", (frames * TILE, TILE))
    for i, tile in enumerate(_tiles(trajectory[picks])):
        strip.paste(tile, (i * TILE, 0))
    return strip


def loss_curve(steps: list[int], losses: list[float], path: str | Path, val: dict[float, float] | None = None) -> None:
    """Training loss (raw and smoothed) against step; with `val`, a second panel of loss against t."""
    fig, axes = plt.subplots(1, 2 if val else 1, figsize=(10 if val else 6, 3.5), squeeze=False)
    ax = axes[0, 0]
    ax.plot(steps, losses, alpha=0.3, label="train loss")
    window = max(1, len(losses) // 20)
    smooth = torch.tensor(losses).unfold(0, window, 1).mean(1).tolist() if len(losses) >= window else losses
    ax.plot(steps[window - 1 :], smooth, label=f"mean of {window}")
    ax.set(xlabel="step", ylabel="loss", yscale="log")
    ax.legend()
    if val:
        axes[0, 1].plot(list(val), list(val.values()), marker="o")
        axes[0, 1].set(xlabel="t (0 data, 1 noise)", ylabel="validation loss", title="final validation loss by t")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def eval_curves(points: list[dict], path: str | Path) -> None:
    """FID (and whole-caption adherence, when scored) against CFG scale and against sampling steps: one
    line per fixed value of the other settings. Points are {sampler, steps, cfg_scale, metrics}."""
    rows = [("fid", "FID")] + (
        [("adherence_whole", "whole-caption adherence")] if "adherence_whole" in points[0]["metrics"] else []
    )
    fig, axes = plt.subplots(len(rows), 2, figsize=(10, 3.3 * len(rows)), squeeze=False)
    for col, (axis, other, label) in enumerate(
        (("cfg_scale", "steps", "CFG scale"), ("steps", "cfg_scale", "sampling steps"))
    ):
        lines: dict[tuple, list[dict]] = {}
        for p in points:
            lines.setdefault((p["sampler"], p[other]), []).append(p)
        for row, (metric, name) in enumerate(rows):
            ax = axes[row, col]
            for (sampler, fixed), members in sorted(lines.items()):
                members = sorted(members, key=lambda p: p[axis])
                ax.plot(
                    [p[axis] for p in members],
                    [p["metrics"][metric] for p in members],
                    marker="o",
                    label=f"{sampler}, {'steps' if other == 'steps' else 'CFG'} {fixed:g}",
                )
            ax.set(xlabel=label, ylabel=name)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
