"""Retries with backoff, timeouts and the failure record of the flows' steps, on Prefect's test
harness (a real Prefect server in a subprocess) and MLflow on SQLite. The tiny tasks here go
through the same `with_step` the `retrain` flow uses; the last test fails the real flow."""

from __future__ import annotations

import time

import pytest


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _cfg(**flow):
    from pipelines.config import load_config

    return load_config("debug", [f"flow.{k}={v}" for k, v in flow.items()])


def test_transient_failures_are_retried_with_growing_delays(prefect_harness):
    from prefect import flow, task

    from flows.policy import with_step

    attempts: list[float] = []

    @task(name="flaky-io")
    def flaky() -> str:
        attempts.append(time.monotonic())
        if len(attempts) < 3:
            raise ConnectionError("connection reset by peer")
        return "ok"

    @flow(name="policy-retry")
    def run() -> str:
        return with_step(flaky, _cfg(retries=3, retry_backoff_s=0.5, retry_jitter=0), "ingest")()

    assert run() == "ok"
    assert len(attempts) == 3
    first, second = attempts[1] - attempts[0], attempts[2] - attempts[1]
    assert first >= 0.45 and second >= 0.95  # 0.5 s, then doubled (each gap also holds engine overhead)


def test_bad_input_fails_at_once_and_names_its_step(prefect_harness):
    from prefect import flow, task

    from flows.policy import with_step

    attempts: list[int] = []

    @task(name="read-source")
    def missing() -> None:
        attempts.append(1)
        raise FileNotFoundError("/no/such/source: not found")

    @flow(name="policy-permanent")
    def run() -> None:
        with_step(missing, _cfg(retries=3, retry_backoff_s=0.1), "ingest")()

    with pytest.raises(FileNotFoundError) as info:
        run()
    assert len(attempts) == 1  # a missing path stays missing: no retry
    assert info.value.mmfusion_step == "read-source"


def test_a_step_past_its_timeout_fails_without_a_retry(prefect_harness):
    from prefect import flow, task

    from flows.policy import with_step

    attempts: list[int] = []

    @task(name="slow-step")
    def slow() -> None:
        attempts.append(1)
        for _ in range(300):  # a step that waits on a job, polling (as Ray Train's fit does)
            time.sleep(0.1)

    @flow(name="policy-timeout")
    def run() -> None:
        with_step(slow, _cfg(evaluate_timeout_s=1.0, retries=2, retry_backoff_s=0.1), "evaluate")()

    t0 = time.monotonic()
    with pytest.raises(TimeoutError) as info:
        run()
    assert time.monotonic() - t0 < 15
    assert len(attempts) == 1 and info.value.mmfusion_step == "slow-step"


def test_step_options_follow_the_flow_config():
    from flows.policy import step_options

    opts = step_options(_cfg(train_timeout_s=120, train_retries=2, retry_backoff_s=3), "train")
    assert opts["timeout_seconds"] == 120 and opts["retries"] == 2
    assert opts["retry_delay_seconds"] == [3, 6]
    assert step_options(_cfg(), "register")["timeout_seconds"] == 1800
    with pytest.raises(ValueError, match="unknown step 'deploy'; expected one of ingest, train"):
        step_options(_cfg(), "deploy")


def test_a_failed_retrain_records_its_step_and_error(prefect_harness, ray_local, tmp_path, monkeypatch):
    """The real flow on a source that does not exist: it fails in prepare-data, and both the
    Prefect artifact and a FAILED MLflow run say so, with the error."""
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from flows.retrain import retrain
    from pipelines.config import load_config, mlflow_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    missing = tmp_path / "no-such-source"
    overrides = [f"services.home={tmp_path / 'home'}", f"data.source={missing}", "data.format=jsonl"]
    state = retrain(config="debug", overrides=overrides, return_state=True)
    assert state.is_failed()
    flow_run_id = state.state_details.flow_run_id

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    (artifact,) = [a for a in found if a.key == "retrain-failure"]
    assert "failed in step **prepare-data**" in artifact.data
    assert "FileNotFoundError" in artifact.data and "no-such-source" in artifact.data

    cfg = load_config("debug", overrides)
    ml = MlflowClient(tracking_uri=mlflow_tracking_uri(cfg))
    exp = ml.get_experiment_by_name(cfg.registry.experiment)
    (run,) = ml.search_runs([exp.experiment_id], f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    assert run.info.status == "FAILED"
    assert run.data.tags["mmfusion.failed_step"] == "prepare-data"
    assert "no-such-source" in run.data.tags["mmfusion.error"]
    assert "failed in step **prepare-data**" in run.data.tags["mlflow.note.content"]


def test_lost_ray_workers_and_failed_submissions_are_transient_bad_input_is_not():
    """What `retry_condition_fn` retries: a lost worker, node or object, an RPC or a submission that
    timed out, an unreachable cluster or MLflow (also as the cause of the step's own error), but
    not a missing input, a bug, or the step's own timeout."""
    from prefect.task_engine import TaskRunTimeoutError
    from ray import exceptions as rx

    from flows.policy import is_transient
    from pipelines.core.mlflow import RegistryError
    from pipelines.train import TrainingError

    def caused(outer: BaseException, cause: BaseException) -> BaseException:
        outer.__cause__ = cause
        return outer

    transient = [rx.WorkerCrashedError(), rx.NodeDiedError("node 1 died"), rx.GetTimeoutError("get timed out"),
                 rx.RpcError("deadline exceeded"), ConnectionError("Ray's GCS is not reachable"),
                 RegistryError("MLflow at http://127.0.0.1:5000 is not reachable"),
                 caused(TrainingError("training run r failed"), rx.WorkerCrashedError())]
    permanent = [ValueError("bad config"), FileNotFoundError("/no/such/source"), KeyError("captions"),
                 TaskRunTimeoutError("took longer than 60 s"),
                 caused(TrainingError("training run r failed"), ValueError("bad batch")), None]
    assert [is_transient(e) for e in transient] == [True] * len(transient)
    assert [is_transient(e) for e in permanent] == [False] * len(permanent)
