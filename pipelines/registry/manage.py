"""Registry housekeeping behind `mmfusion registry`: list, show, promote, rollback."""

from __future__ import annotations

from pipelines.config import Config
from pipelines.core.mlflow import CHAMPION, champion_version, client, registry_lock
from pipelines.core.model_uri import ModelURIError, model_version, parse_models_uri
from pipelines.registry.register import set_champion


def _summary(mv) -> dict:
    tags = dict(mv.tags or {})
    return {
        "name": mv.name,
        "version": str(mv.version),
        "aliases": list(mv.aliases or []),
        "run_id": mv.run_id,
        "source": mv.source,
        "created": mv.creation_timestamp,
        "tags": tags,
        "metrics": {k[7:]: float(v) for k, v in tags.items() if k.startswith("metric.")},
    }


def list_models(cfg: Config) -> list[dict]:
    """Every registered model with its versions (newest first) and their aliases."""
    mlclient = client(cfg)
    out = []
    for rm in mlclient.search_registered_models():
        versions = mlclient.search_model_versions(f"name='{rm.name}'")
        versions = sorted(versions, key=lambda v: int(v.version), reverse=True)
        aliases = {str(a): str(v) for a, v in (rm.aliases or {}).items()}
        summaries = [_summary(v) for v in versions]
        for s in summaries:  # search results may omit aliases; the registered model has them all
            s["aliases"] = sorted(a for a, v in aliases.items() if v == s["version"])
        out.append({"name": rm.name, "aliases": aliases, "versions": summaries})
    return out


def show(cfg: Config, ref: str) -> dict:
    """One version: `NAME` (its champion), `NAME@alias` or `NAME/VERSION` (or a models:/ URI)."""
    uri = ref if ref.startswith("models:/") else f"models:/{ref}"
    if "@" not in uri and uri.count("/") == 1:
        uri = f"{uri}@{CHAMPION}"
    return _summary(model_version(cfg, uri))


def promote(cfg: Config, name: str, version: str, reason: str = "promoted by hand") -> dict:
    """Make `version` the champion regardless of the gate (recorded on the version)."""
    mlclient = client(cfg)
    mv = model_version(cfg, f"models:/{name}/{version}")
    with registry_lock(cfg, name):
        champ = champion_version(mlclient, name)
        set_champion(mlclient, name, str(mv.version), champ.version if champ else None)
        mlclient.set_model_version_tag(name, mv.version, "gate.promote", "True")
        mlclient.set_model_version_tag(name, mv.version, "gate.reason", reason)
    return {"name": name, "champion": str(mv.version), "previous": champ.version if champ else None}


def rollback(cfg: Config, name: str) -> dict:
    """Move `champion` back to the version it replaced (the `previous_champion` tag)."""
    parse_models_uri(f"models:/{name}@{CHAMPION}")  # validates the name
    mlclient = client(cfg)
    with registry_lock(cfg, name):
        champ = champion_version(mlclient, name)
        if champ is None:
            raise ModelURIError(f"{name}: has no champion to roll back (see `mmfusion registry list`)")
        prev = (champ.tags or {}).get("previous_champion")
        if not prev:
            raise ModelURIError(
                f"{name}: champion v{champ.version} replaced no earlier champion; nothing to roll back to"
            )
        mlclient.set_registered_model_alias(name, CHAMPION, prev)
        mlclient.set_model_version_tag(name, champ.version, "rolled_back", "True")
    print(f"[registry] {name}: champion rolled back from v{champ.version} to v{prev}", flush=True)
    return {"name": name, "champion": prev, "previous": str(champ.version)}
