"""Train an MMDiT with Ray Train (DDP over CPUs or GPUs), tracked in MLflow, resumable.

    python -m experiments.train --config C [--set k=v ...]                   # Ray inside this process
    ray job submit --working-dir . -- python -m experiments.train --config C # on a running cluster

The run name is deterministic (config name, hash of the resolved config, seed): submitting the same
config again continues that run from its last checkpoint, in the same MLflow run. A worker that dies
is restarted from the last checkpoint (train.max_failures times) with the same step, data position
and RNG states, so the resumed run matches an uninterrupted one. The driver sets the MLflow run's
final status: FINISHED, FAILED (with the error) or KILLED (SIGTERM, e.g. `ray job stop`).

Outputs in <train.storage_path>/<run name>/: Ray's checkpoint_* directories, metrics.jsonl (every
step), samples/ (grids for held-out captions), trajectory.png, loss.png, summary.json.
"""

from __future__ import annotations

import json
import math
import os
import signal
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mmdit_core.autoencoder import Autoencoder
from mmdit_core.config import ExperimentConfig
from mmdit_core.data.latents import StaleCacheError
from mmdit_core.data.shards import read_manifest
from mmdit_core.data.training import TrainingData, latent_cache_shards, validation_set
from mmdit_core.flow import RectifiedFlow, generate
from mmdit_core.model import MMDiT
from mmdit_core.text import TextEncoder
from mmdit_core.trainer import Trainer

from .cli import config_parser, resolve_config
from .cluster import start_ray
from .figures import loss_curve, sample_grid, trajectory_strip
from .tracking import Tracker, default_uri, git_commit


@dataclass
class Faults:
    """Fault drills (for tests, and for checking a cluster's recovery): kill rank 0's worker process
    once when it reaches a step; feed NaN inputs from a step on."""

    kill_at_step: int | None = None
    nan_from_step: int | None = None


@dataclass
class Launch:
    """What the driver hands every rank."""

    config: str  # resolved config, YAML
    run_name: str
    run_dir: str  # absolute local directory of the run's outputs
    tracking_uri: str
    faults: dict[str, Any]


class Killed(BaseException):
    """SIGTERM reached the driver (BaseException: no library's `except Exception` swallows it)."""


# ---- one rank ------------------------------------------------------------------------------------

def gather(obj: Any) -> list[Any]:
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def mean_over_ranks(value: float) -> float:
    values = gather(value)
    return sum(values) / len(values)


