"""MLflow tracking that never stops training.

Every call is queued and delivered by a background thread, in order, with retries and backoff; the
training loop never waits on the tracking server. One MLflow run per training run: the run is found
by its deterministic name (tag `mmdit.run_key`) and re-attached on resume, or created once. What
could not be delivered by `close()` is written to a JSON-lines backlog next to the run's outputs
and counted in the summary, together with what arrived late (after at least one failed attempt). A call
the store refuses outright (a conflicting param, a missing artifact file) goes to the backlog after a
second try, so it never holds up the calls behind it.

The default store is `sqlite:///<project>/mlruns.db` (MLflow 3 refuses a bare file store);
MLFLOW_TRACKING_URI overrides it.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Imported with this module, never first in a thread: two threads importing mlflow at once (a Tune trial's
# and a Tracker's delivery thread) meet its circular imports half-initialised and fail with ImportError.
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

PROJECT_ROOT = Path(__file__).resolve().parent.parent
RUN_KEY_TAG = "mmdit.run_key"
SETUP_PREFIX = "setup."  # eval runs' params of the FID setup (eval.evaluator.Evaluator.setup)
# the MLflow UI (3.x) opens an experiment in its GenAI view unless the experiment says what kind of work it is
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
LOCAL_UI = "http://127.0.0.1:5000"  # `make ui` serves a sqlite store here
RETRY_MAX_S = 10.0  # longest pause between delivery attempts
REFUSED_ATTEMPTS = 2  # a call the store refuses is tried this often, then kept in the backlog
REFUSAL_CODES = {
    "INVALID_PARAMETER_VALUE",
    "RESOURCE_DOES_NOT_EXIST",
    "RESOURCE_ALREADY_EXISTS",
    "BAD_REQUEST",
    "INVALID_STATE",
    "PERMISSION_DENIED",
    "ENDPOINT_NOT_FOUND",
}


def refused(exc: Exception) -> bool:
    """Whether a failed call can never succeed: the store answered and rejected it (a bad or conflicting
    value, a missing run), or the call itself is broken (an artifact file that is not there). Anything
    else (the server unreachable, timing out or failing) may pass later and is retried in order."""
    if isinstance(exc, MlflowException):
        return exc.error_code in REFUSAL_CODES
    return isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError, ValueError, TypeError))


def default_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{PROJECT_ROOT / 'mlruns.db'}"


def artifact_root_for(uri: str) -> str | None:
    """Where a new experiment keeps artifacts: next to a sqlite store (never the worker's cwd)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
    return None  # a tracking server decides


def ui_links(uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """Deep links to an experiment's Runs page in the UI's model-training view, and to one run: on the
    tracking server when `uri` is one, else where `make ui` serves a local store."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else LOCAL_UI
    runs = f"{base}/#/experiments/{experiment_id}?workflowType=machine_learning"
    links = f"runs {runs}" + (f" ; this run {base}/#/experiments/{experiment_id}/runs/{run_id}" if run_id else "")
    return links + ("" if base != LOCAL_UI else " (after `make ui`)")


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@dataclass
class Delivery:
    delivered: int = 0
    late: int = 0
    undelivered: int = 0
    backlog: str | None = None
    first_error: str | None = None
    run_id: str | None = None
    links: str | None = None  # the run's pages in the MLflow UI (ui_links)

    def summary(self) -> str:
        text = f"tracking: {self.delivered} calls delivered"
        if self.late:
            text += f", {self.late} of them late (after a tracking outage)"
        if self.undelivered:
            text += f"; {self.undelivered} NOT delivered, kept in {self.backlog}"
        if self.first_error:
            text += f"; first error: {self.first_error}"
        return text + (f"\nMLflow UI: {self.links}" if self.links else "")


@dataclass
class _Call:
    method: str
    args: dict[str, Any]
    failures: int = 0
    queued_at: float = field(default_factory=time.time)


class Tracker:
    """One training run's MLflow run, written from one process (the driver, or rank 0)."""

    def __init__(
        self, uri: str, experiment: str, run_key: str, *, backlog: str | Path, tags: dict[str, str] | None = None
    ):
        # MLflow's HTTP client retries for minutes by default; this tracker retries on its own schedule
        # (read by MLflow at each request; a value the user set is kept).
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.uri, self.experiment, self.run_key = uri, experiment, run_key
        self.backlog, self.tags = Path(backlog), tags or {}
        self.result = Delivery()
        self._client = None
        self._queue: queue.Queue[_Call | None] = queue.Queue()
        self._deadline: float | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._deliver_all, name="mlflow-tracker", daemon=True)
        self._thread.start()

    # ---- what callers use (all non-blocking) ---------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        self._put(
            "params", params={k: json.dumps(v) if isinstance(v, (list, dict)) else str(v) for k, v in params.items()}
        )

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._put(
            "metrics", metrics={k: float(v) for k, v in metrics.items()}, step=step, timestamp=int(time.time() * 1000)
        )

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._put("artifact", path=str(path), artifact_path=artifact_path)

    def log_dataset(self, root: str | Path, context: str = "training") -> None:
        """The dataset at `root` (this project's shards) as the run's MLflow dataset input: its key as the
        digest, its folder as the source, its splits' sample counts as the profile."""
        from mmdit_core.data.shards import read_manifest

        manifest = read_manifest(root)
        profile = {split: entry["samples"] for split, entry in manifest["splits"].items()}
        dataset = {
            "name": Path(root).name,
            "digest": manifest["key"],
            "source": str(Path(root).resolve()),
            "profile": json.dumps({"samples": profile, "source": manifest.get("source", {})}),
        }
        self._put("inputs", dataset=dataset, context=context)

    def set_tags(self, tags: dict[str, str]) -> None:
        self._put("tags", tags={k: str(v) for k, v in tags.items()})

    def set_status(self, status: str, error: str | None = None) -> None:
        """FINISHED, FAILED (with the error as a tag) or KILLED; RUNNING re-opens a resumed run."""
        self._put("status", status=status, error=error)

    def wait_ready(self, timeout: float) -> bool:
        """Block until the MLflow run is found or created (False if the server did not answer in time)."""
        return self._ready.wait(timeout)

    def close(self, timeout: float | None = None) -> Delivery:
        """Deliver what is queued within `timeout` seconds (default 30, or 5 when the server has never
        answered); keep the rest in the backlog file."""
        timeout = timeout if timeout is not None else 30.0 if self._ready.is_set() else 5.0
        self._deadline = time.monotonic() + timeout
        self._queue.put(None)
        self._thread.join(timeout + 10)
        return self.result

    # ---- delivery thread ------------------------------------------------------------------------
    def _put(self, method: str, **args: Any) -> None:
        self._queue.put(_Call(method, args))

    def _deliver_all(self) -> None:
        while (call := self._queue.get()) is not None:
            backoff = 0.5
            while True:
                try:
                    self._deliver(call)
                    self.result.delivered += 1
                    self.result.late += call.failures > 0
                    break
                except Exception as exc:  # any client or server error: keep the call and try again later
                    call.failures += 1
                    self.result.first_error = self.result.first_error or f"{type(exc).__name__}: {str(exc)[:200]}"
                    if refused(exc) and call.failures >= REFUSED_ATTEMPTS:  # it will never go through: set it aside
                        self._keep([call])
                        break
                    if self._deadline is not None and time.monotonic() + backoff > self._deadline:
                        self._keep([call, *self._drain()])
                        return
                    time.sleep(backoff)
                    backoff = min(backoff * 2, RETRY_MAX_S)

    def _drain(self) -> list[_Call]:
        calls = []
        while not self._queue.empty():
            if (call := self._queue.get_nowait()) is not None:
                calls.append(call)
        return calls

    def _keep(self, calls: list[_Call]) -> None:
        self.backlog.parent.mkdir(parents=True, exist_ok=True)
        with open(self.backlog, "a") as f:
            for call in calls:
                f.write(
                    json.dumps(
                        {"run_key": self.run_key, "method": call.method, "args": call.args, "queued_at": call.queued_at}
                    )
                    + "\n"
                )
        self.result.undelivered += len(calls)
        self.result.backlog = str(self.backlog)

    def _run_id(self) -> str:
        """The run for this run key: found (re-attached) or created, once per process."""
        if self.result.run_id is None:
            client = MlflowClient(self.uri)
            experiment = client.get_experiment_by_name(self.experiment)
            if experiment is None:
                experiment_id = client.create_experiment(
                    self.experiment, artifact_location=artifact_root_for(self.uri), tags=EXPERIMENT_KIND
                )
            else:
                experiment_id = experiment.experiment_id
                for key, value in EXPERIMENT_KIND.items():  # an experiment made before the tag existed
                    if experiment.tags.get(key) != value:
                        client.set_experiment_tag(experiment_id, key, value)
            found = client.search_runs([experiment_id], f"tags.`{RUN_KEY_TAG}` = '{self.run_key}'", max_results=1)
            run_id = (
                found[0].info.run_id
                if found
                else client.create_run(
                    experiment_id, run_name=self.run_key, tags={RUN_KEY_TAG: self.run_key, **self.tags}
                ).info.run_id
            )
            self._client, self.result.run_id = client, run_id
            self.result.links = ui_links(self.uri, experiment_id, run_id)
            self._ready.set()
        return self.result.run_id

    def _deliver(self, call: _Call) -> None:
        run_id, a = self._run_id(), call.args
        client = self._client
        if call.method == "params":
            existing = client.get_run(run_id).data.params
            new = [Param(k, v) for k, v in a["params"].items() if existing.get(k) != v]
            for start in range(0, len(new), 100):
                client.log_batch(run_id, params=new[start : start + 100])
        elif call.method == "metrics":
            client.log_batch(run_id, metrics=[Metric(k, v, a["timestamp"], a["step"]) for k, v in a["metrics"].items()])
        elif call.method == "artifact":
            client.log_artifact(run_id, a["path"], a["artifact_path"])
        elif call.method == "inputs":
            dataset = Dataset(source_type="local", schema=None, **a["dataset"])
            client.log_inputs(run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", a["context"])])])
        elif call.method == "tags":
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in a["tags"].items()])
        elif call.method == "status":
            if a["error"]:
                client.set_tag(run_id, "error", a["error"][-5000:])
            if a["status"] == "RUNNING":
                client.update_run(run_id, status="RUNNING")
            else:  # a final status also stamps the end time (when it was queued: the backlog may deliver later)
                client.set_terminated(run_id, a["status"], end_time=int(1000 * call.queued_at))
        else:
            raise ValueError(f"unknown tracking call {call.method}")
