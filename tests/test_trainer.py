"""The framework-free trainer: non-finite steps never reach the weights, and the full state resumes exactly."""

import pytest
import torch
from conftest import random_conditioning

from mmdit_core.autoencoder import Autoencoder, build_vae
from mmdit_core.config import AutoencoderConfig, build_config
from mmdit_core.data.scenes import make_scene, render
from mmdit_core.data.shards import ShardStream, StreamPosition, collate, encode_sample, split_shards, write_dataset
from mmdit_core.flow import RectifiedFlow
from mmdit_core.model import MMDiT
from mmdit_core.trainer import NonFiniteError, Trainer


def make_trainer(max_nonfinite=2, seed=0, rank=0, compile="none"):
    cfg = build_config(
        {
            "model": {"width": 32, "depth": 2, "num_heads": 2, "patch_size": 2},
            "data": {"image_size": 8, "channels": 4},
            "text": {"dim": 16},
            "train": {"max_nonfinite": max_nonfinite, "seed": seed, "warmup_steps": 2, "compile": compile},
        }
    )
    torch.manual_seed(0)
    model = MMDiT(cfg.model)
    return Trainer(cfg, model, RectifiedFlow(cfg.flow), random_conditioning(1, seed=9), rank=rank)


def snapshot(trainer):
    return (
        {k: v.clone() for k, v in trainer.module.state_dict().items()},
        {k: v.clone() for k, v in trainer.ema.tensors().items()},
    )


def batch(seed, valid=None):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 4, 8, 8, generator=g), random_conditioning(4, seed=seed, valid=valid)


@pytest.mark.slow  # about 2 minutes when inductor's kernel cache is cold
def test_compiled_training_steps_match_eager_and_keep_parameter_names():
    """train.compile=inductor: the same updates (text lengths vary, so the trimmed shapes do too), eager
    validation, and a state dict a checkpoint of an eager run can load."""
    eager, compiled = make_trainer(), make_trainer(compile="inductor")
    for trainer in (eager, compiled):
        for i, valid in enumerate((5, 2, 4, 3)):
            trainer.train_step(*batch(i, valid))
    weights, compiled_weights = snapshot(eager)[0], snapshot(compiled)[0]
    assert weights.keys() == compiled_weights.keys()
    for name in weights:
        torch.testing.assert_close(compiled_weights[name], weights[name], atol=1e-5, rtol=1e-4)
    assert compiled.module is not compiled.model and type(compiled.module) is MMDiT
    x0, cond = batch(9)
    assert compiled.validation_loss(x0, cond) == pytest.approx(eager.validation_loss(x0, cond), rel=1e-4)


def test_nonfinite_step_leaves_weights_and_ema_untouched_then_fails_naming_step_and_quantity():
    trainer = make_trainer(max_nonfinite=2)
    trainer.train_step(*batch(1))
    weights, ema = snapshot(trainer)
    optimizer_steps = trainer.optimizer.state[next(iter(trainer.module.parameters()))]["step"].item()
    x0, cond = batch(2)
    metrics = trainer.train_step(torch.full_like(x0, float("nan")), cond)
    assert metrics["skipped"] == 1.0 and trainer.skipped_steps == 1
    after_weights, after_ema = snapshot(trainer)
    assert all(torch.equal(weights[k], after_weights[k]) for k in weights)
    assert all(torch.equal(ema[k], after_ema[k]) for k in ema)
    assert trainer.optimizer.state[next(iter(trainer.module.parameters()))]["step"].item() == optimizer_steps
    assert all(p.grad is None for p in trainer.module.parameters())
    trainer.train_step(*batch(3))  # a finite step resets the count
    assert trainer.nonfinite_in_a_row == 0
    trainer.train_step(torch.full_like(x0, float("inf")), cond)
    with pytest.raises(NonFiniteError, match=r"step 5: non-finite loss and grad norm .* 2 steps in a row"):
        trainer.train_step(torch.full_like(x0, float("nan")), cond)


