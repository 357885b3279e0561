"""Deployments of the `retrain` flow: a nightly schedule served by this process.

`mmfusion schedule` calls `serve_retrain`; a Prefect server (PREFECT_API_URL) then shows the
deployment, its schedule and every run. For work-pool based deployments on a cluster, see
infra/prefect/.
"""

from __future__ import annotations

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
