"""In-process demo: train a small MMDiT on the built-in scenes and write what it samples.

    python -m experiments.quickstart [--config experiments/configs/quickstart.yaml] [--set k=v ...] [--out DIR]

Writes DIR/samples.png (held-out captions), DIR/trajectory.png (one sample from noise to image),
DIR/loss.png and DIR/checkpoint/. No Ray, no MLflow: `experiments.train` is the tracked path.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from mmdit_core.checkpoint import save_checkpoint
from mmdit_core.data.scenes import render_split
from mmdit_core.flow import RectifiedFlow, generate
from mmdit_core.model import MMDiT
from mmdit_core.text import TextEncoder
from mmdit_core.trainer import Trainer

from .cli import config_parser, resolve_config
from .figures import loss_curve, sample_grid, trajectory_strip

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "quickstart.yaml"


def main(argv=None) -> dict:
    parser = config_parser(__doc__, str(DEFAULT_CONFIG))
    parser.add_argument("--out", default="outputs/quickstart")
    args = parser.parse_args(argv)
    cfg = resolve_config(args)
    if cfg.autoencoder.kind != "identity":
        raise SystemExit("the quickstart trains in pixel space: set autoencoder.kind=identity")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.train.seed)
    started = time.perf_counter()

    print(f"rendering {cfg.data.num_train} + {cfg.data.num_val} scenes and encoding their captions")
    images, captions, _ = render_split(cfg.data, "train")
    val_images, val_captions, _ = render_split(cfg.data, "val")
    encoder = TextEncoder(cfg.text)
    cond, val_cond, null = encoder.encode(captions), encoder.encode(val_captions), encoder.null()

    model = MMDiT(cfg.model)
    flow = RectifiedFlow(cfg.flow, decode=lambda x: x)  # pixel space: the decoder is the identity
    trainer = Trainer(cfg, model, flow, null)
    print(f"training {model.num_params() / 1e6:.2f}M parameters for {cfg.train.steps} steps of {cfg.train.batch_size}")
    batches = torch.Generator().manual_seed(cfg.data.seed)
    steps, losses = [], []
    train_started = time.perf_counter()
    for step in (bar := tqdm(range(cfg.train.steps), unit="step")):
        idx = torch.randint(len(captions), (cfg.train.batch_size,), generator=batches)
        metrics = trainer.train_step(images[idx], cond[idx])
        steps.append(step + 1)
        losses.append(metrics["loss"])
        if step % 10 == 0:
            bar.set_postfix(loss=f"{metrics['loss']:.3f}")
    train_seconds = time.perf_counter() - train_started
    val = trainer.validation_loss(val_images, val_cond)

    noise = torch.randn(val_images.shape, generator=torch.Generator().manual_seed(cfg.sample.seed))
    with trainer.ema.applied():
        trajectory = generate(model.eval(), flow, noise, val_cond, null, cfg.sample, return_trajectory=True)
    sample_grid(trajectory[-1], val_captions).save(out / "samples.png")
    sample_grid(val_images, val_captions).save(out / "references.png")
    trajectory_strip(trajectory[:, 0]).save(out / "trajectory.png")
    loss_curve(steps, losses, out / "loss.png", val)
    save_checkpoint(out / "checkpoint", model=model, config=cfg, step=trainer.step, ema=trainer.ema,
                    optimizer=trainer.optimizer, scheduler=trainer.scheduler)
    summary = {"steps": trainer.step, "final_loss_mean_last_50": sum(losses[-50:]) / len(losses[-50:]),
               "val_loss_by_t": val, "train_seconds": round(train_seconds, 1),
               "images_per_second": round(cfg.train.steps * cfg.train.batch_size / train_seconds, 1),
               "total_seconds": round(time.perf_counter() - started, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    print(f"samples: {out / 'samples.png'} (references: {out / 'references.png'})")
    print(f"denoising strip: {out / 'trajectory.png'}, loss curve: {out / 'loss.png'}, checkpoint: {out / 'checkpoint'}")
    return summary


if __name__ == "__main__":
    main()
