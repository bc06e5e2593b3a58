"""Run an ablation sweep with Ray Tune: every training trial (training-time arms × seeds) trains with Ray
Train, then its checkpoint is evaluated at every sampling-time arm without retraining.

    python -m ablations.sweep --preset critical_details [--set k=v ...]
    python -m ablations.sweep --axes pos_emb,cfg_scale --seeds 3 [--config C] [--set k=v ...]
    python -m ablations.sweep --axis model.width=128,64,256 [--axis flow.shift=...] [--preset P | --axes A]
    ray job submit --working-dir . -- python -m ablations.sweep --preset critical_details
    python -m ablations.sweep --reevaluate NAME [--set eval.clip_model=trained ...]

The sweep's name is the preset (or axes) plus a hash of everything that defines it, so running the
same command again continues it: finished trials are kept, unfinished and failed ones run again (and
a trial's training resumes from its own last checkpoint). A failed trial is recorded with its error
and does not stop the others. MLflow: the experiment is named after the sweep; one parent run for the
sweep, one nested run per trial (the training run, tagged axis arms and seed), and under each trial
the nested eval runs of its sampling-time arms. At the end the report (ablations.report) is written.

--reevaluate evaluates every trial of an existing sweep again from its last checkpoint, without Ray and
without training (e.g. once a CLIP is trained, or with more samples: --set changes the evaluation), logs
to the same MLflow runs and writes the report again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from mlflow.tracking import MlflowClient

from eval.evaluator import GRID, resolve_checkpoint
from experiments.cli import add_overrides, add_tracking_uri, run_command, sigterm_raises_killed, was_killed
from experiments.cluster import check_storage, start_ray
from experiments.demo import prepare_inputs
from experiments.evaluate import evaluate
from experiments.rank_loop import Faults
from experiments.tracking import RUN_KEY_TAG, Tracker, default_uri
from experiments.train import check_inputs, fit, storage_location
from mmdit_core.config import load_config
from mmdit_core.errors import InputError

from .allocation import ArmStatus, SeedRule, arm_status
from .axes import AXES, get_axis, references
from .plan import PROJECT_ROOT, SweepPlan, Trial, load_preset, preset_names
from .report import read_sweep, report, summarise, sweep_parent

STORAGE = "outputs/sweeps"


def sweep_name(plan: SweepPlan) -> str:
    definition = json.dumps(
        {
            "config": load_config(plan.config).to_dict(),
            "axes": plan.axes,
            "seeds": plan.seeds,
            "overrides": plan.overrides,
            "combine": plan.combine,
            **({"max_seeds": plan.max_seeds} if plan.max_seeds is not None else {}),  # a fixed sweep keeps its name
        },
        sort_keys=True,
    )
    return f"{plan.name}-{hashlib.sha256(definition.encode()).hexdigest()[:8]}"


def trial_config(plan: SweepPlan, name: str, trial: Trial):
    """The trial's resolved config; its `name` is the sweep's, so all its runs share the sweep's experiment."""
    return load_config(plan.config, [*plan.overrides, *trial.overrides(), f"name={name}"])


def trial_of(plan: SweepPlan, space: dict[str, Any]) -> Trial:
    """The trial of a Tune config (arms come back as lists after Tune stores them)."""
    return plan.trial(tuple(tuple(pair) for pair in space["arms"]), space["seed"])


