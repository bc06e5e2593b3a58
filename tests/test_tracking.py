"""The MLflow tracker's delivery: a call the store refuses is set aside, the calls behind it go through."""

import json
import time

from mlflow.tracking import MlflowClient

from experiments.tracking import EXPERIMENT_KIND, RUN_KEY_TAG, Tracker, ui_links


def test_a_refused_call_never_holds_up_the_calls_behind_it(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    tracker = Tracker(uri, "tracking", "run-a", backlog=tmp_path / "backlog.jsonl")
    tracker.log_params({"lr": 1e-3})
    tracker.log_params({"lr": 2e-3})  # MLflow refuses to change a logged param
    tracker.log_artifact(tmp_path / "never-written.png")  # nor can it store a file that is not there
    tracker.log_metrics({"train/loss": 0.5}, step=1)
    assert tracker.wait_ready(30)
    client = MlflowClient(uri)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not client.get_metric_history(tracker.result.run_id, "train/loss"):
        time.sleep(0.2)
    assert client.get_metric_history(tracker.result.run_id, "train/loss"), "the metric waited behind the refused calls"
    delivery = tracker.close()
    assert (delivery.delivered, delivery.undelivered) == (2, 2)
    kept = [json.loads(line) for line in (tmp_path / "backlog.jsonl").read_text().splitlines()]
    assert [k["method"] for k in kept] == ["params", "artifact"] and all(k["run_key"] == "run-a" for k in kept)
    run = client.get_run(tracker.result.run_id)
    assert run.data.params["lr"] == "0.001" and run.data.tags[RUN_KEY_TAG] == "run-a"


def test_experiments_open_in_the_model_training_view_and_runs_print_their_links(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = MlflowClient(uri)
    older = client.create_experiment("made-before-the-tag")  # found, then tagged
    for name in ("fresh", "made-before-the-tag"):
        tracker = Tracker(uri, name, "run-a", backlog=tmp_path / "backlog.jsonl")
        tracker.set_tags({"k": "v"})
        delivery = tracker.close()
        experiment = client.get_experiment_by_name(name)
        assert experiment.tags[next(iter(EXPERIMENT_KIND))] == "custom_model_development"
        runs = f"http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}?workflowType=machine_learning"
        assert f"MLflow UI: runs {runs} ; this run " in delivery.summary()
        assert delivery.summary().rstrip().endswith(f"/runs/{delivery.run_id} (after `make ui`)")
    assert client.get_experiment_by_name("made-before-the-tag").experiment_id == older
    assert ui_links("http://tracking:5000/", "7", "r") == (
        "runs http://tracking:5000/#/experiments/7?workflowType=machine_learning ; "
        "this run http://tracking:5000/#/experiments/7/runs/r"
    )
