"""MLflow, in one place: the client, the experiment and its artifact location, the champion
alias, the registry lock, and the training loop's background tracker.

Local default: SQLite under the state dir with artifacts under `mlflow_artifact_root(cfg)`.
The experiment is created once, on the driver, before any Ray work (`create_experiment`), with
an explicit artifact location (`artifact_location`), so nothing ever lands in a `./mlruns` of
whatever directory a process (or a Ray worker, whose working directory is a Ray session folder
that Ray deletes) runs in. A server (`MLFLOW_TRACKING_URI=http://...`) is used as is and keeps
artifacts where it is configured to.

Every client gets its URI explicitly: nothing here calls `mlflow.set_tracking_uri`, which writes
`MLFLOW_TRACKING_URI` into the process environment, where the next config would inherit it.
Registry reads fail closed: an MLflow error is a `RegistryError`, never "no champion yet".
URIs are redacted (`redact`) wherever they are logged, printed or stored as run params.
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


class RegistryError(RuntimeError):
    """MLflow failed to answer a registry question; nothing was promoted (the registry fails closed)."""


_CREDENTIALS = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")


def redact(text: str) -> str:
    """`text` with the credentials of every URI in it masked: `https://u:p@host` -> `https://***@host`."""
    return _CREDENTIALS.sub(r"\g<scheme>***@", str(text))


def client(cfg: Config):
    """An `MlflowClient` on the configured tracking URI: `client_at(mlflow_tracking_uri(cfg))`."""
    return client_at(mlflow_tracking_uri(cfg))


def client_at(uri: str):
    """An `MlflowClient` on tracking URI `uri` (also the registry URI), passed explicitly: the
    process-wide `mlflow.set_tracking_uri` is never called (see the module doc). For code that
    holds a URI, not a config: rank 0's tracker in a Ray worker, Tune's callback (pickled by Tune)."""
    _quiet_mlflow()
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def registry_error(mlclient, doing: str, error: Exception) -> RegistryError:
    """A `RegistryError` naming the (redacted) tracking URI, what failed and what to do."""
    return RegistryError(
        f"MLflow at {redact(mlclient.tracking_uri)} failed while {doing}: {redact(str(error))[:800]}. "
        "Nothing was promoted. Check that the tracking server or database is reachable and not "
        "locked (services.mlflow_tracking_uri / MLFLOW_TRACKING_URI), then run the step again."
    )


def is_not_found(error: Exception) -> bool:
    """MLflow's own "no such object" answer (as opposed to any failure to answer)."""
    return getattr(error, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"


def is_server(uri: str) -> bool:
    """An MLflow tracking server, which keeps artifacts where it is configured to."""
    return uri.startswith(("http://", "https://", "databricks"))


def artifact_location(cfg: Config, experiment: str | None = None) -> str | None:
    """Where an experiment (the configured one by default) keeps its artifacts: under the state
    dir for a store the client writes itself (SQLite, a database, a `file:` store); None for a
    server (its own root)."""
    if is_server(mlflow_tracking_uri(cfg)):
        return None
    root = Path(mlflow_artifact_root(cfg))
    root.mkdir(parents=True, exist_ok=True)
    return (root / (experiment or cfg.registry.experiment)).as_uri()


# MLflow 3's UI opens an experiment in the view its kind names; without this tag it guesses, and
# opened ours in the GenAI (traces) view. Ours is model training.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def ensure_experiment(mlclient, name: str, location: str | None) -> str:
    """The id of experiment `name`, created on first use with artifacts at `location`, tagged as
    a model-training experiment (an older one gets the tag when it lacks it)."""
    exp = mlclient.get_experiment_by_name(name)
    if exp is not None:
        if EXPERIMENT_KIND[0] not in (exp.tags or {}):
            mlclient.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
        return exp.experiment_id
    try:
        return mlclient.create_experiment(name, artifact_location=location, tags=dict([EXPERIMENT_KIND]))
    except Exception:  # another process created it between our look-up and create
        exp = mlclient.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def experiment_id(cfg: Config, mlclient) -> str:
    """The configured experiment, created on first use (see `artifact_location`)."""
    return ensure_experiment(mlclient, cfg.registry.experiment, artifact_location(cfg))


def create_experiment(cfg: Config, required: bool = True) -> str | None:
    """Create (or find) the configured experiment from the driver, before any Ray work, with
    its artifacts under the configured store; returns its id. Training workers only look it up.

    Warns when an existing experiment keeps its artifacts somewhere else (one created by an
    older version from inside a Ray worker points into a Ray session folder that Ray deletes).
    `required=False` (training, which must not stop for tracking): a failure is a warning and None.
    """
    mlclient = client(cfg)
    try:
        exp_id = experiment_id(cfg, mlclient)
    except Exception as e:
        if required:
            raise registry_error(mlclient, f"creating experiment {cfg.registry.experiment!r}", e) from e
        log.warning("mlflow: no experiment, training runs untracked: %s", redact(str(e))[:500])
        return None
    wanted = artifact_location(cfg)
    got = mlclient.get_experiment(exp_id).artifact_location
    if wanted is not None and got != wanted:
        logging.getLogger("pipelines").warning(
            "mlflow: experiment %r keeps its artifacts at %s, not under the configured store %s; "
            "artifacts there may be lost. Use another registry.experiment name (or delete this "
            "experiment) to start one under the store.", cfg.registry.experiment, redact(got), wanted)
    return exp_id


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
    """The `ModelVersion` holding the champion alias, or None when there is none yet.

    None only when MLflow answers that model `name` does not exist or that it has no champion
    alias. Any other failure (a locked database, an unreachable server) raises `RegistryError`:
    a registry that cannot be read must never let a challenger through as "the first model".
    """
    from mlflow.exceptions import MlflowException

    try:
        model = mlclient.get_registered_model(name)
    except MlflowException as e:
        if is_not_found(e):
            return None
        raise registry_error(mlclient, f"reading registered model {name!r}", e) from e
    version = (model.aliases or {}).get(CHAMPION)
    if version is None:
        return None
    try:
        return mlclient.get_model_version(name, str(version))
    except MlflowException as e:
        raise registry_error(mlclient, f"reading {name} v{version} (the {CHAMPION})", e) from e


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
        self._put(("params", {k: redact(str(v))[:500] for k, v in params.items()}, None))

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._put(("tags", {k: redact(str(v)) for k, v in tags.items()}, None))

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
        client = client_at(tracking_uri)
        if self.run_id is not None:
            client.update_run(self.run_id, status="RUNNING")
            return client, self.run_id
        run = client.create_run(self._experiment_id(client, experiment), run_name=run_name)
        self.run_id = run.info.run_id
        return client, self.run_id

    def _experiment_id(self, client, experiment: str) -> str:
        """The experiment the driver created (`create_experiment`); never created here, where a
        missing location would put artifacts in this worker's Ray session folder."""
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise RuntimeError(
                f"experiment {experiment!r} does not exist; the driver creates it before training "
                "(pipelines.core.mlflow.create_experiment)"
            )
        if self._location is not None and exp.artifact_location != self._location:
            log.warning("mlflow: experiment %r keeps artifacts at %s, expected %s", experiment,
                        redact(exp.artifact_location), self._location)
        return exp.experiment_id

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
        log.warning("mlflow: %s", redact(message))
