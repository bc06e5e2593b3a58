"""Stage 1: train the small latent autoencoder on the dataset's shards, measure its fidelity, freeze it.

    python -m experiments.train_autoencoder --config C [--set autoencoder.train_steps=500 ...] [--reuse]

Trains a diffusers AutoencoderKL (reconstruction MSE, or L1 and object pixels weighted up as
settings, plus a small KL term; no perceptual term, since every perceptual network needs a download),
computes the latent shift and scale from training data, and measures fidelity on the val split the
way the MMDiT is judged: PSNR, and on the built-in scenes the adherence oracle on the reconstructions beside the
oracle on the real images (its ceiling). `autoencoder.path` receives, all at once or not at all,
the weights (save_pretrained), summary.json (settings, what it was made from, fidelity, time) and
recon.png (top: originals, bottom: reconstructions). The run is tracked in MLflow (experiment
`autoencoder`): params, the training curve, the fidelity metrics, recon.png and the summary.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from PIL import Image
from torchmetrics.image import PeakSignalNoiseRatio
from tqdm import tqdm

from eval.adherence import HEADLINE, score_batch
from eval.evaluator import scenes_for
from mmdit_core.autoencoder import Autoencoder, build_vae, latent_stats, vae_loss
from mmdit_core.config import ExperimentConfig, flatten
from mmdit_core.data.images import to_uint8
from mmdit_core.data.shards import SkipCounts, read_manifest
from mmdit_core.data.training import read_split
from mmdit_core.errors import InputError
from mmdit_core.files import verified_summary

from .cli import run_command
from .stage import Stage, descend, train_images
from .tracking import Tracker

# Autoencoders this command trained are committed in experiments/autoencoders with their summaries and
# reused when made from the same settings and data (`python -m experiments.train_autoencoder --config C`
# reproduces each one). The weights file is what save_pretrained writes.
STAGE = Stage(
    "autoencoder",
    weights="diffusion_pytorch_model.safetensors",
    shipped=Path(__file__).parent / "autoencoders",
    measured="fidelity",
)
LOG_EVERY = 50  # training steps between logged losses
FIDELITY_IMAGES = 1024  # val images the fidelity is measured on (all of a smaller split)


def side_by_side(originals: torch.Tensor, recons: torch.Tensor, scale: int = 4) -> Image.Image:
    """Two rows: originals above their reconstructions, each upscaled `scale`× with nearest pixels."""
    n, size = originals.shape[0], originals.shape[-1]
    canvas = Image.new("RGB", (n * size, 2 * size))
    for row, images in enumerate((originals, recons)):
        for i, array in enumerate(to_uint8(images)):
            canvas.paste(Image.fromarray(array), (i * size, row * size))
    return canvas.resize((n * size * scale, 2 * size * scale), Image.Resampling.NEAREST)


def made_from(cfg: ExperimentConfig) -> dict[str, Any]:
    """What determines the trained weights: the autoencoder's settings (not where it is saved or how its
    latents are normalised), the data, the seed."""
    return {
        "autoencoder": cfg.autoencoder.model_dump(exclude={"path", "latent_norm"}),  # how latents are read, not made
        "dataset": read_manifest(cfg.data.root)["key"],
        "seed": cfg.train.seed,
    }


def train(cfg: ExperimentConfig, tracker: Tracker) -> tuple[AutoencoderKL, dict[str, Any]]:
    """The trained VAE with its latent shift and scale set, and what training measured."""
    ae_cfg = cfg.autoencoder
    torch.manual_seed(cfg.train.seed)
    counts = SkipCounts()
    loader = train_images(cfg, ae_cfg.batch_size, counts)
    vae = build_vae(ae_cfg)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=ae_cfg.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, ae_cfg.train_steps)
    started = time.perf_counter()
    batches = iter(loader)
    for step in (bar := tqdm(range(1, ae_cfg.train_steps + 1), desc="autoencoder", unit="step")):
        loss, parts = vae_loss(vae, next(batches)["image"], ae_cfg)
        descend(loss, optimizer, schedule)
        if step % LOG_EVERY == 0 or step == ae_cfg.train_steps:
            tracker.log_metrics({"train/loss": loss.item(), **{f"train/{k}": v for k, v in parts.items()}}, step)
            bar.set_postfix(recon=f"{parts['recon']:.5f}")
    train_seconds = time.perf_counter() - started
    vae.eval()
    shift, scale = latent_stats(vae, (next(batches)["image"] for _ in range(8)))
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    return vae, {
        "train_seconds": round(train_seconds, 1),
        "shift": shift,
        "scale": scale,
        "train_skips": counts.totals(),
    }


@torch.no_grad()
def fidelity(cfg: ExperimentConfig, autoencoder: Autoencoder) -> tuple[dict[str, Any], Image.Image]:
    """PSNR (pixels in [0, 1]) of val reconstructions and, on scenes, the oracle on reconstructions and on
    the real images (a seeded sample of the val split); and the side-by-side image of the first 12."""
    pixels, _, attributes = read_split(cfg.data.root, "val", FIDELITY_IMAGES, cfg.data.seed)
    recons = torch.cat([autoencoder.decode(autoencoder.encode(chunk)).clamp(-1, 1) for chunk in pixels.split(64)])
    psnr = PeakSignalNoiseRatio(data_range=1.0)
    psnr.update((recons + 1) / 2, (pixels + 1) / 2)
    result: dict[str, Any] = {"images": len(pixels), "psnr_db": round(psnr.compute().item(), 2)}
    scenes, notice = scenes_for(cfg, attributes)
    if scenes is None:
        result["notice"] = notice
    else:
        for name, images in (("reconstructions", recons), ("real_images", pixels)):
            result[name] = score_batch(images, scenes).fractions()
    return result, side_by_side(pixels[:12], recons[:12])


def describe(summary: dict[str, Any]) -> str:
    f = summary["fidelity"]
    text = f"val PSNR {f['psnr_db']:.2f} dB"
    if "reconstructions" in f:
        r, c = f["reconstructions"], f["real_images"]
        text += (
            "; oracle on reconstructions "
            + " / ".join(f"{k} {100 * r[k]:.1f}%" for k in HEADLINE)
            + " (real images: "
            + " / ".join(f"{100 * c[k]:.1f}%" for k in HEADLINE)
            + ")"
        )
    return text


def train_and_save(cfg: ExperimentConfig, tracking_uri: str | None = None) -> dict[str, Any]:
    """Train, measure and save the autoencoder of `cfg` (refusing any other kind), tracked in MLflow."""
    if cfg.autoencoder.kind != "trained":
        raise InputError(
            f"autoencoder.kind={cfg.autoencoder.kind}: only the `trained` kind is trained here "
            "(--set autoencoder.kind=trained, or --config experiments/configs/demo.yaml)"
        )
    made, out = made_from(cfg), Path(cfg.autoencoder.path)
    params = {f"autoencoder.{k}": v for k, v in flatten(made["autoencoder"]).items()} | {
        "dataset": made["dataset"],
        "seed": made["seed"],
    }
    with STAGE.tracked(made, out, params, tracking_uri, cfg) as tracker:
        vae, trained = train(cfg, tracker)
        summary = {**trained, "made_from": made}
        STAGE.save(out, summary, vae.save_pretrained)
        return measure_saved(cfg, out, summary, Autoencoder(cfg.autoencoder, vae), tracker)


def measure_saved(
    cfg: ExperimentConfig, out: Path, summary: dict[str, Any], autoencoder: Autoencoder, tracker: Tracker
) -> dict[str, Any]:
    """The saved autoencoder's fidelity and recon.png, written beside it and logged to its run."""
    summary["fidelity"], recon_image = fidelity(cfg, autoencoder)
    recon_image.save(out / "recon.png")
    STAGE.rewrite_summary(out, summary)
    tracker.log_metrics(fidelity_metrics(summary["fidelity"]), cfg.autoencoder.train_steps)
    for name in ("recon.png", "summary.json"):
        tracker.log_artifact(out / name)
    return summary


