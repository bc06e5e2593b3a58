"""The report of a sweep, read back from MLflow: per axis and metric, each arm's mean ± 95% CI over
seeds, its difference to the reference arm (paired by seed) with a CI, and a plain verdict.

    python -m ablations.report --sweep NAME [--tracking-uri URI] [--out DIR]
    python -m ablations.report --sweep NAME --transfer 48px --transfer 48px-rope_interpolate ...

A training-time arm is read from the trials that move only that axis off its reference (at the
reference sampling settings); a sampling-time arm from the reference trials evaluated at that arm.
Where the sweep trained every combination (combine: product), each axis is read again with one other
training axis held at each of its other arms: "does the bug's effect survive width 256?" is a row.
Writes report.md (a headline table first, then those held readings), report.html, samples.png (each
trained variant's samples at the reference sampling settings), one PNG per axis (every metric per arm
with error bars) and one per sampling axis with a curve per trained variant (e.g. FID against the CFG
scale for each training arm) to outputs/sweeps/<NAME>/report/ and logs them as artifacts of the
sweep's parent run. Only evaluations at the side the sweep's trials were evaluated at (the data's, unless
its config sets eval.image_size) count there; those at another side (resolution transfer: `--reevaluate
NAME --set eval.image_size=48 [--set sample.rope_scaling=K]`) are read with --transfer, into transfer.md
and transfer.png: each trained variant at each transfer, differenced against the first transfer named,
paired by seed.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from mlflow.tracking import MlflowClient
from PIL import Image  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from eval.fid import setup_line  # noqa: E402
from eval.figures import titled_row  # noqa: E402
from eval.stats import CONFIDENCE, Interval, mean_interval, paired_difference, verdict  # noqa: E402
from experiments.cli import add_tracking_uri, run_command  # noqa: E402
from experiments.tracking import RUN_KEY_TAG, SETUP_PREFIX, Tracker, default_uri  # noqa: E402
from mmdit_core.errors import InputError  # noqa: E402

from .allocation import PRIMARY, SeedRule, arm_status  # noqa: E402
from .axes import get_axis, references  # noqa: E402

# metric -> (label, higher is better)
METRICS = {
    "eval/fid": ("FID", False),
    "eval/kid": ("KID", False),
    "eval/cmmd": ("CMMD ×10³", False),
    "eval/adherence_colour": ("colour adherence", True),
    "eval/adherence_position": ("position adherence", True),
    "eval/adherence_shape": ("shape adherence", True),
    "eval/adherence_whole": ("whole-caption adherence", True),
    "eval/adherence_whole_shape": ("whole caption with shape", True),
    "eval/adherence_binding": ("binding (2+ objects)", True),
    "eval/clip_score": ("CLIP score", True),
    "val/loss": ("final val loss", False),
    "train/img_per_s": ("train images/s", True),
    "wall_s": ("wall time (s)", False),
}
HEADLINE = (
    "eval/fid",
    "eval/kid",
    "eval/cmmd",
    "eval/adherence_position",
    "eval/adherence_shape",
    "eval/adherence_whole_shape",
    "eval/clip_score",
    "val/loss",
)
AGREEMENT = ("eval/adherence_whole", "eval/adherence_whole_shape")  # the oracle's verdicts metrics are ranked against
RANKED = ("eval/clip_score", "eval/cmmd", "eval/fid", "eval/kid")  # the sample metrics ranked against them
BY_CLIP = ("eval/clip_score", "eval/cmmd")
TRAINED = ("val/loss", "train/img_per_s", "wall_s")  # properties of the training run: no sampling arm moves them
NOT_COMPARABLE = "not comparable: a different loss"
OTHER_SETUP = "not comparable: another FID setup"
# wall seconds by phase, in the cost table's order: of a trial's training (its run's time/<phase>_s) and of
# each of its evaluations (the eval runs' eval/seconds_<phase>)
TRAINING_PHASES = ("ray_start", "workers_and_placement", "setup", "data", "steps", "checkpoint", "quick_eval", "finish")
EVAL_PHASES = ("sampling", "decoding", "writing", "inception", "fid_kid", "oracle", "clip", "cmmd", "grid")
WITH_INTERVAL = ("eval/fid", "eval/kid", "eval/cmmd")  # each eval run logs <metric>_low and _high: its noise at N
SAMPLING_PARAMS = ("sampler", "steps", "cfg_scale", "shift", "noise_seed")  # eval runs' params, for the header
NOT_RECORDED = "not recorded"


@dataclass
class Observation:
    """One trial evaluated at one sampling point."""

    training: dict[str, str]  # training axis -> arm
    sampling: dict[str, str]  # sampling axis -> arm
    seed: int
    metrics: dict[str, float]
    run_id: str = ""  # the eval run: its sample grid is an artifact
    clip: str = "none"  # the CLIP that scored it
    setup: dict[str, str] = field(default_factory=dict)  # its FID setup (eval runs' setup.* params)
    sampling_params: dict[str, str] = field(default_factory=dict)  # its SAMPLING_PARAMS
    seconds: dict[str, float] = field(default_factory=dict)  # its trial's training phases, its evaluation's phases
    references: dict[str, str] = field(default_factory=dict)  # its sweep's axes -> reference arm


def _same(a: str, b: str) -> bool:
    try:
        return float(a) == float(b)
    except ValueError:
        return a == b


def _at_reference(o: Observation, arms: dict[str, str], held: dict[str, str] | None = None) -> bool:
    """Every axis in `arms` (axis -> arm) at the reference arm of `o`'s sweep, or at its arm in `held`."""
    return all(_same(arm, (held or {}).get(axis, o.references[axis])) for axis, arm in arms.items())


