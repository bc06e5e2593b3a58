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

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from PIL import Image
from torchmetrics.image import PeakSignalNoiseRatio
from tqdm import tqdm

from eval.adherence import score_batch
from eval.evaluate import scenes_for
from mmdit_core.autoencoder import Autoencoder, build_vae, latent_stats, vae_loss
from mmdit_core.config import ExperimentConfig, flatten
from mmdit_core.data.images import to_uint8
from mmdit_core.data.shards import SkipCounts, make_loader, read_manifest, split_shards
from mmdit_core.data.training import read_split
from mmdit_core.files import atomic_directory, sha256_file

from .bench import cpu_name
from .cli import config_parser, resolve_config
from .tracking import Tracker, default_uri, git_commit

EXPERIMENT = "autoencoder"
# Autoencoders this command trained, committed with their summaries: reused when made from the same
# settings and data (`python -m experiments.train_autoencoder --config C` reproduces each one).
SHIPPED = Path(__file__).parent / "autoencoders"
WEIGHTS = "diffusion_pytorch_model.safetensors"  # what save_pretrained writes
LOG_EVERY = 50  # training steps between logged losses
FIDELITY_IMAGES = 1024  # val images the fidelity is measured on (all of a smaller split)
ORACLE_FIELDS = ("colour", "position", "shape", "whole", "whole_shape")


def side_by_side(originals: torch.Tensor, recons: torch.Tensor, scale: int = 4) -> Image.Image:
    """Two rows: originals above their reconstructions, each upscaled `scale`× with nearest pixels."""
    n, size = originals.shape[0], originals.shape[-1]
    canvas = Image.new("RGB", (n * size, 2 * size))
    for row, images in enumerate((originals, recons)):
        for i, array in enumerate(to_uint8(images)):
            canvas.paste(Image.fromarray(array), (i * size, row * size))
    return canvas.resize((n * size * scale, 2 * size * scale), Image.Resampling.NEAREST)


def made_from(cfg: ExperimentConfig) -> dict[str, Any]:
    """What determines the trained weights: the autoencoder's settings (not where it is saved), the data, the seed."""
    return {"autoencoder": cfg.autoencoder.model_dump(exclude={"path"}), "dataset": read_manifest(cfg.data.root)["key"],
            "seed": cfg.train.seed}


def run_key(made: dict[str, Any]) -> str:
    """The MLflow run of these settings and data (training them again re-attaches it)."""
    return "autoencoder-" + hashlib.sha256(json.dumps(made, sort_keys=True).encode()).hexdigest()[:8]


