"""Deployments of the `retrain` and `ingest` flows.

- `mmfusion schedule` calls `serve_retrain`: the deployment is served by that foreground process.
- `mmfusion deploy` calls `deploy_to_pool`: `retrain/<name>` and `ingest/<name>` on work pool
  `mmfusion`, where a process worker (the one `mmfusion stack up` starts, or any
  `prefect worker start --pool mmfusion`) runs them from this checkout.
"""

from __future__ import annotations

from pathlib import Path

from flows.ingest import ingest
from flows.retrain import retrain


def retrain_deployment(name: str, config: str, overrides: list[str], cron: str | None):
    """The deployment object (not yet applied), so tests and scripts can inspect or apply it."""
    return retrain.to_deployment(
        name=name,
        cron=cron,
        parameters={"config": config, "overrides": overrides},
        tags=["mmfusion", "retrain"],
        description=f"Retrain on config {config!r}; promote only a better model to champion.",
    )


def serve_retrain(name: str, config: str, overrides: list[str], cron: str | None) -> None:
    """Register the deployment and run its scheduled (and manually triggered) flow runs."""
    from prefect import serve

    serve(retrain_deployment(name, config, overrides, cron))


WORK_POOL = "mmfusion"  # the pool `mmfusion stack up` starts a process worker on
ROOT = Path(__file__).resolve().parents[1]  # the project checkout the worker runs flows from


def deploy_to_pool(name: str, config: str, overrides: list[str], cron: str | None) -> dict[str, str]:
    """Create or update `retrain/<name>` and `ingest/<name>` on work pool `mmfusion`, run by a
    process worker from this checkout (no image: the flow's code is read where it lies).
    Returns {deployment name: id}."""
    from prefect import deploy

    config = _config_arg(config)
    params = {"config": config, "overrides": overrides}
    retrain_flow = retrain.from_source(source=str(ROOT), entrypoint="flows/retrain.py:retrain")
    ingest_flow = ingest.from_source(source=str(ROOT), entrypoint="flows/ingest.py:ingest")
    retrain_dep = retrain_flow.to_deployment(
        name=name, cron=cron, parameters=params, tags=["mmfusion", "retrain"],
        description=f"Retrain on config {config!r}; promote only a better model to champion.")
    ingest_dep = ingest_flow.to_deployment(
        name=name, parameters={"config": config, "overrides": overrides}, tags=["mmfusion", "ingest"],
        description=f"Ingest one raw source (parameters: source, format) with config {config!r}.")
    ids = deploy(retrain_dep, ingest_dep, work_pool_name=WORK_POOL, build=False, push=False,
                 print_next_steps_message=False, ignore_warnings=True)
    return {f"retrain/{name}": str(ids[0]), f"ingest/{name}": str(ids[1])}


def _config_arg(config: str) -> str:
    """A config file as an absolute path (the worker's flow runs start in the checkout, not in the
    caller's directory); a preset name stays a name."""
    path = Path(config).expanduser()
    return str(path.resolve()) if path.suffix in (".yaml", ".yml") or path.exists() else config
