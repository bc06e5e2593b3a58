"""The cluster path end to end: a local Ray head, `ray job submit` of a tiny training run, its MLflow run
and checkpoint; and cluster.yaml against Ray's own cluster-launcher schema."""

import json
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from experiments import cluster, prepare_data
from experiments.tracking import RUN_KEY_TAG

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "tiny_train.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_job_submit_trains_and_tracks(tmp_path):
    overrides = {
        "data.root": tmp_path / "scenes",
        "text.cache_dir": tmp_path / "text",
        "train.storage_path": tmp_path / "runs",
        "train.steps": 4,
        "train.num_workers": 1,
    }
    sets = [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]
    prepare_data.main(["--config", str(TINY), *sets])
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    state = tmp_path / "head.json"
    info = cluster.up(
        num_cpus=2,
        port=free_port(),
        dashboard_port=free_port(),
        client_port=free_port(),
        agent_port=free_port(),
        temp_dir=tempfile.mkdtemp(prefix="ray", dir="/tmp"),
        state=state,
    )
    try:
        job = subprocess.run(
            [
                str(Path(sys.executable).parent / "ray"),
                "job",
                "submit",
                "--address",
                info["address"],
                "--working-dir",
                str(ROOT),
                "--",
                "python",
                "-m",
                "experiments.train",
                "--config",
                "tests/tiny_train.yaml",
                *sets,
                "--tracking-uri",
                uri,
            ],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=ROOT,
        )
        assert job.returncode == 0 and "succeeded" in job.stdout.lower(), job.stdout[-3000:] + job.stderr[-3000:]
    finally:
        cluster.down(state=state)
    assert not cluster.group_alive(info["pid"])

    run_dir = next((tmp_path / "runs").iterdir())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("tiny_train")
    (run,) = client.search_runs([experiment.experiment_id], f"tags.`{RUN_KEY_TAG}` = '{run_dir.name}'")
    assert run.info.status == "FINISHED" and run.data.tags["git_commit"] != ""
    checkpoint = Path(run.data.tags["final_checkpoint"])
    assert (checkpoint / "model.safetensors").is_file() and (checkpoint / "manifest.json").is_file()


def test_cluster_yaml_matches_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(config))  # what `ray up` does: raises on any key or type it would refuse
    with pytest.raises(Exception, match="bogus"):  # the check is real: a stray key is refused
        validate_config(prepare_config({**config, "bogus": 1}))
    workers = config["available_node_types"]
    assert any(
        node["resources"].get("GPU", 0) > 0 and node["max_workers"] > node["min_workers"] for node in workers.values()
    )
    text = (ROOT / "cluster.yaml").read_text().lower()
    assert not any(
        key in text for key in ("aws_secret_access_key", "aws_access_key_id", "password", "api_key", "token:")
    )
