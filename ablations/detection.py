"""Which metric catches which arm, and how cheaply: for every arm of a sweep and every metric, the fewest
generated samples N and seeds at which its paired difference to the reference excludes 0.

The sweep's checkpoints are evaluated at several N first (the sweep itself at its eval.num_samples, then
`python -m ablations.sweep --reevaluate NAME --set eval.num_samples=N` for each other N); every eval run
is kept under its own setup, so each N is read back on its own. For each N and each k from 2 seeds to
all the sweep has, the report's summary is computed from seeds 0..k-1 at the sweep's confidence level
(95%, or the --seeds auto rule's), and an arm counts as caught by a metric at the cheapest (N, k), in
samples generated per arm (N · k, fewer seeds first on a tie), at which the verdict is `better` or `worse`.
"Not caught" means at no N and seed count evaluated. A difference caught at the cheapest pair can come
undone at a dearer one (the intervals are noisy too): the table gives the verdict at the largest N and
every seed beside it.

    python -m ablations.detection --sweep NAME [--seeds-fixed]    # outputs/sweeps/NAME/report/detection.md
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from experiments.cli import add_tracking_uri, run_command
from experiments.tracking import Tracker, default_uri

from .axes import get_axis
from .report import (
    METRICS,
    TRAINED,
    Observation,
    confidence_of,
    level_of,
    observations,
    read_sweep,
    summarise,
    sweep_parent,
)

SKIPPED = ("train/img_per_s", "wall_s")  # costs, not the model's quality
VERDICTS = ("better", "worse")


def eval_sizes(client, experiment_id: str, parent_id: str) -> list[int]:
    """Every N the sweep's checkpoints were evaluated at."""
    sizes = set()
    for trial in client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'"):
        for ev in client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{trial.info.run_id}'"):
            if "setup.num_samples" in ev.data.params:
                sizes.add(int(ev.data.params["setup.num_samples"]))
    return sorted(sizes)


def cheapest(
    by_size: dict[int, list[Observation]], axes: dict[str, list[str]], confidence: float, fixed_seeds: bool = False
) -> dict[tuple[str, str], dict[str, dict[str, Any]]]:
    """{(axis, arm): {metric: {"caught": (N, seeds) | None, "verdict": at the largest N and all seeds}}}.
    `fixed_seeds`: only at every seed the sweep has (the smallest N alone)."""
    seeds = max(o.seed for obs in by_size.values() for o in obs) + 1
    counts = [seeds] if fixed_seeds else list(range(2, seeds + 1))
    pairs = sorted(((n, k) for n in by_size for k in counts), key=lambda p: (p[0] * p[1], p[1]))
    summaries = {(n, k): summarise([o for o in by_size[n] if o.seed < k], axes, confidence) for n, k in pairs}
    largest = summaries[(max(by_size), seeds)]
    found: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for axis, arms in axes.items():
        for arm in (a for a in arms if a != get_axis(axis).reference):
            row = {}
            for metric in (m for m in METRICS if m not in SKIPPED):
                final = largest.get(axis, {}).get(metric, {}).get(arm)
                if final is None:
                    continue
                at = next(
                    (p for p in pairs if summaries[p][axis].get(metric, {}).get(arm, {}).get("verdict") in VERDICTS),
                    None,
                )
                # an arm that --seeds auto stopped early has fewer seeds than the cap k: name the seeds it used
                caught = None if at is None else (at[0], summaries[at][axis][metric][arm]["mean"].n)
                row[metric] = {"caught": caught, "verdict": final["verdict"]}
            found[(axis, arm)] = row
    return found


def markdown(name: str, found: dict, sizes: list[int], seeds: int, level: str) -> str:
    metrics = [m for m in METRICS if any(m in row for row in found.values())]
    lines = [
        f"# What catches what: {name}",
        "",
        f"The fewest samples N (of {', '.join(map(str, sizes))}) and seeds (of {seeds}) at which each arm's paired "
        f"difference to the reference excludes 0 at {level}, cheapest in N × seeds; in brackets the verdict at "
        f"N = {max(sizes)} and {seeds} seeds (ablations/detection.py).",
        "",
        "| arm | " + " | ".join(METRICS[m][0] for m in metrics) + " |",
        "|---|" + "---|" * len(metrics),
    ]
    for (axis, arm), row in found.items():
        cells = []
        for m in metrics:
            if m not in row:
                cells.append("-")
                continue
            caught = row[m]["caught"]
            # a property of the trained model (val loss) does not depend on N
            cell = (
                "not caught"
                if not caught
                else f"{caught[1]} seeds"
                if m in TRAINED
                else f"N={caught[0]}, {caught[1]} seeds"
            )
            cells.append(f"{cell} ({row[m]['verdict']})")
        lines.append(f"| {axis}={arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def detection(
    name: str, tracking_uri: str | None = None, out: str | Path | None = None, fixed_seeds: bool = False
) -> dict[str, Any]:

    uri = tracking_uri or default_uri()
    client = MlflowClient(uri)
    axes, _, rule, _ = read_sweep(client, name, uri)
    experiment, parent = sweep_parent(client, name, uri)
    sizes = eval_sizes(client, experiment.experiment_id, parent.info.run_id)
    if not sizes:
        raise FileNotFoundError(f"sweep {name} has no evaluations that record their N")
    by_size = {n: observations(client, experiment.experiment_id, parent.info.run_id, axes, n) for n in sizes}
    found = cheapest(by_size, axes, confidence_of(rule), fixed_seeds)
    seeds = max(o.seed for obs in by_size.values() for o in obs) + 1
    path = Path(out or Path("outputs/sweeps") / name / "report") / "detection.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown(name, found, sizes, seeds, level_of(rule)))
    tracker = Tracker(uri, name, name, backlog=path.parent / "tracking_backlog.jsonl")
    tracker.log_artifact(path, "report")
    print(tracker.close().summary())
    return {"found": found, "sizes": sizes, "file": str(path)}


def main(argv=None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", required=True, help="the sweep's name (printed by ablations.sweep)")
    parser.add_argument("--seeds-fixed", action="store_true", help="only at every seed the sweep has")
    add_tracking_uri(parser)
    parser.add_argument("--out", default=None, help="folder of detection.md (default: the sweep's report folder)")
    args = parser.parse_args(argv)
    result = detection(args.sweep, args.tracking_uri, args.out, args.seeds_fixed)
    print(Path(result["file"]).read_text())
    return result


if __name__ == "__main__":
    run_command(main)