def transfer_of(params: dict[str, str]) -> str:
    """The resolution transfer an eval run sampled at, as its run name ends ("48px-rope_ntk"; "none" at the
    data's side). A run from before this was logged that sampled at another side reads as not recorded,
    never as the data's side."""
    return params.get("transfer") or ("none" if params.get("image_size", "data") == "data" else NOT_RECORDED)


def observations(
    client,
    experiment_id: str,
    parent_id: str,
    axes: dict[str, list[str]],
    num_samples: int | None = None,
    transfer: str = "none",
) -> list[Observation]:
    """One observation per trial and sampling point: of several eval runs at one point (evaluated again
    with other settings, e.g. more samples), the one that finished last; with `num_samples`, the last of
    those at that N. Only eval runs sampled at `transfer` (default: the data's side) count."""
    sampling_axes = [name for name in axes if get_axis(name, axes[name]).kind == "sampling"]
    reference_arms = references(axes)
    found = []
    for trial in client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'"):
        latest: dict[tuple, tuple[int, Observation]] = {}
        training = {k.removeprefix("arm."): v for k, v in trial.data.tags.items() if k.startswith("arm.")}
        trained = {
            k: v for k, v in trial.data.metrics.items() if k in TRAINED
        }  # wall_s: its attempts, not its downtime
        training_seconds = {
            p: trial.data.metrics[f"time/{p}_s"] for p in TRAINING_PHASES if f"time/{p}_s" in trial.data.metrics
        }
        for ev in client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{trial.info.run_id}'"):
            if num_samples is not None and ev.data.params.get(f"{SETUP_PREFIX}num_samples") != str(num_samples):
                continue
            if transfer_of(ev.data.params) != transfer:
                continue
            sampling = {}
            for name in sampling_axes:
                value = ev.data.params[
                    get_axis(name, axes[name]).field.split(".")[-1]
                ]  # eval runs log their sampling fields by name
                sampling[name] = next((arm for arm in axes[name] if _same(arm, value)), value)
            metrics = {
                k: v
                for k, v in ev.data.metrics.items()
                if k in METRICS or k.removesuffix("_low").removesuffix("_high") in WITH_INTERVAL
            }
            # eval runs from before the CLIP was named carry no tag
            clip = ev.data.tags.get("clip_model", "unknown" if "eval/clip_score" in metrics else "none")
            point = tuple(sorted(sampling.items()))
            if point not in latest or (ev.info.end_time or 0) > latest[point][0]:
                latest[point] = (
                    ev.info.end_time or 0,
                    Observation(
                        training,
                        sampling,
                        int(trial.data.tags["seed"]),
                        {**trained, **metrics},
                        ev.info.run_id,
                        clip,
                        {
                            k.removeprefix(SETUP_PREFIX): v
                            for k, v in ev.data.params.items()
                            if k.startswith(SETUP_PREFIX)
                        },
                        {p: ev.data.params.get(p, NOT_RECORDED) for p in SAMPLING_PARAMS},
                        training_seconds
                        | {
                            f"eval_{p}": ev.data.metrics[f"eval/seconds_{p}"]
                            for p in EVAL_PHASES
                            if f"eval/seconds_{p}" in ev.data.metrics
                        },
                        reference_arms,
                    ),
                )
        found += [o for _, o in latest.values()]
    return found


def common_setup(name: str, obs: list[Observation]) -> dict[str, str]:
    """The FID setup every observation shares. FIDs (KIDs, CMMDs) of different setups are never differenced,
    so a sweep whose eval runs differ in any field of it is refused with what differs."""
    common = {}
    for key in sorted({k for o in obs for k in o.setup}):
        values = Counter(o.setup.get(key, NOT_RECORDED) for o in obs)
        if len(values) > 1:
            counts = ", ".join(f"{value} in {n}" for value, n in sorted(values.items()))
            raise InputError(
                f"sweep {name}: its eval runs differ in {key} ({counts}), so their FIDs cannot be compared; "
                f"evaluate every trial in one setup (python -m ablations.sweep --reevaluate {name} --set eval....)"
            )
        common[key] = next(iter(values))
    return common or {"setup": NOT_RECORDED}


