"""TrainJob: everything a worker needs, resolved once on the driver and shipped to every worker.

A job is composed of typed parts, each with one owner, never fields copied one by one:
- `run` (`RunSpec`): what this run is: name, task, schedule length, peak learning rate, storage
  folder, where it starts from, lineage;
- `data` (`DataSpec`): the shards, the tokenizer, the `mmcore.data.SampleConfig`;
- `model`: the model's own `mmcore.model.FusionModelConfig`;
- `train` and `scaling`: the config's sections as loaded (`pipelines.config.TrainConfig`,
  `ScalingConfig`);
- `tracking` (`Tracking`): where MLflow is.
Every part pickles (Ray Train ships the job to each worker). Paths are absolute: workers run in
their own working directory.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from mmcore.data import SampleConfig
from mmcore.model import FusionModelConfig
from pipelines.config import ScalingConfig, TrainConfig

LOSS_WEIGHTS = ("itc_weight", "itm_weight", "lm_weight", "token_itc_weight", "label_smoothing", "ctc_weight")  # of `train`


@dataclass
class RunSpec:
    """What the run is, resolved from the task: pretraining uses `train.steps` / `train.lr`,
    fine-tuning `train.finetune_steps` / `train.finetune_lr`."""

    name: str
    task: str  # pretrain | caption | vqa | retrieval | finetune
    tasks: list[str]  # what each step trains: step s uses tasks[s % len(tasks)] (`TrainJob.task_at`)
    total_steps: int
    lr: float = 1e-3  # the peak learning rate
    uri: str | None = None  # the run's storage folder, local path or URI (the abort note goes there)
    path: str | None = None  # the same folder when it is local (shared) storage, else None
    init_from: str | None = None  # checkpoint dir whose weights start this run (fine-tuning)
    lineage: dict[str, Any] = field(default_factory=dict)  # dataset version, config hash, init
    progress_every_s: float = 10.0  # rank 0's progress line (`telemetry.progress_every_s`)


@dataclass
class DataSpec:
    """The dataset version's shards and how a sample becomes tensors."""

    train_urls: list[str]
    val_urls: list[str]
    tokenizer: Any  # a PreTrainedTokenizerFast (pickles as its JSON)
    sample: SampleConfig
    eval_batch_size: int = 64  # validation batches (`eval.batch_size`)


@dataclass
class Tracking:
    """Rank 0's MLflow run: the tracking URI (None: no tracking) and the experiment."""

    uri: str | None = None
    experiment: str = "mmfusion"
    artifact_location: str | None = None  # the experiment's, when this run creates it


@dataclass
class TrainJob:
    """One training run (see the module docstring for its parts)."""

    run: RunSpec
    data: DataSpec
    model: FusionModelConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=lambda: ScalingConfig(num_workers=1))
    tracking: Tracking = field(default_factory=Tracking)

    @property
    def grad_accum(self) -> int:
        """Micro-batches per optimiser step (`train.grad_accum`, at least 1)."""
        return max(self.train.grad_accum, 1)

    @property
    def curriculum_steps(self) -> int:
        """Pretraining's first steps on short-caption samples (`train.curriculum_steps`); 0 for
        every other run: fine-tuning never restarts the curriculum."""
        return self.train.curriculum_steps if self.run.task == "pretrain" else 0

    @property
    def curriculum_tasks(self) -> list[str]:
        """What the curriculum's steps train (`train.curriculum_tasks`); empty when there is no
        curriculum or it trains the run's own tasks."""
        return list(self.train.curriculum_tasks) if self.curriculum_steps else []

    @property
    def all_tasks(self) -> list[str]:
        """Every task some step of this run trains, sorted."""
        return sorted({*self.run.tasks, *self.curriculum_tasks})

    def task_at(self, step: int) -> str:
        """What step `step` (0-based) trains: the curriculum's tasks during its steps, if it has
        its own, else the run's, alternated per step either way."""
        tasks = self.curriculum_tasks if step < self.curriculum_steps and self.curriculum_tasks else self.run.tasks
        return tasks[step % len(tasks)]

    @property
    def loss_weights(self) -> dict[str, float]:
        """The loss modules' keyword arguments, from `train`."""
        return {name: getattr(self.train, name) for name in LOSS_WEIGHTS}

    @property
    def fail_marker(self) -> str | None:
        """Test device (`train.fail_at_step`): the file that says the planned failure happened."""
        if self.train.fail_at_step is None or not self.run.uri:
            return None
        return f"{self.run.uri}/.fail-at-step-{self.train.fail_at_step}"

    def describe(self) -> dict[str, Any]:
        """The MLflow params of the run: flat names, as they have always been logged (no
        tokenizer, no shard lists, no model config)."""
        t, s, r = self.train, self.scaling, self.run
        return {
            "run_name": r.name, "task": r.task, "tasks": r.tasks, "total_steps": r.total_steps,
            "sample_config": asdict(self.data.sample), "lr": r.lr, "weight_decay": t.weight_decay,
            "warmup_steps": t.warmup_steps, "min_lr_ratio": t.min_lr_ratio, "grad_clip": t.grad_clip,
            "grad_accum": self.grad_accum, "batch_size": t.batch_size, "loss_weights": self.loss_weights,
            "checkpoint_every": t.checkpoint_every, "eval_every": t.eval_every, "log_every": t.log_every,
            "seed": t.seed, "loader_workers": t.loader_workers, "shuffle_buffer": t.shuffle_buffer,
            "val_max_samples": t.val_max_samples, "eval_batch_size": self.data.eval_batch_size,
            "init_from": r.init_from, "use_gpu": s.use_gpu, "cpus_per_worker": s.cpus_per_worker,
            "compile": t.compile, "activation_checkpointing": t.activation_checkpointing,
            "curriculum_steps": self.curriculum_steps, "curriculum_max_words": t.curriculum_max_words,
            "curriculum_tasks": self.curriculum_tasks,
            "strategy": s.strategy, "fsdp_reduce_dtype": s.fsdp_reduce_dtype, "run_path": r.path,
            "run_uri": r.uri, "fail_at_step": t.fail_at_step, "fail_marker": self.fail_marker,
            "max_nonfinite_steps": t.max_nonfinite_steps, "nonfinite_at_steps": list(t.nonfinite_at_steps),
            "mlflow_uri": self.tracking.uri, "mlflow_experiment": self.tracking.experiment, "lineage": r.lineage,
        }
