"""Prefect flows and deployments. Thin: they order `pipelines` jobs and report on them."""

from pipelines.runtime import quiet_environment

# Before prefect is imported anywhere: its settings (analytics, telemetry) are read at import.
quiet_environment()
