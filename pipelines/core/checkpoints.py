"""What a checkpoint directory holds: the model files against the files that resume training.

A checkpoint directory is an mmcore checkpoint (`mmcore.checkpoint.WEIGHTS`, `CONFIG`, tokenizer
files) plus, when training wrote it, the resume files named here (written by
`pipelines.train.state`). The registry serves the model files only; `is_checkpoint_dir` is the
one test of "is this a checkpoint".
"""

from __future__ import annotations

import os
from pathlib import Path

from mmcore.checkpoint import CONFIG, WEIGHTS
from pipelines.core.storage import sha256_file

TRAINER_STATE = "trainer_state.json"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_META = "optimizer.json"
SCHEDULER_STATE = "scheduler.json"
RESUME_FILES = frozenset({TRAINER_STATE, OPTIMIZER_TENSORS, OPTIMIZER_META, SCHEDULER_STATE})
# Small files enough to rebuild the model and its tokenizer (everything but the weights).
CONFIG_FILES = (CONFIG, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
_TEMPORARY = (".tmp", ".partial")

__all__ = ["CONFIG", "CONFIG_FILES", "RESUME_FILES", "WEIGHTS", "is_checkpoint_dir", "model_files",
           "weights_sha256"]


def is_checkpoint_dir(path: str | os.PathLike) -> bool:
    """A local directory holding a model: its weights and its config."""
    path = Path(path)
    return (path / WEIGHTS).is_file() and (path / CONFIG).is_file()


def weights_sha256(checkpoint_dir: str | os.PathLike) -> str:
    """sha256 of the checkpoint's weights file: what the registry records and checks."""
    return sha256_file(Path(checkpoint_dir) / WEIGHTS)


def model_files(checkpoint_dir: str | os.PathLike) -> list[Path]:
    """The files that make up the served model (relative paths): all but the resume files."""
    checkpoint_dir = Path(checkpoint_dir)
    if not is_checkpoint_dir(checkpoint_dir):
        raise FileNotFoundError(
            f"{checkpoint_dir}: no {WEIGHTS} and {CONFIG}; pass a checkpoint directory written by "
            "mmcore.checkpoint.save_checkpoint (e.g. the path run_training returned)"
        )
    return [
        p.relative_to(checkpoint_dir)
        for p in sorted(checkpoint_dir.rglob("*"))
        if p.is_file() and p.name not in RESUME_FILES and not p.name.endswith(_TEMPORARY)
    ]
