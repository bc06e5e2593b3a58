"""Train an MMDiT with Ray Train (DDP over CPUs or GPUs), tracked in MLflow, resumable.

    python -m experiments.train --config C [--set k=v ...]                   # Ray inside this process
    ray job submit --working-dir . -- python -m experiments.train --config C # on a running cluster

The run name is deterministic (config name, hash of the resolved config, seed): submitting the same
config again continues that run from its last checkpoint, in the same MLflow run. A worker that dies
is restarted from the last checkpoint (train.max_failures times) with the same step, data position
and RNG states, so the resumed run matches an uninterrupted one. The driver sets the MLflow run's
final status: FINISHED, FAILED (with the error) or KILLED (SIGTERM, e.g. `ray job stop`).

Outputs in <train.storage_path>/<run name>/: Ray's checkpoint_* directories, metrics.jsonl (every
step), samples/ (grids for held-out captions), trajectory.png, loss.png, summary.json, attempts.jsonl (each
attempt's seconds: their sum, the MLflow metric `wall_s`, is the run's time without the time it was down).
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mmdit_core.autoencoder import Autoencoder
from mmdit_core.config import TRAINED_CLIP, ExperimentConfig
from mmdit_core.data.shards import read_manifest
from mmdit_core.data.training import latent_cache_shards
from mmdit_core.timing import Phases

from .cli import Killed, add_tracking_uri, config_parser, resolve_config, run_command, sigterm_raises_killed
from .cluster import check_storage, start_ray
from .rank_loop import PHASES_FILE, Faults, Launch, RankLoop
from .tracking import Tracker, default_uri, git_commit


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
    read_manifest(cfg.data.root)
    Autoencoder.check_trained(cfg.autoencoder)
    if cfg.data.latent_cache:
        latent_cache_shards(cfg)


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


def record_attempt(run_dir: Path, seconds: float, status: str) -> float:
    """Append this attempt's duration to the run's attempts.jsonl; return the seconds of all attempts: the
    run's wall time without the time it was down between attempts."""
    attempts = run_dir / "attempts.jsonl"
    with open(attempts, "a") as f:
        f.write(json.dumps({"seconds": round(seconds, 3), "status": status}) + "\n")
    return sum(json.loads(line)["seconds"] for line in attempts.read_text().splitlines())


def open_run(cfg: ExperimentConfig, uri: str, run_dir: Path, tags: dict[str, str] | None) -> Tracker:
    """The run's MLflow run, found or created, marked RUNNING, with the flat config as params and the
    config file as an artifact."""
    tracker = Tracker(
        uri,
        cfg.name,
        cfg.run_name(),
        backlog=run_dir / "tracking_backlog.jsonl",
        tags={"git_commit": git_commit(), "config": cfg.name, "seed": str(cfg.train.seed), **(tags or {})},
    )
    tracker.set_status("RUNNING")
    tracker.log_params(cfg.to_flat())
    tracker.log_artifact(run_dir / "config.yaml")
    tracker.log_dataset(cfg.data.root)
    tracker.set_tags(lineage(cfg, uri))
    if not tracker.wait_ready(15):  # the workers' tracker then finds this run instead of making a twin
        print(f"warning: MLflow at {uri} does not answer; training goes on and tracking calls are retried")
    return tracker


def lineage(cfg: ExperimentConfig, uri: str) -> dict[str, str]:
    """Tags linking a training run to the autoencoder it trained in and the CLIP that scores it, where
    those were trained here (their weights' sha256 and MLflow runs)."""
    from eval.clip_score import trained_clip_dir

    from . import train_autoencoder, train_clip

    tags = train_autoencoder.STAGE.lineage(cfg.autoencoder.path, uri) if cfg.autoencoder.kind == "trained" else {}
    if cfg.eval.clip_model == TRAINED_CLIP:
        tags |= train_clip.STAGE.lineage(trained_clip_dir(cfg.data.root), uri)
    return tags


def set_ray_environment() -> None:
    # Workers keep the driver's (or the job's) working directory, so relative data paths mean the same there.
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    # Train's print patch sends a worker's print both to its stdout and through its logger: every line twice
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")


def torch_trainer(cfg: ExperimentConfig, launch: Launch, storage: str):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": cfg.train.cpus_per_worker, **({"GPU": 1} if cfg.train.use_gpu else {})}
    return TorchTrainer(
        train_loop,
        train_loop_config=asdict(launch),
        scaling_config=ScalingConfig(
            num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=launch.run_name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
        ),
    )


def training_phases(driver: Phases, rank_file: Path) -> dict[str, float]:
    """Where a run's wall time went: Ray's start, rank 0's phases of the last attempt (setup, data, steps,
    checkpoint, quick_eval, finish) and what trainer.fit spent beyond them (Ray Train's worker start-up
    and placement, earlier attempts, reports)."""
    rank = json.loads(rank_file.read_text()) if rank_file.is_file() else {}
    outside = driver.seconds["fit"] - sum(rank.values())
    return {"ray_start": round(driver.seconds["ray_start"], 3), **rank, "workers_and_placement": round(outside, 3)}


def fit(
    cfg: ExperimentConfig,
    *,
    tracking_uri: str | None = None,
    address: str | None = None,
    faults: Faults | None = None,
    tags: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run (or resume) the training run of `cfg` and return its summary; the MLflow status is set here.
    `tags` go on the MLflow run when it is created (a sweep passes its parent run and the trial's arms)."""
    check_inputs(cfg)
    started = time.monotonic()
    name = cfg.run_name()
    storage, outputs = storage_location(cfg)
    run_dir = outputs / name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    uri = tracking_uri or default_uri()
    tracker = open_run(cfg, uri, run_dir, tags)
    launch = Launch(cfg.to_yaml(), name, str(run_dir), uri, asdict(faults or Faults()))
    set_ray_environment()
    status, error, summary = "FAILED", None, {"run_name": name}
    phases = Phases()
    try:
        with phases("ray_start"):
            start_ray(address)
            check_storage(storage, cfg.train.storage_shared)
        with sigterm_raises_killed(), phases("fit"):  # after ray.init, which installs its own handler
            result = fit_interruptibly(torch_trainer(cfg, launch, storage))
        if (run_dir / "summary.json").exists():
            summary.update(json.loads((run_dir / "summary.json").read_text()))
        summary["phase_seconds"] = training_phases(phases, run_dir / PHASES_FILE)
        tracker.log_metrics({f"time/{k}_s": v for k, v in summary["phase_seconds"].items()}, step=cfg.train.steps)
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
        summary["wall_s"] = record_attempt(run_dir, time.monotonic() - started, status)
        tracker.log_metrics({"wall_s": summary["wall_s"]}, step=cfg.train.steps)
        tracker.set_status(status, error)
        delivery = tracker.close()
        summary.update(
            status=status, mlflow_run_id=delivery.run_id, mlflow_links=delivery.links, tracking=delivery.summary()
        )
        print(delivery.summary())


def main(argv=None) -> dict[str, Any]:
    parser = config_parser(__doc__)
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    add_tracking_uri(parser)
    parser.add_argument(
        "--kill-at-step", type=int, default=None, help="fault drill: kill rank 0's worker once at this step"
    )
    parser.add_argument("--nan-from-step", type=int, default=None, help="fault drill: NaN inputs from this step on")
    args = parser.parse_args(argv)
    cfg = resolve_config(args)
    summary = fit(
        cfg, tracking_uri=args.tracking_uri, address=args.address, faults=Faults(args.kill_at_step, args.nan_from_step)
    )
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    run_command(main)