def train(cfg: ExperimentConfig, tracker: Tracker) -> tuple[AutoencoderKL, dict[str, Any]]:
    """The trained VAE with its latent shift and scale set, and what training measured."""
    ae_cfg = cfg.autoencoder
    torch.manual_seed(cfg.train.seed)
    counts = SkipCounts()
    loader = make_loader(split_shards(cfg.data.root, "train"), ae_cfg.batch_size, num_workers=cfg.data.num_workers,
                         resampled=True, shuffle=cfg.data.shuffle_buffer, seed=cfg.data.seed, counts=counts)
    vae = build_vae(ae_cfg)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=ae_cfg.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, ae_cfg.train_steps)
    started = time.perf_counter()
    batches = iter(loader)
    for step in (bar := tqdm(range(1, ae_cfg.train_steps + 1), desc="autoencoder", unit="step")):
        loss, parts = vae_loss(vae, next(batches)["image"], ae_cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % LOG_EVERY == 0 or step == ae_cfg.train_steps:
            tracker.log_metrics({"train/loss": loss.item(), **{f"train/{k}": v for k, v in parts.items()}}, step)
            bar.set_postfix(recon=f"{parts['recon']:.5f}")
    train_seconds = time.perf_counter() - started
    vae.eval()
    shift, scale = latent_stats(vae, (next(batches)["image"] for _ in range(8)))
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    return vae, {"train_seconds": round(train_seconds, 1), "shift": shift, "scale": scale, "train_skips": counts.totals()}


@torch.no_grad()
def fidelity(cfg: ExperimentConfig, autoencoder: Autoencoder) -> tuple[dict[str, Any], Image.Image]:
    """PSNR (pixels in [0, 1]) of val reconstructions and, on scenes, the oracle on reconstructions and on
    the real images; and the side-by-side image of the first 12."""
    available = read_manifest(cfg.data.root)["splits"]["val"]["samples"]
    pixels, _, attributes = read_split(cfg.data.root, "val", min(available, FIDELITY_IMAGES))
    recons = torch.cat([autoencoder.decode(autoencoder.encode(chunk)).clamp(-1, 1) for chunk in pixels.split(64)])
    psnr = PeakSignalNoiseRatio(data_range=1.0)
    psnr.update((recons + 1) / 2, (pixels + 1) / 2)
    result: dict[str, Any] = {"images": len(pixels), "psnr_db": round(psnr.compute().item(), 2)}
    scenes, notice = scenes_for(cfg, attributes)
    if scenes is None:
        result["notice"] = notice
    else:
        for name, images in (("reconstructions", recons), ("real_images", pixels)):
            oracle = score_batch(images, scenes).as_dict()
            result[name] = {k: oracle[k] for k in ORACLE_FIELDS}
    return result, side_by_side(pixels[:12], recons[:12])


def describe(summary: dict[str, Any]) -> str:
    f = summary["fidelity"]
    text = f"val PSNR {f['psnr_db']:.2f} dB"
    if "reconstructions" in f:
        r, c = f["reconstructions"], f["real_images"]
        text += ("; oracle on reconstructions " + " / ".join(f"{k} {100 * r[k]:.1f}%" for k in ORACLE_FIELDS[:4])
                 + " (real images: " + " / ".join(f"{100 * c[k]:.1f}%" for k in ORACLE_FIELDS[:4]) + ")")
    return text


def train_and_save(cfg: ExperimentConfig, tracking_uri: str | None = None) -> dict[str, Any]:
    """Train, measure and save the autoencoder of `cfg` (refusing any other kind), tracked in MLflow."""
    if cfg.autoencoder.kind != "trained":
        raise SystemExit(f"error: autoencoder.kind={cfg.autoencoder.kind}: only the `trained` kind is trained here "
                         "(--set autoencoder.kind=trained, or --config experiments/configs/demo.yaml)")
    made = made_from(cfg)
    out = Path(cfg.autoencoder.path)
    tracker = Tracker(tracking_uri or default_uri(), EXPERIMENT, run_key(made),
                      backlog=out.parent / f"{out.name}.tracking_backlog.jsonl",
                      tags={"git_commit": git_commit(), "config": cfg.name, "dataset": made["dataset"]})
    tracker.set_status("RUNNING")
    tracker.log_params({f"autoencoder.{k}": v for k, v in flatten(made["autoencoder"]).items()}
                       | {"data.root": cfg.data.root, "dataset": made["dataset"], "seed": made["seed"]})
    status, error = "FAILED", None
    try:
        vae, trained = train(cfg, tracker)
        measured, recon_image = fidelity(cfg, Autoencoder(cfg.autoencoder, vae))
        summary = {**trained, "fidelity": measured, "made_from": made,
                   "machine": {"cpu": cpu_name(), "threads": torch.get_num_threads()}}
        with atomic_directory(out) as tmp:  # weights, summary and image appear together or not at all
            vae.save_pretrained(tmp)
            summary["weights_sha256"] = sha256_file(tmp / WEIGHTS)
            recon_image.save(tmp / "recon.png")
            (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
        tracker.log_metrics(fidelity_metrics(measured), cfg.autoencoder.train_steps)
        for name in ("recon.png", "summary.json"):
            tracker.log_artifact(out / name)
        status = "FINISHED"
        return summary
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        tracker.set_status(status, error)
        print(tracker.close().summary())


def fidelity_metrics(measured: dict[str, Any]) -> dict[str, float]:
    """{"val/psnr_db": ..., "recon/colour": ..., "real/colour": ...}: the fidelity as MLflow metrics."""
    metrics = {"val/psnr_db": measured["psnr_db"]}
    for name, prefix in (("reconstructions", "recon"), ("real_images", "real")):
        metrics |= {f"{prefix}/{k}": v for k, v in measured.get(name, {}).items()}
    return metrics


def verified_summary(directory: Path) -> dict[str, Any] | None:
    """The summary of the autoencoder in `directory` if its weights are the ones it describes, else None."""
    summary_file, weights = directory / "summary.json", directory / WEIGHTS
    if not (summary_file.is_file() and weights.is_file()):
        return None
    summary = json.loads(summary_file.read_text())
    return summary if summary.get("weights_sha256") == sha256_file(weights) else None


def reuse_or_train(cfg: ExperimentConfig, tracking_uri: str | None = None) -> dict[str, Any]:
    """The autoencoder trained from these settings and this data (the dataset key is checked): the one at
    autoencoder.path, else a shipped one copied there, else a new one trained."""
    made, path = made_from(cfg), Path(cfg.autoencoder.path)
    shipped = sorted(p for p in SHIPPED.iterdir() if p.is_dir()) if SHIPPED.is_dir() else []
    for directory in (path, *shipped):
        summary = verified_summary(directory)
        if summary is None or summary["made_from"] != made:
            continue
        if directory != path:
            with atomic_directory(path) as tmp:
                shutil.copytree(directory, tmp, dirs_exist_ok=True)
            print(f"copied the shipped autoencoder {directory} to {path} (made from these settings and data {made['dataset']})")
        print(f"reusing the autoencoder at {path}: {describe(summary)}")
        return summary
    return train_and_save(cfg, tracking_uri)


def main(argv=None) -> dict[str, Any]:
    parser = config_parser(__doc__)
    parser.add_argument("--tracking-uri", default=None, help="MLflow URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlruns.db)")
    parser.add_argument("--reuse", action="store_true", help="keep an autoencoder trained from these settings and data")
    args = parser.parse_args(argv)
    cfg = resolve_config(args)
    summary = (reuse_or_train if args.reuse else train_and_save)(cfg, args.tracking_uri)
    print(json.dumps(summary, indent=2))
    print(f"autoencoder saved to {cfg.autoencoder.path}: {describe(summary)}; "
          f"reconstructions: {Path(cfg.autoencoder.path) / 'recon.png'}")
    return summary


if __name__ == "__main__":
    main()
