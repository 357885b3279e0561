"""Register an evaluated checkpoint as a model version, then gate it against the champion."""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from pipelines.config import Config
from pipelines.core.checkpoints import check_finite, model_files, weights_sha256
from pipelines.core.mlflow import (
    CHAMPION,
    champion_version,
    client,
    experiment_id,
    is_not_found,
    redact,
    registry_error,
    registry_lock,
)
from pipelines.core.records import PER_SAMPLE, read_records
from pipelines.registry import gate as gate_mod


def code_version() -> str:
    """The git commit of this code (`-dirty` when the tree has changes), or `unknown`."""
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root, capture_output=True, text=True, timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha + ("-dirty" if dirty else "")) if sha else "unknown"


def _flat(tree: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if not isinstance(v, str) else v
    return out


def _lineage_tags(cfg: Config, report: dict, lineage: dict, weights_sha: str) -> dict[str, str]:
    tags = {
        "dataset_version": lineage.get("dataset_version") or report.get("dataset_version") or "unknown",
        "config_hash": lineage.get("config_hash") or cfg.hash(),
        "code_version": lineage.get("code_version") or code_version(),
        "parent_checkpoint": str(lineage.get("parent_checkpoint") or "none"),
        "benchmark": report["benchmark"],
        "weights_sha256": weights_sha,
    }
    if report.get("protocol"):
        tags["eval_protocol"] = json.dumps(report["protocol"], sort_keys=True)
    for k, v in lineage.items():
        tags.setdefault(f"lineage.{k}", str(v))
    for k, v in report["metrics"].items():
        if v is not None:
            tags[f"metric.{k}"] = f"{v:.6f}"
    return {k: str(v)[:5000] for k, v in tags.items()}


def _log_values(mlclient, run_id: str, cfg: Config, report: dict, tags: dict[str, str]) -> None:
    """Params (redacted: a config may hold a URI with credentials), metrics and tags of the run."""
    from mlflow.entities import Metric, Param, RunTag

    params = _flat({k: cfg.to_dict()[k] for k in ("model", "train", "eval", "registry")})
    params = [Param(k, redact(v)[:6000]) for k, v in params.items()]
    now = int(time.time() * 1000)
    metrics = [Metric(k, float(v), now, 0) for k, v in report["metrics"].items() if v is not None]
    for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
        mlclient.log_batch(run_id, params=params[i:i + 100])
    mlclient.log_batch(run_id, metrics=metrics, tags=[RunTag(k, redact(v)) for k, v in tags.items()])


def _log_run(cfg: Config, ckpt: Path, report: dict, tags: dict[str, str], mlclient) -> tuple[str, str]:
    """One MLflow run: params, metrics, report card + per-sample results, the model files."""
    exp = experiment_id(cfg, mlclient)
    name = f"{cfg.registry.model_name}-{tags['dataset_version'][:12]}-{time.strftime('%Y%m%d-%H%M%S')}"
    run = mlclient.create_run(exp, run_name=name)
    run_id = run.info.run_id
    try:
        _log_values(mlclient, run_id, cfg, report, tags)
        mlclient.log_artifact(run_id, report["report_card_path"], "eval")
        mlclient.log_artifact(run_id, report["per_sample_path"], "eval")
        for picture in report.get("explanations", []):  # where the decoder looked, per word
            mlclient.log_artifact(run_id, picture, "eval/attention")
        with tempfile.TemporaryDirectory() as tmp:
            staged = Path(tmp) / "checkpoint"
            for rel in model_files(ckpt):
                dst = staged / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes((ckpt / rel).read_bytes())
            mlclient.log_artifacts(run_id, str(staged), "checkpoint")
    except BaseException:
        mlclient.set_terminated(run_id, status="FAILED")
        raise
    mlclient.set_terminated(run_id)
    return run_id, f"{run.info.artifact_uri}/checkpoint"


def _ensure_registered_model(mlclient, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        mlclient.get_registered_model(name)
    except MlflowException as e:
        if not is_not_found(e):
            raise registry_error(mlclient, f"reading registered model {name!r}", e) from e
        try:
            mlclient.create_registered_model(
                name, description="mmfusion fusion model; alias `champion` marks the one in service"
            )
        except MlflowException:  # created concurrently by another registration
            mlclient.get_registered_model(name)


def champion_per_sample(mlclient, mv) -> list[dict]:
    """Download the champion's per-sample results from its run."""
    with tempfile.TemporaryDirectory() as tmp:
        return read_records(mlclient.download_artifacts(mv.run_id, f"eval/{PER_SAMPLE}", tmp))


def find_version(mlclient, name: str, weights_sha: str):
    """The version of `name` registered with these weights (`weights_sha256` tag), or None."""
    from mlflow.exceptions import MlflowException

    query = f"name='{name}' and tags.weights_sha256='{weights_sha}'"
    try:
        found = mlclient.search_model_versions(query)
    except MlflowException as e:
        raise registry_error(mlclient, f"looking up {name} versions with weights {weights_sha[:12]}", e) from e
    return min(found, key=lambda v: int(v.version)) if found else None


def register_version(cfg: Config, checkpoint_dir, report: dict, lineage: dict | None = None):
    """Log the run and create the model version (no gating). Returns the `ModelVersion`.

    Idempotent, keyed on the checkpoint's weights sha256 (a version tag): registering the same
    weights again (a retried `register` task) returns the existing version, never a duplicate.
    """
    ckpt = Path(checkpoint_dir)
    check_finite(ckpt)  # a diverged (NaN/Inf) model is never registered, so never promoted
    mlclient = client(cfg)
    sha = weights_sha256(ckpt)
    name = cfg.registry.model_name
    _ensure_registered_model(mlclient, name)
    with registry_lock(cfg, name):  # one look-up-then-create at a time for this model
        existing = find_version(mlclient, name, sha)
        if existing is not None:
            print(f"[registry] {name} v{existing.version} already holds weights {sha[:12]}: reusing it", flush=True)
            return existing
        tags = _lineage_tags(cfg, report, lineage or {}, sha)
        run_id, source = _log_run(cfg, ckpt, report, tags, mlclient)
        return mlclient.create_model_version(name, source=source, run_id=run_id, tags=tags)


def _record(mlclient, mv, decision: dict[str, Any]) -> None:
    """Write the gate's decision on the version (tags) and its run (metrics)."""
    for k, v in decision.items():
        if v is not None:
            mlclient.set_model_version_tag(mv.name, mv.version, f"gate.{k}", str(v)[:5000])
    for k in ("delta", "ci_low", "p_value"):
        if isinstance(decision.get(k), float):
            mlclient.log_metric(mv.run_id, f"gate_{k}", decision[k])


def set_champion(mlclient, name: str, version: str, previous: str | None) -> None:
    """Move the alias; the version remembers who it replaced, which is what rollback uses."""
    if previous and previous != str(version):
        mlclient.set_model_version_tag(name, version, "previous_champion", previous)
    mlclient.set_registered_model_alias(name, CHAMPION, version)


def champion_benchmark(cfg: Config) -> tuple[str, str] | None:
    """(version, benchmark id) of the current champion, or None when there is none; raises
    `RegistryError` when MLflow cannot say (fail closed)."""
    champ = champion_version(client(cfg), cfg.registry.model_name)
    return (str(champ.version), champ.tags.get("benchmark", "")) if champ else None


def _champion_records(mlclient, champ, mine: str, champion_report: dict | None) -> list[dict] | None:
    """The champion's per-sample results on benchmark `mine`: from its own registration, or from
    `champion_report` (the champion re-evaluated on this benchmark); None when neither matches."""
    if champ.tags.get("benchmark") == mine:
        return champion_per_sample(mlclient, champ)
    if (
        champion_report
        and str(champion_report.get("version")) == str(champ.version)
        and champion_report.get("benchmark") == mine
    ):
        return read_records(champion_report["per_sample_path"])
    return None


def _protocol_note(mine: dict | None, champ) -> str:
    """Which evaluation settings differ from the champion's (empty when none are known to)."""
    try:
        theirs = json.loads(champ.tags.get("eval_protocol") or "null")
    except ValueError:
        theirs = None
    if not mine or not theirs:
        return ""
    diff = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
    shown = ", ".join(f"{k} {theirs.get(k)!r} -> {mine.get(k)!r}" for k in diff)
    return f" The evaluation protocol differs ({shown})." if diff else ""


def gate_decision(
    cfg: Config, mlclient, mv, records: list[dict], champ, champion_report: dict | None = None,
    report: dict | None = None,
) -> dict[str, Any]:
    """Decide whether `mv` (with per-sample `records`) should replace `champ` (or None).

    `champion_report`: the champion's evaluation on the challenger's benchmark (with its
    `version`), for when the champion was registered on an older dataset version. `report`: the
    challenger's report card (its `benchmark` and `protocol`); else `mv`'s tags say.
    """
    reg = cfg.registry
    if champ is None:
        return {"promote": True, "reason": "no champion yet: the first evaluated version becomes champion",
                "metric": reg.primary_metric}
    mine, theirs = (report or {}).get("benchmark") or mv.tags.get("benchmark"), champ.tags.get("benchmark")
    champ_records = _champion_records(mlclient, champ, mine, champion_report)
    if champ_records is None:
        return {
            "promote": False,
            "metric": reg.primary_metric,
            "reason": (
                f"not compared: challenger v{mv.version} was evaluated on benchmark {mine}, champion "
                f"v{champ.version} on {theirs}.{_protocol_note((report or {}).get('protocol'), champ)} "
                "Metrics on different test splits or evaluation settings are not comparable; "
                f"evaluate both the same way (mmfusion eval --model models:/{mv.name}@champion "
                "--data DIR) and register again, or promote by hand (mmfusion registry promote)."
            ),
        }
    decision = gate_mod.decide(
        records,
        champ_records,
        reg.primary_metric,
        higher_is_better=reg.higher_is_better,
        margin=reg.margin,
        confidence=reg.confidence,
        samples=cfg.eval.bootstrap_samples,
    )
    out = decision.to_dict()
    where = "" if mine == theirs else f" (champion re-evaluated on {mine})"
    out["reason"] = f"v{mv.version} vs champion v{champ.version}{where}: {decision.reason}"
    return out


def _gate_under_lock(cfg: Config, mlclient, mv, report: dict, champion_report: dict | None) -> dict:
    """Read the champion, decide, move the alias and record the decision, all under the lock:
    whoever held it before may have moved the champion."""
    name = cfg.registry.model_name
    with registry_lock(cfg, name):
        champ = champion_version(mlclient, name)  # raises RegistryError: never "no champion" on error
        if champ is not None and str(champ.version) == str(mv.version):  # a retry after success
            return {"promote": True, "metric": cfg.registry.primary_metric,
                    "reason": f"v{mv.version} (same weights sha256) is already the champion"}
        records = read_records(report["per_sample_path"])
        decision = gate_decision(cfg, mlclient, mv, records, champ, champion_report, report)
        if decision["promote"]:
            set_champion(mlclient, name, mv.version, champ.version if champ else None)
        _record(mlclient, mv, decision)
    return decision


def register_and_gate(
    cfg: Config,
    checkpoint_dir,
    report: dict,
    lineage: dict | None = None,
    champion_report: dict | None = None,
) -> dict:
    """Register `checkpoint_dir` (evaluated as `report`) and make it champion if the gate agrees.

    `champion_report`: optional evaluation of the champion (with `"version"`) on the same
    benchmark as `report`, so that a champion from an older dataset version is still compared.
    Safe to retry: the same weights give the same version (`register_version`). Any MLflow failure
    raises (`RegistryError` when reading the champion) and promotes nothing.

    Returns `{"name", "version", "promoted", "reason", "run_id", "model_uri", "champion_version",
    "decision"}`; `champion_version` is the champion after this call.
    """
    mlclient = client(cfg)
    created = register_version(cfg, checkpoint_dir, report, lineage)
    mv = mlclient.get_model_version(created.name, created.version)
    name = cfg.registry.model_name
    decision = _gate_under_lock(cfg, mlclient, mv, report, champion_report)
    now = champion_version(mlclient, name)
    verdict = "PROMOTED to champion" if decision["promote"] else "not promoted"
    print(f"[registry] {name} v{mv.version} {verdict}: {decision['reason']}", flush=True)
    return {
        "name": name,
        "version": str(mv.version),
        "promoted": bool(decision["promote"]),
        "reason": decision["reason"],
        "run_id": mv.run_id,
        "model_uri": f"models:/{name}/{mv.version}",
        "champion_version": str(now.version) if now else None,
        "decision": decision,
    }
