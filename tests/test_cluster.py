"""The cluster path end to end: a local Ray head, `ray job submit` of a tiny training run, its MLflow run
and checkpoint; and cluster.yaml against Ray's own cluster-launcher schema."""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
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


# Started beside another cluster: its node count, the state API's URL its own cluster registers, and the
# one a worker's state API (Ray Train's placement-group cleaner asks it whether a controller lives) resolves.
ALONE = """
import ray
from ray.dashboard.utils import get_address_for_submission_client
from experiments.cluster import start_ray
start_ray(None, num_cpus=1)
own = get_address_for_submission_client(ray.get_runtime_context().gcs_address)
found = ray.get(ray.remote(lambda: get_address_for_submission_client(None)).remote())
print(len(ray.nodes()), own, found)
"""


def answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=5)
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


@pytest.fixture
def two_nodes():
    """A head and one more node on this machine (ray.cluster_utils.Cluster), this process connected."""
    import ray
    from ray.cluster_utils import Cluster

    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths have a length limit
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "temp_dir": temp})
    try:
        nodes.add_node(num_cpus=1)
        ray.init(address=nodes.address)
        yield nodes
    finally:
        ray.shutdown()
        nodes.shutdown()


def test_a_local_storage_path_on_two_nodes_is_refused_before_training(two_nodes, tmp_path):
    from mmdit_core.config import load_config
    from mmdit_core.errors import InputError

    with pytest.raises(InputError, match=r"train.storage_path=.* 2 nodes.*train.storage_shared=true"):
        cluster.check_storage(str(tmp_path / "runs"), shared=False)
    cluster.check_storage("s3://bucket/runs", shared=False)  # a URI: every node writes there itself
    cluster.check_storage(str(tmp_path / "runs"), shared=True)  # declared, and both nodes see this machine's disk
    assert not any((tmp_path / "runs").iterdir())  # the marker is gone
    started = subprocess.run([sys.executable, "-c", ALONE], capture_output=True, text=True, cwd=ROOT, timeout=300)
    nodes, own, found_by_workers = started.stdout.split()[-3:]
    assert nodes == "1", started.stderr[-2000:]  # a local start joins no cluster left running
    assert found_by_workers == own and not answers(own)  # its own cluster's URL, where no other dashboard answers

    from experiments import train

    sets = {"data.root": tmp_path / "scenes", "text.cache_dir": tmp_path / "text", "train.storage_path": tmp_path / "r"}
    prepare_data.main(["--config", str(TINY), *(a for k, v in sets.items() for a in ("--set", f"{k}={v}"))])
    cfg = load_config(TINY, [f"{k}={v}" for k, v in sets.items()])
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    with pytest.raises(InputError, match="train.storage_path"):
        train.fit(cfg, tracking_uri=uri, address=two_nodes.address)
    (run,) = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name(cfg.name).experiment_id])
    assert run.info.status == "FAILED"
    assert not list((tmp_path / "r").rglob("checkpoint_*"))  # refused before a step


def can_unshare_mounts() -> bool:
    return subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not can_unshare_mounts(), reason="needs `unshare -m` (a mount namespace) to hide a directory")
def test_a_shared_path_one_node_cannot_see_is_proven_and_the_node_named(two_nodes, tmp_path):
    """A third node starts in its own mount namespace with an empty tmpfs over the storage directory:
    it is alive in the cluster but cannot see what the driver writes there, like a node whose NFS mount
    is missing."""
    import time

    import ray

    from mmdit_core.errors import InputError

    storage = tmp_path / "shared"
    storage.mkdir()
    ray_bin = Path(sys.executable).parent / "ray"
    start = f"mount -t tmpfs tmpfs {storage} && exec {ray_bin} start --address={two_nodes.address} --num-cpus=1 --block"
    blind = subprocess.Popen(
        ["unshare", "-m", "sh", "-c", start],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while sum(n["Alive"] for n in ray.nodes()) < 3:
            assert time.monotonic() < deadline and blind.poll() is None, "the third node did not join"
            time.sleep(1)
        with pytest.raises(InputError, match=r"declared shared .* 1 of 3 nodes cannot read") as refused:
            cluster.check_storage(str(storage), shared=True)
        (node,) = [
            n for n in ray.nodes() if n["Alive"] and n["NodeID"] not in {x.node_id for x in two_nodes.list_all_nodes()}
        ]
        assert node["NodeID"][:12] in str(refused.value)
    finally:
        os.killpg(blind.pid, signal.SIGTERM)
        blind.wait(timeout=60)