def evaluate_arms(
    plan: SweepPlan, checkpoint: str, tracking_uri: str, run_name: str | None = None, extra: tuple[str, ...] = ()
) -> tuple[dict[str, float], dict[str, Any]]:
    """The checkpoint's eval metrics at every sampling-time arm (`eval/<metric>` at the reference, else
    `eval_<axis>_<arm>/<metric>`; sampled at another side, `eval_<transfer>...`, e.g. `eval_48px-rope_ntk/fid`,
    so a resolution-transfer evaluation never overwrites the trained size's), and the last evaluate() report
    (its step, its CLIP). A sampler, steps or CFG axis is one evaluate() call over its arms (its grid), so the
    text encoder, Inception and validation loss are set up once per axis, not once per arm.
    `extra`: overrides of the evaluation on top of the checkpoint's config."""
    reference = plan.sampling_overrides("reference", "reference")
    results: dict[str, float] = {}
    reports: list[dict[str, Any]] = []

    def record(metrics: dict[str, float], axis: str | None = None, arm: str | None = None):
        base = "_".join(filter(None, ("eval", reports[-1]["transfer"])))
        prefix = base if axis is None or arm == plan.axis(axis).reference else f"{base}_{axis}_{arm}"
        results.update({f"{prefix}/{k}": v for k, v in metrics.items()})

    def points(overrides: list[str], grid: dict[str, list[Any]] | None = None) -> list[dict[str, Any]]:
        reports.append(
            evaluate(
                checkpoint,
                grid=grid,
                overrides=[*overrides, *extra],
                tracking_uri=tracking_uri,
                verbose=False,
                run_name=run_name,
            )
        )
        return reports[-1]["points"]

    def grid_field(axis) -> str | None:
        field = axis.field.removeprefix("sample.")
        return field if axis.field.startswith("sample.") and field in GRID else None

    sampling = plan.of_kind("sampling")
    if not any(grid_field(plan.axis(name)) for name in sampling):
        record(points(reference)[0]["metrics"])
    for name, arms in sampling.items():
        axis = plan.axis(name)
        if field := grid_field(axis):  # each such grid holds the reference point: scored again, with the same noise
            for arm, point in zip(arms, points(reference, {field: [GRID[field].parse(a) for a in arms]})):
                record(point["metrics"], name, arm)
        else:
            for arm in arms:
                if arm != axis.reference:
                    record(points(plan.sampling_overrides(name, arm))[0]["metrics"], name, arm)
    return results, reports[-1]


def log_trial_results(
    uri: str, experiment: str, run_name: str, run_dir: Path, results: dict[str, float], evaluated: dict[str, Any]
) -> None:
    """The eval metrics on the trial's own run too (at the checkpoint's step, tagged with the CLIP that
    scored), so comparing trial runs in the MLflow UI shows their eval results side by side."""
    tracker = Tracker(uri, experiment, run_name, backlog=run_dir / "tracking_backlog.jsonl")
    tracker.log_metrics(results, evaluated["step"])
    tracker.set_tags({"clip_model": evaluated["clip"] or "none"})
    tracker.close()


def run_trial(config: dict[str, Any]) -> None:
    """One Tune trial: train (or resume) the trial's run, then evaluate it at every sampling-time arm."""
    from ray import tune

    sweep = config["sweep"]
    if Path(
        sweep["cwd"]
    ).is_dir():  # Tune starts a trial in its own directory; config paths are relative to the sweep's
        os.chdir(sweep["cwd"])
    plan = SweepPlan(**sweep["plan"])
    trial = trial_of(plan, config["trial"])
    cfg = trial_config(plan, sweep["name"], trial)
    tags = {
        "mlflow.parentRunId": sweep["parent_run_id"],
        "sweep": sweep["name"],
        "trial": trial.name,
        **{f"arm.{axis}": arm for axis, arm in trial.arms},
    }
    summary = fit(
        cfg, tracking_uri=sweep["tracking_uri"], tags=tags, faults=Faults(**sweep["faults"].get(trial.name, {}))
    )
    if summary.get("status") != "FINISHED" or not summary.get("checkpoint"):
        raise RuntimeError(f"trial {trial.name}: training ended {summary.get('status')} without a checkpoint")
    # Ray starts this 0-CPU process with OMP_NUM_THREADS=1; the CPUs its training held are free for evaluation now
    torch.set_num_threads(cfg.train.num_workers * cfg.train.cpus_per_worker)
    results, evaluated = evaluate_arms(plan, summary["checkpoint"], sweep["tracking_uri"])
    log_trial_results(
        sweep["tracking_uri"], cfg.name, cfg.run_name(), Path(summary["grid"]).parent.parent, results, evaluated
    )
    tune.report({"trial": trial.name, "val_loss": summary["val_loss"], **results})


