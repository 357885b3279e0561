"""MLflow, in one place: the client, the experiment and its artifact location, the champion
alias, the registry lock, and the training loop's background tracker.

Local default: SQLite under the state dir with artifacts under `mlflow_artifact_root(cfg)`.
Every experiment is created with an explicit artifact location (`artifact_location`), so nothing
ever lands in a `./mlruns` of whatever directory a process (or a Ray worker) runs in. A server
(`MLFLOW_TRACKING_URI=http://...`) is used as is and keeps artifacts where it is configured to.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipelines.config import Config, home_dir, mlflow_artifact_root, mlflow_tracking_uri
from pipelines.runtime import quiet_environment

CHAMPION = "champion"
log = logging.getLogger("pipelines.train")  # the tracker's warnings belong to the training log


def _quiet_mlflow() -> None:
    quiet_environment()
    # Download progress bars and the "View run at http://..." banner are noise in job logs.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in ("mlflow", "alembic", "mlflow.store.db.utils"):
        logging.getLogger(name).setLevel(logging.WARNING)


def client(cfg: Config):
    """An `MlflowClient` on the configured tracking URI (also the registry URI)."""
    _quiet_mlflow()
    import mlflow
    from mlflow import MlflowClient

    uri = mlflow_tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def is_server(uri: str) -> bool:
    """An MLflow tracking server, which keeps artifacts where it is configured to."""
    return uri.startswith(("http://", "https://", "databricks"))


def artifact_location(cfg: Config) -> str | None:
    """Where the configured experiment keeps its artifacts: under the state dir for a store the
    client writes itself (SQLite, a database, a `file:` store); None for a server (its own root)."""
    if is_server(mlflow_tracking_uri(cfg)):
        return None
    root = Path(mlflow_artifact_root(cfg))
    root.mkdir(parents=True, exist_ok=True)
    return (root / cfg.registry.experiment).as_uri()


def ensure_experiment(mlclient, name: str, location: str | None) -> str:
    """The id of experiment `name`, created on first use with artifacts at `location`."""
    exp = mlclient.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return mlclient.create_experiment(name, artifact_location=location)
    except Exception:  # another process created it between our look-up and create
        exp = mlclient.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def experiment_id(cfg: Config, mlclient) -> str:
    """The configured experiment, created on first use (see `artifact_location`)."""
    return ensure_experiment(mlclient, cfg.registry.experiment, artifact_location(cfg))


@contextlib.contextmanager
def registry_lock(cfg: Config, model_name: str) -> Iterator[None]:
    """Serialise champion changes for one registered model.

    An exclusive `flock` on a file in the state dir: it orders threads and processes on one
    host, and hosts that share the state dir (the cluster preset puts `services.home` on
    shared storage). MLflow has no compare-and-set on aliases, so reading the champion,
    deciding and moving the alias must happen under one lock, or two racing registrations
    could both beat the old champion and the later, possibly worse, one would win.
    """
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", model_name)
    path = home_dir(cfg) / "locks" / f"registry-{safe}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def champion_version(mlclient, name: str):
    """The `ModelVersion` holding the champion alias, or None when there is none yet."""
    from mlflow.exceptions import MlflowException

    try:
        return mlclient.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


# ----------------------------------------------------------------------------- training metrics


class MlflowTracker:
    """Metrics to MLflow from rank 0, off the training thread, never fatal.

    Training must not stop (or slow down) because a tracking server is slow, down or
    misconfigured: calls are queued to a daemon thread; the first failure is logged once and
    tracking switches off. `log_metrics(dict, step)`, `log_params(dict)`, `set_tags(dict)`, `close()`; `run_id` once started.

    Resumes the MLflow run `run_id` when given (a restarted or re-run training job keeps one run).
    """

    def __init__(self, tracking_uri: str, experiment: str, run_name: str, run_id: str | None = None,
                 enabled: bool = True, artifact_location: str | None = None):
        self.run_id = run_id
        self._ready = threading.Event()
        self._queue: queue.Queue = queue.Queue()
        self._alive = enabled
        self._location = artifact_location
        self._thread = None
        if enabled:
            self._thread = threading.Thread(
                target=self._work, args=(tracking_uri, experiment, run_name), daemon=True, name="mlflow-tracker"
            )
            self._thread.start()

    # -- public, called from the training loop: cheap and never raising --------------------
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
        self._put(("metrics", clean, step))

    def log_params(self, params: dict[str, Any]) -> None:
        self._put(("params", {k: str(v)[:500] for k, v in params.items()}, None))

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._put(("tags", {k: str(v) for k, v in tags.items()}, None))

    def wait_run_id(self, timeout: float = 30.0) -> str | None:
        self._ready.wait(timeout)
        return self.run_id

    def close(self, timeout: float = 15.0) -> None:
        """Flush what is queued (up to `timeout` seconds) and end the run."""
        if self._thread is None:
            return
        self._put(("close", None, None))
        self._thread.join(timeout)

    # -- the worker thread -----------------------------------------------------------------
    def _put(self, item) -> None:
        if self._alive:
            self._queue.put(item)

    def _work(self, tracking_uri: str, experiment: str, run_name: str) -> None:
        try:
            client, run_id = self._start(tracking_uri, experiment, run_name)
        except Exception as e:  # noqa: BLE001 - any tracking problem must not reach training
            self._disable(f"could not start an MLflow run at {tracking_uri}: {e}")
            return
        finally:
            self._ready.set()
        while True:
            kind, payload, step = self._queue.get()
            try:
                if kind == "close":
                    client.set_terminated(run_id)
                    return
                self._send(client, run_id, kind, payload, step)
            except Exception as e:  # noqa: BLE001
                self._disable(f"MLflow logging failed ({e}); continuing without it")
                return

    def _start(self, tracking_uri: str, experiment: str, run_name: str):
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri)
        if self.run_id is not None:
            client.update_run(self.run_id, status="RUNNING")
            return client, self.run_id
        run = client.create_run(ensure_experiment(client, experiment, self._location), run_name=run_name)
        self.run_id = run.info.run_id
        return client, self.run_id

    @staticmethod
    def _send(client, run_id: str, kind: str, payload: dict, step: int | None) -> None:
        from mlflow.entities import Metric, Param, RunTag

        if kind == "metrics":
            now = int(time.time() * 1000)
            client.log_batch(run_id, metrics=[Metric(k, v, now, step or 0) for k, v in payload.items()])
        elif kind == "params":
            client.log_batch(run_id, params=[Param(k, v) for k, v in payload.items()])
        elif kind == "tags":
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in payload.items()])

    def _disable(self, message: str) -> None:
        self._alive = False
        log.warning("mlflow: %s", message)
