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

    python -m ablations.detection --sweep NAME [--seeds-fixed]    # outputs/sweeps/NAME/report/detection.{md,png}
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import matplotlib
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
    own_transfer,
    read_sweep,
    summarise,
    sweep_parent,
    transfer_of,
)

SKIPPED = ("train/img_per_s", "wall_s")  # costs, not the model's quality
VERDICTS = ("better", "worse")


def eval_sizes(client, experiment_id: str, parent_id: str, transfer: str) -> list[int]:
    """Every N the sweep's checkpoints were evaluated at, at side `transfer`."""
    sizes = set()
    for trial in client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'"):
        for ev in client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{trial.info.run_id}'"):
            if "setup.num_samples" in ev.data.params and transfer_of(ev.data.params) == transfer:
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
        for arm in (a for a in arms if a != get_axis(axis, arms).reference):
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


def matrix_figure(found: dict, path: str | Path) -> None:
    """The table as a heat map: each cell shaded by the cost at which the metric first caught the arm
    (samples generated per arm, N × seeds; seeds alone for val loss), darker green is cheaper, on a log
    scale within each kind of cost; grey where it never did."""
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in METRICS if any(m in row for row in found.values())]
    rows = list(found.values())
    costs = [[_cost(row.get(m), m) for m in metrics] for row in rows]
    spans = {}  # per kind of cost: (log of the cheapest, log of the dearest)
    for trained in (True, False):
        logs = [math.log(c) for row in costs for m, c in zip(metrics, row) if c and (m in TRAINED) == trained]
        spans[trained] = (min(logs), max(logs)) if logs else (0.0, 0.0)
    fig, ax = plt.subplots(figsize=(1.1 * len(metrics) + 2.5, 0.55 * len(found) + 1.6))
    ax.imshow([[0.15 for _ in metrics] for _ in found], cmap="Greys", vmin=0, vmax=1)  # the not-caught grey
    green = plt.get_cmap("Greens")
    for i, row in enumerate(costs):
        for j, (metric, cost) in enumerate(zip(metrics, row)):
            if cost:
                low, high = spans[metric in TRAINED]
                dearness = (math.log(cost) - low) / (high - low) if high > low else 0.0
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, color=green(0.7 - 0.5 * dearness)))
            ax.text(j, i, _cell(rows[i].get(metric), metric), ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(metrics)), [METRICS[m][0] for m in metrics], rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(found)), [f"{axis}={arm}" for axis, arm in found], fontsize=8)
    ax.set_title("what catches what: fewest N and seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cost(cell: dict | None, metric: str) -> int | None:
    """Samples generated per arm when first caught (seeds alone for a property of the trained model)."""
    if not cell or not cell["caught"]:
        return None
    n, seeds = cell["caught"]
    return seeds if metric in TRAINED else n * seeds


def _cell(cell: dict | None, metric: str) -> str:
    if not cell:
        return "-"
    if not cell["caught"]:
        return "not caught"
    n, seeds = cell["caught"]
    return f"{seeds} seeds" if metric in TRAINED else f"N={n}\n{seeds} seeds"


def detection(
    name: str, tracking_uri: str | None = None, out: str | Path | None = None, fixed_seeds: bool = False
) -> dict[str, Any]:

    uri = tracking_uri or default_uri()
    client = MlflowClient(uri)
    axes, _, rule, _ = read_sweep(client, name, uri)
    experiment, parent = sweep_parent(client, name, uri)
    transfer = own_transfer(parent)
    sizes = eval_sizes(client, experiment.experiment_id, parent.info.run_id, transfer)
    if not sizes:
        raise FileNotFoundError(f"sweep {name} has no evaluations that record their N")
    by_size = {n: observations(client, experiment.experiment_id, parent.info.run_id, axes, n, transfer) for n in sizes}
    found = cheapest(by_size, axes, confidence_of(rule), fixed_seeds)
    seeds = max(o.seed for obs in by_size.values() for o in obs) + 1
    path = Path(out or Path("outputs/sweeps") / name / "report") / "detection.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown(name, found, sizes, seeds, level_of(rule)))
    matrix_figure(found, path.with_suffix(".png"))
    tracker = Tracker(uri, name, name, backlog=path.parent / "tracking_backlog.jsonl")
    for written in (path, path.with_suffix(".png")):
        tracker.log_artifact(written, "report")
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
