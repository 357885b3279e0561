"""One Tune trial: pretrain, fine-tune, then score the validation split, as `mmfusion run` does.

The trial is a Tune function trainable that drives two Ray Train runs (`run_training`, one
`TorchTrainer` each, on the trial's `scaling` workers). A Ray Train callback forwards every
validation point of those runs to Tune, so ASHA sees the metric at each one and can stop a trial
in the middle of pretraining; the last report is the fine-tuned model scored on the validation
split with the report card's metrics (`val_i2t_r1`, `val_vqa_acc`, `val_itm_acc`, `val_bleu4`...).
The test split stays untouched by the search.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback

from pipelines.config import Config, datasets_root, home_dir

# What evaluate() reports at every validation point of a training run (see pipelines.train.loop).
VAL_MARKER = "val_samples"


@dataclass(frozen=True)
class TrialPlan:
    """What every trial shares: the base config tree (paths resolved), the data, the run names."""

    base: dict[str, Any]
    data_dir: str
    search_name: str
    experiment: str


def prepare_dataset(cfg: Config) -> str:
    """The configured source (or the synthetic shapes set) as a dataset version, like the
    `retrain` flow's first step; ingest returns the same version for the same inputs."""
    from pipelines.ingest import ingest
    from pipelines.ingest.synth import synthesize

    source, fmt = cfg.data.source, cfg.data.format
    if source is None:
        spoken = "-audio" if cfg.data.synth_audio else ""
        out = home_dir(cfg) / "raw" / f"synth-n{cfg.data.synth_num}-s{cfg.data.synth_seed}{spoken}"
        source, fmt = str(synthesize(out, cfg.data.synth_num, cfg.data.synth_seed, audio=cfg.data.synth_audio)), "jsonl"
    return str(ingest(source, datasets_root(cfg), cfg.data, fmt=fmt))


def prepare_tokenizer(cfg: Config, data_dir: str) -> None:
    """Train the dataset version's tokenizer once, before trials race to do it."""
    from pipelines.train.driver import dataset_tokenizer

    if not cfg.model.tokenizer:
        dataset_tokenizer(cfg, data_dir)


def n_val_reports(cfg: Config) -> int:
    """How many results a finished trial reports: each phase's validation points, then the final
    score. ASHA's `max_t` (rungs are counted in these reports)."""
    def points(steps: int) -> int:
        every = cfg.train.eval_every
        if every <= 0:
            return 1
        return steps // every + (1 if steps % every else 0)

    return points(cfg.train.steps) + points(cfg.train.finetune_steps) + 1


class ValidationToTune(TuneReportCallback):
    """A Ray Train callback that forwards a run's validation points (rank 0's) to Tune, with the
    phase and the trial's cumulative step; training-loss log points are not forwarded."""

    def __init__(self, phase: str, step_offset: int):
        super().__init__()
        self.phase, self.step_offset = phase, step_offset

    def after_report(self, run_context, metrics, checkpoint):
        first = metrics[0] if metrics else {}
        if VAL_MARKER not in first:
            return
        out = {k: v for k, v in first.items() if k.startswith("val_")}
        out.update(phase=self.phase, step=self.step_offset + int(first["step"]))
        self._training_actor_item_queue.put(out)


def validation_scores(cfg: Config, checkpoint: Path, data_dir: str) -> dict[str, float]:
    """The report card's metrics on the validation split (`val_` + name), with the same code
    as `pipelines.evaluate` on the test split."""
    from mmcore.checkpoint import load_checkpoint
    from pipelines.core.records import compute_metrics
    from pipelines.evaluate.inference import infer_shards, merge, settings_for
    from pipelines.evaluate.run import build_records
    from pipelines.train.driver import split_urls

    merged = merge(infer_shards(str(checkpoint), split_urls(data_dir, "val"), settings_for(cfg, checkpoint), False))
    model, _, _ = load_checkpoint(checkpoint)
    metrics = compute_metrics(build_records(model.eval(), merged, cfg))
    return {f"val_{k}": float(v) for k, v in metrics.items() if v is not None}


def score_in_task(cfg: Config, checkpoint: Path, data_dir: str) -> dict[str, float]:
    """`validation_scores` in a Ray task that reserves `eval.ray_cpus_per_task` CPUs. It is
    scheduled outside the trial's placement group, which holds no CPU (see `search.build_tuner`)."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    task = ray.remote(validation_scores).options(
        num_cpus=cfg.eval.ray_cpus_per_task,
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None),
    )
    return ray.get(task.remote(cfg, checkpoint, data_dir))


def run_trial(params: dict[str, Any], plan: TrialPlan) -> None:
    """The Tune trainable: `params` are the sampled dotted keys."""
    import ray.tune

    from pipelines.train import run_training
    from pipelines.tune.cleanup import RecordPlacementGroup, kv_key
    from pipelines.tune.space import apply_values

    cfg = apply_values(plan.base, params)
    cfg.registry.experiment = plan.experiment  # the training runs' MLflow runs sit beside the trial's
    trial = ray.tune.get_context().get_trial_id()
    name, record = f"{plan.search_name}-{trial}", RecordPlacementGroup(kv_key(plan.search_name, trial))
    pre = run_training(cfg, plan.data_dir, "pretrain", run_name=f"{name}-pretrain",
                       callbacks=[ValidationToTune("pretrain", 0), record])
    fine = run_training(cfg, plan.data_dir, "finetune", init_from=pre, run_name=f"{name}-finetune",
                        callbacks=[ValidationToTune("finetune", cfg.train.steps), record])
    scores = score_in_task(cfg, fine, plan.data_dir)
    total = cfg.train.steps + cfg.train.finetune_steps
    ray.tune.report({**scores, "phase": "final", "step": total, "checkpoint_dir": str(fine)})
