"""Model URIs -> local checkpoint directories.

Accepted: a checkpoint directory, `models:/NAME@ALIAS`, `models:/NAME/VERSION`. Registry
versions are downloaded once into `<home>/models/NAME/VERSION` and checked against the
`weights_sha256` tag recorded at registration, so what loads is exactly what was registered.
It lives in `core` because training (fine-tuning from `models:/...`), evaluation and serving all
resolve URIs, and none of them may import the registry job.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

from pipelines.config import Config, home_dir, mlflow_tracking_uri
from pipelines.core.checkpoints import CONFIG, WEIGHTS, is_checkpoint_dir, weights_sha256
from pipelines.core.mlflow import client, redact

_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


class ModelURIError(ValueError):
    """A model URI that names nothing usable."""


def parse_models_uri(uri: str) -> tuple[str, str | None, str | None]:
    """`models:/NAME@alias` -> (NAME, alias, None); `models:/NAME/3` -> (NAME, None, "3")."""
    m = _MODELS_URI.match(uri)
    if not m:
        raise ModelURIError(
            f"bad model URI {uri!r}: use a checkpoint directory, models:/NAME@ALIAS or models:/NAME/VERSION"
        )
    return m["name"], m["alias"], m["version"]


def model_version(cfg: Config, uri: str):
    """The MLflow `ModelVersion` a `models:/` URI points at (clear error when there is none)."""
    from mlflow.exceptions import MlflowException

    name, alias, version = parse_models_uri(uri)
    mlclient = client(cfg)
    try:
        if alias:
            return mlclient.get_model_version_by_alias(name, alias)
        return mlclient.get_model_version(name, version)
    except MlflowException as e:
        raise ModelURIError(
            f"{uri}: not found in the registry at {redact(mlflow_tracking_uri(cfg))} ({redact(e.message)}). "
            "List what exists with `mmfusion registry list`."
        ) from e


def _verify(path: Path, expected_sha: str | None, uri: str) -> None:
    if expected_sha and weights_sha256(path) != expected_sha:
        raise ModelURIError(
            f"{uri}: downloaded {WEIGHTS} in {path} does not match the registered "
            f"weights_sha256 {expected_sha[:12]}…; delete {path} and try again"
        )


def _download(source: str, dest: Path, tracking_uri: str) -> None:
    import mlflow

    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        got = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tmp, tracking_uri=tracking_uri))
        try:
            got.rename(dest)  # atomic: a concurrent reader sees all files or none
        except OSError:
            if not is_checkpoint_dir(dest):
                raise


def resolve_model(cfg: Config, uri) -> Path:
    """A local checkpoint directory for a path or a `models:/` URI (downloading once)."""
    text = str(uri)
    if not text.startswith("models:/"):
        path = Path(text).expanduser()
        if not is_checkpoint_dir(path):
            raise ModelURIError(
                f"{text}: not a checkpoint directory (no {WEIGHTS} and {CONFIG}) and not a models:/ URI"
            )
        return path.resolve()
    mv = model_version(cfg, text)
    dest = home_dir(cfg) / "models" / mv.name / str(mv.version)
    if not is_checkpoint_dir(dest):
        if dest.exists():
            shutil.rmtree(dest)
        _download(mv.source, dest, mlflow_tracking_uri(cfg))
    _verify(dest, mv.tags.get("weights_sha256"), text)
    return dest
