"""One Ray Train worker's training loop (`RankLoop`), and what rank 0 adds to it (`RankZero`: tracking,
the per-step metrics file, validation, quick evals, sample grids, the run's summary).

Every rank builds the same model from the same seed, restores the same checkpoint, reads its own share
of the data from its saved reader position, and takes part in the collectives (the logged loss, the
checkpoint's rank states); only rank 0 writes files and talks to MLflow.
"""

from __future__ import annotations

import json
import math
import os
import platform
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from eval.figures import loss_curve, sample_grid, trajectory_strip
from mmdit_core.autoencoder import Autoencoder
from mmdit_core.config import ExperimentConfig
from mmdit_core.data.training import TrainingData, validation_set
from mmdit_core.flow import RectifiedFlow, generate
from mmdit_core.model import MMDiT
from mmdit_core.text import TextEncoder
from mmdit_core.timing import Phases
from mmdit_core.trainer import Trainer

from .tracking import Tracker

PHASES_FILE = "phases.json"  # rank 0's wall seconds by phase in the run's last attempt, read by the driver


@dataclass
class Faults:
    """Fault drills (for tests, and for checking a cluster's recovery): kill rank 0's worker process
    once when it reaches a step; feed NaN inputs from a step on."""

    kill_at_step: int | None = None
    nan_from_step: int | None = None

    def inject(self, step: int, x0: torch.Tensor, rank: int, run_dir: Path) -> None:
        if self.nan_from_step is not None and step >= self.nan_from_step:
            x0.fill_(float("nan"))
        marker = run_dir / f"killed_at_{step}"  # once per run: the restarted worker passes this step
        if self.kill_at_step == step and rank == 0 and not marker.exists():
            marker.touch()
            print(f"fault drill: killing rank 0's worker process at step {step}", flush=True)
            os._exit(1)


@dataclass
class Launch:
    """What the driver hands every rank."""

    config: str  # resolved config, YAML
    run_name: str
    run_dir: str  # absolute local directory of the run's outputs
    tracking_uri: str
    faults: dict[str, Any]


def gather(obj: Any) -> list[Any]:
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def mean_over_ranks(value: float) -> float:
    values = gather(value)
    return sum(values) / len(values)


class Throughput:
    """Training images per second between log steps, with the time of validation, checkpoints and quick
    evals (`paused()`) left out, and every training step's time and images counted."""

    def __init__(self):
        self.seconds, self.images, self.since = 0.0, 0, time.perf_counter()

    def add(self, images: int) -> None:
        self.images += images

    @contextmanager
    def paused(self):
        self.seconds += time.perf_counter() - self.since
        try:
            yield
        finally:
            self.since = time.perf_counter()

    def rate(self) -> float:
        """Images per second since the last call."""
        now = time.perf_counter()
        seconds, images = self.seconds + now - self.since, self.images
        self.seconds, self.images, self.since = 0.0, 0, now
        return images / seconds


class MetricsFile:
    """metrics.jsonl: one line per training step (rank 0's loss, grad norm, lr, skipped)."""

    def __init__(self, path: Path, resumed_at: int):
        self.path = path
        if path.exists():  # after a restart, the steps past the checkpoint are run again: drop their lines
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= resumed_at]
            path.write_text("".join(f"{line}\n" for line in kept))

    def append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.path.read_text().splitlines()]


