"""Ray for this project: a one-node cluster on this machine for the `ray job submit` path
(`make cluster-up/down`), start_ray(), which joins a cluster or starts Ray inside this process, and
check_storage(), which refuses, before anything trains, a storage path some node of the cluster cannot reach.

    python -m experiments.cluster up [--num-cpus N] [--dashboard-port 8265]
    python -m experiments.cluster down

`up` runs `ray start --head --block` in its own process group with token auth off (RAY_AUTH_MODE
=disabled, else a token left by an earlier in-process ray.init() can make `ray job submit` fail),
waits until the job server answers, and records the head's PID. `down` ends exactly that process
group: SIGTERM, then SIGKILL for whatever is left after a grace period. Nothing else is touched.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

from mmdit_core.errors import InputError

STATE = Path("outputs/ray-cluster/head.json")
CLUSTER_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "HF_HUB_OFFLINE": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
}


PLACEMENT_GROUP_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def ray_worker_setup() -> None:
    """Run in every Ray worker that start_ray starts, for Ray Train's placement-group cleaner, which asks
    the dashboard's state API whether the controller is alive. Without a dashboard it warns about every
    failed query, about once a second: silenced. If another Ray cluster's state API answers instead, it
    knows no such controller, and the cleaner removes a live trial's placement group. Two ways lead
    there: the state API finds its cluster by discovery (RAY_ADDRESS pins it to this worker's own), and
    a cluster without a dashboard still registers the dashboard's port, 8265 by default, where another
    cluster's dashboard may listen (start_ray registers a free port, where nothing answers).
    (It lives here because workers import it: this module is light.)"""
    import ray

    logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER).setLevel(logging.ERROR)
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def start_ray(address: str | None, **local) -> None:
    """Connect to the cluster at `address` (or RAY_ADDRESS), else start Ray in this process (`local`:
    more ray.init arguments) without its dashboard: on a 2-core machine the dashboard's processes cost
    training about 9% of its speed. The local start says so (address="local"): a bare ray.init() joins
    a cluster that `ray start` left running on the machine (a test's two-node cluster, say)."""
    import ray

    if ray.is_initialized():
        return
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address)
    else:
        ray.init(
            address="local",
            include_dashboard=False,
            dashboard_port=unused_port(),  # see ray_worker_setup
            runtime_env={"worker_process_setup_hook": ray_worker_setup},
            **local,
        )


STORAGE_FIX = (
    "a URI every node writes to (s3://, gs://, ...), or a directory mounted at the same path on every node "
    "(NFS) declared with train.storage_shared=true"
)


def check_storage(path: str, shared: bool, what: str = "train.storage_path") -> None:
    """Refuse a storage path that some alive node cannot reach. Since Ray 2.7 nothing syncs checkpoints
    to the head node, and Ray Train only fails when the first checkpoint is reported, after start-up and
    training steps. One node, or a URI: nothing to check. A local path on several nodes is refused unless
    declared shared; a declared one is proven: a marker the driver writes there must be read by a task on
    every node."""
    import ray

    nodes = [node for node in ray.nodes() if node["Alive"]]
    if len(nodes) < 2 or "://" in path:
        return
    if not shared:
        raise InputError(
            f"{what}={path!r} is a local path and this Ray cluster has {len(nodes)} nodes: each node would keep "
            f"its own checkpoints where the others cannot read them; use {STORAGE_FIX}"
        )
    blind = nodes_not_seeing(Path(path), nodes)
    if blind:
        raise InputError(
            f"{what}={path!r} is declared shared (train.storage_shared=true) but {len(blind)} of {len(nodes)} "
            f"nodes cannot read a marker the driver wrote there: {', '.join(blind)}; use {STORAGE_FIX}"
        )


def read_text_or_none(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def nodes_not_seeing(directory: Path, nodes: list[dict], timeout: float = 60.0) -> list[str]:
    """The nodes (address and ID) on which a task cannot read a marker written into `directory` here."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    directory.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    marker = directory / f".storage-check-{token}"
    marker.write_text(token)
    try:
        read = ray.remote(num_cpus=0)(read_text_or_none)
        found = {
            f"{node['NodeManagerAddress']} (node {node['NodeID'][:12]})": read.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
            ).remote(str(marker))
            for node in nodes
        }
        ready, _ = ray.wait(list(found.values()), num_returns=len(found), timeout=timeout)
        return [name for name, ref in found.items() if ref not in ready or ray.get(ref) != token]
    finally:
        marker.unlink(missing_ok=True)


def job_server_up(address: str) -> bool:
    try:
        with urllib.request.urlopen(f"{address}/api/version", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def group_alive(pgid: int) -> bool:
    try:
        os.waitpid(pgid, os.WNOHANG)  # reap the head if this process started it
    except ChildProcessError:
        pass
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def up(
    *,
    num_cpus: int,
    port: int = 6379,
    dashboard_port: int = 8265,
    client_port: int = 10001,
    agent_port: int = 52365,
    temp_dir: str = "/tmp/ray-mmdit",
    state: Path = STATE,
    timeout: float = 120.0,
) -> dict:
    """Start the head node; return {"pid", "address" (job server URL), "log"}."""
    info = json.loads(state.read_text()) if state.exists() else None
    if info is not None and group_alive(info["pid"]):
        print(f"a cluster started here is already running: {info['address']}")
        return info
    state.parent.mkdir(parents=True, exist_ok=True)
    log = state.with_name("head.log")
    bin_dir = str(Path(sys.executable).parent)  # the project's environment: `ray`, and `python` for job entrypoints
    env = {**os.environ, **CLUSTER_ENV, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
    command = [
        f"{bin_dir}/ray",
        "start",
        "--head",
        "--block",
        f"--num-cpus={num_cpus}",
        f"--port={port}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        f"--ray-client-server-port={client_port}",
        f"--dashboard-agent-listen-port={agent_port}",
        "--disable-usage-stats",
        f"--temp-dir={temp_dir}",
    ]
    with open(log, "w") as out:
        head = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    info = {"pid": head.pid, "address": f"http://127.0.0.1:{dashboard_port}", "log": str(log)}
    state.write_text(json.dumps(info))
    deadline = time.monotonic() + timeout
    while not job_server_up(info["address"]):
        if head.poll() is not None or time.monotonic() > deadline:
            down(state=state)
            raise RuntimeError(f"the Ray head did not come up (see {log}):\n{log.read_text()[-2000:]}")
        time.sleep(1)
    print(f"Ray cluster up: job server {info['address']}, head PID {head.pid}, log {log}")
    return info


def down(*, state: Path = STATE, grace: float = 10.0) -> None:
    """Stop the process group recorded by `up` (and only that)."""
    if not state.exists():
        print("no cluster started here")
        return
    pgid = json.loads(state.read_text())["pid"]
    if group_alive(pgid):
        os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.5)
        if group_alive(pgid):
            os.killpg(pgid, signal.SIGKILL)
            while group_alive(pgid) and time.monotonic() < deadline + grace:
                time.sleep(0.2)
    state.unlink()
    print(f"Ray cluster (process group {pgid}) stopped")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count())
    parser.add_argument("--dashboard-port", type=int, default=8265)
    args = parser.parse_args(argv)
    if args.action == "up":
        up(num_cpus=args.num_cpus, dashboard_port=args.dashboard_port)
    else:
        down()


if __name__ == "__main__":
    main()
