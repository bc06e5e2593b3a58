"""Evaluate a checkpoint over a grid of sampling settings, without retraining; log it to its MLflow run.

    python -m experiments.evaluate --checkpoint PATH [--steps 4,8,25] [--cfg 1,2,4,7] [--sampler euler,heun]
                                   [--set eval.weights=model] [--set eval.num_samples=2000 ...] [--out DIR]

PATH is a checkpoint directory the trainer wrote, or a run directory (its latest checkpoint is used).
What is scored and which files are written: eval/evaluator.py. In MLflow: one nested child run per grid
point under the checkpoint's run, metrics `eval/...` at the checkpoint's step, the FID setup as params
`setup.*`; evaluating again in the same setup reuses the reference statistics and the same child runs, in
another setup (N, precision, batch size, ...) it makes other child runs: a run's FIDs share one setup.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

from eval.evaluator import GRID, evaluate_checkpoint, markdown

from .cli import add_overrides, add_tracking_uri, run_command
from .tracking import SETUP_PREFIX, Tracker, default_uri


def setup_digest(setup: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(setup, sort_keys=True).encode()).hexdigest()[:8]


def log_to_mlflow(uri: str, experiment: str, key: str, report: dict[str, Any]) -> list[str]:
    """One nested child run per grid point under the checkpoint's run (found by its run name `key`); the
    report files as artifacts of that run. Returns the child run ids (empty if MLflow did not answer)."""
    step, out = report["step"], Path(report["out"])
    backlog = out / "tracking_backlog.jsonl"
    parent = Tracker(uri, experiment, key, backlog=backlog)
    for name in ("report.md", "report.json", "curves.png"):
        parent.log_artifact(out / name, f"eval/step_{step:06d}")
    if not parent.wait_ready(15):
        print(f"warning: MLflow at {uri} does not answer; the results are in {out} only. {parent.close().summary()}")
        return []
    children = []
    for point in report["points"]:
        setup = report["setup"]
        name = f"{point['name']}-n{setup['num_samples']}-{setup['weights']}-{setup_digest(setup)}"
        if report["transfer"]:  # another resolution (or rope scaling) is another evaluation, never the same run
            name += f"-{report['transfer']}"
        setting = {field: point[field] for field in GRID}
        child = Tracker(
            uri,
            experiment,
            f"{key}/eval/step_{step:06d}/{name}",
            backlog=backlog,
            tags={
                "mlflow.parentRunId": parent.result.run_id,
                "mmdit.kind": "eval",
                "checkpoint": report["checkpoint"],
                **{field: f"{value:g}" if isinstance(value, float) else str(value) for field, value in setting.items()},
            },
        )
        child.log_params(
            {
                "image_size": report["transfer_size"] or "data",
                "transfer": report["transfer"] or "none",  # what ablations.report --transfer reads
                "rope_scaling": report["points"][0]["sampling"]["rope_scaling"],
                **setting,
                "shift": point["sampling"]["shift"],
                "noise_seed": point["sampling"]["seed"],
                "step": step,
                **{f"{SETUP_PREFIX}{k}": v for k, v in setup.items()},
            }
        )
        child.set_tags(
            {"clip_model": report["clip"] or "none"}
        )  # a tag, not a param: evaluating again with another CLIP updates it
        child.log_metrics(
            {f"eval/{k}": v for k, v in point["metrics"].items()}
            | {"eval/val_loss": report["val_loss"]}
            | {f"eval/val_loss_t{float(t):.3f}": v for t, v in report["val_loss_by_t"].items()},
            step,
        )
        child.log_artifact(out / f"grid_{point['name']}.png")
        child.set_status("FINISHED")
        delivery = child.close()
        children.append(delivery.run_id)
        if delivery.undelivered:
            print(f"warning: eval run {name}: {delivery.summary()}")
    print(parent.close().summary())
    return children


def evaluate(
    checkpoint: str | Path,
    *,
    grid: dict[str, list[Any]] | None = None,
    overrides: list[str] | None = None,
    out: str | Path | None = None,
    tracking_uri: str | None = None,
    device: str | None = None,
    verbose: bool = True,
    run_name: str | None = None,
) -> dict[str, Any]:
    """eval.evaluator.evaluate_checkpoint, then its MLflow runs, nested under the run `run_name` (default:
    the run directory the checkpoint lies in, the name it trained under; else the name its config makes
    today, which a field added since with its default changes). Returns the report."""
    report = evaluate_checkpoint(checkpoint, grid=grid, overrides=overrides, out=out, device=device, verbose=verbose)
    trained = report.pop("trained")
    run_dir = Path(report["checkpoint"]).parent.name
    trained_as = run_dir if run_dir.startswith(f"{trained.name}-") else trained.run_name()
    report["mlflow_child_runs"] = log_to_mlflow(
        tracking_uri or default_uri(), trained.name, run_name or trained_as, report
    )
    return report


def _list(kind):
    return lambda text: [kind(v) for v in text.split(",") if v.strip()]


def main(argv=None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--checkpoint", required=True, help="checkpoint directory, or a run directory (latest checkpoint)"
    )
    for name, field in GRID.items():
        parser.add_argument(
            field.flag,
            dest=name,
            type=_list(field.parse),
            default=None,
            help=f"comma-separated values of sample.{name} (default: the config's)",
        )
    add_overrides(parser, "override a field of the checkpoint's config, e.g. eval.num_samples=2000")
    parser.add_argument("--out", default=None, help="output directory (default: <run dir>/eval/step_<N>)")
    add_tracking_uri(parser)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when the config trains on GPUs)")
    args = parser.parse_args(argv)
    grid = {field: getattr(args, field) for field in GRID if getattr(args, field)}
    report = evaluate(
        args.checkpoint,
        grid=grid,
        overrides=args.overrides,
        out=args.out,
        tracking_uri=args.tracking_uri,
        device=args.device,
    )
    print(f"\nreport: {report['out']}/report.md\n")
    print(markdown(report))
    return report


if __name__ == "__main__":
    run_command(main)
