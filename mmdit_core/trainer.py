"""One training step, the validation loss and the full training state, free of any framework.

A step: sample t and noise, interpolate, predict, loss (latent or image space), backward, clip the
gradient norm, AdamW with linear warm-up, then update the EMA. Before the optimizer steps, the loss
and the gradient norm are checked finite on every rank (one all-reduce when torch.distributed is
running): a non-finite step is skipped by all ranks together, so bad values never reach the weights,
and `train.max_nonfinite` skips in a row fail the run with the step and the quantity named.

The model may be wrapped in DistributedDataParallel; the EMA, the checkpoint and the validation
loss use the bare module.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import ExperimentConfig
from .ema import EMA
from .errors import InputError
from .flow import Conditioning, RectifiedFlow
from .machine import autocast


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row: the run cannot recover by skipping."""


def all_finite(values: dict[str, torch.Tensor]) -> dict[str, bool]:
    """Whether each scalar is finite on every rank (a single all-reduce of 0/1 flags)."""
    flags = torch.stack([torch.isfinite(v.detach().float()).all() for v in values.values()]).float()
    if dist.is_available() and dist.is_initialized():
        flags = flags.to("cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    return {name: bool(flag) for name, flag in zip(values, flags.tolist())}


@torch.no_grad()
def validation_loss(
    model: nn.Module, flow: RectifiedFlow, x0: torch.Tensor, cond: Conditioning, cfg: ExperimentConfig, seed: int = 0
) -> dict[float, float]:
    """Mean loss at each fixed t of eval.val_t (RectifiedFlow.loss_by_t) under the training precision: the one
    definition training's and evaluation's validation losses share."""
    device = next(model.parameters()).device
    model.eval()
    with autocast(cfg.train.precision, device):
        return flow.loss_by_t(model, x0.to(device), cond.to(device), cfg.eval.val_t, seed)


class Trainer:
    def __init__(self, cfg: ExperimentConfig, model: nn.Module, flow: RectifiedFlow, null: Conditioning, rank: int = 0):
        self.cfg, self.flow = cfg, flow
        self.module = getattr(model, "module", model)  # the bare model under a DDP wrapper: saved, validated, sampled
        # the training step's model; compiled, it shares the weights and leaves validation and sampling eager
        self.model = torch.compile(model) if cfg.train.compile == "inductor" else model
        self.device = next(model.parameters()).device
        self.null = null.to(self.device)
        train = cfg.train
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
        warmup = max(train.warmup_steps, 1)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: min(1.0, (step + 1) / warmup))
        self.ema = EMA(self.module, train.ema_decay)
        # t, noise and CFG-dropout draws: one stream per rank, so ranks do not draw the same noise
        self.generator = torch.Generator().manual_seed(
            int(np.random.SeedSequence([train.seed, rank]).generate_state(1)[0])
        )
        self.step = 0
        self.nonfinite_in_a_row = 0
        self.skipped_steps = 0
        self.data_position: Any = None  # opaque to the trainer: the driver's reader position, saved with the state

    def train_step(self, x0: torch.Tensor, cond: Conditioning) -> dict[str, float]:
        """One optimisation step (or a skipped one: `skipped` is 1.0 and the weights are untouched)."""
        self.model.train()
        x0, cond = x0.to(self.device), cond.to(self.device)
        with autocast(self.cfg.train.precision, self.device):
            loss = self.flow.loss(self.model, x0, cond, self.null, self.generator)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        lr = self.scheduler.get_last_lr()[0]
        finite = all_finite({"loss": loss, "grad norm": grad_norm})
        self.step += 1
        if all(finite.values()):
            self.optimizer.step()
            self.scheduler.step()
            self.ema.update()
            self.nonfinite_in_a_row = 0
        else:
            self._skip(finite)
        self.optimizer.zero_grad(set_to_none=True)
        return {
            "loss": loss.item(),
            "grad_norm": grad_norm.item(),
            "lr": lr,
            "skipped": float(not all(finite.values())),
        }

    def _skip(self, finite: dict[str, bool]) -> None:
        self.nonfinite_in_a_row += 1
        self.skipped_steps += 1
        if self.nonfinite_in_a_row >= self.cfg.train.max_nonfinite:
            bad = " and ".join(name for name, ok in finite.items() if not ok)
            raise NonFiniteError(
                f"step {self.step}: non-finite {bad} (on at least one rank) for "
                f"{self.nonfinite_in_a_row} steps in a row (train.max_nonfinite="
                f"{self.cfg.train.max_nonfinite}); the weights hold the last finite step"
            )

    def validation_loss(self, x0: torch.Tensor, cond: Conditioning, seed: int = 0) -> dict[float, float]:
        return validation_loss(self.module, self.flow, x0, cond, self.cfg, seed)

    # ---- full state: what a checkpoint needs to continue exactly -----------------------------------
    def rank_state(self) -> dict[str, Any]:
        """This rank's own state: its draw generator, the global RNGs, its reader position, skip counters."""
        return {
            "generator": self.generator.get_state(),
            "rng": rng_state(),
            "data_position": self.data_position,
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
            "skipped_steps": self.skipped_steps,
        }

    def load_rank_state(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        set_rng_state(state["rng"])
        self.data_position = state["data_position"]
        self.nonfinite_in_a_row, self.skipped_steps = state["nonfinite_in_a_row"], state["skipped_steps"]

    def save(self, path, rank_states: list[dict[str, Any]]):
        """A checkpoint of the whole run: shared weights and optimizer, plus every rank's own state."""
        return save_checkpoint(
            path,
            model=self.module,
            config=self.cfg,
            step=self.step,
            ema=self.ema,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            extra={"ranks": rank_states},
        )

    def restore(self, path, rank: int = 0) -> None:
        """Continue from a checkpoint written by `save` with the same number of ranks."""
        checkpoint = load_checkpoint(
            path, model=self.module, ema=self.ema, optimizer=self.optimizer, scheduler=self.scheduler
        )
        ranks = checkpoint.extra["ranks"]
        if len(ranks) <= rank:
            raise InputError(
                f"checkpoint {path} was written by {len(ranks)} ranks; it cannot resume rank {rank} "
                "(resume with the same train.num_workers)"
            )
        self.step = checkpoint.step
        self.load_rank_state(ranks[rank])
