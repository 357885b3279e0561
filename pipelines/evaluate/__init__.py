"""Evaluation on a dataset version's fixed test split: report card + per-sample results."""

from pipelines.evaluate.run import benchmark_id, evaluate, format_metrics

__all__ = ["benchmark_id", "evaluate", "format_metrics"]
