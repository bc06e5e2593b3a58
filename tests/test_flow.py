import math

import pytest
import torch
from conftest import random_conditioning, tiny_model_config
from test_model import randomise

from mmdit_core.config import FlowConfig, SampleConfig
from mmdit_core.flow import (
    PARAMETERIZATIONS,
    Conditioning,
    RectifiedFlow,
    generate,
    guided_velocity,
    integrate,
    interpolate,
    sample_time,
    timesteps,
)
from mmdit_core.model import MMDiT

MU, SIGMA = 2.0, 0.5  # the data distribution N(MU, SIGMA²) of the exact-velocity tests


def gaussian_velocity(x: torch.Tensor, t: float) -> torch.Tensor:
    """The exact rectified-flow velocity E[noise - x0 | x_t] for data N(MU, SIGMA²) and noise N(0, 1)."""
    mean = (1 - t) * MU
    var = (1 - t) ** 2 * SIGMA**2 + t**2
    x0 = MU + (1 - t) * SIGMA**2 / var * (x - mean)
    noise = t / var * (x - mean)
    return noise - x0


def flow_map_error(sampler: str, steps: int) -> float:
    """|error| of the sampled mean and std; the exact flow maps N(0,1) onto N(MU, SIGMA²)."""
    noise = torch.randn(200_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = integrate(gaussian_velocity, noise, sampler, steps)
    # The flow map is affine, so compare against the same noise pushed through the exact map.
    exact = MU + SIGMA * noise
    return (x - exact).abs().max().item()


def test_euler_recovers_the_gaussian():
    noise = torch.randn(200_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = integrate(gaussian_velocity, noise, "euler", 100)
    assert abs(x.mean().item() - MU) < 0.01 and abs(x.std().item() - SIGMA) < 0.01


def test_heun_needs_fewer_steps_than_euler():
    euler_32 = flow_map_error("euler", 32)
    heun_8 = flow_map_error("heun", 8)
    assert heun_8 < euler_32, (heun_8, euler_32)  # a quarter of the steps, half the model evaluations
    assert flow_map_error("euler", 64) < euler_32 < flow_map_error("euler", 8)


def test_trajectory_and_shift():
    traj = integrate(gaussian_velocity, torch.zeros(3, dtype=torch.float64), "euler", 5, return_trajectory=True)
    assert traj.shape == (6, 3)
    plain, shifted = timesteps(4), timesteps(4, shift=3.0)
    assert plain[0] == shifted[0] == 1.0 and plain[-1] == shifted[-1] == 0.0
    assert all(s > p for s, p in zip(shifted[1:-1], plain[1:-1]))  # more time spent at high noise


@pytest.mark.parametrize("prediction", list(PARAMETERIZATIONS))
def test_parameterisations_decompose_their_own_target(prediction):
    flow = RectifiedFlow(FlowConfig(prediction=prediction))
    x0, noise = torch.randn(6, 4, 8, 8), torch.randn(6, 4, 8, 8)
    t = torch.linspace(0.05, 0.95, 6)
    x_t = interpolate(x0, noise, t)
    target = flow.param.target(x0, noise)
    got_x0, got_noise = flow.split(target, x_t, t)
    torch.testing.assert_close(got_x0, x0, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got_noise, noise, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(flow.velocity(target, x_t, t), noise - x0, atol=1e-5, rtol=1e-4)


def test_time_sampling_distributions():
    g = torch.Generator().manual_seed(0)
    for kind in ("uniform", "logit_normal", "mode"):
        t = sample_time(50_000, FlowConfig(time_sampling=kind, logit_mean=0.0), g)
        assert t.min() >= 0 and t.max() <= 1, kind
        assert abs(t.median().item() - 0.5) < 0.02, kind  # all three are symmetric about 1/2 unshifted
    shifted = sample_time(50_000, FlowConfig(time_sampling="logit_normal", logit_mean=1.0), g)
    assert shifted.mean() > 0.6
    # logit-normal puts less mass at the ends than uniform
    ends = lambda t: ((t < 0.05) | (t > 0.95)).float().mean().item()  # noqa: E731
    assert ends(sample_time(50_000, FlowConfig(time_sampling="logit_normal"), g)) < ends(
        sample_time(50_000, FlowConfig(time_sampling="uniform"), g)
    )


def test_cfg_scale_one_is_the_conditional_prediction_and_batching_is_exact():
    model = randomise(MMDiT(tiny_model_config()))
    flow = RectifiedFlow(FlowConfig())
    cond, null = random_conditioning(3, seed=1), random_conditioning(1, seed=2)
    x = torch.randn(3, 4, 8, 8)
    tt = torch.full((3,), 0.7)
    with torch.no_grad():
        v_cond = flow.velocity(model(x, tt, cond.text, cond.mask, cond.pooled), x, tt)
        null3 = null.expand(3)
        v_null = flow.velocity(model(x, tt, null3.text, null3.mask, null3.pooled), x, tt)
        torch.testing.assert_close(guided_velocity(model, flow, x, 0.7, cond, null, 1.0), v_cond)
        torch.testing.assert_close(
            guided_velocity(model, flow, x, 0.7, cond, null, 4.0),
            v_null + 4.0 * (v_cond - v_null),
            atol=2e-4,
            rtol=1e-4,
        )


def test_cfg_dropout_rate_matches_config():
    seen = []

    def recorder(x, t, text, mask, pooled):
        seen.append(text[:, 0, 0].clone())
        return torch.zeros_like(x, requires_grad=True)

    flow = RectifiedFlow(FlowConfig(cfg_dropout=0.3))
    cond = Conditioning(torch.ones(500, 2, 3), torch.ones(500, 2, dtype=torch.bool), torch.ones(500, 3))
    null = Conditioning(torch.zeros(1, 2, 3), torch.ones(1, 2, dtype=torch.bool), torch.zeros(1, 3))
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        flow.loss(recorder, torch.randn(500, 1, 2, 2), cond, null, g)
    rate = (torch.cat(seen) == 0).float().mean().item()
    assert abs(rate - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 10_000)


def test_image_loss_needs_and_uses_the_decoder():
    with pytest.raises(ValueError, match="decoder"):
        RectifiedFlow(FlowConfig(loss_space="image"))
    calls = []

    def decode(z):
        calls.append(z.shape)
        return z.repeat_interleave(2, dim=-1)  # a stand-in decoder that upsamples width

    model = MMDiT(tiny_model_config())
    flow = RectifiedFlow(FlowConfig(loss_space="image"), decode=decode)
    loss = flow.per_sample_loss(
        model, torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.full((2,), 0.5), random_conditioning(2)
    )
    assert loss.shape == (2,) and calls == [(2, 4, 8, 8)] * 2  # target and prediction both decoded


def test_generate_shapes_and_determinism():
    model = randomise(MMDiT(tiny_model_config()))
    flow = RectifiedFlow(FlowConfig())
    cond, null = random_conditioning(2), random_conditioning(1, seed=3)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cfg = SampleConfig(steps=3, sampler="heun", cfg_scale=2.0)
    a = generate(model, flow, noise, cond, null, cfg)
    b = generate(model, flow, noise, cond, null, cfg, return_trajectory=True)
    assert a.shape == noise.shape and b.shape == (4, 2, 4, 8, 8)
    torch.testing.assert_close(a, b[-1])