def sampling_line(obs: list[Observation], axes: dict[str, list[str]]) -> str:
    """The sampling settings of the eval runs: one value, or the values an axis gives it."""
    parts = []
    for param in SAMPLING_PARAMS:
        values = sorted({o.sampling_params.get(param, NOT_RECORDED) for o in obs}, key=lambda v: (len(v), v))
        axis = next((a for a in axes if get_axis(a, axes[a]).field.split(".")[-1] == param), None)
        parts.append(f"{param} {'/'.join(values)}" + (f" (axis {axis})" if axis and len(values) > 1 else ""))
    return "Sampled with: " + ", ".join(parts) + "."


def compare(
    values: dict[int, float],
    reference: dict[int, float],
    higher: bool,
    confidence: float,
    is_reference: bool,
    incomparable: str | None = None,
) -> dict[str, Any]:
    """A report cell: the mean of `values` (seed -> value) over seeds, its difference to `reference` paired
    by seed, and the verdict; `incomparable`: the verdict, and no difference, where the two may not be
    differenced (another loss, another FID setup)."""
    paired = incomparable is None and not is_reference and set(values) & set(reference)
    diff = paired_difference(values, reference, confidence) if paired else None
    return {
        "mean": mean_interval(list(values.values()), confidence),
        "diff": diff,
        "verdict": "reference" if is_reference else verdict(diff, higher) if diff else incomparable or "no reference",
    }


def arm_rows(
    obs: list[Observation], axes: dict[str, list[str]], axis: str, held: dict[str, str] | None = None
) -> dict[str, dict[int, Observation]]:
    """arm -> {seed: observation} for `axis`, every other axis at its reference or at its arm in `held`."""
    rows: dict[str, dict[int, Observation]] = {}
    for o in obs:
        arms = {**o.training, **o.sampling}
        others = {name: arm for name, arm in arms.items() if name != axis and name in axes}
        if axis in arms and _at_reference(o, others, held):
            rows.setdefault(arms[axis], {})[o.seed] = o
    return rows


def summarise(
    obs: list[Observation],
    axes: dict[str, list[str]],
    confidence: float = CONFIDENCE,
    held: dict[str, str] | None = None,
) -> dict[str, Any]:
    """{axis: {metric: {arm: {"mean": Interval, "diff": Interval | None, "noise": float | None, "verdict": str}}}},
    every interval at `confidence`; each axis read with the others at their references, or at their arms in
    `held` (axis -> arm; a held axis itself is not read)."""
    out: dict[str, Any] = {}
    for axis in (a for a in axes if a not in (held or {})):
        info, rows = get_axis(axis, axes[axis]), arm_rows(obs, axes, axis, held)
        per_metric: dict[str, Any] = {}
        for metric, (_, higher) in METRICS.items():
            if metric in TRAINED and info.kind == "sampling":
                continue
            comparable = not (metric == "val/loss" and info.redefines_loss)
            ref = {seed: o.metrics[metric] for seed, o in rows.get(info.reference, {}).items() if metric in o.metrics}
            table = {}
            for arm in axes[axis]:
                values = {seed: o.metrics[metric] for seed, o in rows.get(arm, {}).items() if metric in o.metrics}
                if not values:
                    continue
                incomparable = None if comparable else NOT_COMPARABLE
                table[arm] = {
                    **compare(values, ref, higher, confidence, arm == info.reference, incomparable),
                    "noise": run_noise(rows.get(arm, {}), metric),
                }
            if table:
                per_metric[metric] = table
        out[axis] = per_metric
    return out