class RankLoop:
    """The training loop of one Ray Train worker; rank 0 also validates, samples, logs and saves."""

    def __init__(self, launch: Launch, rank: int, world_size: int, device: torch.device):
        import ray.train.torch

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
        self.trainer = Trainer(cfg, model, self.flow, self.encoder.null(), rank=rank)
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as path:
                self.trainer.restore(path, rank)
            print(f"rank {rank}: resumed at step {self.trainer.step} from {checkpoint.path}")
        self.data = TrainingData(cfg, self.autoencoder, self.encoder, rank=rank, world_size=world_size,
                                 position=self.trainer.data_position)
        self.tracker = None
        if rank == 0:
            self.tracker = Tracker(launch.tracking_uri, cfg.name, launch.run_name,
                                   backlog=self.run_dir / "tracking_backlog.jsonl")
            self.val_x0, self.val_cond, self.val_captions = validation_set(cfg, self.autoencoder, self.encoder,
                                                                           cfg.eval.val_loss_samples)
            self.metrics_file = self.run_dir / "metrics.jsonl"
            self._truncate_metrics(self.trainer.step)
            self.val_by_t: dict[float, float] | None = None  # of the last checkpoint (always at the final step)
            self.evaluator = None  # eval.evaluate.Evaluator, built at the first quick eval (eval.every)

    # ---- the loop ---------------------------------------------------------------------------------
    def run(self) -> None:
        cfg, trainer = self.cfg, self.trainer
        window: list[float] = []
        seconds, images = 0.0, 0
        started = time.perf_counter()
        batches = iter(self.data)
        while trainer.step < cfg.train.steps:
            x0, cond = next(batches)
            step = trainer.step + 1
            self._inject(step, x0)
            metrics = trainer.train_step(x0, cond)
            window.append(metrics["loss"])
            if self.rank == 0:
                self._append_metrics({"step": step, **metrics})
            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                seconds += time.perf_counter() - started
                images += len(window) * cfg.train.batch_size * self.world_size
                self._log_train(step, window, metrics, images / seconds)
                window, seconds, images = [], 0.0, 0
                started = time.perf_counter()
            if step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps:
                self._checkpoint(step, metrics)
                started = time.perf_counter()  # validation and saving are not training throughput
            if cfg.eval.every and step % cfg.eval.every == 0 and self.rank == 0:
                self._quick_eval(step)
                started = time.perf_counter()
        if self.rank == 0:
            self._finish()
        print(f"rank {self.rank}: done at step {trainer.step}; {self.data.counts.report()}; "
              f"{trainer.skipped_steps} non-finite steps skipped")

    def _inject(self, step: int, x0: torch.Tensor) -> None:
        if self.faults.nan_from_step is not None and step >= self.faults.nan_from_step:
            x0.fill_(float("nan"))
        marker = self.run_dir / f"killed_at_{step}"
        if self.faults.kill_at_step == step and self.rank == 0 and not marker.exists():
            marker.touch()
            print(f"fault drill: killing rank 0's worker process at step {step}", flush=True)
            os._exit(1)

    # ---- logging ------------------------------------------------------------------------------------
    def _truncate_metrics(self, step: int) -> None:
        """After a restart, drop per-step lines past the checkpoint: those steps are run again."""
        if self.metrics_file.exists():
            lines = [line for line in self.metrics_file.read_text().splitlines() if json.loads(line)["step"] <= step]
            self.metrics_file.write_text("".join(f"{line}\n" for line in lines))

    def _append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps(record) + "\n")

    def _log_train(self, step: int, window: list[float], metrics: dict[str, float], img_per_s: float) -> None:
        loss = mean_over_ranks(sum(window) / len(window))  # collective: every rank takes part
        if self.rank == 0:
            self.tracker.log_metrics({"train/loss": loss, "train/grad_norm": metrics["grad_norm"], "train/lr": metrics["lr"],
                                      "train/img_per_s": img_per_s, "train/skipped_steps": self.trainer.skipped_steps}, step)
            print(f"step {step}: loss {loss:.4f}  grad norm {metrics['grad_norm']:.3f}  {img_per_s:.0f} img/s", flush=True)

    def _validate(self, step: int) -> dict[str, float]:
        self.val_by_t = val = self.trainer.validation_loss(self.val_x0, self.val_cond)
        metrics = {f"val/loss_t{t:.3f}": v for t, v in val.items()}
        metrics["val/loss"] = sum(val.values()) / len(val)
        self.tracker.log_metrics(metrics, step)
        return metrics

    def _quick_eval(self, step: int) -> None:
        """FID, KID and adherence of eval.train_samples samples at the config's sampling settings (rank 0)."""
        from eval.evaluate import Evaluator, Setting  # torchmetrics, CLIP, Inception: loaded only when used

        if self.evaluator is None:
            self.evaluator = Evaluator(self.cfg, self.autoencoder, self.encoder, self.device, self.cfg.eval.train_samples, verbose=False)
            self.tracker.set_tags({"clip_model": self.evaluator.clip_name or "none"})
        # fork_rng: the eval must not shift the training's random streams (loader seeds draw from them)
        with torch.random.fork_rng(devices=[]), self.trainer.ema.applied() as model, tempfile.TemporaryDirectory() as tmp:
            metrics = self.evaluator.run(model, self.flow, Setting.of(self.cfg.sample), Path(tmp))
        self.tracker.log_metrics({f"eval/{k}": v for k, v in metrics.items()}, step)
        print(f"step {step}: quick eval " + "  ".join(f"{k} {v:.4g}" for k, v in metrics.items()), flush=True)

    @torch.no_grad()
    def _samples(self, trajectory: bool = False) -> torch.Tensor:
        """Held-out captions sampled with the EMA weights and fixed noise: (steps+1, n, 3, H, W) or (n, 3, H, W)."""
        n = min(self.cfg.train.num_grid_samples, len(self.val_captions))
        noise = torch.randn((n, *self.val_x0.shape[1:]), generator=torch.Generator().manual_seed(self.cfg.sample.seed))
        with self.trainer.ema.applied() as model:
            out = generate(model.eval(), self.flow, noise.to(self.device), self.val_cond[:n].to(self.device),
                           self.trainer.null, self.cfg.sample, return_trajectory=trajectory)
        frames = out if trajectory else out[None]
        pixels = torch.stack([self.autoencoder.decode(frame).clamp(-1, 1).cpu() for frame in frames])
        return pixels if trajectory else pixels[0]

    def _save_grid(self, step: int, images: torch.Tensor) -> Path:
        path = self.run_dir / "samples" / f"step_{step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        sample_grid(images, self.val_captions[:len(images)]).save(path)
        self.tracker.log_artifact(path, "samples")
        return path

    # ---- checkpoints --------------------------------------------------------------------------------
    def _checkpoint(self, step: int, metrics: dict[str, float]) -> None:
        import ray.train

        report = {"step": step, "loss": metrics["loss"]}
        self.trainer.data_position = self.data.position.to_dict()
        states = gather(self.trainer.rank_state())  # collective: every rank's RNGs and reader position
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if self.rank == 0:
                report.update(self._validate(step))
                every = self.cfg.train.sample_every
                if every and step % every == 0 and step != self.cfg.train.steps:
                    self._save_grid(step, self._samples())
                path = self.trainer.save(Path(tmp) / "checkpoint", states)
                checkpoint = ray.train.Checkpoint.from_directory(str(path))
            ray.train.report(report, checkpoint=checkpoint)

    def _finish(self) -> None:
        """Rank 0, at the last step: the final grid, a denoising strip, the loss curve, a summary."""
        step = self.trainer.step
        frames = self._samples(trajectory=True)  # (steps+1, n, 3, H, W): the last frame is the grid
        grid = self._save_grid(step, frames[-1])
        strip = self.run_dir / "trajectory.png"
        trajectory_strip(frames[:, 0]).save(strip)
        records = [json.loads(line) for line in self.metrics_file.read_text().splitlines()]
        # resubmitting a finished run trains no step, so no checkpoint validated in this attempt
        val = self.val_by_t or self.trainer.validation_loss(self.val_x0, self.val_cond)
        curve = self.run_dir / "loss.png"
        loss_curve([r["step"] for r in records], [r["loss"] for r in records], curve, val)
        for path in (strip, curve):
            self.tracker.log_artifact(path)
        last = [r["loss"] for r in records[-self.cfg.train.log_every:] if math.isfinite(r["loss"])]
        summary = {"run_name": self.launch.run_name, "steps": step, "grid": str(grid),
                   "train_loss_last": sum(last) / max(len(last), 1), "val_loss": sum(val.values()) / len(val),
                   "val_loss_by_t": val, "skipped_steps": self.trainer.skipped_steps, "data_skips": self.data.counts.totals()}
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))

    def close(self) -> None:
        if self.tracker is not None:
            print(self.tracker.close().summary())


