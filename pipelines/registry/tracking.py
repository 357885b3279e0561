"""MLflow connection: tracking + registry URI, the experiment, quiet logging, the lock.

Local default: SQLite under the state dir with artifacts under `mlflow_artifact_root(cfg)`,
so nothing ever lands in ./mlruns. A server (`MLFLOW_TRACKING_URI=http://...`) is used as is.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

from pipelines.config import Config, home_dir, mlflow_artifact_root, mlflow_tracking_uri
from pipelines.runtime import quiet_environment

CHAMPION = "champion"


def _quiet_mlflow() -> None:
    quiet_environment()
    # Download progress bars and the "View run at http://..." banner are noise in job logs.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in ("mlflow", "alembic", "mlflow.store.db.utils"):
        logging.getLogger(name).setLevel(logging.WARNING)


def is_local_sqlite(uri: str) -> bool:
    return uri.startswith("sqlite:///")


def client(cfg: Config):
    """An `MlflowClient` on the configured tracking URI (also the registry URI)."""
    _quiet_mlflow()
    import mlflow
    from mlflow import MlflowClient

    uri = mlflow_tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(cfg: Config, mlclient) -> str:
    """The configured experiment, created on first use (artifacts under the state dir locally)."""
    name = cfg.registry.experiment
    exp = mlclient.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if is_local_sqlite(mlflow_tracking_uri(cfg)):
        root = Path(mlflow_artifact_root(cfg))
        root.mkdir(parents=True, exist_ok=True)
        location = (root / name).as_uri()
    try:
        return mlclient.create_experiment(name, artifact_location=location)
    except Exception:  # another process created it between our look-up and create
        exp = mlclient.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


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
