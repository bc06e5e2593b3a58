"""One training step and the validation loss, free of any framework (no Ray, no MLflow here).

A step: sample t and noise, interpolate, predict, loss (latent or image space), backward, clip the
gradient norm, AdamW with linear warm-up, then update the EMA.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn as nn

from .config import ExperimentConfig
from .ema import EMA
from .flow import Conditioning, RectifiedFlow


def autocast(precision: str, device: torch.device):
    """`train.precision`: bf16 autocast (AMX on CPU, tensor cores on GPU) or plain fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


class Trainer:
    def __init__(self, cfg: ExperimentConfig, model: nn.Module, flow: RectifiedFlow, null: Conditioning):
        self.cfg, self.model, self.flow = cfg, model, flow
        self.device = next(model.parameters()).device
        self.null = null.to(self.device)
        train = cfg.train
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
        warmup = max(train.warmup_steps, 1)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: min(1.0, (step + 1) / warmup))
        self.ema = EMA(model, train.ema_decay)
        self.generator = torch.Generator().manual_seed(train.seed)  # t, noise and CFG-dropout draws
        self.step = 0

    def train_step(self, x0: torch.Tensor, cond: Conditioning) -> dict[str, float]:
        self.model.train()
        x0, cond = x0.to(self.device), cond.to(self.device)
        with autocast(self.cfg.train.precision, self.device):
            loss = self.flow.loss(self.model, x0, cond, self.null, self.generator)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update()
        self.step += 1
        return {"loss": loss.item(), "grad_norm": grad_norm.item(), "lr": lr}

    @torch.no_grad()
    def validation_loss(self, x0: torch.Tensor, cond: Conditioning, seed: int = 0) -> dict[float, float]:
        """Mean loss at each fixed t of eval.val_t, with noise fixed by `seed` (comparable across runs)."""
        self.model.eval()
        x0, cond = x0.to(self.device), cond.to(self.device)
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(x0.shape, generator=generator).to(self.device)
        losses = {}
        with autocast(self.cfg.train.precision, self.device):
            for t in self.cfg.eval.val_t:
                tt = torch.full((x0.shape[0],), t, device=self.device)
                losses[t] = self.flow.per_sample_loss(self.model, x0, noise, tt, cond).mean().item()
        return losses
