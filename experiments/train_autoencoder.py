"""Stage 1: train the small latent autoencoder on the dataset's shards, then freeze it.

    python -m experiments.train_autoencoder --config C [--set autoencoder.train_steps=500 ...]

Trains a diffusers AutoencoderKL (reconstruction MSE + a small KL term; no perceptual term, since
every perceptual network needs a download), computes the latent shift and scale from training
data, saves it with save_pretrained to `autoencoder.path`, and reports reconstruction PSNR on the val
split with a side-by-side image (top: originals, bottom: reconstructions).
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import torch
from PIL import Image
from torchmetrics.image import PeakSignalNoiseRatio
from tqdm import tqdm

from mmdit_core.autoencoder import Autoencoder, build_vae, latent_stats, vae_loss
from mmdit_core.data.images import to_uint8
from mmdit_core.data.shards import SkipCounts, make_loader, read_manifest, split_shards

from .cli import config_parser, resolve_config


def side_by_side(originals: torch.Tensor, recons: torch.Tensor, scale: int = 4) -> Image.Image:
    """Two rows: originals above their reconstructions, each upscaled `scale`× with nearest pixels."""
    n, size = originals.shape[0], originals.shape[-1]
    canvas = Image.new("RGB", (n * size, 2 * size))
    for row, images in enumerate((originals, recons)):
        for i, array in enumerate(to_uint8(images)):
            canvas.paste(Image.fromarray(array), (i * size, row * size))
    return canvas.resize((n * size * scale, 2 * size * scale), Image.Resampling.NEAREST)


def train(cfg) -> dict:
    ae_cfg = cfg.autoencoder
    if ae_cfg.kind != "trained":
        raise SystemExit(f"error: autoencoder.kind={ae_cfg.kind}: only the `trained` kind is trained here "
                         "(--set autoencoder.kind=trained, or --config experiments/configs/scenes.yaml)")
    torch.manual_seed(cfg.train.seed)
    counts = SkipCounts()
    loader = make_loader(split_shards(cfg.data.root, "train"), ae_cfg.batch_size, num_workers=cfg.data.num_workers,
                         resampled=True, shuffle=cfg.data.shuffle_buffer, seed=cfg.data.seed, counts=counts)
    vae = build_vae(ae_cfg)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=ae_cfg.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, ae_cfg.train_steps)
    started = time.perf_counter()
    batches = iter(loader)
    for step in (bar := tqdm(range(ae_cfg.train_steps), desc="autoencoder", unit="step")):
        loss, parts = vae_loss(vae, next(batches)["image"], ae_cfg.kl_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 20 == 0:
            bar.set_postfix(mse=f"{parts['mse']:.4f}")
    train_seconds = time.perf_counter() - started
    vae.eval()
    shift, scale = latent_stats(vae, (next(batches)["image"] for _ in range(8)))
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    out = Path(ae_cfg.path)
    vae.save_pretrained(out)
    return {"train_seconds": round(train_seconds, 1), "shift": shift, "scale": scale,
            **evaluate(cfg, Autoencoder.load(ae_cfg), out), "train_skips": counts.totals()}


@torch.no_grad()
def evaluate(cfg, autoencoder: Autoencoder, out: Path) -> dict:
    """Reconstruction PSNR (pixels in [0, 1]) over the val split, and recon.png beside the weights."""
    counts = SkipCounts()
    psnr = PeakSignalNoiseRatio(data_range=1.0)
    first = None
    for batch in make_loader(split_shards(cfg.data.root, "val"), 64, counts=counts):
        images = batch["image"]
        recons = autoencoder.decode(autoencoder.encode(images)).clamp(-1, 1)
        psnr.update((recons + 1) / 2, (images + 1) / 2)
        first = first if first is not None else (images[:12], recons[:12])
    side_by_side(*first).save(out / "recon.png")
    return {"val_psnr_db": round(psnr.compute().item(), 2), "val_skips": counts.totals()}


def made_from(cfg) -> dict:
    """What determines the trained weights: the autoencoder's settings (not where it is saved), the data, the seed."""
    return {"autoencoder": cfg.autoencoder.model_dump(exclude={"path"}), "dataset": read_manifest(cfg.data.root)["key"],
            "seed": cfg.train.seed}


def train_and_save(cfg) -> dict:
    summary = {**train(cfg), "made_from": made_from(cfg)}
    (Path(cfg.autoencoder.path) / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def reuse_or_train(cfg) -> dict:
    """The autoencoder at autoencoder.path if it was trained from these settings and data, else a new one."""
    summary_file = Path(cfg.autoencoder.path) / "summary.json"
    if summary_file.is_file():
        summary = json.loads(summary_file.read_text())
        if summary.get("made_from") == made_from(cfg):
            print(f"reusing the autoencoder at {cfg.autoencoder.path} (val PSNR {summary['val_psnr_db']} dB)")
            return summary
    return train_and_save(cfg)


def main(argv=None) -> dict:
    cfg = resolve_config(config_parser(__doc__).parse_args(argv))
    summary = train_and_save(cfg)
    print(json.dumps(summary, indent=2))
    print(f"autoencoder saved to {cfg.autoencoder.path}; reconstructions: {Path(cfg.autoencoder.path) / 'recon.png'}")
    return summary


if __name__ == "__main__":
    main()
