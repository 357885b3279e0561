"""What a Prefect user expects of a step: retries with exponential backoff on transient failures
(I/O, MLflow, Ray job submission) but not on bad input, a timeout (the `flow` config section),
and, when a run fails, a record of why: a markdown artifact on the flow run and a failed MLflow
run whose note names the step and the error.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from prefect.tasks import exponential_backoff

from pipelines.config import Config

STEPS = ("ingest", "train", "evaluate", "register")
# Errors of the input, not of the moment: retrying them only delays the same failure.
PERMANENT_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def _ray_transient() -> tuple[type[BaseException], ...]:
    """Ray's errors of a lost worker, node or object, or of a submission that timed out."""
    try:
        from ray import exceptions as rx
    except ImportError:
        return ()
    return (rx.RaySystemError, rx.WorkerCrashedError, rx.LocalRayletDiedError, rx.ActorDiedError,
            rx.ActorUnavailableError, rx.NodeDiedError, rx.ObjectLostError, rx.ObjectFetchTimedOutError,
            rx.OwnerDiedError, rx.GetTimeoutError, rx.RpcError)


def is_transient(exc: BaseException | None) -> bool:
    """True for failures a retry can cure: OS/network I/O (not a missing or forbidden path), an
    unreachable MLflow (`RegistryError`), Ray losing a worker/node or a submission timing out.
    A step's own timeout is not retried: it would take as long again. The cause chain counts."""
    from prefect.task_engine import TaskRunTimeoutError

    from pipelines.core.mlflow import RegistryError

    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, (TaskRunTimeoutError, *PERMANENT_OS_ERRORS)):
            return False
        if isinstance(exc, (OSError, RegistryError, *_ray_transient())):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect's `retry_condition_fn`: retry the failed task run only when `is_transient`."""
    exc = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    return is_transient(exc if isinstance(exc, BaseException) else None)


def step_options(cfg: Config, step: str) -> dict[str, Any]:
    """`Task.with_options(...)` for one of `STEPS`: its timeout and retries from `cfg.flow`."""
    if step not in STEPS:
        raise ValueError(f"unknown step {step!r}; expected one of {', '.join(STEPS)}")
    f = cfg.flow
    retries = f.train_retries if step == "train" else f.retries
    return {
        "timeout_seconds": getattr(f, f"{step}_timeout_s"),
        "retries": retries,
        "retry_delay_seconds": exponential_backoff(f.retry_backoff_s)(retries) if retries else 0,
        "retry_jitter_factor": (f.retry_jitter or None) if retries else None,
        "retry_condition_fn": retry_if_transient,
    }


@contextmanager
def failing_step(name: str) -> Iterator[None]:
    """Mark an exception raised inside with the step it came from (read by `record_failure`)."""
    try:
        yield
    except BaseException as e:
        if getattr(e, "mmfusion_step", None) is None:
            try:
                e.mmfusion_step = name
            except AttributeError:  # an exception type without a __dict__
                pass
        raise


def failure_markdown(flow_name: str, flow_run_name: str, step: str, error: str, detail: str) -> str:
    from flows.dashboard import md_text

    return (f"# {flow_name} failed\n\nRun **{md_text(flow_run_name)}** failed in step **{md_text(step)}**.\n\n"
            f"**Error:** {md_text(error)}\n\n```\n{detail.replace('```', '` ` `')[-4000:]}\n```\n")


def _failure(state) -> tuple[str, str, str]:
    """(failed step, one-line error, traceback tail) of a Failed flow-run state."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception as e:  # the result itself could not be read: say so
        exc = e
    if not isinstance(exc, BaseException):
        return "flow", str(state.message or "unknown error"), ""
    step = getattr(exc, "mmfusion_step", None) or "flow (before any step: config, concurrency slot)"
    detail = "".join(traceback.format_exception(exc)[-6:])
    return step, f"{type(exc).__name__}: {exc}"[:2000], detail


def record_failure(flow, flow_run, state) -> None:
    """Prefect `on_failure` hook: a markdown artifact `<flow>-failure` on the flow run, and a
    FAILED MLflow run (tags `mmfusion.failed_step`, `mmfusion.error`, a note) in the config's
    experiment. Never raises: a broken hook must not hide the run's own error."""
    from prefect import get_run_logger

    step, error, detail = _failure(state)
    markdown = failure_markdown(flow.name, flow_run.name, step, error, detail)
    for write in (_artifact, _mlflow_note):
        try:
            write(flow, flow_run, step, error, markdown)
        except Exception as e:  # noqa: BLE001 - reported, and the run's own failure stands
            get_run_logger().warning("could not record the failure (%s): %s", write.__name__, e)


def _artifact(flow, flow_run, step: str, error: str, markdown: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import ArtifactCreate

    with get_client(sync_client=True) as client:
        client.create_artifact(ArtifactCreate(
            key=f"{flow.name}-failure", type="markdown", data=markdown, flow_run_id=flow_run.id,
            description=f"{flow.name} failed in {step}: {error[:200]}"))


def _mlflow_note(flow, flow_run, step: str, error: str, markdown: str) -> None:
    from pipelines.config import load_config
    from pipelines.core.mlflow import client, experiment_id, redact

    params = flow_run.parameters or {}
    cfg = load_config(params.get("config", "local"), params.get("overrides") or [])
    mlclient = client(cfg)
    run = mlclient.create_run(experiment_id(cfg, mlclient), run_name=f"{flow.name}-failed-{flow_run.name}", tags={
        "mmfusion.flow": flow.name, "mmfusion.failed_step": step, "mmfusion.error": redact(error)[:5000],
        "prefect.flow_run_id": str(flow_run.id), "mlflow.note.content": redact(markdown)[:20000]})
    mlclient.set_terminated(run.info.run_id, status="FAILED")


def with_step(task_obj, cfg: Config, step: str) -> Callable[..., Any]:
    """`task_obj` with `step`'s options; calling it marks a failure with `step`'s name."""
    configured = task_obj.with_options(**step_options(cfg, step))

    def call(*args: Any, **kwargs: Any) -> Any:
        with failing_step(task_obj.name):
            return configured(*args, **kwargs)

    return call
