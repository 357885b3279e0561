"""What the retrain flow asks the registry before and after training: is anything new since the
champion was trained (else skip), where the champion's weights are (to fine-tune from them), and
the description a person reads on a registered version in MLflow's UI."""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path
from typing import Any

from pipelines.config import Config
from pipelines.core.mlflow import champion_version, client

ROOT = Path(__file__).resolve().parents[2]
CODE_PACKAGES = ("mmcore", "pipelines", "flows")  # the code that makes a model


@cache
def code_hash() -> str:
    """A hash of every .py file of the code that makes a model (paths and bytes). Unlike the git
    commit (`code_version`) it is the same on a dirty tree with the same files, and differs when
    an uncommitted change would change the model."""
    digest = hashlib.sha256()
    for package in CODE_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def unchanged_since_champion(cfg: Config, dataset_version: str, config_hash: str, code: str) -> str | None:
    """The reason to skip training when a version of the model was already trained on this
    dataset version, with this config and this code (its lineage tags say): the champion, or a
    challenger the gate kept out (training it again would give the same verdict). None when
    anything differs or nothing is registered. An unreadable registry raises `RegistryError`."""
    mlclient = client(cfg)
    wanted = (dataset_version, config_hash, code)
    champ = champion_version(mlclient, cfg.registry.model_name)
    if champ is not None and _lineage_of(champ) == wanted:
        return (f"nothing changed since champion {champ.name} v{champ.version} was trained: same dataset "
                f"version {dataset_version}, config {config_hash} and code {code}; training skipped. "
                "Add data, change the config or the code to train again.")
    same = [v for v in _versions_on(mlclient, cfg.registry.model_name, dataset_version, config_hash)
            if _lineage_of(v) == wanted]
    if not same:
        return None
    mv = max(same, key=lambda v: int(v.version))
    return (f"{mv.name} v{mv.version} was already trained on dataset version {dataset_version} with config "
            f"{config_hash} and code {code}, and not promoted ({(mv.tags or {}).get('gate.reason', 'no verdict')}); "
            "training skipped. Add data, change the config or the code to train again.")


def _lineage_of(mv) -> tuple[str | None, str | None, str | None]:
    tags = mv.tags or {}
    return tags.get("dataset_version"), tags.get("config_hash"), tags.get("lineage.code_hash")


def _versions_on(mlclient, name: str, dataset_version: str, config_hash: str) -> list:
    from mlflow.exceptions import MlflowException

    from pipelines.core.mlflow import registry_error

    query = f"name='{name}' and tags.dataset_version='{dataset_version}' and tags.config_hash='{config_hash}'"
    try:
        return list(mlclient.search_model_versions(query))
    except MlflowException as e:
        raise registry_error(mlclient, f"looking up {name} versions trained on {dataset_version}", e) from e


def champion_checkpoint(cfg: Config) -> tuple[str, Path] | None:
    """`(models:/NAME/VERSION, local checkpoint dir)` of the champion, downloaded once; None when
    there is none yet."""
    from pipelines.core.model_uri import resolve_model

    champ = champion_version(client(cfg), cfg.registry.model_name)
    if champ is None:
        return None
    uri = f"models:/{champ.name}/{champ.version}"
    return uri, resolve_model(cfg, uri)


def _table(rows: dict[str, Any]) -> str:
    lines = [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in rows.items()]
    return "| | |\n|---|---|\n" + "\n".join(lines)


def version_description(registration: dict, report: dict, lineage: dict, data_report: dict | None) -> str:
    """Markdown for the registered version's description: gate verdict, metrics, dataset, lineage."""
    decision = registration.get("decision") or {}
    data = data_report or {}
    parts = [
        f"**{'Champion' if registration.get('promoted') else 'Not promoted'}**: {registration.get('reason')}",
        "### Metrics (test split)\n\n" + _table({k: v for k, v in sorted(report.get("metrics", {}).items())
                                                 if v is not None}),
        "### Dataset\n\n" + _table({"version": lineage.get("dataset_version"), "benchmark": report.get("benchmark"),
                                    "kept": data.get("kept"), "rejected": sum((data.get("rejected") or {}).values()),
                                    "duplicates": data.get("duplicates"), "test images": report.get("num_images")}),
        "### Lineage\n\n" + _table({k: lineage[k] for k in sorted(lineage)}),
    ]
    if decision.get("ci_low") is not None:
        parts.insert(1, f"Gate on {decision.get('metric')}: delta {decision.get('delta'):+.4f}, lower bound "
                        f"{decision.get('ci_low'):+.4f} at {decision.get('confidence')} confidence.")
    return "\n\n".join(parts)


def describe_version(cfg: Config, registration: dict, report: dict, lineage: dict, data_report: dict | None) -> str:
    """Write `version_description` on the registered version (MLflow UI: the model version page)."""
    text = version_description(registration, report, lineage, data_report)
    client(cfg).update_model_version(registration["name"], registration["version"], description=text)
    return text

