"""The report of a sweep, read back from MLflow: per axis and metric, each arm's mean ± 95% CI over
seeds, its difference to the reference arm (paired by seed) with a CI, and a plain verdict.

    python -m ablations.report --sweep NAME [--tracking-uri URI] [--out DIR]

A training-time arm is read from the trials that move only that axis off its reference (at the
reference sampling settings); a sampling-time arm from the reference trials evaluated at that arm.
Writes report.md, report.html and one PNG per axis (every metric per arm with error bars) to
outputs/sweeps/<NAME>/report/ and logs them as artifacts of the sweep's parent run.
"""

from __future__ import annotations

import argparse
import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments.tracking import RUN_KEY_TAG, Tracker, default_uri  # noqa: E402

from .axes import get_axis  # noqa: E402
from .stats import Interval, mean_interval, paired_difference, verdict  # noqa: E402

# metric -> (label, higher is better)
METRICS = {
    "eval/fid": ("FID", False), "eval/kid": ("KID", False),
    "eval/adherence_colour": ("colour adherence", True), "eval/adherence_position": ("position adherence", True),
    "eval/adherence_shape": ("shape adherence", True), "eval/adherence_whole": ("whole-caption adherence", True),
    "eval/clip_score": ("CLIP score", True), "val/loss": ("final val loss", False),
    "train/img_per_s": ("train images/s", True), "wall_s": ("wall time (s)", False),
}
SAMPLING_FIELDS = {"sample.cfg_scale": "cfg_scale", "sample.steps": "steps", "sample.sampler": "sampler", "eval.weights": "weights"}


@dataclass
class Observation:
    """One trial evaluated at one sampling point."""

    training: dict[str, str]  # training axis -> arm
    sampling: dict[str, str]  # sampling axis -> arm
    seed: int
    metrics: dict[str, float]


def _same(a: str, b: str) -> bool:
    try:
        return float(a) == float(b)
    except ValueError:
        return a == b


def observations(client, experiment_id: str, parent_id: str, axes: dict[str, list[str]]) -> list[Observation]:
    sampling_axes = [name for name in axes if get_axis(name).kind == "sampling"]
    found = []
    for trial in client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'"):
        training = {k.removeprefix("arm."): v for k, v in trial.data.tags.items() if k.startswith("arm.")}
        trained = {k: v for k, v in trial.data.metrics.items() if k in ("val/loss", "train/img_per_s")}
        if trial.info.end_time:
            trained["wall_s"] = (trial.info.end_time - trial.info.start_time) / 1000
        for ev in client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{trial.info.run_id}'"):
            sampling = {}
            for name in sampling_axes:
                value = ev.data.params[SAMPLING_FIELDS[get_axis(name).field]]
                sampling[name] = next((arm for arm in axes[name] if _same(arm, value)), value)
            metrics = {k: v for k, v in ev.data.metrics.items() if k in METRICS}
            found.append(Observation(training, sampling, int(trial.data.tags["seed"]), {**trained, **metrics}))
    return found


def arm_rows(obs: list[Observation], axes: dict[str, list[str]], axis: str) -> dict[str, dict[int, Observation]]:
    """arm -> {seed: observation} for `axis`, every other axis at its reference."""
    rows: dict[str, dict[int, Observation]] = {}
    for o in obs:
        arms = {**o.training, **o.sampling}
        others_at_reference = all(_same(arms[name], get_axis(name).reference) for name in axes if name != axis and name in arms)
        if others_at_reference and axis in arms:
            rows.setdefault(arms[axis], {})[o.seed] = o
    return rows


def summarise(obs: list[Observation], axes: dict[str, list[str]]) -> dict[str, Any]:
    """{axis: {metric: {arm: {"mean": Interval, "diff": Interval | None, "verdict": str}}}}."""
    out: dict[str, Any] = {}
    for axis in axes:
        rows, reference = arm_rows(obs, axes, axis), get_axis(axis).reference
        per_metric: dict[str, Any] = {}
        for metric, (_, higher) in METRICS.items():
            ref = {seed: o.metrics[metric] for seed, o in rows.get(reference, {}).items() if metric in o.metrics}
            table = {}
            for arm in axes[axis]:
                values = {seed: o.metrics[metric] for seed, o in rows.get(arm, {}).items() if metric in o.metrics}
                if not values:
                    continue
                diff = paired_difference(values, ref) if arm != reference and set(values) & set(ref) else None
                table[arm] = {"mean": mean_interval(list(values.values())), "diff": diff,
                              "verdict": verdict(diff, higher) if diff else "reference" if arm == reference else "no reference"}
            if table:
                per_metric[metric] = table
        out[axis] = per_metric
    return out


