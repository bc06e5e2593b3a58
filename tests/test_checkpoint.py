import random

import numpy as np
import pytest
import torch
from conftest import random_conditioning

from mmdit_core import checkpoint as ckpt
from mmdit_core.checkpoint import (
    CheckpointError,
    load_checkpoint,
    read_config,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from mmdit_core.config import build_config
from mmdit_core.ema import EMA
from mmdit_core.flow import RectifiedFlow
from mmdit_core.model import MMDiT
from mmdit_core.trainer import Trainer


def make_trainer(seed=0):
    cfg = build_config(
        {"name": "ck"},
        [
            "model.width=32",
            "model.depth=2",
            "model.num_heads=2",
            "data.image_size=8",
            "text.dim=16",
            "train.warmup_steps=3",
        ],
    )
    torch.manual_seed(seed)
    model = MMDiT(cfg.model)
    return cfg, Trainer(cfg, model, RectifiedFlow(cfg.flow), random_conditioning(1, seed=9))


def train_a_little(trainer, steps=4):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        trainer.train_step(torch.randn(4, 3, 8, 8, generator=g), random_conditioning(4))


def test_round_trip_restores_everything_bit_identically(tmp_path):
    cfg, trainer = make_trainer()
    train_a_little(trainer)
    random.seed(5), np.random.seed(6), torch.manual_seed(7)
    save_checkpoint(
        tmp_path / "c",
        model=trainer.model,
        config=cfg,
        step=trainer.step,
        ema=trainer.ema,
        optimizer=trainer.optimizer,
        scheduler=trainer.scheduler,
        extra={"data_position": 123, "rng": rng_state()},
    )
    expected_draws = (random.random(), np.random.rand(), torch.rand(3))

    _, fresh = make_trainer(seed=1)
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    info = load_checkpoint(
        tmp_path / "c", model=fresh.model, ema=fresh.ema, optimizer=fresh.optimizer, scheduler=fresh.scheduler
    )
    set_rng_state(info.extra["rng"])  # RNG states travel as weights_only-loadable data
    assert (random.random(), np.random.rand()) == expected_draws[:2] and torch.equal(torch.rand(3), expected_draws[2])
    assert info.step == 4 and info.extra["data_position"] == 123 and info.config == cfg
    for a, b in zip(trainer.model.state_dict().values(), fresh.model.state_dict().values()):
        assert torch.equal(a, b)
    for name, tensor in trainer.ema.tensors().items():
        assert torch.equal(tensor, fresh.ema.tensors()[name])
    assert fresh.ema.num_updates == trainer.ema.num_updates
    assert fresh.scheduler.state_dict() == trainer.scheduler.state_dict()
    state_a, state_b = trainer.optimizer.state_dict(), fresh.optimizer.state_dict()
    assert state_a["param_groups"] == state_b["param_groups"]
    for k in state_a["state"]:
        for field in state_a["state"][k]:
            assert torch.equal(state_a["state"][k][field], state_b["state"][k][field])
    # Continuing both gives the same next step.
    fresh.step = trainer.step
    fresh.generator.set_state(trainer.generator.get_state())
    train_a_little(trainer, 1), train_a_little(fresh, 1)
    for a, b in zip(trainer.model.parameters(), fresh.model.parameters()):
        assert torch.equal(a, b)


def test_ema_weights_load_into_the_model(tmp_path):
    cfg, trainer = make_trainer()
    train_a_little(trainer)
    save_checkpoint(tmp_path / "c", model=trainer.model, config=cfg, step=4, ema=trainer.ema)
    model = MMDiT(read_config(tmp_path / "c").model)
    load_checkpoint(tmp_path / "c", model=model, weights="ema")
    for name, p in model.named_parameters():
        assert torch.equal(p, trainer.ema.tensors()[name])


def test_ema_warm_up_and_swap():
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, decay=0.99)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update()  # first update: decay 0, the average is the weights
    assert torch.allclose(ema.tensors()["weight"], model.weight)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema.update()  # second update: decay (1 + 1) / (10 + 1)
    assert torch.allclose(ema.tensors()["weight"], torch.full((2, 2), 2 / 11))
    with ema.applied():
        assert torch.allclose(model.weight, torch.full((2, 2), 2 / 11))
    assert torch.equal(model.weight, torch.zeros(2, 2))


@pytest.mark.parametrize("victim", ["model.safetensors", "state.pt"])
def test_truncated_file_is_reported_corrupt(tmp_path, victim):
    cfg, trainer = make_trainer()
    save_checkpoint(
        tmp_path / "c", model=trainer.model, config=cfg, step=0, ema=trainer.ema, optimizer=trainer.optimizer
    )
    data = (tmp_path / "c" / victim).read_bytes()
    (tmp_path / "c" / victim).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"corrupt: {victim}.*truncated"):
        load_checkpoint(tmp_path / "c", model=trainer.model)


def test_flipped_byte_and_missing_pieces_are_reported(tmp_path):
    cfg, trainer = make_trainer()
    save_checkpoint(tmp_path / "c", model=trainer.model, config=cfg, step=0)
    data = bytearray((tmp_path / "c" / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "c" / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(tmp_path / "c", model=trainer.model)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere", model=trainer.model)
    with pytest.raises(CheckpointError, match="no ema weights"):
        save_checkpoint(tmp_path / "d", model=trainer.model, config=cfg, step=0)
        load_checkpoint(tmp_path / "d", model=trainer.model, weights="ema")


def test_failed_write_leaves_nothing_and_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    cfg, trainer = make_trainer()
    save_checkpoint(tmp_path / "c", model=trainer.model, config=cfg, step=1)

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "c", model=trainer.model, config=cfg, step=2)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "new", model=trainer.model, config=cfg, step=2)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    assert load_checkpoint(tmp_path / "c", model=trainer.model).step == 1
    save_checkpoint(tmp_path / "c", model=trainer.model, config=cfg, step=3)  # overwrite in place
    assert load_checkpoint(tmp_path / "c", model=trainer.model).step == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
