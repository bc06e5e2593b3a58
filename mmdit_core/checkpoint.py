"""Checkpoints: a directory that appears complete or not at all.

    model.safetensors   weights; the resolved config YAML rides in its metadata
    ema.safetensors     averaged weights (when an EMA is saved)
    state.pt            step, optimizer, scheduler, EMA counters, every RNG, caller extras;
                        plain tensors and containers only, read with torch.load(weights_only=True)
    config.yaml         the resolved config, for people
    manifest.json       size and sha256 of every file, checked before anything is loaded

Everything is written into a temporary sibling directory which replaces the checkpoint whole at the
end (files.atomic_directory), so a crash mid-write never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .config import ExperimentConfig, build_config
from .ema import EMA
from .errors import InputError
from .files import atomic_directory, sha256_file

FILES = ("model.safetensors", "ema.safetensors", "state.pt", "config.yaml")


class CheckpointError(InputError, RuntimeError):
    """A checkpoint that is missing, incomplete or corrupt."""


@dataclass
class Checkpoint:
    path: Path
    config: ExperimentConfig
    step: int
    extra: dict[str, Any] = field(default_factory=dict)


# ---- RNG state as weights_only-loadable data ---------------------------------------------------


def rng_state() -> dict[str, Any]:
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(mt), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- save / load --------------------------------------------------------------------------------


def _cpu_contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def save_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    config: ExperimentConfig,
    step: int,
    ema: EMA | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint directory atomically (replacing one already at `path`)."""
    path = Path(path)
    with atomic_directory(path) as tmp:
        config_yaml = config.to_yaml()
        metadata = {"config": config_yaml, "step": str(step)}
        save_file(_cpu_contiguous(model.state_dict()), tmp / "model.safetensors", metadata=metadata)
        if ema is not None:
            save_file(_cpu_contiguous(ema.tensors()), tmp / "ema.safetensors", metadata=metadata)
        state = {
            "step": step,
            "extra": extra or {},
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "ema_updates": ema.num_updates if ema is not None else None,
        }
        torch.save(state, tmp / "state.pt")
        (tmp / "config.yaml").write_text(config_yaml)
        manifest = {
            name: {"bytes": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)}
            for name in FILES
            if (tmp / name).exists()
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        for name in [*manifest, "manifest.json"]:
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
    return path


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Check every file against the manifest; raise CheckpointError naming the first bad one."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path} is incomplete or corrupt: unreadable manifest.json ({exc})") from None
    for name, expected in manifest.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(
                f"checkpoint {path} is corrupt: {name} has {size} bytes, expected {expected['bytes']} (truncated?)"
            )
        if sha256_file(file) != expected["sha256"]:
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} fails its sha256 check")
    return manifest


def read_config(path: str | Path) -> ExperimentConfig:
    """The resolved config stored inside a checkpoint's weights file (one written before model.pooled_dim
    was derived from text.dim still loads: the field is dropped)."""
    path = Path(path)
    try:
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            tree = yaml.safe_load(f.metadata()["config"])
    except (OSError, SafetensorError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path}: cannot read the config from model.safetensors ({exc})") from None
    tree.get("model", {}).pop("pooled_dim", None)
    return build_config(tree)


def load_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    ema: EMA | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    weights: str = "model",
) -> Checkpoint:
    """Restore whatever is passed in from a verified checkpoint.

    weights="ema" loads the averaged weights into `model` (for sampling and evaluation).
    """
    path = Path(path)
    manifest = verify_checkpoint(path)
    weights_file = f"{weights}.safetensors"
    if weights_file not in manifest or (ema is not None and "ema.safetensors" not in manifest):
        raise CheckpointError(f"checkpoint {path} holds no {'ema' if ema is not None else weights} weights")
    try:
        model.load_state_dict(load_file(path / weights_file))
        state = torch.load(path / "state.pt", weights_only=True)
        if ema is not None:
            ema.load_tensors(load_file(path / "ema.safetensors"), state["ema_updates"])
    except (SafetensorError, RuntimeError, EOFError, KeyError) as exc:
        raise CheckpointError(f"checkpoint {path} cannot be loaded: {exc}") from None
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    return Checkpoint(path=path, config=read_config(path), step=state["step"], extra=state["extra"])