def test_save_and_restore_continue_exactly(tmp_path):
    straight = make_trainer()
    for i in range(6):
        straight.train_step(*batch(i))

    first = make_trainer()
    for i in range(3):
        first.train_step(*batch(i))
    first.data_position = {"next_index": [12], "turn": 0}
    first.save(tmp_path / "ckpt", [first.rank_state()])
    torch.manual_seed(123)  # disturb the global RNG: restore must put it back

    resumed = make_trainer(seed=5)  # a different seed too: everything comes from the checkpoint
    resumed.restore(tmp_path / "ckpt")
    assert resumed.step == 3 and resumed.data_position == {"next_index": [12], "turn": 0}
    for i in range(3, 6):
        resumed.train_step(*batch(i))
    for name, value in straight.module.state_dict().items():
        torch.testing.assert_close(resumed.module.state_dict()[name], value, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="written by 1 ranks"):
        make_trainer().restore(tmp_path / "ckpt", rank=1)


def test_ranks_draw_different_noise():
    a, b = make_trainer(rank=0), make_trainer(rank=1)
    assert not torch.equal(torch.randn(8, generator=a.generator), torch.randn(8, generator=b.generator))


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_position_resumes_the_same_batches(tmp_path, workers):
    samples = (encode_sample(f"{i:04d}", render(make_scene(0, i), 8), f"scene {i}") for i in range(40))
    write_dataset(tmp_path / "ds", {"train": samples}, 8, {})
    urls = split_shards(tmp_path / "ds", "train")

    def loader(position):
        stream = ShardStream(urls, resampled=True, shuffle=8, seed=3, **position.stream_args())
        return torch.utils.data.DataLoader(stream, batch_size=4, num_workers=workers, collate_fn=collate)

    position = StreamPosition.start(workers)
    straight = []
    for b in loader(position):
        position.advance(b)
        straight.append(b["key"])
        if len(straight) == 9:
            break
    position = StreamPosition.start(workers)
    for b, _ in zip(loader(position), range(5)):
        position.advance(b)
    resumed = StreamPosition(**position.to_dict())
    continued = [b["key"] for b, _ in zip(loader(resumed), range(4))]
    assert continued == straight[5:]


def test_image_space_loss_backpropagates_through_the_frozen_decoder_and_never_updates_it():
    """flow.loss_space=image: MSE between decoded predicted x0 and decoded x0; the gradient reaches the
    MMDiT through the decoder, whose weights get no gradient and stay as they were."""
    ae_cfg = AutoencoderConfig(kind="trained", latent_channels=4, factor=2, block_out_channels=[8, 8])
    torch.manual_seed(1)
    autoencoder = Autoencoder(ae_cfg, build_vae(ae_cfg))
    decoder = {k: v.clone() for k, v in autoencoder.vae.state_dict().items()}
    cfg = build_config(
        {
            "model": {"width": 32, "depth": 2, "num_heads": 2, "patch_size": 2},
            "data": {"image_size": 16},
            "autoencoder": ae_cfg.model_dump(),
            "text": {"dim": 16},
            "flow": {"loss_space": "image", "cfg_dropout": 0.0},
            "train": {"warmup_steps": 1},
        }
    )
    torch.manual_seed(0)
    model = MMDiT(cfg.model)
    flow = RectifiedFlow(cfg.flow, decode=autoencoder.decode)
    trainer = Trainer(cfg, model, flow, random_conditioning(1, seed=9))
    x0, cond = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(3)), random_conditioning(4, seed=3)
    noise, t = torch.randn_like(x0), torch.rand(4)
    loss = flow.per_sample_loss(model, x0, noise, t, cond).mean()  # by hand: decode both x0s, MSE in pixels
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
    predicted_x0 = x_t - t.view(-1, 1, 1, 1) * model(x_t, t, cond.text, cond.mask, cond.pooled)
    expected = ((autoencoder.decode(predicted_x0) - autoencoder.decode(x0)) ** 2).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert model.final.linear.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in autoencoder.parameters())
    model.zero_grad(set_to_none=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(2):
        trainer.train_step(x0, cond)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(decoder[k], v) for k, v in autoencoder.vae.state_dict().items())
