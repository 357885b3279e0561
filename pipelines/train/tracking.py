"""Metrics to MLflow from rank 0, off the training thread, never fatal.

Training must not stop (or slow down) because a tracking server is slow, down or misconfigured:
calls are queued to a daemon thread; the first failure is logged once and tracking switches off.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any

log = logging.getLogger("pipelines.train")


class MlflowTracker:
    """`log_metrics(dict, step)`, `log_params(dict)`, `set_tags(dict)`, `close()`; `run_id` once started.

    Resumes the MLflow run `run_id` when given (a restarted or re-run training job keeps one run).
    """

    def __init__(self, tracking_uri: str, experiment: str, run_name: str, run_id: str | None = None,
                 enabled: bool = True):
        self.run_id = run_id
        self._ready = threading.Event()
        self._queue: queue.Queue = queue.Queue()
        self._alive = enabled
        self._thread = None
        if enabled:
            self._thread = threading.Thread(
                target=self._work, args=(tracking_uri, experiment, run_name), daemon=True, name="mlflow-tracker"
            )
            self._thread.start()

    # -- public, called from the training loop: cheap and never raising --------------------
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
        self._put(("metrics", clean, step))

    def log_params(self, params: dict[str, Any]) -> None:
        self._put(("params", {k: str(v)[:500] for k, v in params.items()}, None))

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._put(("tags", {k: str(v) for k, v in tags.items()}, None))

    def wait_run_id(self, timeout: float = 30.0) -> str | None:
        self._ready.wait(timeout)
        return self.run_id

    def close(self, timeout: float = 15.0) -> None:
        """Flush what is queued (up to `timeout` seconds) and end the run."""
        if self._thread is None:
            return
        self._put(("close", None, None))
        self._thread.join(timeout)

    # -- the worker thread -----------------------------------------------------------------
    def _put(self, item) -> None:
        if self._alive:
            self._queue.put(item)

    def _work(self, tracking_uri: str, experiment: str, run_name: str) -> None:
        try:
            client, run_id = self._start(tracking_uri, experiment, run_name)
        except Exception as e:  # noqa: BLE001 - any tracking problem must not reach training
            self._disable(f"could not start an MLflow run at {tracking_uri}: {e}")
            return
        finally:
            self._ready.set()
        while True:
            kind, payload, step = self._queue.get()
            try:
                if kind == "close":
                    client.set_terminated(run_id)
                    return
                self._send(client, run_id, kind, payload, step)
            except Exception as e:  # noqa: BLE001
                self._disable(f"MLflow logging failed ({e}); continuing without it")
                return

    def _start(self, tracking_uri: str, experiment: str, run_name: str):
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri)
        if self.run_id is not None:
            client.update_run(self.run_id, status="RUNNING")
            return client, self.run_id
        exp = client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
        run = client.create_run(exp_id, run_name=run_name)
        self.run_id = run.info.run_id
        return client, self.run_id

    @staticmethod
    def _send(client, run_id: str, kind: str, payload: dict, step: int | None) -> None:
        import time

        from mlflow.entities import Metric, Param, RunTag

        if kind == "metrics":
            now = int(time.time() * 1000)
            client.log_batch(run_id, metrics=[Metric(k, v, now, step or 0) for k, v in payload.items()])
        elif kind == "params":
            client.log_batch(run_id, params=[Param(k, v) for k, v in payload.items()])
        elif kind == "tags":
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in payload.items()])

    def _disable(self, message: str) -> None:
        self._alive = False
        log.warning("mlflow: %s", message)
