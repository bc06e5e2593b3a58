import os

# Offline, quiet, local-only: the test environment the project promises.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")

import tempfile  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from mmdit_core.config import DataConfig, ModelConfig  # noqa: E402
from mmdit_core.data.images import to_tensor  # noqa: E402
from mmdit_core.data.scenes import Scene, make_scene, render, split_indices  # noqa: E402
from mmdit_core.flow import Conditioning  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


def tiny_model_config(**overrides) -> ModelConfig:
    fields = dict(width=32, depth=2, num_heads=2, patch_size=2, input_size=8, in_channels=4, text_dim=16)
    return ModelConfig(**(fields | overrides))


def random_conditioning(
    batch: int, length: int = 5, dim: int = 16, valid: int | None = None, seed: int = 0
) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.bool)
    if valid is not None:
        mask[:, valid:] = False
    return Conditioning(torch.randn(batch, length, dim, generator=g), mask, torch.randn(batch, dim, generator=g))


def tiny_clip_config(vocab_size: int, **text):
    """A CLIP of one 16-wide layer per tower (32×32 images in 2×2 patches): fast to build and save."""
    from transformers import CLIPConfig

    tower = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    return CLIPConfig(
        text_config={**tower, "vocab_size": vocab_size, **text},
        vision_config={**tower, "image_size": 32, "patch_size": 16},
        projection_dim=8,
    )


def render_split(cfg: DataConfig, split: str) -> tuple[torch.Tensor, list[str], list[Scene]]:
    """A whole split of scenes rendered in memory: images (N, 3, S, S) in [-1, 1], captions, scenes."""
    scenes = [
        make_scene(cfg.seed, i, cfg.min_objects, cfg.max_objects, cfg.background) for i in split_indices(cfg, split)
    ]
    images = torch.stack([to_tensor(render(s, cfg.image_size)) for s in scenes])
    return images, [s.caption for s in scenes], scenes


@pytest.fixture
def tiny_cfg():
    return tiny_model_config


@pytest.fixture(scope="module")
def local_ray():
    """Ray in this process as the project starts it, with 2 CPUs, shut down after the module's tests."""
    import ray

    from experiments.cluster import start_ray

    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths have a length limit
    start_ray(None, num_cpus=2, _temp_dir=temp, configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()