def within_arms(obs: list[Observation], axes: dict[str, list[str]], confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Where a sweep trained every combination: each axis read again with one other training axis held at
    each of its other arms (the rest at their references), e.g. the head-axis bug at width 256.
    {"model.width=256": summarise()'s summary of the other axes}, only holds where some arm has a difference."""
    out = {}
    for held_axis in axes:
        info = get_axis(held_axis, axes[held_axis])
        if info.kind != "training":
            continue
        for arm in (a for a in axes[held_axis] if a != info.reference):
            summary = summarise(obs, axes, confidence, held={held_axis: arm})
            cells = (c for per_metric in summary.values() for table in per_metric.values() for c in table.values())
            if any(c["diff"] is not None for c in cells):
                out[f"{held_axis}={arm}"] = summary
    return out


def run_noise(by_seed: dict[int, Observation], metric: str) -> float | None:
    """The mean over seeds of one run's interval half-width (its noise at N, eval.stats' jackknife); None for a
    metric without one."""
    halves = [
        (o.metrics[f"{metric}_high"] - o.metrics[f"{metric}_low"]) / 2
        for o in by_seed.values()
        if f"{metric}_low" in o.metrics and f"{metric}_high" in o.metrics
    ]
    return sum(halves) / len(halves) if halves else None


def training_label(o: Observation) -> str:
    """The training arms an observation's trial moved off the reference, e.g. "pos_emb=none"."""
    return ",".join(f"{a}={v}" for a, v in o.training.items() if not _same(v, o.references[a])) or "reference"


def sampling_curves(
    obs: list[Observation], axes: dict[str, list[str]], sampling_axis: str, metric: str
) -> dict[str, dict[str, Interval]]:
    """{training arms: {sampling arm: mean over seeds}}: every trained variant across one sampling axis,
    the other sampling axes at their reference (how, e.g., CFG interacts with each training arm)."""
    values: dict[str, dict[str, list[float]]] = {}
    for o in obs:
        others = {a: v for a, v in o.sampling.items() if a != sampling_axis}
        if metric in o.metrics and _at_reference(o, others):
            values.setdefault(training_label(o), {}).setdefault(o.sampling[sampling_axis], []).append(o.metrics[metric])
    return {
        label: {arm: mean_interval(by_arm[arm]) for arm in axes[sampling_axis] if arm in by_arm}
        for label, by_arm in values.items()
    }


def transfer_cells(
    by_transfer: dict[str, list[Observation]],
    metric: str,
    setups: dict[str, dict[str, str]],
    confidence: float = CONFIDENCE,
) -> dict[str, dict[str, dict[str, Any]]]:
    """{trained variant: {transfer: {"mean", "diff", "verdict"}}} of one metric, every variant at the
    reference sampling settings; "diff": paired by seed against the same variant at the first transfer,
    for FID, KID and CMMD only where the two transfers' setups (`setups`, transfer -> common_setup) agree."""
    values: dict[str, dict[str, dict[int, float]]] = {}  # variant -> transfer -> seed -> value
    for transfer, obs in by_transfer.items():
        for o in obs:
            if metric in o.metrics and _at_reference(o, o.sampling):
                values.setdefault(training_label(o), {}).setdefault(transfer, {})[o.seed] = o.metrics[metric]
    first, higher = next(iter(by_transfer)), METRICS[metric][1]
    cells: dict[str, dict[str, dict[str, Any]]] = {}
    for label, by_transfer_seed in values.items():
        base = by_transfer_seed.get(first, {})
        for transfer, by_seed in by_transfer_seed.items():
            comparable = metric not in WITH_INTERVAL or setups[transfer] == setups[first]
            incomparable = None if comparable else OTHER_SETUP
            cells.setdefault(label, {})[transfer] = compare(
                by_seed, base, higher, confidence, transfer == first, incomparable
            )
    return cells


def transfer_markdown(
    name: str,
    cells: dict[str, dict[str, dict[str, dict[str, Any]]]],
    setups: dict[str, dict[str, str]],
    level: str,
) -> str:
    """One table per metric: a row per trained variant, a column per transfer (`setups`, transfer -> its FID
    setup), each cell the mean over seeds and, after the first column, the paired difference to the first."""
    transfers = list(setups)
    if all(setup == setups[transfers[0]] for setup in setups.values()):
        setup_lines = [setup_line(setups[transfers[0]]), ""]
    else:
        setup_lines = [f"At {t}: {setup_line(setup)}" for t, setup in setups.items()] + [""]
    lines = [
        f"# Sweep {name}: sampled at other sides",
        "",
        *setup_lines,
        f"Each trained variant at the reference sampling settings, sampled at {', '.join(transfers)} ('none': "
        f"the data's side). Cells: mean over seeds [{level} CI]; after the first column, the difference to "
        f"{transfers[0]} of the same checkpoints, paired by seed, with the verdict where its interval excludes 0.",
        "",
    ]
    for metric, by_label in cells.items():
        lines += [f"## {METRICS[metric][0]}", "", "| trained variant | " + " | ".join(transfers) + " |"]
        lines.append("|" + "---|" * (len(transfers) + 1))
        for label in sorted(by_label, key=lambda label: (label != "reference", label)):
            row = [
                "-"
                if (cell := by_label[label].get(t)) is None
                else _interval(cell["mean"]) + ("" if t == transfers[0] else f"; {_difference(cell)}")
                for t in transfers
            ]
            lines.append(f"| {label} | " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def cost_table(obs: list[Observation]) -> tuple[list[str], list[list[str]]] | None:
    """(header, rows): each trial's wall seconds by phase (training once, its evaluations summed) and the
    sweep's total; None when no run recorded its phases."""
    trials: dict[tuple[str, int], dict[str, float]] = {}
    for o in obs:
        row = trials.setdefault(
            (training_label(o), o.seed), {p: o.seconds[p] for p in TRAINING_PHASES if p in o.seconds}
        )
        for phase in (f"eval_{p}" for p in EVAL_PHASES if f"eval_{p}" in o.seconds):
            row[phase] = row.get(phase, 0.0) + o.seconds[phase]
    columns = [
        c for c in (*TRAINING_PHASES, *(f"eval_{p}" for p in EVAL_PHASES)) if any(c in r for r in trials.values())
    ]
    if not columns:
        return None
    total = {c: sum(r.get(c, 0.0) for r in trials.values()) for c in columns}
    rows = [
        [label, str(seed), *(f"{r.get(c, 0.0):.1f}" for c in columns), f"{sum(r.values()):.1f}"]
        for (label, seed), r in sorted(trials.items())
    ]
    rows.append(["all trials", "", *(f"{total[c]:.1f}" for c in columns), f"{sum(total.values()):.1f}"])
    return ["trial", "seed", *columns, "total"], rows


def _interval(i: Interval | None, scale: float = 1.0) -> str:
    if i is None:
        return "-"
    if not i.known:
        return f"{scale * i.mean:.4g} (n={i.n})"
    return f"{scale * i.mean:.4g} [{scale * i.low:.4g}, {scale * i.high:.4g}]"


def tables(
    summary: dict[str, Any], axes: dict[str, list[str]], level: str = "95%"
) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) per axis; `level`: the intervals' confidence, as the headers print it."""
    out = []
    for axis, per_metric in summary.items():
        header = [
            "metric",
            "arm",
            "n",
            f"mean [{level} CI]",
            "seed-to-seed SD",
            "one run's noise (±, 95%)",
            f"difference to reference [{level} CI]",
            "verdict",
        ]
        rows = []
        for metric, table in per_metric.items():
            for arm, cell in table.items():
                spread = cell["mean"].sd
                rows.append(
                    [
                        METRICS[metric][0],
                        arm,
                        str(cell["mean"].n),
                        _interval(cell["mean"]),
                        f"{spread:.3g}" if cell["mean"].n >= 2 else "-",
                        "-" if cell["noise"] is None else f"{cell['noise']:.3g}",
                        _interval(cell["diff"]),
                        cell["verdict"],
                    ]
                )
        axis_info = get_axis(axis, axes[axis])
        out.append(
            (f"{axis} ({axis_info.kind}-time; reference {axis_info.reference}): {axis_info.tests}", header, rows)
        )
    return out


def _difference(cell: dict[str, Any]) -> str:
    d = cell["diff"]
    if cell["verdict"] in (NOT_COMPARABLE, OTHER_SETUP):
        return cell["verdict"]
    if d is None or not d.known:
        return _interval(d) if d else "-"
    mark = {"better": " (better)", "worse": " (worse)"}.get(cell["verdict"], "")
    return f"{d.mean:+.3g} [{d.low:+.3g}, {d.high:+.3g}]{mark}"


def headline(summary: dict[str, Any], axes: dict[str, list[str]], level: str = "95%", held_at: str = "") -> list[str]:
    """One Markdown table of the headline metrics: the reference run's mean (every axis at its reference
    arm, or at the arm `held_at` names, e.g. "model.width=256": the same trials for every axis), then
    every other arm's paired difference to it with its 95% CI, and the verdict where the interval excludes 0."""
    at = f" at {held_at}" if held_at else ""
    metrics = [m for m in HEADLINE if any(m in per_metric for per_metric in summary.values())]
    lines = ["| arm | " + " | ".join(METRICS[m][0] for m in metrics) + " |", "|" + "---|" * (len(metrics) + 1)]
    reference = {
        m: cell["mean"]
        for per_metric in summary.values()
        for m, table in per_metric.items()
        for cell in table.values()
        if cell["verdict"] == "reference"
    }
    lines.append(
        f"| reference{at}: mean [{level} CI] | " + " | ".join(_interval(reference.get(m)) for m in metrics) + " |"
    )
    for axis, per_metric in summary.items():
        arms = list(
            dict.fromkeys(
                arm for m in metrics for arm in per_metric.get(m, {}) if arm != get_axis(axis, axes[axis]).reference
            )
        )
        for arm in arms:
            cells = [per_metric.get(m, {}).get(arm) for m in metrics]
            lines.append(
                f"| {axis}={arm}{at}: difference | "
                + " | ".join("-" if c is None else _difference(c) for c in cells)
                + " |"
            )
    return lines


def oracle_agreement(obs: list[Observation]) -> dict[str, Any] | None:
    """Spearman rank correlation of each sample metric (FID, KID, CMMD, CLIP score) with the oracle's
    verdicts over the trials (arms × seeds) at the reference sampling settings, and which CLIPs scored;
    None where the oracle scored nothing. CLIP-based metrics are not ranked across different CLIPs: their
    values are not on one scale."""
    scored = [o for o in obs if _at_reference(o, o.sampling) and any(m in o.metrics for m in AGREEMENT)]
    if not scored:
        return None
    clips = sorted({o.clip for o in scored if "eval/clip_score" in o.metrics})
    agreement: dict[str, Any] = {"clips": clips, "ranks": {}}
    for metric in RANKED if len(clips) <= 1 else [m for m in RANKED if m not in BY_CLIP]:
        for oracle in AGREEMENT:
            pairs = [(o.metrics[metric], o.metrics[oracle]) for o in scored if {metric, oracle} <= set(o.metrics)]
            if len(pairs) >= 3:
                rho, p = spearmanr(*zip(*pairs))
                agreement["ranks"].setdefault(oracle, {})[metric] = {"rho": float(rho), "p": float(p), "n": len(pairs)}
    return agreement


def agreement_lines(agreement: dict[str, Any] | None) -> list[str]:
    if agreement is None:
        return []
    clips = agreement["clips"]
    lines = []
    if len(clips) == 1:
        lines.append(f"CLIP score and CMMD by: {clips[0]}.")
    elif clips:
        lines.append(
            f"**CLIP scores and CMMDs come from {len(clips)} different CLIPs, which are not comparable**: "
            + "; ".join(clips)
            + "."
        )
    for oracle, ranks in agreement["ranks"].items():
        n = max(r["n"] for r in ranks.values())
        lines.append(
            f"Agreement with the oracle, Spearman ρ with {METRICS[oracle][0]} over the {n} trials (arms × seeds, "
            "reference sampling settings; a good lower-is-better metric has ρ near -1): "
            + ", ".join(f"{METRICS[m][0]} {_rho(r)}" for m, r in ranks.items())
            + "."
        )
    return [" ".join(lines), ""] if lines else []


def _rho(a: dict[str, float]) -> str:
    return f"{a['rho']:+.2f} (p = {a['p']:.2g})" if math.isfinite(a["rho"]) else "undefined (one side is constant)"


def markdown(
    name: str,
    summary: dict[str, Any],
    axes: dict[str, list[str]],
    seeds: int,
    agreement: dict[str, Any] | None = None,
    setup: dict | None = None,
    cost: tuple[list[str], list[list[str]]] | None = None,
    sampled: str = "",
    rule: SeedRule | None = None,
    within: dict[str, Any] | None = None,
) -> str:
    lines = [f"# Sweep {name}", ""]
    if setup:
        lines += [setup_line(setup), ""]
    if sampled:
        lines += [sampled, ""]
    lines += [
        "Beside each FID, KID and CMMD: the spread of the arm's runs across seeds (their SD) and one run's own "
        "noise, the mean half-width of its 95% jackknife interval over its generated samples: where the noise "
        "is most of the spread, more samples narrow the verdicts more than more seeds.",
        "",
    ]
    lines += seed_lines(summary, axes, rule)
    if seeds < 3 and rule is None:
        lines += [
            f"**{seeds} seed(s) per arm: too few for confident intervals** (95% t-intervals widen sharply below 3).",
            "",
        ]
    level = level_of(rule)
    lines += ["## Headline", "", *headline(summary, axes, level), "", *agreement_lines(agreement)]
    if within:
        lines += ["## Each axis within the other arms", ""]
        lines += [line for held_at, s in within.items() for line in (*headline(s, axes, level, held_at), "")]
    for title, header, rows in tables(summary, axes, level) + (
        [("Cost: wall seconds by phase", *cost)] if cost else []
    ):
        lines += [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows] + [""]
    return "\n".join(lines)


def html_page(
    name: str,
    summary: dict[str, Any],
    axes: dict[str, list[str]],
    agreement: dict[str, Any] | None = None,
    level: str = "95%",
) -> str:
    parts = [
        f"<html><head><meta charset='utf-8'><title>Sweep {html.escape(name)}</title></head>"
        f"<body><h1>Sweep {html.escape(name)}</h1>"
    ]
    parts += [f"<p>{html.escape(line).replace('**', '')}</p>" for line in agreement_lines(agreement) if line]
    for title, header, rows in tables(summary, axes, level):
        parts.append(
            f"<h2>{html.escape(title)}</h2><table border='1' cellpadding='4'><tr>"
            + "".join(f"<th>{html.escape(h)}</th>" for h in header)
            + "</tr>"
        )
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
        ax.errorbar(range(len(arms)), [m.mean for m in means], yerr=[m.half_width for m in means], fmt="o", capsize=4)
        ax.set_xticks(range(len(arms)), arms, rotation=30, fontsize=7)
        ax.set_title(METRICS[metric][0], fontsize=9)
    fig.suptitle(axis)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curves(curves: dict[str, dict[str, dict[str, Interval]]], xs: list[str], xlabel: str, path: Path) -> bool:
    """One panel per metric of `curves` ({metric: {label: {x: mean}}}), one line (mean ± CI) per label
    across `xs`; False (nothing written) when no metric has a curve."""
    metrics = [m for m in curves if curves[m]]
    if not metrics:
        return False
    cols = min(4, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig, plots = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.2 * rows), squeeze=False)
    for ax in plots.flat[len(metrics) :]:
        ax.axis("off")
    for ax, metric in zip(plots.flat, metrics):
        for label, by_x in sorted(curves[metric].items()):
            means = list(by_x.values())
            ax.errorbar(
                [xs.index(x) for x in by_x],
                [m.mean for m in means],
                yerr=[m.half_width for m in means],
                marker="o",
                capsize=3,
                label=label,
            )
        ax.set_xticks(range(len(xs)), xs, fontsize=8, rotation=20 if max(map(len, xs)) > 8 else 0)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_title(METRICS[metric][0], fontsize=9)
    plots[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_sampling_curves(obs: list[Observation], axes: dict[str, list[str]], sampling_axis: str, path: Path) -> bool:
    """The headline eval metrics across one sampling axis, one line (mean ± 95% CI) per trained variant."""
    metrics = [m for m in HEADLINE if m.startswith("eval/")]
    curves = {m: sampling_curves(obs, axes, sampling_axis, m) for m in metrics}
    return plot_curves(curves, list(axes[sampling_axis]), sampling_axis, path)


def sample_sheet(client, obs: list[Observation], path: Path) -> bool:
    """The sample grid of every trained variant's first seed at the reference sampling settings, side by side."""
    firsts: dict[str, Observation] = {}
    for o in sorted(obs, key=lambda o: o.seed):
        if o.run_id and _at_reference(o, o.sampling):
            firsts.setdefault(training_label(o), o)
    panels = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, o in sorted(firsts.items(), key=lambda item: item[0] != "reference"):
            grids = [a.path for a in client.list_artifacts(o.run_id) if a.path.startswith("grid_")]
            if grids:
                panels.append(
                    (
                        f"{label} (seed {o.seed})",
                        Image.open(client.download_artifacts(o.run_id, grids[0], tmp)).convert("RGB"),
                    )
                )
    if panels:
        titled_row(panels).save(path)
    return bool(panels)


def sweep_parent(client, name: str, uri: str):
    """(experiment, parent run) of sweep `name`; exits with an error naming the store when there is none."""
    experiment = client.get_experiment_by_name(name)
    parents = client.search_runs([experiment.experiment_id], f"tags.`{RUN_KEY_TAG}` = '{name}'") if experiment else []
    if not parents:
        raise InputError(f"no sweep {name!r} in {uri}")
    return experiment, parents[0]


def own_transfer(parent) -> str:
    """The side a sweep's trials are evaluated at ("none": the data's; "48px" where its config sets
    eval.image_size=48), from its parent run (sweeps from before it was logged: the data's)."""
    return parent.data.params.get("sweep.transfer", "none")


def read_sweep(
    client, name: str, uri: str, transfer: str | None = None
) -> tuple[dict[str, list[str]], int, SeedRule | None, list[Observation]]:
    """A sweep's axes, its seeds per arm (the first round's with --seeds auto), its seed rule (None: a fixed
    number of seeds) and its observations sampled at `transfer` (default: where its trials were evaluated),
    from MLflow. Eval runs only at other transfers is an error naming them."""
    experiment, parent = sweep_parent(client, name, uri)
    transfer = transfer or own_transfer(parent)
    params = parent.data.params
    axes, seeds = json.loads(params["sweep.axes"]), int(params["sweep.seeds"])
    rule = SeedRule(seeds, int(params["sweep.max_seeds"])) if "sweep.max_seeds" in params else None
    obs = observations(client, experiment.experiment_id, parent.info.run_id, axes, transfer=transfer)
    if not obs and (evals := client.search_runs([experiment.experiment_id], "tags.`mmdit.kind` = 'eval'")):
        raise InputError(
            f"sweep {name}: no evaluation sampled at transfer {transfer!r}; its eval runs are at "
            f"{', '.join(sorted({transfer_of(ev.data.params) for ev in evals}))} (--transfer NAME reads one; "
            "'none' is the data's side)"
        )
    return axes, seeds, rule, obs


def confidence_of(rule: SeedRule | None) -> float:
    """The level of a sweep's intervals: 95%, or its seed rule's (ablations.allocation)."""
    return rule.confidence if rule else CONFIDENCE


def level_of(rule: SeedRule | None) -> str:
    return f"{100 * confidence_of(rule):.3g}%"


def seed_lines(summary: dict[str, Any], axes: dict[str, list[str]], rule: SeedRule | None) -> list[str]:
    """With --seeds auto: the rule, and how many seeds each arm got and why it stopped."""
    if rule is None:
        return []
    lines = [
        f"Seeds by --seeds {rule} (ablations/allocation.py): every arm {rule.min_seeds}, then one more per round "
        f"for the arms still undecided on {', '.join(METRICS[m][0] for m in PRIMARY)}; every interval here is at "
        f"{100 * rule.confidence:.1f}% (95% split over the {rule.looks} looks the rule can take).",
        "",
        "| arm | seeds | status |",
        "|---|---|---|",
    ]
    for (axis, arm), status in arm_status(summary, references(axes), rule).items():
        lines.append(
            f"| {axis}={arm} | {status.seeds} | {status.why}{' (open: rerun to continue)' if status.open else ''} |"
        )
    return lines + [""]


def report(name: str, tracking_uri: str | None = None, out: str | Path | None = None) -> dict[str, Any]:

    uri = tracking_uri or default_uri()
    client = MlflowClient(uri)
    axes, seeds, rule, obs = read_sweep(client, name, uri)
    setup = common_setup(name, obs)
    summary = summarise(obs, axes, confidence_of(rule))
    within = within_arms(obs, axes, confidence_of(rule))
    agreement = oracle_agreement(obs)
    out = Path(out or Path("outputs/sweeps") / name / "report")
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "report.md", out / "report.html"]
    text = markdown(
        name, summary, axes, seeds, agreement, setup, cost_table(obs), sampling_line(obs, axes), rule, within
    )
    files[0].write_text(text)
    files[1].write_text(html_page(name, summary, axes, agreement, level_of(rule)))
    for axis, per_metric in summary.items():
        if per_metric:
            plot_axis(axis, per_metric, out / f"{axis}.png")
            files.append(out / f"{axis}.png")
    if sample_sheet(client, obs, out / "samples.png"):
        files.append(out / "samples.png")
    for axis in (a for a in axes if get_axis(a, axes[a]).kind == "sampling"):
        if plot_sampling_curves(obs, axes, axis, out / f"{axis}_by_trained_arm.png"):
            files.append(out / f"{axis}_by_trained_arm.png")
    tracker = Tracker(uri, name, name, backlog=out / "tracking_backlog.jsonl")
    for file in files:
        tracker.log_artifact(file, "report")
    print(tracker.close().summary())
    return {"summary": summary, "within": within, "agreement": agreement, "files": [str(f) for f in files]}


def transfer_report(
    name: str, transfers: list[str], tracking_uri: str | None = None, out: str | Path | None = None
) -> dict[str, Any]:
    """The sweep's trained variants sampled at each of `transfers` (eval runs' transfer names, e.g. "48px",
    "48px-rope_interpolate"; "none": the data's side), the first the baseline of the differences: transfer.md
    (a table per headline metric) and transfer.png (a panel per metric, a line per variant), logged to the
    sweep's parent run."""
    uri = tracking_uri or default_uri()
    client = MlflowClient(uri)
    by_transfer: dict[str, list[Observation]] = {}
    for transfer in dict.fromkeys(transfers):
        _, _, rule, by_transfer[transfer] = read_sweep(client, name, uri, transfer)
    setups = {transfer: common_setup(name, obs) for transfer, obs in by_transfer.items()}
    metrics = [m for m in HEADLINE if m.startswith("eval/")]
    cells = {m: c for m in metrics if (c := transfer_cells(by_transfer, m, setups, confidence_of(rule)))}
    out = Path(out or Path("outputs/sweeps") / name / "report")
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "transfer.md", out / "transfer.png"]
    files[0].write_text(transfer_markdown(name, cells, setups, level_of(rule)))
    curves = {m: {label: {t: c["mean"] for t, c in row.items()} for label, row in c.items()} for m, c in cells.items()}
    plot_curves(curves, list(by_transfer), "sampled at", files[1])
    tracker = Tracker(uri, name, name, backlog=out / "tracking_backlog.jsonl")
    for file in files:
        tracker.log_artifact(file, "report")
    print(tracker.close().summary())
    return {"cells": cells, "files": [str(f) for f in files]}


def main(argv=None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", required=True, help="the sweep's name (printed by ablations.sweep)")
    add_tracking_uri(parser)
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--transfer",
        action="append",
        default=[],
        metavar="NAME",
        help="instead: the trained variants sampled at these transfers (repeatable; eval runs' names end in them, "
        "e.g. 48px, 48px-rope_ntk; 'none' is the data's side), differences to the first: transfer.md and .png",
    )
    args = parser.parse_args(argv)
    if args.transfer:
        result = transfer_report(args.sweep, args.transfer, args.tracking_uri, args.out)
        print(Path(result["files"][0]).read_text())
        return result
    result = report(args.sweep, args.tracking_uri, args.out)
    print(Path(result["files"][0]).read_text())
    return result


if __name__ == "__main__":
    run_command(main)