class RankZero:
    """What rank 0 does beside training: the MLflow run, metrics.jsonl, the validation loss, quick evals,
    sample grids for held-out captions, and at the end the denoising strip, loss curve and summary."""

    def __init__(self, loop: RankLoop):
        self.loop, cfg = loop, loop.cfg
        self.tracker = Tracker(
            loop.launch.tracking_uri, cfg.name, loop.launch.run_name, backlog=loop.run_dir / "tracking_backlog.jsonl"
        )
        self.val_x0, self.val_cond, self.val_captions = validation_set(
            cfg, loop.autoencoder, loop.encoder, cfg.eval.val_loss_samples
        )
        self.metrics = MetricsFile(loop.run_dir / "metrics.jsonl", loop.trainer.step)
        self.val_by_t: dict[float, float] | None = None  # of the last checkpoint (always at the final step)
        self.evaluator = None  # eval.evaluator.Evaluator, built at the first quick eval (eval.every)
        self.system_metrics = None  # MLflow's SystemMetricsMonitor (train.system_metrics_s), once the run is known
        self.tracker.set_tags({"rank0_node": platform.node()})  # also finds the run now, for the monitor
        if cfg.train.system_metrics_s and find_spec("psutil") is not None:
            threading.Thread(target=self.watch_system, name="watch-system", daemon=True).start()

    def watch_system(self) -> None:
        """Start MLflow's CPU, memory and disk sampler on this run as soon as the tracker has found the run
        (in this thread: training never waits on the tracking server). It samples in its own thread; its
        cost is measured in docs/performance.md."""
        if not self.tracker.wait_ready(600):
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self.system_metrics = SystemMetricsMonitor(
            self.tracker.result.run_id,
            sampling_interval=self.loop.cfg.train.system_metrics_s,
            resume_logging=True,  # a resumed run continues its system/* steps
            tracking_uri=self.loop.launch.tracking_uri,
        )
        self.system_metrics.start()

    def log_train(self, step: int, loss: float, metrics: dict[str, float], img_per_s: float) -> None:
        trainer = self.loop.trainer
        self.tracker.log_metrics(
            {
                "train/loss": loss,
                "train/grad_norm": metrics["grad_norm"],
                "train/lr": metrics["lr"],
                "train/img_per_s": img_per_s,
                "train/skipped_steps": trainer.skipped_steps,
            },
            step,
        )
        print(f"step {step}: loss {loss:.4f}  grad norm {metrics['grad_norm']:.3f}  {img_per_s:.0f} img/s", flush=True)

    def validate(self, step: int) -> dict[str, float]:
        self.val_by_t = val = self.loop.trainer.validation_loss(self.val_x0, self.val_cond)
        metrics = {f"val/loss_t{t:.3f}": v for t, v in val.items()}
        metrics["val/loss"] = sum(val.values()) / len(val)
        self.tracker.log_metrics(metrics, step)
        return metrics

    def quick_eval(self, step: int) -> None:
        """FID, KID and adherence of eval.train_samples samples at the config's sampling settings."""
        from eval.evaluator import Evaluator, Setting  # torchmetrics, CLIP, Inception: loaded only when used

        loop = self.loop
        if self.evaluator is None:
            self.evaluator = Evaluator(
                loop.cfg, loop.autoencoder, loop.encoder, loop.device, loop.cfg.eval.train_samples, verbose=False
            )
            self.tracker.set_tags({"clip_model": self.evaluator.clip_name or "none"})
        # fork_rng: the eval must not shift the training's random streams (loader seeds draw from them)
        with (
            torch.random.fork_rng(devices=[]),
            loop.trainer.ema.applied() as model,
            tempfile.TemporaryDirectory() as tmp,
        ):
            metrics = self.evaluator.run(model, loop.flow, Setting.of(loop.cfg.sample), Path(tmp))
        self.tracker.log_metrics({f"eval/{k}": v for k, v in metrics.items()}, step)
        print(f"step {step}: quick eval " + "  ".join(f"{k} {v:.4g}" for k, v in metrics.items()), flush=True)

    @torch.no_grad()
    def samples(self, trajectory: bool = False) -> torch.Tensor:
        """Held-out captions sampled with the EMA weights and fixed noise: (steps+1, n, 3, H, W) or (n, 3, H, W)."""
        loop, cfg = self.loop, self.loop.cfg
        n = min(cfg.train.num_grid_samples, len(self.val_captions))
        noise = torch.randn((n, *self.val_x0.shape[1:]), generator=torch.Generator().manual_seed(cfg.sample.seed))
        with loop.trainer.ema.applied() as model:
            out = generate(
                model.eval(),
                loop.flow,
                noise.to(loop.device),
                self.val_cond[:n].to(loop.device),
                loop.trainer.null,
                cfg.sample,
                return_trajectory=trajectory,
            )
        frames = out if trajectory else out[None]
        pixels = torch.stack([loop.autoencoder.decode(frame).clamp(-1, 1).cpu() for frame in frames])
        return pixels if trajectory else pixels[0]

    def save_grid(self, step: int, images: torch.Tensor) -> Path:
        path = self.loop.run_dir / "samples" / f"step_{step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        sample_grid(images, self.val_captions[: len(images)]).save(path)
        self.tracker.log_artifact(path, "samples")
        return path

    def finish(self) -> None:
        """At the last step: the final grid, a denoising strip, the loss curve, a summary."""
        loop = self.loop
        step, run_dir = loop.trainer.step, loop.run_dir
        frames = self.samples(trajectory=True)  # (steps+1, n, 3, H, W): the last frame is the grid
        grid = self.save_grid(step, frames[-1])
        strip = run_dir / "trajectory.png"
        trajectory_strip(frames[:, 0]).save(strip)
        records = self.metrics.records()
        # resubmitting a finished run trains no step, so no checkpoint validated in this attempt
        val = self.val_by_t or loop.trainer.validation_loss(self.val_x0, self.val_cond)
        curve = run_dir / "loss.png"
        loss_curve([r["step"] for r in records], [r["loss"] for r in records], curve, val)
        for path in (strip, curve):
            self.tracker.log_artifact(path)
        last = [r["loss"] for r in records[-loop.cfg.train.log_every :] if math.isfinite(r["loss"])]
        summary = {
            "run_name": loop.launch.run_name,
            "steps": step,
            "grid": str(grid),
            "train_loss_last": sum(last) / max(len(last), 1),
            "val_loss": sum(val.values()) / len(val),
            "val_loss_by_t": val,
            "skipped_steps": loop.trainer.skipped_steps,
            "data_skips": loop.data.counts.totals(),
        }
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))

    def close(self) -> None:
        if self.system_metrics is not None:
            self.system_metrics.finish()  # before the run ends: the monitor stops at a run that is not RUNNING
        print(self.tracker.close().summary())