def remeasure(cfg: ExperimentConfig, tracking_uri: str | None = None) -> dict[str, Any]:
    """Measure the autoencoder at autoencoder.path (saved, never measured), logged to the run that trained it."""
    out = Path(cfg.autoencoder.path)
    summary = verified_summary(out, STAGE.weights)
    with STAGE.tracked(summary["made_from"], out, {}, tracking_uri, cfg) as tracker:
        return measure_saved(cfg, out, summary, Autoencoder.load(cfg.autoencoder), tracker)


def fidelity_metrics(measured: dict[str, Any]) -> dict[str, float]:
    """{"val/psnr_db": ..., "recon/colour": ..., "real/colour": ...}: the fidelity as MLflow metrics."""
    metrics = {"val/psnr_db": measured["psnr_db"]}
    for name, prefix in (("reconstructions", "recon"), ("real_images", "real")):
        metrics |= {f"{prefix}/{k}": v for k, v in measured.get(name, {}).items()}
    return metrics


def reuse_or_train(cfg: ExperimentConfig, tracking_uri: str | None = None) -> dict[str, Any]:
    """The autoencoder trained from these settings and this data (the dataset key is checked): the one at
    autoencoder.path, else a shipped one copied there, else a new one trained."""
    return STAGE.reuse_or_train(
        made_from(cfg),
        Path(cfg.autoencoder.path),
        lambda: train_and_save(cfg, tracking_uri),
        describe,
        lambda: remeasure(cfg, tracking_uri),
    )


def main(argv=None) -> dict[str, Any]:
    return STAGE.main(
        __doc__,
        argv,
        train_and_save,
        reuse_or_train,
        lambda cfg, summary: (
            f"autoencoder saved to {cfg.autoencoder.path}: {describe(summary)}; "
            f"reconstructions: {Path(cfg.autoencoder.path) / 'recon.png'}"
        ),
    )


if __name__ == "__main__":
    run_command(main)