def train_loop(launch: dict[str, Any]) -> None:
    """Ray Train's per-worker entry point."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    loop = RankLoop(Launch(**launch), context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device())
    try:
        loop.run()
    finally:
        loop.close()


# ---- the driver -----------------------------------------------------------------------------------

def check_inputs(cfg: ExperimentConfig) -> None:
    """Refuse, before Ray starts, a run whose data, autoencoder or latent cache is missing or stale."""
    try:
        read_manifest(cfg.data.root)
        Autoencoder.check_trained(cfg.autoencoder)
        if cfg.data.latent_cache:
            latent_cache_shards(cfg)
    except (FileNotFoundError, StaleCacheError) as exc:
        raise SystemExit(f"error: {exc}") from None


def fit_interruptibly(trainer):
    """trainer.fit() in a helper thread: Ray's blocking wait in the main thread would hold off the
    SIGTERM handler until training ended; joining in short slices lets it run at once."""
    outcome: dict[str, Any] = {}

    def target():
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # handed to the main thread below
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def storage_location(cfg: ExperimentConfig) -> tuple[str, Path]:
    """(Ray storage path or URI, local directory for this process's outputs)."""
    storage = cfg.train.storage_path
    if "://" in storage:
        return storage, Path("outputs/runs").resolve()
    return str(Path(storage).resolve()), Path(storage).resolve()


def fit(cfg: ExperimentConfig, *, tracking_uri: str | None = None, address: str | None = None,
        faults: Faults | None = None, tags: dict[str, str] | None = None) -> dict[str, Any]:
    """Run (or resume) the training run of `cfg` and return its summary; the MLflow status is set here.
    `tags` go on the MLflow run when it is created (a sweep passes its parent run and the trial's arms)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    check_inputs(cfg)
    name = cfg.run_name()
    storage, outputs = storage_location(cfg)
    run_dir = outputs / name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    uri = tracking_uri or default_uri()
    tracker = Tracker(uri, cfg.name, name, backlog=run_dir / "tracking_backlog.jsonl",
                      tags={"git_commit": git_commit(), "config": cfg.name, "seed": str(cfg.train.seed), **(tags or {})})
    tracker.set_status("RUNNING")
    tracker.log_params(cfg.to_flat())
    tracker.log_artifact(run_dir / "config.yaml")
    if not tracker.wait_ready(15):  # the workers' tracker then finds this run instead of making a twin
        print(f"warning: MLflow at {uri} does not answer; training goes on and tracking calls are retried")
    launch = Launch(cfg.to_yaml(), name, str(run_dir), uri, asdict(faults or Faults()))

    def terminate(signum, frame):
        raise Killed()

    # Workers keep the driver's (or the job's) working directory, so relative data paths mean the same there.
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    # Train's print patch sends a worker's print both to its stdout and through its logger: every line twice
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    status, error, summary = "FAILED", None, {"run_name": name}
    # Signal handlers belong to the main thread; a Ray Tune trial runs fit() in another one (Tune handles its stop).
    handles_sigterm = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM)
    try:
        start_ray(address)
        if handles_sigterm:
            previous = signal.signal(signal.SIGTERM, terminate)  # after ray.init, which installs its own
        resources = {"CPU": cfg.train.cpus_per_worker, **({"GPU": 1} if cfg.train.use_gpu else {})}
        trainer = TorchTrainer(
            train_loop, train_loop_config=asdict(launch),
            scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                         resources_per_worker=resources),
            run_config=RunConfig(name=name, storage_path=storage,
                                 failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints)))
        result = fit_interruptibly(trainer)
        if (run_dir / "summary.json").exists():
            summary.update(json.loads((run_dir / "summary.json").read_text()))
        if result.checkpoint is not None:
            summary["checkpoint"] = result.checkpoint.path
            tracker.set_tags({"final_checkpoint": result.checkpoint.path})
        status = "FINISHED"
        return summary
    except Killed:
        status, error = "KILLED", "SIGTERM"
        raise SystemExit("training run killed (SIGTERM); MLflow status KILLED") from None
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        if handles_sigterm:
            signal.signal(signal.SIGTERM, previous)
        tracker.set_status(status, error)
        delivery = tracker.close()
        summary.update(status=status, mlflow_run_id=delivery.run_id, tracking=delivery.summary())
        print(delivery.summary())


def main(argv=None) -> dict[str, Any]:
    parser = config_parser(__doc__)
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlruns.db)")
    parser.add_argument("--kill-at-step", type=int, default=None, help="fault drill: kill rank 0's worker once at this step")
    parser.add_argument("--nan-from-step", type=int, default=None, help="fault drill: NaN inputs from this step on")
    args = parser.parse_args(argv)
    cfg = resolve_config(args)
    summary = fit(cfg, tracking_uri=args.tracking_uri, address=args.address,
                  faults=Faults(args.kill_at_step, args.nan_from_step))
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
