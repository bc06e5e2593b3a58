"""Rectified flow: training loss, parameterisations, and the Euler / Heun samplers with CFG.

Convention (SD3, Flux, minRF): t=0 is data, t=1 is noise.
    x_t = (1 - t)·x0 + t·noise        velocity v = dx_t/dt = noise - x0
Sampling integrates dx/dt = v from t=1 (pure noise) down to t=0.
Each switch is read in one place: `flow.time_sampling` in sample_time(), `flow.prediction` and
`flow.loss_space` in RectifiedFlow, `sample.sampler` in integrate().
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import FlowConfig, SampleConfig

# Bounds the 1/(1-t) and 1/t factors that turn an epsilon (or x0) prediction into a velocity near the
# end of the path where that prediction carries no information (epsilon at t=1, x0 at t=0).
T_EPS = 1e-2


@dataclass
class Conditioning:
    """Text conditioning of a batch: token states, their padding mask and a pooled vector."""

    text: torch.Tensor  # (B, L, D_text)
    mask: torch.Tensor  # (B, L) bool, True for real tokens
    pooled: torch.Tensor  # (B, D_text): the masked mean of the text states, or what the encoder pools

    def __len__(self) -> int:
        return self.text.shape[0]

    def __getitem__(self, rows) -> Conditioning:
        return Conditioning(self.text[rows], self.mask[rows], self.pooled[rows])

    def expand(self, batch: int) -> Conditioning:
        """`batch` rows: a batch-1 conditioning (the null text) repeated, any other returned as is."""
        if len(self) == batch:
            return self
        return Conditioning(self.text.expand(batch, -1, -1), self.mask.expand(batch, -1), self.pooled.expand(batch, -1))

    def cat(self, other: Conditioning) -> Conditioning:
        if other.text.shape[1:] != self.text.shape[1:]:
            raise ValueError(
                f"cannot batch text of shape {tuple(self.text.shape[1:])} with {tuple(other.text.shape[1:])}: "
                "encode both with the same text.max_length"
            )
        return Conditioning(
            *(
                torch.cat([a, b])
                for a, b in ((self.text, other.text), (self.mask, other.mask), (self.pooled, other.pooled))
            )
        )

    def where(self, keep: torch.Tensor, other: Conditioning) -> Conditioning:
        """Rows of self where keep (B,) is True, else the rows of other (batch 1 or B)."""
        other = other.expand(len(self))
        return Conditioning(
            torch.where(keep[:, None, None], self.text, other.text),
            torch.where(keep[:, None], self.mask, other.mask),
            torch.where(keep[:, None], self.pooled, other.pooled),
        )

    def to(self, device) -> Conditioning:
        return Conditioning(self.text.to(device), self.mask.to(device), self.pooled.to(device))


def sample_time(n: int, cfg: FlowConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """(n,) training times in (0, 1): uniform, logit-normal (SD3's choice) or SD3's mode sampling."""
    if cfg.time_sampling == "logit_normal":
        return torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(n, generator=generator))
    u = torch.rand(n, generator=generator)
    if cfg.time_sampling == "mode":
        return 1 - u - cfg.mode_scale * (torch.cos(math.pi / 2 * u) ** 2 - 1 + u)
    return u


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = t.view(-1, *([1] * (x0.dim() - 1)))  # (B, 1, 1, 1)
    return (1 - t) * x0 + t * noise


@dataclass(frozen=True)
class Parameterization:
    """What the network outputs: its regression target, and how to read (x0, noise) back from it."""

    target: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x0, noise) -> target
    decompose: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # (out, x_t, t)


PARAMETERIZATIONS = {
    "velocity": Parameterization(
        target=lambda x0, noise: noise - x0, decompose=lambda out, x_t, t: (x_t - t * out, x_t + (1 - t) * out)
    ),
    "epsilon": Parameterization(
        target=lambda x0, noise: noise, decompose=lambda out, x_t, t: ((x_t - t * out) / (1 - t).clamp_min(T_EPS), out)
    ),
    "x0": Parameterization(
        target=lambda x0, noise: x0, decompose=lambda out, x_t, t: (out, (x_t - (1 - t) * out) / t.clamp_min(T_EPS))
    ),
}


class RectifiedFlow:
    """Training loss and velocity of a network under one `FlowConfig`.

    `decode` is the frozen autoencoder's decoder (latents -> pixels); loss_space=image needs it.
    """

    def __init__(self, cfg: FlowConfig, decode: Callable[[torch.Tensor], torch.Tensor] | None = None):
        if cfg.loss_space == "image" and decode is None:
            raise ValueError("flow.loss_space=image needs the autoencoder's decoder")
        self.cfg = cfg
        self.param = PARAMETERIZATIONS[cfg.prediction]
        self.decode = decode

    def split(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Network output -> predicted (x0, noise), in fp32."""
        return self.param.decompose(out.float(), x_t.float(), t.float().view(-1, *([1] * (x_t.dim() - 1))))

    def velocity(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x0, noise = self.split(out, x_t, t)
        return noise - x0

    def per_sample_loss(
        self, model: nn.Module, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, cond: Conditioning
    ) -> torch.Tensor:
        """(B,) MSE at the given times: against the parameterisation's target in latent space, or
        between decoded predicted and decoded true x0 in pixel space."""
        x_t = interpolate(x0, noise, t)
        out = model(x_t, t, cond.text, cond.mask, cond.pooled)
        if self.cfg.loss_space == "image":
            with torch.no_grad():
                target = self.decode(x0).float()
            pred = self.decode(self.split(out, x_t, t)[0]).float()
        else:
            pred, target = out.float(), self.param.target(x0, noise).float()
        return F.mse_loss(pred, target, reduction="none").flatten(1).mean(1)

    def loss(
        self,
        model: nn.Module,
        x0: torch.Tensor,
        cond: Conditioning,
        null: Conditioning,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Scalar training loss: random t and noise, and the text replaced by `null` with
        probability flow.cfg_dropout (classifier-free guidance training)."""
        B = x0.shape[0]
        t = sample_time(B, self.cfg, generator).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
        keep = (torch.rand(B, generator=generator) >= self.cfg.cfg_dropout).to(x0.device)
        return self.per_sample_loss(model, x0, noise, t, cond.where(keep, null)).mean()

    @torch.no_grad()
    def loss_by_t(
        self, model: nn.Module, x0: torch.Tensor, cond: Conditioning, ts: list[float], seed: int = 0
    ) -> dict[float, float]:
        """Mean loss at each fixed t, with noise fixed by `seed`: comparable across steps, runs and arms
        that train on the same loss (not across flow.loss_space or flow.prediction)."""
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(x0.device)
        return {
            t: self.per_sample_loss(model, x0, noise, torch.full((x0.shape[0],), t, device=x0.device), cond)
            .mean()
            .item()
            for t in ts
        }


# ---- sampling -----------------------------------------------------------------------------------

Velocity = Callable[[torch.Tensor, float], torch.Tensor]  # (x, t) -> dx/dt


def timesteps(steps: int, shift: float = 1.0) -> list[float]:
    """steps + 1 times from 1 to 0; shift > 1 spends more of them at high noise (SD3's timestep shift)."""
    ts = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return (shift * ts / (1 + (shift - 1) * ts)).tolist()


def euler_step(velocity: Velocity, x: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
    return x + (t_next - t) * velocity(x, t)


def heun_step(velocity: Velocity, x: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
    v = velocity(x, t)
    x_euler = x + (t_next - t) * v
    if t_next == 0.0:  # the final step stays Euler (EDM): no second evaluation at the data end
        return x_euler
    return x + (t_next - t) * 0.5 * (v + velocity(x_euler, t_next))


SAMPLERS = {"euler": euler_step, "heun": heun_step}


def integrate(
    velocity: Velocity,
    noise: torch.Tensor,
    sampler: str,
    steps: int,
    shift: float = 1.0,
    return_trajectory: bool = False,
) -> torch.Tensor:
    """Solve dx/dt = velocity from t=1 (noise) to t=0. Returns x0 (B, ...), or with
    return_trajectory the states at every time, (steps + 1, B, ...)."""
    step = SAMPLERS[sampler]
    ts = timesteps(steps, shift)
    x, trajectory = noise, [noise]
    for t, t_next in zip(ts[:-1], ts[1:]):
        x = step(velocity, x, t, t_next)
        trajectory.append(x)
    return torch.stack(trajectory) if return_trajectory else x


def guided_velocity(
    model: nn.Module,
    flow: RectifiedFlow,
    x: torch.Tensor,
    t: float,
    cond: Conditioning,
    null: Conditioning,
    cfg_scale: float,
) -> torch.Tensor:
    """Classifier-free guidance: v_null + s·(v_cond - v_null), both passes batched into one forward.
    At s = 1 this is the conditional velocity, and the null pass is skipped."""
    B = x.shape[0]
    if cfg_scale == 1.0:
        tt = torch.full((B,), t, device=x.device)
        return flow.velocity(model(x, tt, cond.text, cond.mask, cond.pooled), x, tt)
    both = cond.cat(null.expand(B))
    xx, tt = torch.cat([x, x]), torch.full((2 * B,), t, device=x.device)
    v_cond, v_null = flow.velocity(model(xx, tt, both.text, both.mask, both.pooled), xx, tt).chunk(2)
    return v_null + cfg_scale * (v_cond - v_null)


@torch.no_grad()
def generate(
    model: nn.Module,
    flow: RectifiedFlow,
    noise: torch.Tensor,
    cond: Conditioning,
    null: Conditioning,
    cfg: SampleConfig,
    return_trajectory: bool = False,
) -> torch.Tensor:
    """Sample latents for `cond` from `noise` (B, C, H, W) with the configured sampler, steps, shift and CFG."""
    velocity = lambda x, t: guided_velocity(model, flow, x, t, cond, null, cfg.cfg_scale)  # noqa: E731
    return integrate(velocity, noise.float(), cfg.sampler, cfg.steps, cfg.shift, return_trajectory)
