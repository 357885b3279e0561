"""The `retrain` flow: raw data -> dataset version -> pretrain -> fine-tune -> evaluate -> registry.

Thin by design: every step is a plain function in `pipelines` (also a CLI command); the flow only
orders them, retries the I/O-bound ones and leaves a report in Prefect's UI. No tensors here.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.logging.handlers import APILogHandler
from prefect.logging.loggers import PrefectLogAdapter

from flows.dashboard import md_text, publish, render_markdown  # noqa: F401 - render_markdown: the report, re-exported
from flows.policy import failing_step, record_failure, with_step
from pipelines.config import Config, datasets_root, home_dir, load_config, mlflow_tracking_uri
from pipelines.core.mlflow import redact
from pipelines.registry.lineage import describe_version
from pipelines.registry.register import code_version
from pipelines.runtime import init_ray, quiet_environment

SLOT_TIMEOUT_S = 6 * 3600.0  # how long a retrain waits for another retrain of its model to end


class RetrainBusyError(RuntimeError):
    """Another retrain of the same registered model held the slot for longer than we waited."""


def retrain_limit_name(model_name: str) -> str:
    """The Prefect global concurrency limit that admits one retrain of `model_name` at a time."""
    return "mmfusion-retrain-" + re.sub(r"[/%&<>]", "_", model_name)


def ensure_retrain_limit(name: str) -> None:
    """Create the limit (one slot) on first use; a limit that exists is left as it is."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:  # created by a retrain that started at the same moment
                pass


@contextmanager
def one_retrain_per_model(model_name: str, timeout_s: float | None = SLOT_TIMEOUT_S) -> Iterator[None]:
    """Hold the model's retrain slot: a second retrain of the same model WAITS (up to `timeout_s`,
    None = for ever) until the first ends, then runs on the newest data; other models are not
    blocked. The slot is a lease that Prefect renews while we run, so a crashed holder frees it."""
    from prefect.concurrency.sync import concurrency

    name = retrain_limit_name(model_name)
    ensure_retrain_limit(name)
    acquired = False
    try:
        with concurrency(name, occupy=1, timeout_seconds=timeout_s, strict=True):
            acquired = True
            yield
    except TimeoutError as e:  # Prefect's documented "slot not acquired in time"
        if acquired:
            raise
        raise RetrainBusyError(
            f"another retrain of model {model_name!r} still holds the Prefect concurrency limit {name!r} "
            f"after {timeout_s:.0f} s of waiting; see its flow run in the Prefect UI, or pass a longer "
            "slot_timeout_s"
        ) from e


@task(name="prepare-data", cache_policy=NO_CACHE)
def prepare_data(cfg: Config) -> dict[str, Any]:
    """Ingest the configured source (or the synthesised set) into a dataset version. Unchanged
    data is not redone: the ingest finds the version its inputs made before (its id is derived
    from their content), and the synthesised set is written once per (num, seed).
    Returns `{"dir", "version", "reused", "report"}`."""
    from pipelines.core.dataset import read_report, version_id
    from pipelines.ingest import ingest
    from pipelines.ingest.synth import synthesize

    # Connecting to the Ray cluster is the first job submission: here, under this step's retries
    # and timeout, not bare in the flow (a cluster that is briefly away would fail the run at once).
    init_ray(cfg)
    source, fmt = cfg.data.source, cfg.data.format
    if source is None:
        spoken = "-audio" if cfg.data.synth_audio else ""
        out = home_dir(cfg) / "raw" / f"synth-n{cfg.data.synth_num}-s{cfg.data.synth_seed}{spoken}"
        if not (out / "samples.jsonl").is_file():  # written last: its presence marks the set complete
            synthesize(out, cfg.data.synth_num, cfg.data.synth_seed, audio=cfg.data.synth_audio)
            get_run_logger().info("synthesised %d samples into %s", cfg.data.synth_num, out)
        source, fmt = str(out), "jsonl"
    before = _complete_versions(datasets_root(cfg))
    version_dir = str(ingest(source, datasets_root(cfg), cfg.data, fmt=fmt))
    reused = Path(version_dir).name in before
    if reused:
        print(f"[retrain] dataset version {Path(version_dir).name} reused: {source} is unchanged since it was "
              "ingested (nothing re-cleaned)", flush=True)
    return {"dir": version_dir, "version": version_id(version_dir), "reused": reused,
            "report": read_report(version_dir)}


