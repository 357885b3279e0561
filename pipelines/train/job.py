"""TrainJob: everything a worker needs, resolved once on the driver and shipped as plain data."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any


@dataclass
class TrainJob:
    """One training run. Paths are absolute (Ray Train workers run in their own working dir)."""

    run_name: str
    task: str  # pretrain | caption | vqa | retrieval | finetune
    tasks: list[str]  # what each step trains: step s uses tasks[s % len(tasks)]
    total_steps: int
    train_urls: list[str]
    val_urls: list[str]
    model_config: dict[str, Any]  # FusionModelConfig.to_dict()
    tokenizer: Any  # a PreTrainedTokenizerFast (pickles as its JSON)
    sample_config: dict[str, int]  # mmcore.data.SampleConfig fields
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    grad_accum: int = 1
    batch_size: int = 32
    loss_weights: dict[str, float] = field(default_factory=dict)  # itc/itm/lm weights, label_smoothing
    checkpoint_every: int = 100
    eval_every: int = 100
    log_every: int = 10
    seed: int = 0
    loader_workers: int = 1
    shuffle_buffer: int = 256
    val_max_samples: int = 512
    eval_batch_size: int = 64
    init_from: str | None = None  # checkpoint dir whose weights start this run (fine-tuning)
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    compile: bool = False  # torch.compile, with text padded to static lengths (`steps.sample_codec`)
    activation_checkpointing: bool = False  # recompute each block's activations in the backward
    strategy: str = "ddp"  # ddp | fsdp (`pipelines.train.sharding`)
    fsdp_reduce_dtype: str = "float32"  # FSDP on GPU: the dtype gradients are reduced in
    run_path: str | None = None  # the run's storage folder when local (shared) storage, else None
    run_uri: str | None = None  # the run's storage folder, local path or URI (the abort note goes there)
    fail_at_step: int | None = None
    fail_marker: str | None = None
    max_nonfinite_steps: int = 20  # non-finite steps in a row (all skipped) that stop the run; 0: never
    nonfinite_at_steps: list[int] = field(default_factory=list)  # test device: NaN loss at these steps
    mlflow_uri: str | None = None
    mlflow_experiment: str = "mmfusion"
    mlflow_artifact_location: str | None = None  # the experiment's, when this run creates it
    lineage: dict[str, Any] = field(default_factory=dict)  # dataset version, config hash, init

    def describe(self) -> dict[str, Any]:
        """The loggable parameters (no tokenizer, no shard lists, no model config)."""
        skip = {"tokenizer", "train_urls", "val_urls", "model_config", "mlflow_artifact_location"}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
