"""Pictures of a run for people: learning curves from the training checkpoints' history, and test
images with the generated and the true captions. matplotlib on the Agg backend (no display)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

SKIP_KEYS = {"step", "samples_per_s", "train_tflops", "mfu", "nonfinite_steps", "lr", "grad_norm",
             "val_samples", "val_chance_r1"}  # not curves of learning


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only: never a window, also without a display
    import matplotlib.pyplot as plt

    return plt


def read_history(checkpoint_dir: str | os.PathLike) -> list[dict[str, float]]:
    """The log points of the run that wrote `checkpoint_dir` (`trainer_state.json`'s `history`:
    step, training losses, and validation metrics at eval steps); [] when it kept none."""
    from pipelines.core.checkpoints import TRAINER_STATE
    from pipelines.core.storage import read_json

    path = Path(checkpoint_dir) / TRAINER_STATE
    if not path.is_file():
        return []
    return [p for p in read_json(str(path)).get("history", []) if isinstance(p, dict) and "step" in p]


def curve_series(history: list[dict[str, float]]) -> dict[str, tuple[list[int], list[float]]]:
    """`{metric: (steps, values)}` of every loss and validation metric in `history`."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for point in history:
        for key, value in point.items():
            if key in SKIP_KEYS or not isinstance(value, int | float):
                continue
            steps, values = series.setdefault(key, ([], []))
            steps.append(int(point["step"]))
            values.append(float(value))
    return series


def learning_curves(histories: dict[str, list[dict[str, float]]]):
    """One row per stage (pretrain, finetune): training losses left, validation metrics right."""
    plt = _pyplot()
    stages = [s for s, h in histories.items() if h]
    if not stages:
        raise ValueError("no training history to draw: the checkpoints kept no log points")
    fig, axes = plt.subplots(len(stages), 2, figsize=(11, 3.6 * len(stages)), squeeze=False)
    for row, stage in zip(axes, stages, strict=True):
        series = curve_series(histories[stage])
        for ax, is_val, title in ((row[0], False, "training loss"), (row[1], True, "validation")):
            for key, (steps, values) in sorted(series.items()):
                if key.startswith("val_") == is_val:
                    ax.plot(steps, values, marker="o" if len(steps) < 8 else None, label=key)
            ax.set_title(f"{stage}: {title}")
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            if ax.has_data():
                ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def example_images(urls: list[str], keys: list[str]) -> dict[str, Any]:
    """`{key: PIL image}` of the test samples named in `keys` (read from the test shards)."""
    from mmcore.data import load_image, parse_sample
    from pipelines.core.dataset import read_shard

    wanted, found = set(keys), {}
    for url in urls:
        for sample in map(parse_sample, read_shard(url)):
            if sample.key in wanted:
                found[sample.key] = load_image(sample.image)
        if len(found) == len(wanted):
            break
    return found


def examples_figure(images: dict[str, Any], examples: list[dict[str, Any]]):
    """Each test image titled with the generated caption and the first true caption."""
    import textwrap

    plt = _pyplot()
    shown = [e for e in examples if e["key"] in images]
    if not shown:
        raise ValueError("no example image found in the test shards")
    fig, axes = plt.subplots(1, len(shown), figsize=(3.4 * len(shown), 4.2), squeeze=False)
    for ax, ex in zip(axes[0], shown, strict=True):
        ax.imshow(images[ex["key"]])
        ax.axis("off")
        true = ex["references"][0] if ex.get("references") else ""
        ax.set_title(textwrap.fill(f"generated: {ex['generated']}", 34) + "\n"
                     + textwrap.fill(f"true: {true}", 34), fontsize=8, loc="left")
    fig.tight_layout()
    return fig

