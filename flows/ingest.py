"""The `ingest` flow: one raw source -> one dataset version, so a data engineer can trigger just
an ingest (from the Prefect UI, `prefect deployment run ingest/<name>`, or a schedule)."""

from __future__ import annotations

from typing import Literal

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.policy import record_failure, with_step
from pipelines.config import Config, datasets_root, load_config
from pipelines.ingest.sources import FORMATS
from pipelines.runtime import init_ray, quiet_environment

Format = Literal[FORMATS]  # the typed parameter the Prefect UI offers as a drop-down


@task(name="ingest", cache_policy=NO_CACHE)
def ingest_source(cfg: Config, source: str, format: str | None) -> str:
    """Unchanged inputs are not redone: the ingest returns the version they made before."""
    from pipelines.ingest import ingest as run_ingest

    init_ray(cfg)
    return str(run_ingest(source, datasets_root(cfg), cfg.data, fmt=format))


@flow(name="ingest", log_prints=True, on_failure=[record_failure])
def ingest(source: str, format: Format | None = None, config: str = "local",
           overrides: list[str] | None = None) -> str:
    """Clean and shard `source` (a path or URI; `format` guessed when None) into a dataset version
    under the config's data root; returns the version's directory. The step retries transient
    failures and times out as the config's `flow` section says; a failed run leaves an
    `ingest-failure` artifact and a failed MLflow run naming the error."""
    quiet_environment()
    cfg = load_config(config, overrides or [])
    version_dir = with_step(ingest_source, cfg, "ingest")(cfg, source, format)
    get_run_logger().info("dataset version: %s", version_dir)
    return version_dir