def fit_round(sweep: dict[str, Any], trials: list[Trial], storage: Path, name: str, concurrent: int) -> dict[str, str]:
    """Fit `trials` with one Tune run kept at storage/name (continued when it is there); trial name -> outcome."""
    from ray import tune

    space = {"sweep": sweep, "trial": tune.grid_search([{"arms": t.arms, "seed": t.seed} for t in trials])}
    # The trial process only waits on Ray Train, then evaluates: the training workers hold the CPUs. Ray
    # refuses an empty request, so the trial asks for a token of memory instead of a CPU.
    trainable = tune.with_resources(run_trial, {"cpu": 0, "memory": 2**20})
    path, plan = str(storage / name), SweepPlan(**sweep["plan"])
    if tune.Tuner.can_restore(path):
        print(f"continuing sweep {name}: finished trials are kept, unfinished and failed ones run again")
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, restart_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(max_concurrent_trials=concurrent),
            run_config=tune.RunConfig(name=name, storage_path=str(storage)),
        )
    return {
        trial_of(plan, r.config["trial"]).name: f"FAILED: {str(r.error).splitlines()[0]}" if r.error else "FINISHED"
        for r in tuner.fit()
    }


def arm_statuses(name: str, uri: str, rule: SeedRule, seeds: int) -> dict[tuple[str, str], ArmStatus]:
    """Every arm's status (ablations.allocation) from its first `seeds` seeds, read from the sweep's MLflow
    runs, and printed. Later seeds are left out, so a rerun takes every look again exactly as it was taken."""

    axes, _, _, obs = read_sweep(MlflowClient(uri), name, uri)
    obs = [o for o in obs if o.seed < seeds]
    status = arm_status(summarise(obs, axes, rule.confidence), references(axes), rule)
    for (axis, arm), s in status.items():
        print(f"  {axis}={arm}: {s.why}")
    return status


def variants_to_seed(plan: SweepPlan, status: dict[tuple[str, str], ArmStatus]) -> list[tuple[tuple[str, str], ...]]:
    """The trained variants that get another seed: each one moving an open training arm, and the reference
    whenever any arm, of a training or a sampling axis, is open (every paired difference needs its seed)."""
    open_arms = {key for key, s in status.items() if s.open}
    if not open_arms:
        return []
    combos = plan.combos()
    return [combos[0]] + [combo for combo in combos[1:] if any(pair in open_arms for pair in combo)]


