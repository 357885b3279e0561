"""Distributed training on Ray Train: `run_training(cfg, data_dir, task, init_from, run_name) -> Path`."""

from pipelines.train.driver import TrainingError, build_job, run_training
from pipelines.train.state import latest_checkpoint, read_trainer_state

__all__ = ["TrainingError", "build_job", "latest_checkpoint", "read_trainer_state", "run_training"]
