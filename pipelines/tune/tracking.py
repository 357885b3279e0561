"""Tune trials to MLflow, from the driver: one parent run for the search, one child run a trial.

A Tune callback sees every trial's results and how it ended, including trials that ASHA stopped
(whose processes are killed, so they cannot close their own runs).
"""

from __future__ import annotations

import time
from typing import Any

from ray.tune import Callback

from pipelines.core.mlflow import client_at, ensure_experiment


class TrialsToMlflow(Callback):
    """Params: the trial's sampled values. Metrics: every numeric `val_*` of each report, at step
    `training_iteration`. Tags: `tune.search`, `tune.trial_id`, `tune.status` (done | stopped |
    error), `tune.reports`."""

    def __init__(self, tracking_uri: str, experiment: str, search_name: str, max_reports: int,
                 params: dict[str, Any], artifact_location: str | None = None):
        self.tracking_uri, self.experiment, self.search_name = tracking_uri, experiment, search_name
        self.artifact_location = artifact_location  # never MLflow's ./mlruns fallback in a worker's cwd
        self.max_reports, self.params = max_reports, params
        self.parent_run_id: str | None = None
        self._client, self._exp_id, self._runs, self._last = None, None, {}, {}

    def __getstate__(self):  # Tune may pickle its callbacks; a DB client does not travel
        return {**self.__dict__, "_client": None}

    # -- Tune hooks ------------------------------------------------------------------------
    def setup(self, **info) -> None:
        self._client = client_at(self.tracking_uri)
        self._exp_id = ensure_experiment(self._client, self.experiment, self.artifact_location)
        run = self._client.create_run(self._exp_id, run_name=self.search_name, tags={"tune.search": self.search_name})
        self.parent_run_id = run.info.run_id
        self._log(self.parent_run_id, params={k: str(v)[:500] for k, v in self.params.items()})

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        tags = {"mlflow.parentRunId": self.parent_run_id, "tune.search": self.search_name,
                "tune.trial_id": trial.trial_id}
        run = self._client.create_run(self._exp_id, run_name=f"{self.search_name}-{trial.trial_id}", tags=tags)
        self._runs[trial.trial_id] = run.info.run_id
        self._log(run.info.run_id, params={k: str(v) for k, v in trial.config.items()})

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self._last[trial.trial_id] = result
        metrics = {k: float(v) for k, v in result.items()
                   if k.startswith("val_") and isinstance(v, int | float) and not isinstance(v, bool)}
        step = int(result.get("training_iteration", 0))
        self._log(self._runs[trial.trial_id], metrics=metrics, step=step,
                  tags={"tune.phase": result.get("phase"), "tune.reports": step})

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        last = self._last.get(trial.trial_id, {})
        self._end(trial.trial_id, "done" if last.get("phase") == "final" else "stopped", "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._end(trial.trial_id, "error", "FAILED")

    # -- helpers ---------------------------------------------------------------------------
    def log_best(self, trial_id: str | None, score: float | None) -> None:
        """On the parent run: the best trial and its score; then end it."""
        if self._client is None or self.parent_run_id is None:
            return
        tags = {"tune.best_trial": trial_id or "none", "tune.best_run_id": self._runs.get(trial_id, "")}
        self._log(self.parent_run_id, metrics={"best_score": score} if score is not None else {}, tags=tags)
        self._client.set_terminated(self.parent_run_id)

    def _end(self, trial_id: str, status: str, mlflow_status: str) -> None:
        run_id = self._runs.get(trial_id)
        if run_id is None:
            return
        self._log(run_id, tags={"tune.status": status, "tune.max_reports": self.max_reports})
        self._client.set_terminated(run_id, status=mlflow_status)

    def _log(self, run_id: str, metrics=None, params=None, tags=None, step: int = 0) -> None:
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        self._client.log_batch(
            run_id,
            metrics=[Metric(k, v, now, step) for k, v in (metrics or {}).items()],
            params=[Param(k, v) for k, v in (params or {}).items()],
            tags=[RunTag(k, str(v)) for k, v in (tags or {}).items() if v is not None],
        )