def _complete_versions(root: str) -> set[str]:
    """Names of the complete dataset versions under a local `root` (empty for object storage)."""
    path = Path(root)
    if "://" in root or not path.is_dir():
        return set()
    return {p.name for p in path.iterdir() if (p / "manifest.json").is_file()}


@task(name="train", cache_policy=NO_CACHE)
def train(cfg: Config, data_dir: str, stage: str, init_from: str | None = None) -> str:
    """One Ray Train job; Ray Train itself restarts failed workers (train.max_failures), and a
    retried task resumes the same run (its name is deterministic) from its last checkpoint."""
    from pipelines.train import run_training

    # Rank 0's progress lines into this task's log (the flow run's page in the Prefect UI); the
    # console gets them from the driver: live on a terminal, plain lines in a log.
    return str(run_training(cfg, data_dir, stage, init_from=init_from, on_progress=api_log()))


PROGRESS_LOGGER = "mmfusion.train.progress"


def api_log() -> Callable[[str], None]:
    """INFO lines into this task run's Prefect log (the API, the UI), never printed: unlike
    `get_run_logger()`, whose records reach the console handler too."""
    logger = logging.getLogger(PROGRESS_LOGGER)
    if not any(isinstance(h, APILogHandler) for h in logger.handlers):
        logger.addHandler(APILogHandler())
        logger.setLevel(logging.INFO)
        logger.propagate = False  # the root logger's handler is Prefect's console
    return PrefectLogAdapter(logger, extra=get_run_logger().extra).info


@task(name="calibrate-itm", cache_policy=NO_CACHE)
def calibrate(cfg: Config, checkpoint: str, data_dir: str) -> dict[str, Any]:
    """Fit the fine-tuned model's ITM score on the validation split, into its checkpoint."""
    from pipelines.evaluate.calibrate import calibrate_itm

    return calibrate_itm(cfg, checkpoint, data_dir)


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_challenger(cfg: Config, checkpoint: str, data_dir: str) -> dict[str, Any]:
    """This run's fine-tuned model on the dataset version's test split (its report card)."""
    from pipelines.evaluate import evaluate

    return evaluate(cfg, checkpoint, data_dir)


@task(name="evaluate-champion", cache_policy=NO_CACHE)
def evaluate_champion(cfg: Config, data_dir: str, benchmark: str) -> dict[str, Any] | None:
    """The champion on this run's benchmark, when it was registered on another one.

    Splits are a function of the sample key, so an older champion's test samples are test samples
    here too: re-evaluating it on the new test split gives a fair, paired comparison.
    """
    from pipelines.evaluate import evaluate
    from pipelines.registry import champion_benchmark

    current = champion_benchmark(cfg)
    if current is None or current[1] == benchmark:
        return None
    version = current[0]
    get_run_logger().info("champion v%s was evaluated on %s: re-evaluating it on %s", version,
                          current[1], benchmark)
    uri = f"models:/{cfg.registry.model_name}/{version}"
    return {**evaluate(cfg, uri, data_dir), "version": version}


@task(name="register", cache_policy=NO_CACHE)
def register(
    cfg: Config,
    checkpoint: str,
    report: dict[str, Any],
    lineage: dict[str, str],
    champion_report: dict[str, Any] | None,
) -> dict:
    from pipelines.registry import register_and_gate

    return register_and_gate(cfg, checkpoint, report, lineage, champion_report=champion_report)


@task(name="check-changes", cache_policy=NO_CACHE)
def check_changes(cfg: Config, dataset_version: str) -> str | None:
    """Why training can be skipped (nothing changed since the champion was trained), or None."""
    from pipelines.registry.lineage import code_hash, unchanged_since_champion

    return unchanged_since_champion(cfg, dataset_version, cfg.hash(), code_hash())


@task(name="resolve-champion", cache_policy=NO_CACHE)
def resolve_champion(cfg: Config) -> tuple[str, str] | None:
    """(models:/ URI, local checkpoint dir) of the champion to fine-tune from, or None."""
    from pipelines.registry.lineage import champion_checkpoint

    found = champion_checkpoint(cfg)
    return (found[0], str(found[1])) if found else None


