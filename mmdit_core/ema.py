"""Exponential moving average of the weights: diffusers' EMAModel, addressed by parameter name.

The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates, so early averages are not
dominated by the random initialisation.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn
from diffusers.training_utils import EMAModel


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.model = model
        self.names = [name for name, _ in model.named_parameters()]
        self.avg = EMAModel(model.parameters(), decay=decay, use_ema_warmup=False, foreach=True)

    @property
    def num_updates(self) -> int:
        return self.avg.optimization_step

    def update(self) -> None:
        self.avg.step(self.model.parameters())

    def tensors(self) -> dict[str, torch.Tensor]:
        """The averaged weights by parameter name (what goes into ema.safetensors)."""
        return dict(zip(self.names, self.avg.shadow_params))

    def load_tensors(self, tensors: dict[str, torch.Tensor], num_updates: int) -> None:
        missing = set(self.names) ^ set(tensors)
        if missing:
            raise KeyError(f"EMA weights do not match the model: {sorted(missing)[:5]}")
        for shadow, name in zip(self.avg.shadow_params, self.names):
            shadow.copy_(tensors[name])
        self.avg.optimization_step = num_updates

    @contextmanager
    def applied(self) -> Iterator[nn.Module]:
        """Temporarily swap the averaged weights into the model (for sampling), then restore."""
        self.avg.store(self.model.parameters())
        self.avg.copy_to(self.model.parameters())
        try:
            yield self.model
        finally:
            self.avg.restore(self.model.parameters())