def run(
    plan: SweepPlan,
    *,
    tracking_uri: str | None = None,
    address: str | None = None,
    storage: str = STORAGE,
    faults: dict[str, Faults] | None = None,
) -> dict[str, Any]:
    """Run or continue the sweep (with --seeds auto, round by round: ablations.allocation); returns its name,
    MLflow parent run id and per-trial outcome.
    `faults`: fault drills by trial name (train's one-shot drills: a rerun of the sweep runs clean)."""
    import ray

    name, uri = sweep_name(plan), tracking_uri or default_uri()
    trials = plan.trials()
    base = trial_config(plan, name, trials[0])
    prepare_inputs(base)  # shards, autoencoder, CLIP and latent cache, made or reused: training arms share them
    for trial in trials:  # a bad arm or missing data is refused before anything starts
        check_inputs(trial_config(plan, name, trial))
    parent = Tracker(
        uri,
        name,
        name,
        backlog=Path(storage) / name / "tracking_backlog.jsonl",
        tags={
            "sweep": name,
            "preset": plan.name,
            "axes": ",".join(plan.axes),
            "seeds": str(plan.seed_rule or plan.seeds),
        },
    )
    parent.log_params(
        {
            "sweep.axes": json.dumps(plan.axes),
            "sweep.seeds": plan.seeds,
            **({"sweep.max_seeds": plan.max_seeds} if plan.max_seeds is not None else {}),
            "sweep.combine": plan.combine,
            "sweep.config": plan.config,
            "sweep.overrides": json.dumps(plan.overrides),
            "sweep.transfer": base.transfer or "none",  # the side its trials are evaluated at: what its report reads
        }
    )
    if not parent.wait_ready(30):
        parent.close()
        raise InputError(f"MLflow at {uri} does not answer; a sweep needs its parent run before trials start")
    parent_id = parent.result.run_id

    status, error = "FAILED", None
    try:
        start_ray(address)
        shared = base.train.storage_shared
        check_storage(storage_location(base)[0], shared)  # every trial's Ray Train storage, before any trial
        check_storage(str(Path(storage).resolve()), shared, "the sweep's Tune storage")
        with sigterm_raises_killed():  # after ray.init, which installs its own handler
            per_trial = base.train.num_workers * base.train.cpus_per_worker
            concurrent = max(1, int(ray.cluster_resources().get("CPU", 1) // per_trial))
            sweep = {
                "plan": dict(plan.__dict__),
                "name": name,
                "parent_run_id": parent_id,
                "tracking_uri": uri,
                "cwd": os.getcwd(),
                "faults": {k: asdict(v) for k, v in (faults or {}).items()},
            }
            outcome = fit_round(sweep, trials, Path(storage).resolve(), name, concurrent)
            if rule := plan.seed_rule:
                for seed in range(plan.seeds, rule.max_seeds):
                    variants = variants_to_seed(plan, arm_statuses(name, uri, rule, seed))
                    if not variants:
                        break
                    more = [plan.trial(combo, seed) for combo in variants]
                    outcome |= fit_round(sweep, more, Path(storage).resolve(), f"{name}-seed{seed}", concurrent)
        failed = sum(v != "FINISHED" for v in outcome.values())
        parent.set_tags({"trials_failed": str(failed), "trials": str(len(outcome))})
        status, error = (
            "FAILED" if failed == len(outcome) else "FINISHED",
            f"{failed} trials failed" if failed else None,
        )
    except BaseException as exc:
        status, error = ("KILLED", "SIGTERM") if was_killed(exc) else ("FAILED", f"{type(exc).__name__}: {exc}")
        raise
    finally:
        end_open_trials(uri, parent_id, status)
        parent.set_status(status, error)
        print(parent.close().summary())
    return {"sweep": name, "mlflow_parent_run_id": parent_id, "trials": outcome, "failed": failed}


def end_open_trials(uri: str, parent_id: str, status: str) -> None:
    """End the sweep's trial runs still RUNNING as the driver leaves. A trial ends its own run, unless its
    process dies first: with the driver (SIGTERM) or with a lost Ray worker. Such a run gets the sweep's
    status if that is KILLED, else FAILED, and says why; a rerun of the sweep reopens it like any other."""
    try:
        client = MlflowClient(uri)
        experiment = client.get_run(parent_id).info.experiment_id
        query = f"tags.mlflow.parentRunId = '{parent_id}' and attributes.status = 'RUNNING'"
        open_runs = client.search_runs([experiment], query)
        for run in open_runs:
            client.set_tag(run.info.run_id, "error", f"its trial process ended before this run (sweep {status})")
            client.set_terminated(run.info.run_id, "KILLED" if status == "KILLED" else "FAILED")
    except Exception as exc:  # MLflow down: the parent's backlog keeps its own status; these stay as they are
        print(f"could not end the sweep's open trial runs at {uri}: {type(exc).__name__}: {exc}")
        return
    if open_runs:
        print(f"ended {len(open_runs)} trial runs left RUNNING: {', '.join(r.info.run_name for r in open_runs)}")


def reevaluate(name: str, tracking_uri: str | None = None, overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """Evaluate every finished trial of sweep `name` again from its last checkpoint, logged to the same runs.
    The plan comes from the sweep's parent run, each checkpoint from its trial run's storage path (a
    relative one is read from the current directory: run it where the sweep ran). A trial that fails
    is counted and reported; the others go on."""

    uri = tracking_uri or default_uri()
    client = MlflowClient(uri)
    experiment, parent = sweep_parent(client, name, uri)
    params = parent.data.params
    plan = SweepPlan(
        name=name,
        config=params["sweep.config"],
        axes=json.loads(params["sweep.axes"]),
        seeds=int(params["sweep.seeds"]),
        overrides=tuple(json.loads(params["sweep.overrides"])),
        combine=params["sweep.combine"],
        max_seeds=int(params["sweep.max_seeds"]) if "sweep.max_seeds" in params else None,
    )
    trials = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    outcome = {}
    for i, trial in enumerate(trials, 1):
        run_name = trial.data.tags[RUN_KEY_TAG]
        label = trial.data.tags.get("trial", run_name)
        if trial.info.status != "FINISHED":  # a failed trial's checkpoint is not the trained model
            outcome[run_name] = f"SKIPPED: its training ended {trial.info.status}"
            print(f"[{i}/{len(trials)}] {label}: skipped, its training ended {trial.info.status}")
            continue
        storage = trial.data.params.get("train.storage_path", "")
        run_dir = Path(storage) / run_name
        print(f"[{i}/{len(trials)}] re-evaluating {label} from {run_dir}", flush=True)
        try:
            if "://" in storage or not storage:
                raise FileNotFoundError(
                    f"its checkpoints are not in a local directory (train.storage_path={storage!r})"
                )
            results, evaluated = evaluate_arms(plan, str(resolve_checkpoint(run_dir)), uri, run_name, overrides)
        except Exception as exc:  # noqa: BLE001 - one trial's failure is reported, the others go on
            outcome[run_name] = f"FAILED: {type(exc).__name__}: {exc}"
            print(f"  failed: {outcome[run_name]}")
            continue
        log_trial_results(uri, name, run_name, run_dir, results, evaluated)
        outcome[run_name] = "FINISHED"
    done = sum(v == "FINISHED" for v in outcome.values())
    print(
        f"re-evaluated {done} of {len(outcome)} trials"
        + "".join(f"; {k}: {v}" for k, v in outcome.items() if v != "FINISHED")
    )
    return {
        "sweep": name,
        "trials": outcome,
        "failed": sum(v.startswith("FAILED") for v in outcome.values()),
        "skipped": sum(v.startswith("SKIPPED") for v in outcome.values()),
    }


def parse_seeds(text: str) -> tuple[int, int | None]:
    """--seeds: N -> (N, None); auto -> (2, 6); auto:MIN-MAX -> (MIN, MAX)."""
    try:
        if not text.startswith("auto"):
            return int(text), None
        spec = text.removeprefix("auto").removeprefix(":")
        low, high = (int(v) for v in spec.split("-")) if spec else (2, 6)
    except ValueError:
        raise InputError(f"--seeds {text!r}: expected a number, `auto` or `auto:MIN-MAX` (e.g. auto:2-6)") from None
    return SeedRule(low, high).min_seeds, high  # a bad range is named by SeedRule


def field_axes(specs: list[str], chosen: list[str]) -> dict[str, tuple[str, ...]]:
    """--axis FIELD=V1,V2,... -> {FIELD: values, the reference first}: the first value given, or the one
    --reference FIELD=V names."""
    references = dict(r.partition("=")[::2] for r in chosen)
    axes = {}
    for spec in specs:
        field, _, values = spec.partition("=")
        arms = tuple(v.strip() for v in values.split(",") if v.strip())
        if not field or not arms:
            raise InputError(f"--axis {spec!r}: expected FIELD=V1,V2,... (e.g. model.width=128,64,256)")
        if field in references:
            reference = references.pop(field)
            if reference not in arms:
                raise InputError(f"--reference {field}={reference}: not one of its values {','.join(arms)}")
            arms = (reference, *(a for a in arms if a != reference))
        axes[field] = arms
    if references:
        raise InputError(f"--reference {', '.join(references)}: no --axis on that field")
    return axes


def check_arms(plan: SweepPlan) -> None:
    """Every trial's and every sampling arm's config resolved: an unknown field or a bad value is named
    before anything starts."""
    for trial in plan.trials():
        load_config(plan.config, [*plan.overrides, *trial.overrides()])
    for name, arms in plan.of_kind("sampling").items():
        for arm in arms:
            load_config(plan.config, [*plan.overrides, *plan.sampling_overrides(name, arm)])


def plan_from_args(args: argparse.Namespace) -> SweepPlan:
    extra = field_axes(args.axis, args.reference)
    if args.preset:
        plan = load_preset(args.preset)
        seeds, max_seeds = parse_seeds(args.seeds) if args.seeds else (plan.seeds, plan.max_seeds)
        overrides = (*plan.overrides, *args.overrides)
        axes = {**plan.axes, **extra}
        return SweepPlan(
            **{**plan.__dict__, "axes": axes, "overrides": overrides, "seeds": seeds, "max_seeds": max_seeds}
        )
    axes = {name: get_axis(name).arms for name in args.axes.split(",")} if args.axes else {}
    axes |= extra
    seeds, max_seeds = parse_seeds(args.seeds) if args.seeds else (1, None)
    return SweepPlan(
        name="_".join(axes),
        config=str(Path(args.config).resolve()),
        axes=axes,
        seeds=seeds,
        overrides=tuple(args.overrides),
        max_seeds=max_seeds,
    )


def main(argv=None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--preset", help=f"a preset in ablations/presets: {', '.join(preset_names())}")
    which.add_argument("--axes", help=f"comma-separated axes, all arms each: {', '.join(AXES)}")
    which.add_argument(
        "--reevaluate", metavar="NAME", help="evaluate an existing sweep's checkpoints again (no training)"
    )
    parser.add_argument(
        "--axis",
        action="append",
        default=[],
        metavar="FIELD=V1,V2",
        help="an axis on any config field, at these values, the first the reference (repeatable; alone or with "
        "--preset/--axes); sampling-time for the sampling fields eval.evaluator.GRID varies, else training-time",
    )
    parser.add_argument(
        "--reference",
        action="append",
        default=[],
        metavar="FIELD=V",
        help="the reference value of an --axis (default: its first value)",
    )
    parser.add_argument(
        "--config", default=str(PROJECT_ROOT / "experiments/configs/demo.yaml"), help="base config (with --axes)"
    )
    parser.add_argument(
        "--seeds",
        default=None,
        help="seeds per arm (default: the preset's, else 1), or auto[:MIN-MAX] (default 2-6): further seeds only "
        "for arms still undecided (ablations/allocation.py)",
    )
    add_overrides(parser, "override a field of every trial's config")
    add_tracking_uri(parser)
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    args = parser.parse_args(argv)
    if not (args.preset or args.axes or args.axis or args.reevaluate):
        parser.error("one of --preset, --axes, --axis or --reevaluate is required")
    if args.reevaluate and args.axis:
        parser.error("--axis defines a sweep; --reevaluate reads an existing one")
    if args.reevaluate:
        result = reevaluate(args.reevaluate, args.tracking_uri, tuple(args.overrides))
        written = report(args.reevaluate, args.tracking_uri)
        print(f"report: {written['files'][0]}")
        return result
    try:
        plan = plan_from_args(args)
        load_config(plan.config, list(plan.overrides))  # refuse a bad --set at once
        check_arms(plan)
    except KeyError as exc:  # an unknown axis or arm (InputErrors reach run_command as they are)
        raise InputError(exc.args[0]) from None
    result = run(plan, tracking_uri=args.tracking_uri, address=args.address)
    print(json.dumps(result, indent=2))
    written = report(result["sweep"], args.tracking_uri)
    print(f"report: {written['files'][0]} (python -m ablations.report --sweep {result['sweep']} writes it again)")
    return result


if __name__ == "__main__":
    run_command(main)
