"""MLflow registry: register evaluated checkpoints, gate them against the champion, resolve URIs."""

from pipelines.core.mlflow import RegistryError
from pipelines.core.model_uri import ModelURIError, resolve_model
from pipelines.registry.manage import list_models, promote, rollback, show
from pipelines.registry.register import champion_benchmark, code_version, register_and_gate, register_version

__all__ = [
    "ModelURIError",
    "RegistryError",
    "champion_benchmark",
    "code_version",
    "list_models",
    "promote",
    "register_and_gate",
    "register_version",
    "resolve_model",
    "rollback",
    "show",
]
