"""The frozen latent autoencoder: a diffusers AutoencoderKL, or the identity (pixel space).

`autoencoder.kind`: `identity` (the MMDiT sees pixels), `trained` (a small AutoencoderKL trained
here by `experiments.train_autoencoder` and saved to `autoencoder.path`) or `pretrained` (any
AutoencoderKL by hub id or local path, e.g. an SD VAE). Latents are normalised as in SD3,
z' = (z - shift_factor) · scaling_factor, with both numbers read from the VAE's own config
(the trained one stores values computed from its data), unless `autoencoder.latent_norm=none`.
Encoding takes the posterior mean; the latent cache stores it raw, so one cache serves both.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn as nn
from diffusers import AutoencoderKL

from .config import AutoencoderConfig
from .errors import InputError, MissingInput


def build_vae(cfg: AutoencoderConfig) -> AutoencoderKL:
    """A fresh AutoencoderKL shaped by the config (the `trained` kind before training)."""
    depth = len(cfg.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=cfg.latent_channels,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        down_block_types=("DownEncoderBlock2D",) * depth,
        up_block_types=("UpDecoderBlock2D",) * depth,
        norm_num_groups=min(32, min(cfg.block_out_channels)),
        scaling_factor=1.0,
        shift_factor=0.0,
    )


FOREGROUND_THRESHOLD = (
    0.1  # summed |RGB| distance (pixels in [-1, 1]) from the median colour that marks a pixel foreground
)


def foreground_weights(pixels: torch.Tensor, weight: float) -> torch.Tensor:
    """(B, 1, H, W) loss weights: `weight` where a pixel differs from its image's median colour (an
    object on a flat background), 1 elsewhere. On scenes the background is ~90% of the pixels, so a
    plain mean spends the loss on it while the shapes the oracle reads sit in the other 10%."""
    median = pixels.flatten(2).median(-1).values[:, :, None, None]  # (B, 3, 1, 1)
    foreground = (pixels - median).abs().sum(1, keepdim=True) > FOREGROUND_THRESHOLD
    return 1 + (weight - 1) * foreground.float()


def vae_loss(vae: AutoencoderKL, pixels: torch.Tensor, cfg: AutoencoderConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Reconstruction error (autoencoder.recon_loss, weighted by autoencoder.foreground_weight)
    + autoencoder.kl_weight · KL(posterior ‖ N(0, I)), both per element."""
    posterior = vae.encode(pixels).latent_dist
    recon = vae.decode(posterior.sample()).sample
    error = (recon - pixels).abs() if cfg.recon_loss == "l1" else (recon - pixels) ** 2
    weights = foreground_weights(pixels, cfg.foreground_weight)
    reconstruction = (error * weights).mean() / weights.mean()
    kl = posterior.kl().mean() / posterior.mean[0].numel()
    return reconstruction + cfg.kl_weight * kl, {"recon": reconstruction.item(), "kl": kl.item()}


@torch.no_grad()
def latent_stats(vae: AutoencoderKL, batches) -> tuple[float, float]:
    """(shift, scale) that give the posterior means zero mean and unit variance over `batches`."""
    means = torch.cat([vae.encode(b).latent_dist.mean.flatten() for b in batches])
    return means.mean().item(), 1.0 / means.std().item()


def identity_key(cfg: AutoencoderConfig) -> str:
    """Identifies the autoencoder's weights, for cache keys: a hash of its files, or its hub id."""
    if cfg.kind == "identity":
        return "identity"
    path = Path(cfg.path) / (cfg.subfolder or "")
    if not path.is_dir():
        return f"hub:{cfg.path}/{cfg.subfolder or ''}"
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.name.encode() + file.read_bytes())
    return digest.hexdigest()[:16]


class Autoencoder(nn.Module):
    """Frozen encode (pixels in [-1, 1] -> normalised latents) and decode (the way back)."""

    def __init__(self, cfg: AutoencoderConfig, vae: AutoencoderKL | None = None):
        super().__init__()
        self.cfg, self.vae = cfg, vae
        if vae is not None:
            vae.eval().requires_grad_(False)
            factor = 2 ** (len(vae.config.block_out_channels) - 1)
            if vae.config.latent_channels != cfg.latent_channels:
                raise InputError(
                    f"autoencoder.latent_channels={cfg.latent_channels} but the VAE at {cfg.path} "
                    f"has {vae.config.latent_channels}"
                )
            if factor != cfg.factor:
                raise InputError(f"autoencoder.factor={cfg.factor} but the VAE at {cfg.path} downsamples by {factor}")

    @staticmethod
    def check_trained(cfg: AutoencoderConfig) -> None:
        """MissingInput when the `trained` kind has not been trained yet (cheap: no weights read)."""
        if cfg.kind == "trained" and not Path(cfg.path).is_dir():
            raise MissingInput(
                f"autoencoder.path={cfg.path} holds no trained autoencoder: "
                "run python -m experiments.train_autoencoder first"
            )

    @classmethod
    def load(cls, cfg: AutoencoderConfig) -> Autoencoder:
        if cfg.kind == "identity":
            return cls(cfg)
        cls.check_trained(cfg)
        return cls(cfg, AutoencoderKL.from_pretrained(cfg.path, subfolder=cfg.subfolder))

    @property
    def normalised(self) -> bool:
        return self.vae is not None and self.cfg.latent_norm == "scale_shift"

    @property
    def shift(self) -> float:
        return float(self.vae.config.shift_factor or 0.0) if self.normalised else 0.0

    @property
    def scale(self) -> float:
        return float(self.vae.config.scaling_factor) if self.normalised else 1.0

    def normalise(self, raw: torch.Tensor) -> torch.Tensor:  # posterior means -> what the MMDiT sees
        return (raw - self.shift) * self.scale if self.normalised else raw

    def denormalise(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.scale + self.shift if self.normalised else latents

    @torch.no_grad()
    def encode_raw(self, pixels: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, C, H/f, W/f)
        if self.vae is None:
            return pixels
        return self.vae.encode(pixels).latent_dist.mean

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, C, H/f, W/f), normalised
        return self.normalise(self.encode_raw(pixels))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:  # (B, C, h, w) -> (B, 3, h·f, w·f)
        """Differentiable (loss_space=image backpropagates through it); the weights stay frozen."""
        if self.vae is None:
            return latents
        return self.vae.decode(self.denormalise(latents)).sample