@flow(name="retrain", log_prints=True, on_failure=[record_failure])
def retrain(
    config: str = "local", overrides: list[str] | None = None, slot_timeout_s: float | None = SLOT_TIMEOUT_S
) -> dict[str, Any]:
    """Scheduled/triggered retraining on one config; returns a summary of what it produced.

    One retrain per registered model at a time (`one_retrain_per_model`): a second one waits up
    to `slot_timeout_s` seconds for the first to end, then fails with `RetrainBusyError`.
    Steps retry transient failures and time out as the config's `flow` section says; a failed
    run leaves a `retrain-failure` artifact and a failed MLflow run naming the step and error.
    When data, config and code are unchanged since the champion was trained, nothing trains and
    the summary's `skipped` says why (also a `retrain-skipped` artifact)."""
    quiet_environment()
    cfg = load_config(config, overrides or [])
    with one_retrain_per_model(cfg.registry.model_name, slot_timeout_s):
        return _run_steps(cfg)


def _run_steps(cfg: Config) -> dict[str, Any]:
    data = with_step(prepare_data, cfg, "ingest")(cfg)
    data_dir = data["dir"]
    skipped = with_step(check_changes, cfg, "register")(cfg, data["version"])
    if skipped:
        print(f"[retrain] {skipped}", flush=True)
        create_markdown_artifact(key="retrain-skipped", markdown=f"# retrain skipped\n\n{md_text(skipped)}\n",
                                 description="nothing changed since the champion was trained")
        return {"data_dir": data_dir, "dataset_reused": data["reused"], "skipped": skipped,
                "data_report": data["report"]}
    pretrained, start = _start_weights(cfg, data_dir)
    finetuned = with_step(train, cfg, "train")(cfg, data_dir, "finetune", init_from=start)
    calibration = with_step(calibrate, cfg, "train")(cfg, finetuned, data_dir) if cfg.train.calibrate_itm else None
    report = with_step(evaluate_challenger, cfg, "evaluate")(cfg, finetuned, data_dir)
    champion_report = with_step(evaluate_champion, cfg, "evaluate")(cfg, data_dir, report["benchmark"])
    lineage = _lineage(cfg, report, data_dir, pretrained or start)
    registration = with_step(register, cfg, "register")(cfg, finetuned, report, lineage, champion_report)
    summary = {
        "data_dir": data_dir, "dataset_reused": data["reused"], "data_report": data["report"],
        "pretrain_checkpoint": pretrained, "init_from": start, "checkpoint": finetuned, "report": report,
        "itm_calibration": calibration,
        "registration": registration, "lineage": lineage, "tracking_uri": redact(mlflow_tracking_uri(cfg)),
        "home": str(home_dir(cfg)), "ray_dashboard": _dashboard_url(),
    }
    with failing_step("dashboards"):
        describe_version(cfg, registration, report, lineage, data["report"])
        publish(cfg, summary)
    return summary


def _start_weights(cfg: Config, data_dir: str) -> tuple[str | None, str]:
    """`(pretrain checkpoint or None, checkpoint the fine-tune starts from)`: the champion's
    weights when `train.init_from: champion` and there is one, else a fresh pretraining run."""
    if cfg.train.init_from == "champion":
        champion = with_step(resolve_champion, cfg, "register")(cfg)
        if champion is not None:
            print(f"[retrain] fine-tuning from the champion {champion[0]} ({champion[1]}); no pretraining",
                  flush=True)
            return None, champion[1]
        print("[retrain] train.init_from=champion, but there is no champion yet: pretraining first", flush=True)
    pretrained = with_step(train, cfg, "train")(cfg, data_dir, "pretrain")
    return pretrained, pretrained


def _lineage(cfg: Config, report: dict[str, Any], data_dir: str, parent: str) -> dict[str, str]:
    from pipelines.registry.lineage import code_hash

    return {"dataset_version": report["dataset_version"], "dataset_dir": data_dir, "config_hash": cfg.hash(),
            "code_version": code_version(), "code_hash": code_hash(), "parent_checkpoint": parent}


def _dashboard_url() -> str | None:
    """The Ray dashboard's address, when this Ray runs one (it needs `ray[default]`)."""
    try:
        from ray._private.worker import get_dashboard_url

        url = get_dashboard_url()
    except Exception:  # no dashboard is not an error: the run goes on without one
        return None
    if not url:
        return None
    return url if url.startswith("http") else f"http://{url}"
