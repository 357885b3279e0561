"""What a person opens after a retrain: the flow run's artifacts in Prefect's UI (data quality,
report card, gate decision with its confidence interval, learning curves, example captions) and
the same figures and per-step curves on the registered version's MLflow run.

Pictures go into the markdown as PNG data URIs: the artifact needs no file server, and Prefect's
UI renders markdown images (`![..](data:image/png;base64,..)`) inline.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path
from typing import Any

from pipelines.config import Config, home_dir


def data_quality_markdown(data_report: dict[str, Any] | None) -> str:
    """Kept, rejected by reason, duplicates by kind, samples per split."""
    if not data_report:
        return ""
    rows = [("seen", data_report.get("seen")), ("kept", data_report.get("kept"))]
    rows += [(f"rejected: {reason}", n) for reason, n in sorted((data_report.get("rejected") or {}).items())]
    rows += [(f"duplicates: {kind}", n) for kind, n in (data_report.get("dedup") or {}).items() if kind != "distance"]
    rows += [(f"split {s}", v.get("samples")) for s, v in (data_report.get("per_split") or {}).items()]
    body = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"## Data quality ({data_report.get('version')})\n\n| | samples |\n|---|---|\n{body}\n"


def gate_markdown(decision: dict[str, Any] | None) -> str:
    """The gate's verdict, with the delta and its one-sided lower confidence bound when compared."""
    if not decision:
        return ""
    lines = [f"## Gate: {'promote' if decision.get('promote') else 'keep the champion'}\n",
             f"{decision.get('reason')}\n"]
    if decision.get("ci_low") is not None:
        conf = decision.get("confidence") or 0.0
        lines.append(
            f"| metric | challenger | champion | delta | lower bound ({conf:.0%}) | p |\n|---|---|---|---|---|---|\n"
            f"| {decision.get('metric')} | {_num(decision.get('challenger'))} | {_num(decision.get('champion'))} "
            f"| {_num(decision.get('delta'), '+.4f')} | {_num(decision.get('ci_low'), '+.4f')} "
            f"| {_num(decision.get('p_value'))} |\n")
    return "\n".join(lines)


def _num(value: Any, fmt: str = ".4f") -> str:
    return format(value, fmt) if isinstance(value, int | float) else "n/a"


def image_markdown(title: str, path: str | Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f"\n## {title}\n\n![{title}](data:image/png;base64,{data})\n"


def make_figures(cfg: Config, summary: dict[str, Any], out_dir: Path) -> tuple[dict[str, Any], dict[str, Path]]:
    """Learning curves and example captions as matplotlib figures and PNGs under `out_dir`;
    returns `(figures, pngs)` (figures stay open for `log_to_mlflow`, which closes them)."""
    from pipelines.core.dataset import shard_paths
    from pipelines.evaluate.report import example_images, examples_figure, learning_curves, read_history

    figures: dict[str, Any] = {}
    histories = {stage: read_history(summary[key]) for stage, key in
                 (("pretrain", "pretrain_checkpoint"), ("finetune", "checkpoint")) if summary.get(key)}
    if any(histories.values()):
        figures["learning_curves"] = learning_curves(histories)
    examples = summary["report"].get("examples", [])
    images = example_images(shard_paths(summary["data_dir"], "test"), [e["key"] for e in examples])
    if images:
        figures["examples"] = examples_figure(images, examples)
    pngs = {}
    for name, fig in figures.items():
        out_dir.mkdir(parents=True, exist_ok=True)
        pngs[name] = out_dir / f"{name}.png"
        fig.savefig(pngs[name], format="png", dpi=90, bbox_inches="tight")  # titles never clipped
    summary["histories"] = histories
    return figures, pngs


def log_to_mlflow(cfg: Config, run_id: str, figures: dict[str, Any], histories: dict[str, list[dict]]) -> None:
    """The figures (`log_figure`, under figures/) and each stage's per-step training metrics
    (`<stage>/<metric>` at their steps) on the registered version's run, so its MLflow page
    shows the curves next to the report card."""
    from mlflow.entities import Metric

    from pipelines.core.mlflow import client
    from pipelines.evaluate.report import _pyplot, curve_series

    mlclient = client(cfg)
    try:
        for name, fig in figures.items():
            mlclient.log_figure(run_id, fig, f"figures/{name}.png", save_kwargs={"dpi": 90, "bbox_inches": "tight"})
    finally:
        for fig in figures.values():
            _pyplot().close(fig)
    metrics = [Metric(f"{stage}/{key}", value, 0, step)
               for stage, history in histories.items()
               for key, (steps, values) in curve_series(history).items()
               for step, value in zip(steps, values, strict=True)]
    for i in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
        mlclient.log_batch(run_id, metrics=metrics[i:i + 1000])


def publish(cfg: Config, summary: dict[str, Any]) -> dict[str, Path]:
    """Figures to MLflow and disk, then the flow run's artifacts; returns the PNGs' paths."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    reg = summary["registration"]
    out_dir = home_dir(cfg) / "reports" / f"{reg['name']}-v{reg['version']}"
    figures, pngs = make_figures(cfg, summary, out_dir)
    log_to_mlflow(cfg, reg["run_id"], figures, summary.get("histories", {}))
    summary["figures"] = {k: str(v) for k, v in pngs.items()}
    data_report = summary.get("data_report") or {}
    if data_report:
        rows = [{"reason": "kept", "samples": data_report.get("kept")}]
        rows += [{"reason": r, "samples": n} for r, n in sorted((data_report.get("rejected") or {}).items())]
        rows += [{"reason": "duplicate", "samples": data_report.get("duplicates")}]
        create_table_artifact(key="data-quality", table=rows, description=f"ingest of {data_report.get('version')}")
    create_markdown_artifact(key="retrain-report", markdown=render_markdown(summary),
                             description=f"{reg['name']} v{reg['version']}: promoted {reg.get('promoted')}")
    return pngs


def render_markdown(summary: dict[str, Any]) -> str:
    """The run's report as Markdown for Prefect's artifact view: verdict, data quality, report
    card, gate decision, learning curves, example captions and attention pictures."""
    metrics = summary["report"].get("metrics", {})
    reg = summary["registration"]
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in sorted(metrics.items()) if isinstance(v, float))
    examples = "\n".join(
        f"| {md_text(e['key'])} | {md_text(e['generated'])} | {md_text(e['references'][0] if e['references'] else '')} |"
        for e in summary["report"].get("examples", [])
    )
    figures = summary.get("figures", {})
    titles = {"learning_curves": "Learning curves", "examples": "Test images: generated and true captions"}
    return (
        f"# retrain\n\nModel **{reg.get('name')}** version **{reg.get('version')}**; "
        f"promoted: **{reg.get('promoted')}** ({md_text(reg.get('reason'))})\n\n"
        f"- data: `{summary['data_dir']}`{' (reused: unchanged)' if summary.get('dataset_reused') else ''}\n"
        f"- checkpoint: `{summary['checkpoint']}`\n- started from: `{summary.get('init_from') or 'scratch'}`\n\n"
        f"{data_quality_markdown(summary.get('data_report'))}\n"
        f"## Report card\n\n| metric | value |\n|---|---|\n{rows}\n\n"
        f"{gate_markdown(reg.get('decision'))}\n"
        + "".join(image_markdown(titles.get(k, k), p) for k, p in figures.items())
        + f"\n| sample | generated | reference |\n|---|---|---|\n{examples}\n"
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
