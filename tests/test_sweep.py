"""A smoke sweep through Ray Tune: one training run per training arm × seed, sampling arms evaluated on
each checkpoint without retraining, nested MLflow runs, and a rerun that adds nothing."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from ablations import allocation, report, sweep
from ablations.allocation import SeedRule
from ablations.axes import get_axis
from ablations.plan import SweepPlan
from experiments import prepare_data, train_clip
from experiments.rank_loop import Faults
from experiments.tracking import RUN_KEY_TAG
from mmdit_core.config import load_config
from mmdit_core.errors import InputError

TINY = Path(__file__).parent / "tiny_train.yaml"


def observation(arms, sampling, seed, metrics, **fields) -> report.Observation:
    """An Observation as a sweep of these named axes reads it: each axis's reference is its own."""
    references = {axis: get_axis(axis).reference for axis in (*arms, *sampling)}
    return report.Observation(arms, sampling, seed, metrics, references=references, **fields)


def test_smoke_sweep_on_a_field_axis_survives_a_failed_trial_and_nests_its_runs(tmp_path, local_ray):
    overrides = (
        f"data.root={tmp_path / 'scenes'}",
        f"text.cache_dir={tmp_path / 'text'}",
        f"train.storage_path={tmp_path / 'runs'}",
        f"eval.stats_dir={tmp_path / 'stats'}",
        "train.max_failures=0",
        "train.num_workers=1",
        "train.steps=4",
        "train.sample_every=0",
        "eval.num_samples=4",
        "eval.clip_model=null",
    )
    prepare_data.prepare(load_config(TINY, list(overrides)))
    plan = SweepPlan(
        "smoke",
        str(TINY),
        {"model.sdpa_layout": ("heads_first", "seq_first"), "cfg_scale": ("1.0", "2.0")},  # a field axis,
        seeds=1,
        overrides=overrides,
    )
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    storage = str(tmp_path / "sweeps")
    crashed = sweep.run(
        plan, tracking_uri=uri, storage=storage, faults={"model.sdpa_layout=seq_first-s0": Faults(kill_at_step=3)}
    )
    assert crashed["failed"] == 1 and crashed["trials"]["reference-s0"] == "FINISHED"
    assert crashed["trials"]["model.sdpa_layout=seq_first-s0"].startswith("FAILED")
    result = sweep.run(plan, tracking_uri=uri, storage=storage)  # the same command again: only the failed trial runs
    assert result["sweep"] == crashed["sweep"] and result["failed"] == 0
    assert set(result["trials"]) == {"reference-s0", "model.sdpa_layout=seq_first-s0"}

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(result["sweep"]).experiment_id
    (parent,) = client.search_runs([experiment], f"tags.`{RUN_KEY_TAG}` = '{result['sweep']}'")
    trials = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.data.tags["trial"] for r in trials) == ["model.sdpa_layout=seq_first-s0", "reference-s0"]
    for run in trials:  # trained once, evaluated at both CFG scales
        assert run.info.status == "FINISHED" and run.data.tags["arm.model.sdpa_layout"] in ("heads_first", "seq_first")
        evals = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
        assert sorted(r.data.tags["cfg_scale"] for r in evals) == ["1", "2"]
        assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 1  # trained once, never twice
        assert {"eval/fid", "eval/adherence_position", "eval_cfg_scale_2.0/fid"} <= set(run.data.metrics)
    assert len(list((tmp_path / "runs").iterdir())) == 2  # one training run directory per trial
    resumed = next(run for run in trials if run.data.tags["trial"] == "model.sdpa_layout=seq_first-s0")
    attempts = [
        json.loads(line)
        for line in (tmp_path / "runs" / resumed.data.tags[RUN_KEY_TAG] / "attempts.jsonl").read_text().splitlines()
    ]
    assert [a["status"] for a in attempts] == ["FAILED", "FINISHED"]
    assert resumed.data.metrics["wall_s"] == pytest.approx(sum(a["seconds"] for a in attempts))
    assert (
        resumed.data.metrics["wall_s"] < (resumed.info.end_time - resumed.info.start_time) / 1000
    )  # not the time it was down
    assert len(client.search_runs([experiment], "")) == 1 + 2 + 4  # no duplicate runs after the rerun

    written = report.report(result["sweep"], uri, tmp_path / "report")
    text = (tmp_path / "report" / "report.md").read_text()
    for arm in ("heads_first", "seq_first", "| 1.0 |", "| 2.0 |"):
        assert arm in text, arm
    assert "too few for confident intervals" in text and (tmp_path / "report" / "model.sdpa_layout.png").is_file()
    assert (tmp_path / "report" / "cfg_scale_by_trained_arm.png").is_file()
    assert written["summary"]["cfg_scale"]["eval/fid"]["2.0"]["mean"].n == 1
    assert written["agreement"] == {"clips": [], "ranks": {}}  # no CLIP scored; 2 trials: too few to rank
    assert "CLIP score" not in text
    assert (
        "Every FID, KID and CMMD here: " in text
        and "precision fp32" in text
        and "## Cost: wall seconds by phase" in text
    )
    assert "Sampled with: sampler euler, steps 2, cfg_scale 1.0/2.0 (axis cfg_scale), shift 1.0, noise_seed 0." in text
    cost = text.split("## Cost: wall seconds by phase")[1]
    assert "| steps |" in cost and "| eval_inception |" in cost and "| all trials |" in cost

    # a CLIP trained for the sweep's data afterwards: the trials are evaluated again from their checkpoints
    fids = {
        ev.info.run_id: ev.data.metrics["eval/fid"]
        for run in trials
        for ev in client.search_runs([experiment], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    }
    train_clip.train_and_save(
        load_config(
            TINY,
            [
                *overrides,
                "clip.train_steps=2",
                "clip.width=32",
                "clip.num_heads=2",
                "clip.depth=1",
                "clip.batch_size=8",
            ],
        ),
        uri,
    )
    again = sweep.reevaluate(result["sweep"], uri, ("eval.clip_model=trained",))
    assert again["failed"] == again["skipped"] == 0 and set(again["trials"]) == {
        r.data.tags[RUN_KEY_TAG] for r in trials
    }
    assert len(client.search_runs([experiment], "")) == 1 + 2 + 4  # the same runs, scored again
    for run in client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"):
        assert (
            "eval/clip_score" in run.data.metrics and len(client.get_metric_history(run.info.run_id, "train/loss")) == 1
        )
        for ev in client.search_runs([experiment], f"tags.mlflow.parentRunId = '{run.info.run_id}'"):
            assert (
                ev.data.tags["clip_model"].startswith("CLIP trained here on") and "eval/clip_score" in ev.data.metrics
            )
            assert ev.data.metrics["eval/fid"] == pytest.approx(
                fids[ev.info.run_id], rel=1e-6
            )  # same noise, same samples
        assert run.data.tags["clip_model"].startswith("CLIP trained here on")
    rescored = report.report(result["sweep"], uri, tmp_path / "report")
    assert "CLIP score and CMMD by: CLIP trained here on" in Path(rescored["files"][0]).read_text()

    # sampled at another side: its own eval runs and trial metrics, read only with --transfer
    before = {r.info.run_id: r.data.metrics for r in client.search_runs([experiment], "tags.trial != ''")}
    moved = sweep.reevaluate(result["sweep"], uri, ("eval.image_size=24",))
    assert moved["failed"] == 0 and len(client.search_runs([experiment], "")) == 1 + 2 + 4 + 4
    for run in client.search_runs([experiment], "tags.trial != ''"):
        assert (
            run.data.metrics["eval/fid"] == before[run.info.run_id]["eval/fid"] and "eval_24px/fid" in run.data.metrics
        )
    unmoved = report.report(result["sweep"], uri, tmp_path / "report")
    assert (
        unmoved["summary"]["cfg_scale"]["eval/fid"]["2.0"]["mean"]
        == rescored["summary"]["cfg_scale"]["eval/fid"]["2.0"]["mean"]
    )
    transfer = report.main(
        [
            "--sweep",
            result["sweep"],
            "--tracking-uri",
            uri,
            "--out",
            str(tmp_path / "t"),
            "--transfer",
            "none",
            "--transfer",
            "24px",
        ]
    )
    assert set(transfer["cells"]["eval/fid"]) == {"reference", "model.sdpa_layout=seq_first"}
    fid = transfer["cells"]["eval/fid"]["reference"]
    assert set(fid) == {"none", "24px"} and fid["24px"]["verdict"] == report.OTHER_SETUP  # another image size
    assert (tmp_path / "t" / "transfer.png").is_file() and "At 24px: Every FID" in (
        tmp_path / "t" / "transfer.md"
    ).read_text()
    with pytest.raises(InputError, match="no evaluation sampled at transfer '40px'; its eval runs are at 24px, none"):
        report.transfer_report(result["sweep"], ["40px"], uri, tmp_path / "t")


def test_report_summary_reads_each_axis_against_its_reference_with_intervals(tmp_path):
    def obs(pos_emb, cfg_scale, seed, position, fid):
        return observation(
            {"pos_emb": pos_emb}, {"cfg_scale": cfg_scale}, seed, {"eval/adherence_position": position, "eval/fid": fid}
        )

    axes = {"pos_emb": ["learned", "none"], "cfg_scale": ["1.0", "4.0"]}
    observations = [obs("learned", "1.0", s, 0.9 + 0.01 * s, 50.0 + s) for s in range(3)]
    observations += [obs("learned", "4.0", s, 0.95 + 0.01 * s, 50.5 + s) for s in range(3)]
    observations += [obs("none", "1.0", s, 0.2 + 0.02 * s, 80.0 + s) for s in range(3)]
    observations += [obs("none", "4.0", s, 0.3, 90.0) for s in range(3)]  # never read: both axes off reference
    summary = report.summarise(observations, axes)
    none = summary["pos_emb"]["eval/adherence_position"]["none"]
    assert none["mean"].n == 3 and none["diff"].mean < 0 and none["verdict"] == "worse"
    assert summary["pos_emb"]["eval/fid"]["none"]["verdict"] == "worse"  # higher FID is worse
    assert summary["cfg_scale"]["eval/adherence_position"]["4.0"]["diff"].mean > 0
    assert summary["cfg_scale"]["eval/adherence_position"]["4.0"]["verdict"] == "better"
    assert summary["pos_emb"]["eval/fid"]["learned"]["verdict"] == "reference"
    text = report.markdown("s", summary, axes, seeds=3)
    assert "| position adherence | none | 3 |" in text and "too few" not in text
    assert "| pos_emb=none: difference | +30 [+30, +30] (worse) |" in text  # headline: FID 80+s vs 50+s

    curves = report.sampling_curves(observations, axes, "cfg_scale", "eval/fid")
    assert set(curves) == {"reference", "pos_emb=none"}  # every trained variant, across every CFG arm
    assert curves["pos_emb=none"]["4.0"].mean == 90.0 and curves["reference"]["4.0"].mean == 51.5
    assert report.plot_sampling_curves(observations, axes, "cfg_scale", tmp_path / "curves.png")


def test_a_product_sweep_reads_each_axis_again_within_the_other_axes_arms():
    def obs(bug, pos, seed):  # the head-axis bug costs 10 FID with the table, 100 without positions
        fid = (
            50.0 + seed + {"learned": 0.0, "none": 30.0}[pos] + (bug == "seq_first") * {"learned": 10, "none": 100}[pos]
        )
        return observation({"sdpa_layout": bug, "pos_emb": pos}, {}, seed, {"eval/fid": fid + 0.1 * (seed % 2)})

    axes = {"sdpa_layout": ["heads_first", "seq_first"], "pos_emb": ["learned", "none"]}
    product = [obs(b, p, s) for b in axes["sdpa_layout"] for p in axes["pos_emb"] for s in range(3)]
    within = report.within_arms(product, axes)
    assert set(within) == {"pos_emb=none", "sdpa_layout=seq_first"}  # each other arm of each training axis
    assert within["sdpa_layout=seq_first"]["pos_emb"]["eval/fid"]["none"]["diff"].mean == pytest.approx(120.0)
    held = within["pos_emb=none"]
    assert set(held) == {"sdpa_layout"}  # the held axis itself is not read
    assert held["sdpa_layout"]["eval/fid"]["seq_first"]["diff"].mean == pytest.approx(100.0)
    assert report.summarise(product, axes)["sdpa_layout"]["eval/fid"]["seq_first"]["diff"].mean == pytest.approx(10.0)
    text = report.markdown("p", report.summarise(product, axes), axes, 3, within=within)
    assert "| sdpa_layout=seq_first at pos_emb=none: difference | +100" in text

    one_at_a_time = [
        o for o in product if o.training["sdpa_layout"] == "heads_first" or o.training["pos_emb"] == "learned"
    ]
    assert report.within_arms(one_at_a_time, axes) == {}  # nothing to pair within pos_emb=none


def test_transfer_cells_difference_each_trained_variant_against_its_own_checkpoints_at_the_first_transfer(tmp_path):
    positions = {  # per seed: the table transfers as it is; rotary positions only once interpolated
        "48px": {"learned": [0.90, 0.95, 0.97], "rope2d": [0.10, 0.20, 0.15]},
        "48px-rope_interpolate": {"learned": [0.90, 0.95, 0.97], "rope2d": [0.95, 0.99, 0.97]},
    }
    by_transfer = {
        transfer: [
            observation({"pos_emb": arm}, {}, seed, {"eval/adherence_position": value, "eval/fid": 100.0 - value})
            for arm, values in arms.items()
            for seed, value in enumerate(values)
        ]
        for transfer, arms in positions.items()
    }
    by_transfer["48px-rope_interpolate"].append(observation({"pos_emb": "none"}, {}, 0, {"eval/fid": 1.0}))
    setups = {"48px": {"image_size": "48"}, "48px-rope_interpolate": {"image_size": "48"}}
    cells = report.transfer_cells(by_transfer, "eval/adherence_position", setups)
    rope = cells["pos_emb=rope2d"]["48px-rope_interpolate"]
    assert rope["diff"].mean == pytest.approx(0.82) and rope["verdict"] == "better"
    assert cells["reference"]["48px-rope_interpolate"]["diff"].mean == pytest.approx(0.0)
    assert cells["pos_emb=rope2d"]["48px"]["verdict"] == "reference" and "pos_emb=none" not in cells
    fid = report.transfer_cells(by_transfer, "eval/fid", setups)
    assert fid["pos_emb=none"]["48px-rope_interpolate"]["diff"] is None
    assert fid["pos_emb=rope2d"]["48px-rope_interpolate"]["diff"].mean == pytest.approx(-0.82)
    other = report.transfer_cells(by_transfer, "eval/fid", {**setups, "48px-rope_interpolate": {"image_size": "64"}})
    assert other["pos_emb=rope2d"]["48px-rope_interpolate"]["verdict"] == report.OTHER_SETUP  # FIDs never mixed
    text = report.transfer_markdown("s", {"eval/adherence_position": cells}, setups, "95%")
    assert "| trained variant | 48px | 48px-rope_interpolate |" in text
    assert "| pos_emb=rope2d | 0.15 [0.02579, 0.2742] | 0.97 [0.9203, 1.02]; +0.82 [+0.745, +0.895] (better) |" in text
    assert text.index("| reference |") < text.index("| pos_emb=rope2d |")


def test_val_losses_of_arms_that_train_on_different_losses_are_not_compared():
    observations = [
        observation({"loss_space": space}, {}, s, {"val/loss": loss + 0.01 * s, "eval/fid": fid + s})
        for s in range(3)
        for space, loss, fid in (("latent", 0.2, 80.0), ("image", 0.006, 260.0))
    ]
    summary = report.summarise(observations, {"loss_space": ["latent", "image"]})
    image = summary["loss_space"]["val/loss"]["image"]
    assert image["verdict"] == report.NOT_COMPARABLE and image["diff"] is None and image["mean"].n == 3
    assert summary["loss_space"]["eval/fid"]["image"]["verdict"] == "worse"  # the samples still are
    assert f"| {report.NOT_COMPARABLE} |" in report.markdown("s", summary, {"loss_space": ["latent", "image"]}, seeds=3)


def test_the_report_ranks_the_sample_metrics_against_the_oracle_and_names_the_clips():
    def obs(arm, seed, clip_score, whole, clip="CLIP A"):
        metrics = {"eval/clip_score": clip_score, "eval/cmmd": 100 - clip_score, "eval/adherence_whole": whole}
        return observation({"pos_emb": arm}, {"cfg_scale": "1.0"}, seed, metrics | {"eval/fid": 5.0}, clip=clip)

    observations = [obs("learned", s, 30 + s, 0.9 + 0.01 * s) for s in range(3)]
    observations += [obs("none", s, 20 + s, 0.2 + 0.01 * s) for s in range(3)]
    observations.append(observation({"pos_emb": "learned"}, {"cfg_scale": "7.0"}, 0, {"eval/clip_score": 0.0}))
    agreement = report.oracle_agreement(observations)  # the CFG-7 point is off the reference sampling: not ranked
    ranks = agreement["ranks"]["eval/adherence_whole"]
    assert agreement["clips"] == ["CLIP A"] and "eval/adherence_whole_shape" not in agreement["ranks"]
    assert ranks["eval/clip_score"]["n"] == 6 and ranks["eval/clip_score"]["rho"] == pytest.approx(1.0)
    assert ranks["eval/cmmd"]["rho"] == pytest.approx(-1.0) and "eval/kid" not in ranks  # no KID logged
    axes = {"pos_emb": ["learned", "none"], "cfg_scale": ["1.0", "7.0"]}
    summary = report.summarise(observations, axes)
    text = report.markdown("s", summary, axes, 3, agreement)
    assert "CLIP score and CMMD by: CLIP A." in text
    assert "Spearman ρ with whole-caption adherence over the 6 trials" in text
    assert "CLIP score +1.00" in text and "CMMD ×10³ -1.00" in text
    assert "FID undefined (one side is constant)" in text
    assert "CLIP score" in text.split("## Headline")[1].splitlines()[2]  # a column of the headline table

    observations[0].clip = "CLIP B"
    mixed = report.oracle_agreement(observations)
    assert set(mixed["ranks"]["eval/adherence_whole"]) == {"eval/fid"}  # no ranking across two CLIPs' scales
    assert (
        "**CLIP scores and CMMDs come from 2 different CLIPs, which are not comparable**"
        in report.agreement_lines(mixed)[0]
    )


def test_the_report_never_differences_fids_of_different_setups():
    def obs(seed, precision, n="128"):
        setup = {"num_samples": n, "precision": precision}
        return observation({"pos_emb": "learned"}, {}, seed, {"eval/fid": 50.0}, setup=setup)

    assert report.common_setup("s", [obs(s, "bf16") for s in range(3)]) == {"num_samples": "128", "precision": "bf16"}
    header = report.markdown("s", {}, {}, 3, setup={"num_samples": "128", "precision": "bf16"})
    assert "Every FID, KID and CMMD here: num_samples 128, precision bf16." in header
    with pytest.raises(InputError) as refused:
        report.common_setup("s", [obs(0, "fp32"), obs(1, "bf16"), obs(2, "bf16")])
    assert str(refused.value).startswith("sweep s: its eval runs differ in precision (bf16 in 2, fp32 in 1)")
    with pytest.raises(InputError, match="differ in num_samples"):
        report.common_setup("s", [obs(0, "fp32"), obs(1, "fp32", n="256")])
    unrecorded = observation({"pos_emb": "learned"}, {}, 2, {"eval/fid": 50.0})  # logged before setup.*
    with pytest.raises(InputError, match=r"differ in num_samples \(128 in 1, not recorded in 1\)"):
        report.common_setup("s", [obs(0, "fp32"), unrecorded])


def test_the_cost_table_counts_each_trials_training_once_and_sums_its_evaluations():
    def obs(arm, seed, cfg_scale, steps, inception):
        seconds = {"ray_start": 1.0, "steps": steps, "eval_sampling": 2.0, "eval_inception": inception}
        return observation({"pos_emb": arm}, {"cfg_scale": cfg_scale}, seed, {}, seconds=seconds)

    observations = [obs("learned", 0, c, 10.0, 4.0) for c in ("1.0", "2.0")] + [obs("none", 0, "1.0", 20.0, 5.0)]
    header, rows = report.cost_table(observations)
    assert header == ["trial", "seed", "ray_start", "steps", "eval_sampling", "eval_inception", "total"]
    assert rows[0] == ["pos_emb=none", "0", "1.0", "20.0", "2.0", "5.0", "28.0"]
    assert rows[1] == ["reference", "0", "1.0", "10.0", "4.0", "8.0", "23.0"]  # two evaluations, one training
    assert rows[2] == ["all trials", "", "2.0", "30.0", "6.0", "13.0", "51.0"]
    assert report.cost_table([observation({}, {}, 0, {})]) is None


def test_sampling_arms_of_one_grid_axis_share_one_evaluation(monkeypatch):
    calls = []

    def fake_evaluate(checkpoint, *, overrides, grid=None, **_):
        samplers, steps, scales = ((grid or {}).get(field) for field in ("sampler", "steps", "cfg_scale"))
        calls.append((tuple(overrides), samplers, steps, scales))
        grid = [(s, n, c) for s in samplers or ["euler"] for n in steps or [25] for c in scales or [1.0]]
        return {
            "step": 7,
            "transfer": "",  # sampled at the data's side
            "points": [
                {"metrics": {"fid": 100 * c + n + (s == "heun") + ("eval.weights=model" in overrides)}}
                for s, n, c in grid
            ],
        }

    monkeypatch.setattr(sweep, "evaluate", fake_evaluate)
    plan = SweepPlan(
        "p",
        "c.yaml",
        {"pos_emb": ("learned",), "cfg_scale": ("1.0", "4.0"), "steps": ("8", "25"), "ema": ("ema", "model")},
        seeds=1,
    )
    results, evaluated = sweep.evaluate_arms(plan, "ckpt", "sqlite://")
    assert evaluated["step"] == 7
    reference = ("sample.cfg_scale=1.0", "sample.steps=25", "eval.weights=ema")
    assert calls == [
        (reference, None, None, [1.0, 4.0]),
        (reference, None, [8, 25], None),
        (("sample.cfg_scale=1.0", "sample.steps=25", "eval.weights=model"), None, None, None),
    ]
    assert results == {
        "eval/fid": 125,
        "eval_cfg_scale_4.0/fid": 425,
        "eval_steps_8/fid": 108,
        "eval_ema_model/fid": 126,
    }

    calls.clear()
    assert sweep.evaluate_arms(SweepPlan("p", "c.yaml", {"pos_emb": ("learned",)}, seeds=1), "ckpt", "sqlite://")[
        0
    ] == {"eval/fid": 125}
    assert calls == [((), None, None, None)]  # no sampling axis: one evaluation at the config's own settings


def test_axis_flags_put_the_reference_first_and_bad_fields_or_values_are_named_before_anything_starts():
    assert sweep.field_axes(["model.width=128,64", "flow.shift=1.0,3.0"], ["flow.shift=3.0"]) == {
        "model.width": ("128", "64"),
        "flow.shift": ("3.0", "1.0"),
    }
    for specs, chosen, message in (
        (["model.width"], [], "expected FIELD=V1,V2"),
        (["model.width=64,128"], ["model.width=32"], "not one of its values 64,128"),
        (["model.width=64,128"], ["flow.shift=1.0"], "--reference flow.shift: no --axis"),
    ):
        with pytest.raises(InputError, match=message):
            sweep.field_axes(specs, chosen)
    for axis, message in (("model.widht=64,128", "model.widht: unknown key"), ("model.width=64,wide", "valid integer")):
        with pytest.raises(InputError, match=message):
            sweep.main(["--axis", axis, "--config", str(TINY)])
    with pytest.raises(InputError, match="sample.steps: Input should be a valid integer"):  # a sampling arm too
        sweep.main(["--preset", "critical_details", "--axis", "sample.steps=8,lots"])
    with pytest.raises(InputError, match="more than one axis sets sample.cfg_scale"):
        sweep.main(["--preset", "critical_details", "--axis", "sample.cfg_scale=1.0,3.0"])


def test_seeds_auto_gives_another_seed_only_to_arms_still_undecided():
    rule = SeedRule(2, 6)
    assert rule.looks == 5 and rule.confidence == pytest.approx(0.99)  # 95% split over the 5 looks
    assert sweep.parse_seeds("auto") == (2, 6) and sweep.parse_seeds("auto:3-4") == (3, 4)
    assert sweep.parse_seeds("3") == (3, None)
    for bad, message in (("auto:1-4", "needs 2 <= min <= max"), ("auto:5-3", "needs 2"), ("lots", "expected a number")):
        with pytest.raises(InputError, match=message):
            sweep.parse_seeds(bad)

    def obs(arm, seed, fid, pos="learned"):
        return observation({"sdpa_layout": arm, "pos_emb": pos}, {}, seed, {"eval/fid": fid})

    seeds = range(3)
    observations = (
        [obs("heads_first", s, 50.0 + s) for s in seeds]
        + [obs("seq_first", s, 50.0 + s + (0.3, -0.2, 0.1)[s]) for s in seeds]  # no effect: open
        + [obs("heads_first", s, 150.0 + s + (0.3, -0.2, 0.1)[s], pos="none") for s in seeds]  # +100: decided
    )
    axes = {"sdpa_layout": ["heads_first", "seq_first"], "pos_emb": ["learned", "none"]}
    summary = report.summarise(observations, axes, rule.confidence)
    status = allocation.arm_status(summary, {"sdpa_layout": "heads_first", "pos_emb": "learned"}, rule)
    assert status[("pos_emb", "none")] == allocation.ArmStatus(3, False, "decided at 3 seeds on eval/fid")
    assert status[("sdpa_layout", "seq_first")].open and status[("sdpa_layout", "seq_first")].seeds == 3
    plan = SweepPlan("p", str(TINY), {k: tuple(v) for k, v in axes.items()}, seeds=2, max_seeds=6)
    reference, seq_first, _ = plan.combos()
    assert sweep.variants_to_seed(plan, status) == [reference, seq_first]  # the reference pairs every difference
    assert sweep.variants_to_seed(plan, {("pos_emb", "none"): status[("pos_emb", "none")]}) == []
    capped = allocation.arm_status(summary, {"sdpa_layout": "heads_first", "pos_emb": "learned"}, SeedRule(2, 3))
    assert capped[("sdpa_layout", "seq_first")].why == "undecided at the maximum of 3 seeds on eval/fid"
    text = report.markdown("p", summary, axes, 2, rule=rule)
    assert "Seeds by --seeds auto:2-6" in text and "| sdpa_layout=seq_first | 3 | undecided at 3 seeds" in text
    assert "mean [99% CI]" in text and "too few for confident intervals" not in text
    with pytest.raises(InputError, match="one axis at a time"):
        SweepPlan("p", str(TINY), {k: tuple(v) for k, v in axes.items()}, seeds=2, max_seeds=6, combine="product")


def test_an_auto_seeded_sweep_trains_more_seeds_only_for_open_arms_and_continues(tmp_path, local_ray, monkeypatch):
    overrides = (
        f"data.root={tmp_path / 'scenes'}",
        f"text.cache_dir={tmp_path / 'text'}",
        f"train.storage_path={tmp_path / 'runs'}",
        f"eval.stats_dir={tmp_path / 'stats'}",
        "train.num_workers=1",
        "train.steps=2",
        "train.checkpoint_every=2",
        "train.sample_every=0",
        "eval.num_samples=4",
        "eval.clip_model=null",
    )
    prepare_data.prepare(load_config(TINY, list(overrides)))
    plan = SweepPlan("auto", str(TINY), {"sdpa_layout": ("heads_first", "seq_first")}, 2, overrides, max_seeds=3)
    looks = []

    def spy(name, uri, rule, seeds):
        looks.append(real(name, uri, rule, seeds))
        return looks[-1]

    real = sweep.arm_statuses
    monkeypatch.setattr(sweep, "arm_statuses", spy)
    uri, storage = f"sqlite:///{tmp_path / 'mlruns.db'}", str(tmp_path / "sweeps")
    result = sweep.run(plan, tracking_uri=uri, storage=storage)
    (first,) = looks  # one look: after round 1, before the last seed
    extra = {"reference-s2", "sdpa_layout=seq_first-s2"} if first[("sdpa_layout", "seq_first")].open else set()
    assert (
        set(result["trials"])
        == {"reference-s0", "reference-s1", "sdpa_layout=seq_first-s0", "sdpa_layout=seq_first-s1"} | extra
    )
    assert result["failed"] == 0 and first[("sdpa_layout", "seq_first")].seeds == 2

    again = sweep.run(plan, tracking_uri=uri, storage=storage)  # interrupted or not, rerunning continues: no new runs
    assert again["trials"] == result["trials"] and looks[1] == first
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(result["sweep"]).experiment_id
    (parent,) = client.search_runs([experiment], f"tags.`{RUN_KEY_TAG}` = '{result['sweep']}'")
    trials = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(trials) == len(result["trials"]) and parent.data.params["sweep.max_seeds"] == "3"
    assert all(len(client.get_metric_history(t.info.run_id, "train/loss")) == 1 for t in trials)  # trained once
    text = Path(report.report(result["sweep"], uri, tmp_path / "report")["files"][0]).read_text()
    assert "Seeds by --seeds auto:2-3" in text and "| sdpa_layout=seq_first | " in text and "mean [97.5% CI]" in text


def test_sweep_help_lists_every_preset_and_starts_without_a_future_warning():
    done = subprocess.run(
        [sys.executable, "-W", "error::FutureWarning", "-m", "ablations.sweep", "--help"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[1],
    )
    assert done.returncode == 0 and "Warning" not in done.stderr, done.stderr
    presets = sorted(p.stem for p in (Path(__file__).parents[1] / "ablations/presets").glob("*.yaml"))
    assert "positions" in presets and f"ablations/presets: {', '.join(presets)}" in " ".join(done.stdout.split())


def test_detection_finds_the_fewest_samples_and_seeds_that_catch_an_arm(tmp_path):
    from ablations import detection

    def obs(arm, seed, fid, loss):
        return observation({"pos_emb": arm}, {}, seed, {"eval/fid": fid, "val/loss": loss})

    noise = [0.0, 3.0, -3.0, 1.0]  # seed-to-seed, shared by both arms at N=32 only
    by_size = {}
    for n, gap in ((32, 2.0), (128, 2.0)):
        jitter = [e if n == 32 else e / 30 for e in noise]
        by_size[n] = [obs("learned", s, 50 + jitter[s], 0.2 + 0.01 * s) for s in range(4)]
        by_size[n] += [obs("none", s, 50 + gap + jitter[s] * (1 + s), 0.2 + 0.01 * s) for s in range(4)]
    found = detection.cheapest(by_size, {"pos_emb": ["learned", "none"]}, 0.95)
    fid, loss = found[("pos_emb", "none")]["eval/fid"], found[("pos_emb", "none")]["val/loss"]
    assert fid["caught"][0] == 128 and fid["verdict"] == "worse"  # at N=32 the spread hides it at every seed count
    assert loss["caught"] is None and loss["verdict"] == "no detectable difference"  # the same loss every seed
    assert detection.cheapest(by_size, {"pos_emb": ["learned", "none"]}, 0.95, fixed_seeds=True)[("pos_emb", "none")][
        "eval/fid"
    ]["caught"] == (128, 4)
    text = detection.markdown("s", found, [32, 128], 4, "95%")
    assert "| pos_emb=none | N=128, " in text and "not caught (no detectable difference)" in text
    detection.matrix_figure(found, tmp_path / "detection.png")
    assert Image.open(tmp_path / "detection.png").size[0] > 200


def test_a_sweep_is_read_at_the_side_its_trials_were_evaluated_at(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("big")
    parent = client.create_run(experiment, tags={RUN_KEY_TAG: "big"}).info.run_id
    for key, value in {"sweep.axes": '{"pos_emb": ["learned", "none"]}', "sweep.seeds": "1"}.items():
        client.log_param(parent, key, value)
    trial = client.create_run(experiment, tags={"mlflow.parentRunId": parent, "arm.pos_emb": "none", "seed": "0"})
    for transfer, fid in (("48px", 120.0), ("48px-rope_ntk", 130.0)):  # its own evaluation, and another afterwards
        ev = client.create_run(experiment, tags={"mlflow.parentRunId": trial.info.run_id, "mmdit.kind": "eval"})
        client.log_param(ev.info.run_id, "transfer", transfer)
        client.log_metric(ev.info.run_id, "eval/fid", fid)
    with pytest.raises(InputError, match="no evaluation sampled at transfer 'none'; its eval runs are at 48px, 48px-"):
        report.read_sweep(client, "big", uri)  # a sweep from before its side was logged reads the data's
    client.log_param(parent, "sweep.transfer", "48px")  # a sweep whose config sets eval.image_size=48
    (own,) = report.read_sweep(client, "big", uri)[3]
    assert (
        own.metrics["eval/fid"] == 120.0
        and report.read_sweep(client, "big", uri, "48px-rope_ntk")[3][0].metrics["eval/fid"] == 130.0
    )


def test_a_sweep_driver_leaving_ends_its_trials_runs_left_running(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("sweep-x")
    parent, other = (client.create_run(experiment, run_name=n).info.run_id for n in ("sweep-x", "other-sweep"))

    def trial(name: str, parent_id: str, ended: bool) -> str:
        run_id = client.create_run(experiment, run_name=name, tags={"mlflow.parentRunId": parent_id}).info.run_id
        if ended:
            client.set_terminated(run_id, "FINISHED")
        return run_id

    orphan, done, elsewhere = trial("a", parent, False), trial("b", parent, True), trial("c", other, False)
    sweep.end_open_trials(uri, parent, "KILLED")  # the driver got SIGTERM: its trials' processes died with it
    status = {r: client.get_run(r).info.status for r in (orphan, done, elsewhere)}
    assert status == {orphan: "KILLED", done: "FINISHED", elsewhere: "RUNNING"}
    assert "trial process ended before" in client.get_run(orphan).data.tags["error"]
    assert "ended 1 trial runs left RUNNING: a" in capsys.readouterr().out

    lost = trial("d", parent, False)  # a trial whose Ray worker was lost, in a sweep that otherwise finished
    sweep.end_open_trials(uri, parent, "FINISHED")
    assert client.get_run(lost).info.status == "FAILED"
