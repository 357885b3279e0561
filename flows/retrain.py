"""The `retrain` flow: raw data -> dataset version -> pretrain -> fine-tune -> evaluate -> registry.

Thin by design: every step is a plain function in `pipelines` (also a CLI command); the flow only
orders them, retries the I/O-bound ones and leaves a report in Prefect's UI. No tensors here.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from pipelines.config import Config, datasets_root, home_dir, load_config, mlflow_tracking_uri
from pipelines.core.mlflow import redact
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


@task(name="prepare-data", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)
def prepare_data(cfg: Config) -> str:
    """Ingest the configured source (or a freshly synthesised set) into a dataset version."""
    from pipelines.ingest import ingest
    from pipelines.ingest.synth import synthesize

    source, fmt = cfg.data.source, cfg.data.format
    if source is None:
        out = home_dir(cfg) / "raw" / f"synth-n{cfg.data.synth_num}-s{cfg.data.synth_seed}"
        source, fmt = str(synthesize(out, cfg.data.synth_num, cfg.data.synth_seed)), "jsonl"
        get_run_logger().info("synthesised %d samples into %s", cfg.data.synth_num, source)
    version_dir = ingest(source, datasets_root(cfg), cfg.data, fmt=fmt)
    return str(version_dir)


@task(name="train", cache_policy=NO_CACHE)
def train(cfg: Config, data_dir: str, stage: str, init_from: str | None = None) -> str:
    """One Ray Train job; Ray Train itself restarts failed workers (train.max_failures)."""
    from pipelines.train import run_training

    return str(run_training(cfg, data_dir, stage, init_from=init_from))


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(cfg: Config, checkpoint: str, data_dir: str) -> dict[str, Any]:
    from pipelines.evaluate import evaluate as run_evaluation

    return run_evaluation(cfg, checkpoint, data_dir)


@task(name="evaluate-champion", cache_policy=NO_CACHE)
def evaluate_champion(cfg: Config, data_dir: str, benchmark: str) -> dict[str, Any] | None:
    """The champion on this run's benchmark, when it was registered on another one.

    Splits are a function of the sample key, so an older champion's test samples are test samples
    here too: re-evaluating it on the new test split gives a fair, paired comparison.
    """
    from pipelines.evaluate import evaluate as run_evaluation
    from pipelines.registry import champion_benchmark

    current = champion_benchmark(cfg)
    if current is None or current[1] == benchmark:
        return None
    version = current[0]
    get_run_logger().info("champion v%s was evaluated on %s: re-evaluating it on %s", version,
                          current[1], benchmark)
    uri = f"models:/{cfg.registry.model_name}/{version}"
    return {**run_evaluation(cfg, uri, data_dir), "version": version}


@task(name="register", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def register(
    cfg: Config,
    checkpoint: str,
    report: dict[str, Any],
    lineage: dict[str, str],
    champion_report: dict[str, Any] | None,
) -> dict:
    from pipelines.registry import register_and_gate

    return register_and_gate(cfg, checkpoint, report, lineage, champion_report=champion_report)


@flow(name="retrain", log_prints=True)
def retrain(
    config: str = "local", overrides: list[str] | None = None, slot_timeout_s: float | None = SLOT_TIMEOUT_S
) -> dict[str, Any]:
    """Scheduled/triggered retraining on one config; returns a summary of what it produced.

    One retrain per registered model at a time (`one_retrain_per_model`): a second one waits up
    to `slot_timeout_s` seconds for the first to end, then fails with `RetrainBusyError`."""
    quiet_environment()
    cfg = load_config(config, overrides or [])
    with one_retrain_per_model(cfg.registry.model_name, slot_timeout_s):
        return _run_steps(cfg)


def _run_steps(cfg: Config) -> dict[str, Any]:
    init_ray(cfg)
    data_dir = prepare_data(cfg)
    pretrained = train(cfg, data_dir, "pretrain")
    finetuned = train(cfg, data_dir, "finetune", init_from=pretrained)
    report = evaluate(cfg, finetuned, data_dir)
    champion_report = evaluate_champion(cfg, data_dir, report["benchmark"])
    lineage = {
        "dataset_version": report["dataset_version"],
        "dataset_dir": data_dir,
        "config_hash": cfg.hash(),
        "code_version": code_version(),
        "parent_checkpoint": pretrained,
    }
    registration = register(cfg, finetuned, report, lineage, champion_report)
    summary = {
        "data_dir": data_dir,
        "pretrain_checkpoint": pretrained,
        "checkpoint": finetuned,
        "report": report,
        "registration": registration,
        "tracking_uri": redact(mlflow_tracking_uri(cfg)),
        "home": str(home_dir(cfg)),
        "ray_dashboard": _dashboard_url(),
    }
    create_markdown_artifact(key="retrain-report", markdown=render_markdown(summary))
    return summary


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


def render_markdown(summary: dict[str, Any]) -> str:
    """The run's report as Markdown for Prefect's artifact view."""
    metrics = summary["report"].get("metrics", {})
    reg = summary["registration"]
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in sorted(metrics.items()) if isinstance(v, float))
    examples = "\n".join(
        f"| {md_text(e['key'])} | {md_text(e['generated'])} | {md_text(e['references'][0] if e['references'] else '')} |"
        for e in summary["report"].get("examples", [])
    )
    return (
        f"# retrain\n\nModel **{reg.get('name')}** version **{reg.get('version')}**; "
        f"promoted: **{reg.get('promoted')}** ({reg.get('reason')})\n\n"
        f"- data: `{summary['data_dir']}`\n- checkpoint: `{summary['checkpoint']}`\n\n"
        f"| metric | value |\n|---|---|\n{rows}\n\n"
        f"| sample | generated | reference |\n|---|---|---|\n{examples}\n"
        f"{_attention_section(summary['report'].get('explanations', []))}"
    )


_MD_SPECIAL = re.compile(r"([\\`*_\[\]|~])")  # what could open a link, code, emphasis or a cell


def md_text(value: Any) -> str:
    """Data (captions, generated text, keys) as literal text in a Markdown table cell: HTML
    escaped (`<script>` is shown, never run), Markdown's own marks backslash-escaped, one line."""
    text = html.escape(str(value), quote=False)
    return _MD_SPECIAL.sub(r"\\\1", " ".join(text.split()))


def _attention_section(pictures: list[str]) -> str:
    """The attention pictures inline (PNG data URIs: the artifact needs no file server), with paths."""
    if not pictures:
        return ""
    parts = ["\n## Where the model looks\n\nDecoder cross-attention over the image for each generated word.\n"]
    for path in pictures:
        data = base64.b64encode(Path(path).read_bytes()).decode()
        parts.append(f"\n`{path}`\n\n![attention](data:image/png;base64,{data})\n")
    return "".join(parts)
