"""What the frozen networks trained here (the latent autoencoder, the CLIP that scores) share: each is
trained once per settings and data, saved all at once with the sha256 of its weights, tracked as an
MLflow run, and reused (from its own directory, or a committed copy) when made from the same settings
and data.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from mlflow.tracking import MlflowClient

from mmdit_core.config import ExperimentConfig
from mmdit_core.data.shards import SkipCounts, make_loader, split_shards
from mmdit_core.files import atomic_directory, sha256_file, verified_summary
from mmdit_core.machine import cpu_name

from .cli import Killed, add_tracking_uri, config_parser, resolve_config
from .tracking import RUN_KEY_TAG, Tracker, default_uri, git_commit

Trains = Callable[[ExperimentConfig, "str | None"], dict[str, Any]]  # (config, tracking URI) -> summary


def descend(loss: torch.Tensor, optimizer: torch.optim.Optimizer, schedule, max_grad_norm: float = 1.0) -> None:
    """One optimizer step on `loss`, its gradients clipped to `max_grad_norm`, then one schedule step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], max_grad_norm)
    optimizer.step()
    schedule.step()


@dataclass(frozen=True)
class Stage:
    label: str  # what it is, in messages: "autoencoder", "CLIP"
    weights: str  # the file in its directory whose sha256 the summary records
    shipped: Path  # committed copies, each a directory with its summary
    measured: str  # the summary's entry of what measuring the saved model found: "fidelity", "validation"

    @property
    def experiment(self) -> str:
        """The MLflow experiment of its runs."""
        return self.label.lower()

    def run_key(self, made: dict[str, Any]) -> str:
        """The MLflow run of these settings and data (training them again re-attaches it)."""
        return f"{self.experiment}-" + hashlib.sha256(json.dumps(made, sort_keys=True).encode()).hexdigest()[:8]

    @contextmanager
    def tracked(
        self, made: dict[str, Any], out: Path, params: dict[str, Any], tracking_uri: str | None, cfg: ExperimentConfig
    ) -> Iterator[Tracker]:
        """A RUNNING MLflow run of this training; FINISHED if the block returns, KILLED on SIGTERM, else FAILED
        with the error.
        Where the data lies is a tag, not a param: the same data elsewhere re-attaches the same run."""
        tracker = Tracker(
            tracking_uri or default_uri(),
            self.experiment,
            self.run_key(made),
            backlog=out.parent / f"{out.name}.tracking_backlog.jsonl",
            tags={
                "git_commit": git_commit(),
                "config": cfg.name,
                "dataset": made["dataset"],
                "data.root": cfg.data.root,
            },
        )
        tracker.set_status("RUNNING")
        tracker.log_params(params)
        tracker.log_dataset(cfg.data.root)
        status, error = "FAILED", None
        try:
            yield tracker
            status = "FINISHED"
        except Killed:
            status, error = "KILLED", "SIGTERM"
            raise
        except BaseException as exc:
            error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            tracker.set_status(status, error)
            print(tracker.close().summary())

    def lineage(self, directory: str | Path, tracking_uri: str) -> dict[str, str]:
        """Tags naming the one at `directory` for a run that used it: its weights' sha256 and its MLflow run in
        this store (or why there is none: a shipped copy was trained elsewhere); {} where none is saved."""

        summary = verified_summary(Path(directory), self.weights)
        if summary is None:
            return {}
        key, prefix = self.run_key(summary["made_from"]), self.label.lower()
        try:
            client = MlflowClient(tracking_uri)
            experiment = client.get_experiment_by_name(self.experiment)
            found = (
                client.search_runs([experiment.experiment_id], f"tags.`{RUN_KEY_TAG}` = '{key}'") if experiment else []
            )
            run_id = found[0].info.run_id if found else "none in this store (a shipped or copied one)"
        except Exception as exc:  # noqa: BLE001 - a tracking store that does not answer never stops training
            run_id = f"unknown: the tracking store did not answer ({type(exc).__name__})"
        return {f"{prefix}.weights_sha256": summary["weights_sha256"], f"{prefix}.run_id": run_id}

    def save(self, out: Path, summary: dict[str, Any], write: Callable[[Path], None]) -> None:
        """`write(tmp)` fills a temporary directory; the summary (with the weights' sha256 and the machine)
        joins it, and all of it appears at `out` together or not at all. Called before the model is
        measured, so a failure while measuring loses no training: `reuse_or_train` measures it then."""
        summary["machine"] = {"cpu": cpu_name(), "threads": torch.get_num_threads()}
        with atomic_directory(out) as tmp:
            write(tmp)
            summary["weights_sha256"] = sha256_file(tmp / self.weights)
            (tmp / "summary.json").write_text(json.dumps(summary, indent=2))

    def rewrite_summary(self, out: Path, summary: dict[str, Any]) -> None:
        """Replace the summary beside unchanged weights (checked against it first) in one rename."""
        if verified_summary(out, self.weights) is None or summary["weights_sha256"] != sha256_file(out / self.weights):
            raise ValueError(f"{out}: its weights are not the ones the summary names")
        tmp = out / ".summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2))
        os.replace(tmp, out / "summary.json")

    def reuse_or_train(
        self,
        made: dict[str, Any],
        path: Path,
        train: Callable[[], dict[str, Any]],
        describe: Callable[[dict[str, Any]], str],
        measure: Callable[[], dict[str, Any]],
    ) -> dict[str, Any]:
        """The summary of the one made from `made`: at `path`, else a shipped one copied there, else `train()`.
        One saved but never measured (measuring failed or was cut off) is measured now by `measure()`."""
        summary = self.reuse(made, path)
        if summary is None:
            return train()
        if self.measured not in summary:
            print(f"the {self.label} at {path} was saved but its {self.measured} was never measured: measuring it")
            summary = measure()
        print(f"reusing the {self.label} at {path}: {describe(summary)}")
        return summary

    def main(
        self,
        doc: str,
        argv: list[str] | None,
        train_and_save: Trains,
        reuse_or_train: Trains,
        saved: Callable[[ExperimentConfig, dict[str, Any]], str],
        revalidate: Trains | None = None,
    ) -> dict[str, Any]:
        """The stage's command: --config/--set, --tracking-uri, --reuse (and --revalidate where the stage
        has it); prints the summary and `saved`."""
        parser = config_parser(doc)
        add_tracking_uri(parser)
        mode = parser.add_mutually_exclusive_group()
        mode.add_argument(
            "--reuse", action="store_true", help=f"keep the {self.label} made from these settings and data"
        )
        if revalidate is not None:
            mode.add_argument(
                "--revalidate", action="store_true", help=f"measure the saved {self.label} again, no training"
            )
        args = parser.parse_args(argv)
        cfg = resolve_config(args)
        run = revalidate if getattr(args, "revalidate", False) else reuse_or_train if args.reuse else train_and_save
        summary = run(cfg, args.tracking_uri)
        print(json.dumps(summary, indent=2))
        print(saved(cfg, summary))
        return summary

    def reuse(self, made: dict[str, Any], path: Path) -> dict[str, Any] | None:
        """The summary of the one made from `made` at `path`, else of a shipped one copied there; else None."""
        shipped = sorted(p for p in self.shipped.iterdir() if p.is_dir()) if self.shipped.is_dir() else []
        for directory in (path, *shipped):
            summary = verified_summary(directory, self.weights)
            if summary is None or summary["made_from"] != made:
                continue
            if directory != path:
                with atomic_directory(path) as tmp:
                    shutil.copytree(directory, tmp, dirs_exist_ok=True)
                print(
                    f"copied the shipped {self.label} {directory} to {path} "
                    f"(made from these settings and data {made['dataset']})"
                )
            return summary
        return None


def train_images(cfg: ExperimentConfig, batch_size: int, counts: SkipCounts):
    """What a stage trains on: endless batches of the train split's images, shuffled, seeded by data.seed."""
    return make_loader(
        split_shards(cfg.data.root, "train"),
        batch_size,
        num_workers=cfg.data.num_workers,
        image_size=cfg.data.image_size,
        resampled=True,
        shuffle=cfg.data.shuffle_buffer,
        seed=cfg.data.seed,
        counts=counts,
    )
