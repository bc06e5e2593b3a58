"""The Ray Train driver in-process: DDP, fault recovery that matches an uninterrupted run, NaN failure,
a tracking outage, and a bad config refused before Ray starts."""

import json
import logging
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from experiments import prepare_data, rank_loop, train
from experiments.cluster import PLACEMENT_GROUP_CLEANER_LOGGER
from experiments.tracking import RUN_KEY_TAG
from mmdit_core.config import load_config

TINY = Path(__file__).parent / "tiny_train.yaml"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    prepare_data.main(["--config", str(TINY), *settings(root)])
    return root


def settings(root: Path, **extra) -> list[str]:
    fields = {
        "data.root": root / "scenes",
        "text.cache_dir": root / "text",
        "train.storage_path": root / "runs",
        **extra,
    }
    return [arg for key, value in fields.items() for arg in ("--set", f"{key}={value}")]


def config(root: Path, **extra):
    return load_config(TINY, settings(root, **extra)[1::2])


def runs(uri: str, experiment: str, run_name: str):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], f"tags.`{RUN_KEY_TAG}` = '{run_name}'")


def losses(summary) -> dict[int, float]:
    lines = (Path(summary["grid"]).parent.parent / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def test_throughput_leaves_out_checkpoints_but_counts_every_training_step(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(rank_loop.time, "perf_counter", lambda: clock[0])
    meter = rank_loop.Throughput()
    for step in range(1, 5):  # four training steps of 1 s and 8 images each
        clock[0] += 1.0
        meter.add(8)
        if step == 2:  # a checkpoint between log steps: 10 s that are not training
            with meter.paused():
                clock[0] += 10.0
    assert meter.rate() == 8.0  # 32 images in 4 s of training (not 32 in the 2 s since the checkpoint)
    clock[0] += 2.0
    meter.add(8)
    assert meter.rate() == 4.0  # the next window starts at the last log


def test_local_ray_workers_silence_the_placement_group_cleaners_dashboard_warnings(local_ray):
    import ray

    @ray.remote
    def level() -> int:
        return logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER).level

    assert ray.get(level.remote()) == logging.ERROR  # set by start_ray's worker setup hook


def test_killed_worker_resumes_and_matches_an_uninterrupted_run(workdir, local_ray):
    uri = f"sqlite:///{workdir / 'mlruns.db'}"
    sampled = {"train.storage_path": workdir / "straight", "train.system_metrics_s": 0.2}
    straight = train.fit(config(workdir, **sampled), tracking_uri=uri)
    cfg = config(workdir)
    drilled = train.fit(cfg, tracking_uri=uri, faults=train.Faults(kill_at_step=7))
    assert (Path(drilled["grid"]).parent.parent / "killed_at_7").exists()
    assert straight["status"] == drilled["status"] == "FINISHED" and drilled["steps"] == cfg.train.steps

    a, b = losses(straight), losses(drilled)
    assert sorted(a) == sorted(b) == list(range(1, cfg.train.steps + 1))
    assert max(abs(a[s] - b[s]) for s in a) < 1e-6
    wa, wb = (load_file(Path(s["checkpoint"]) / "model.safetensors") for s in (straight, drilled))
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-6

    (run,) = runs(uri, cfg.name, drilled["run_name"])  # one MLflow run, re-attached after the restart
    assert run.info.status == "FINISHED" and run.info.run_id == drilled["mlflow_run_id"]
    assert run.info.end_time > run.info.start_time
    assert run.data.params["model.width"] == str(cfg.model.width)
    assert {"train/loss", "train/img_per_s", "val/loss_t0.250"} <= set(run.data.metrics)
    assert run.data.tags["final_checkpoint"] == drilled["checkpoint"]
    artifacts = {a.path for a in MlflowClient(uri).list_artifacts(run.info.run_id)}
    assert {"config.yaml", "samples", "trajectory.png", "loss.png"} <= artifacts

    system = MlflowClient(uri).get_run(straight["mlflow_run_id"]).data.metrics  # MLflow's sampler, psutil's numbers
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(system)

    again = train.fit(cfg, tracking_uri=uri)  # resubmitting the same config resumes (here: already done)
    assert again["run_name"] == drilled["run_name"] and len(runs(uri, cfg.name, drilled["run_name"])) == 1


def test_nan_inputs_fail_the_run_after_the_configured_count(workdir, local_ray):
    uri = f"sqlite:///{workdir / 'mlruns.db'}"
    cfg = config(workdir, **{"train.max_failures": 0, "train.max_nonfinite": 2, "train.seed": 7})
    with pytest.raises(Exception, match="non-finite loss"):
        train.fit(cfg, tracking_uri=uri, faults=train.Faults(nan_from_step=5))
    (run,) = runs(uri, cfg.name, cfg.run_name())
    assert run.info.status == "FAILED" and "step 6: non-finite loss" in run.data.tags["error"]
    checkpoints = sorted((workdir / "runs" / cfg.run_name()).glob("checkpoint_2*"))
    assert checkpoints  # the last good checkpoint (step 4) holds finite weights
    weights = load_file(checkpoints[-1] / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_unreachable_tracking_server_does_not_stop_training(workdir, local_ray):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = config(workdir, **{"train.seed": 3, "train.steps": 4})
    summary = train.fit(cfg, tracking_uri=f"http://127.0.0.1:{port}")
    assert summary["status"] == "FINISHED" and summary["steps"] == 4 and Path(summary["checkpoint"]).is_dir()
    assert "NOT delivered" in summary["tracking"]
    backlog = Path(summary["grid"]).parent.parent / "tracking_backlog.jsonl"
    methods = [json.loads(line)["method"] for line in backlog.read_text().splitlines()]
    assert {"params", "metrics", "status"} <= set(methods)


def test_bad_config_and_missing_data_fail_before_ray_starts(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "experiments.train", "--config", str(TINY), "--set", "model.width=7"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "ray" not in result.stdout.lower()
    assert result.stderr.strip().splitlines() == [
        "error: invalid config: model.width: Input should be greater than or equal to 8 (got 7)"
    ]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.train",
            "--config",
            str(TINY),
            "--set",
            f"data.root={tmp_path / 'nothing'}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'nothing' / 'manifest.json'} not found: prepare the data first "
        "(python -m experiments.prepare_data)"
    ]
    assert "Started a local Ray instance" not in result.stdout + result.stderr


def test_sigterm_marks_the_run_killed(workdir):
    import signal
    import time

    overrides = settings(workdir, **{"train.steps": 100000, "train.seed": 11, "train.num_workers": 1})
    uri = f"sqlite:///{workdir / 'mlruns.db'}"
    driver = subprocess.Popen(
        [sys.executable, "-m", "experiments.train", "--config", str(TINY), *overrides, "--tracking-uri", uri],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        cfg = config(workdir, **{"train.steps": 100000, "train.seed": 11, "train.num_workers": 1})
        metrics = workdir / "runs" / cfg.run_name() / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while (
            not (metrics.exists() and metrics.stat().st_size) and time.monotonic() < deadline and driver.poll() is None
        ):
            time.sleep(1)
        assert metrics.exists(), "training never started"
        driver.send_signal(signal.SIGTERM)
        assert driver.wait(timeout=120) != 0
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    (run,) = runs(uri, cfg.name, cfg.run_name())
    assert run.info.status == "KILLED" and run.info.end_time is not None


def test_quick_eval_during_training_logs_fid_and_adherence(workdir, local_ray):
    uri = f"sqlite:///{workdir / 'mlruns.db'}"
    cfg = config(
        workdir,
        **{
            "train.seed": 5,
            "train.steps": 4,
            "train.num_workers": 1,
            "eval.every": 2,
            "eval.train_samples": 4,
            "eval.stats_dir": workdir / "fid_stats",
            "eval.clip_model": "null",
        },
    )
    summary = train.fit(cfg, tracking_uri=uri)
    assert summary["status"] == "FINISHED"
    phases = summary["phase_seconds"]  # where the wall time went, rank 0's phases and Ray's around them
    assert set(phases) == {
        "ray_start",
        "setup",
        "data",
        "steps",
        "checkpoint",
        "quick_eval",
        "finish",
        "workers_and_placement",
    }
    assert all(seconds >= 0 for seconds in phases.values()) and phases["steps"] > 0
    (run,) = runs(uri, cfg.name, cfg.run_name())
    client = MlflowClient(uri)
    assert run.data.metrics["time/steps_s"] == phases["steps"]
    for metric in ("eval/fid", "eval/kid", "eval/adherence_colour"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, metric)] == [2, 4]