def _interval(i: Interval | None, scale: float = 1.0) -> str:
    if i is None:
        return "-"
    if not i.known:
        return f"{scale * i.mean:.4g} (n={i.n})"
    return f"{scale * i.mean:.4g} [{scale * i.low:.4g}, {scale * i.high:.4g}]"


def tables(summary: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) per axis."""
    out = []
    for axis, per_metric in summary.items():
        header = ["metric", "arm", "n", "mean [95% CI]", "difference to reference [95% CI]", "verdict"]
        rows = []
        for metric, table in per_metric.items():
            for arm, cell in table.items():
                rows.append([METRICS[metric][0], arm, str(cell["mean"].n), _interval(cell["mean"]), _interval(cell["diff"]), cell["verdict"]])
        axis_info = get_axis(axis)
        out.append((f"{axis} ({axis_info.kind}-time; reference {axis_info.reference}): {axis_info.tests}", header, rows))
    return out


def markdown(name: str, summary: dict[str, Any], seeds: int) -> str:
    lines = [f"# Sweep {name}", ""]
    if seeds < 3:
        lines += [f"**{seeds} seed(s) per arm: too few for confident intervals** (95% t-intervals widen sharply below 3).", ""]
    for title, header, rows in tables(summary):
        lines += [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows] + [""]
    return "\n".join(lines)


def html_page(name: str, summary: dict[str, Any]) -> str:
    parts = [f"<html><head><meta charset='utf-8'><title>Sweep {html.escape(name)}</title></head><body><h1>Sweep {html.escape(name)}</h1>"]
    for title, header, rows in tables(summary):
        parts.append(f"<h2>{html.escape(title)}</h2><table border='1' cellpadding='4'><tr>"
                     + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows]
        parts.append("</table>")
    return "\n".join(parts + ["</body></html>"])


def plot_axis(axis: str, per_metric: dict[str, Any], path: Path) -> None:
    """Every metric of one axis: mean per arm with its 95% CI as an error bar."""
    metrics = list(per_metric)
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        arms = list(per_metric[metric])
        means = [per_metric[metric][a]["mean"] for a in arms]
        errors = [(m.high - m.low) / 2 if m.known else 0.0 for m in means]
        ax.errorbar(range(len(arms)), [m.mean for m in means], yerr=errors, fmt="o", capsize=4)
        ax.set_xticks(range(len(arms)), arms, rotation=30, fontsize=7)
        ax.set_title(METRICS[metric][0], fontsize=9)
    fig.suptitle(axis)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(name: str, tracking_uri: str | None = None, out: str | Path | None = None) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    uri = tracking_uri or default_uri()
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    parents = client.search_runs([experiment.experiment_id], f"tags.`{RUN_KEY_TAG}` = '{name}'") if experiment else []
    if not parents:
        raise SystemExit(f"error: no sweep {name!r} in {uri}")
    parent = parents[0]
    axes = json.loads(parent.data.params["sweep.axes"])
    seeds = int(parent.data.params["sweep.seeds"])
    summary = summarise(observations(client, experiment.experiment_id, parent.info.run_id, axes), axes)
    out = Path(out or Path("outputs/sweeps") / name / "report")
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "report.md", out / "report.html"]
    files[0].write_text(markdown(name, summary, seeds))
    files[1].write_text(html_page(name, summary))
    for axis, per_metric in summary.items():
        if per_metric:
            plot_axis(axis, per_metric, out / f"{axis}.png")
            files.append(out / f"{axis}.png")
    tracker = Tracker(uri, name, name, backlog=out / "tracking_backlog.jsonl")
    for file in files:
        tracker.log_artifact(file, "report")
    print(tracker.close().summary())
    return {"summary": summary, "files": [str(f) for f in files]}


def main(argv=None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", required=True, help="the sweep's name (printed by ablations.sweep)")
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    result = report(args.sweep, args.tracking_uri, args.out)
    print(Path(result["files"][0]).read_text())
    return result


if __name__ == "__main__":
    main()