class RankLoop:
    """The training loop of one Ray Train worker."""

    def __init__(self, launch: Launch, rank: int, world_size: int, device: torch.device):
        import ray.train.torch

        started, self.phases = time.perf_counter(), Phases()  # this attempt's wall time by phase
        self.cfg = cfg = ExperimentConfig.from_yaml(launch.config)
        self.launch, self.rank, self.world_size, self.device = launch, rank, world_size, device
        self.faults = Faults(**launch.faults)
        self.run_dir = Path(launch.run_dir)
        torch.set_num_threads(cfg.train.cpus_per_worker)
        self.autoencoder = Autoencoder.load(cfg.autoencoder).to(device)
        self.encoder = TextEncoder(cfg.text, device)
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank, in every attempt
        model = ray.train.torch.prepare_model(MMDiT(cfg.model))
        self.flow = RectifiedFlow(cfg.flow, decode=self.autoencoder.decode)
        self.trainer = Trainer(cfg, model, self.flow, self.encoder.null(cfg.flow.null_text), rank=rank)
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as path:
                self.trainer.restore(path, rank)
            print(f"rank {rank}: resumed at step {self.trainer.step} from {checkpoint.path}")
        self.data = TrainingData(
            cfg, self.autoencoder, self.encoder, rank=rank, world_size=world_size, position=self.trainer.data_position
        )
        self.rank_zero = RankZero(self) if rank == 0 else None
        self.phases.add("setup", time.perf_counter() - started)

    def run(self) -> None:
        cfg, trainer, zero = self.cfg, self.trainer, self.rank_zero
        window: list[float] = []
        throughput = Throughput()
        batches = iter(self.data)
        while trainer.step < cfg.train.steps:
            with self.phases("data"):
                x0, cond = next(batches)
            step = trainer.step + 1
            self.faults.inject(step, x0, self.rank, self.run_dir)
            with self.phases("steps"):
                metrics = trainer.train_step(x0, cond)
            window.append(metrics["loss"])
            throughput.add(cfg.train.batch_size * self.world_size)
            if zero:
                zero.metrics.append({"step": step, **metrics})
            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                loss = mean_over_ranks(sum(window) / len(window))  # collective: every rank takes part
                if zero:
                    zero.log_train(step, loss, metrics, throughput.rate())
                window = []
            if step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps:
                with throughput.paused(), self.phases("checkpoint"):  # validating and saving: not throughput
                    self.checkpoint(step, metrics)
            if cfg.eval.every and step % cfg.eval.every == 0 and zero:
                with throughput.paused(), self.phases("quick_eval"):
                    zero.quick_eval(step)
        if zero:
            with self.phases("finish"):
                zero.finish()
            (self.run_dir / PHASES_FILE).write_text(json.dumps(self.phases.as_metrics(""), indent=2))
        print(
            f"rank {self.rank}: done at step {trainer.step}; {self.data.counts.report()}; "
            f"{trainer.skipped_steps} non-finite steps skipped"
        )

    def checkpoint(self, step: int, metrics: dict[str, float]) -> None:
        """Every rank's state gathered, rank 0 validates (and draws a grid when sample_every says) and saves;
        Ray Train keeps the checkpoint."""
        import ray.train

        report = {"step": step, "loss": metrics["loss"]}
        self.trainer.data_position = self.data.position.to_dict()
        states = gather(self.trainer.rank_state())  # collective: every rank's RNGs and reader position
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if self.rank_zero:
                report.update(self.rank_zero.validate(step))
                every = self.cfg.train.sample_every
                if every and step % every == 0 and step != self.cfg.train.steps:
                    self.rank_zero.save_grid(step, self.rank_zero.samples())
                path = self.trainer.save(Path(tmp) / "checkpoint", states)
                checkpoint = ray.train.Checkpoint.from_directory(str(path))
            ray.train.report(report, checkpoint=checkpoint)

    def close(self) -> None:
        if self.rank_zero:
            self.rank_zero.close()
