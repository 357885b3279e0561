"""What a checkpoint directory holds: the model files against the files that resume training.

A checkpoint directory is an mmcore checkpoint (`mmcore.checkpoint.WEIGHTS`, `CONFIG`, tokenizer
files) plus, when training wrote it, the resume files named here (written by
`pipelines.train.state`). The registry serves the model files only; `is_checkpoint_dir` is the
one test of "is this a model", `checkpoint_problems` the one test of "can training resume from
this" (every file there, none cut short), and `check_finite` refuses a model with NaN/Inf weights.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from pathlib import Path

import torch

from mmcore.checkpoint import CONFIG, WEIGHTS
from pipelines.core.storage import get_fs, sha256_file

TRAINER_STATE = "trainer_state.json"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_META = "optimizer.json"
SCHEDULER_STATE = "scheduler.json"
RESUME_FILES = frozenset({TRAINER_STATE, OPTIMIZER_TENSORS, OPTIMIZER_META, SCHEDULER_STATE})
# Small files enough to rebuild the model and its tokenizer (everything but the weights).
CONFIG_FILES = (CONFIG, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
# Every file a training checkpoint needs to resume: the model, its tokenizer, the resume state.
TRAINING_FILES = (WEIGHTS, CONFIG, "tokenizer.json", *sorted(RESUME_FILES))
_TEMPORARY = (".tmp", ".partial")

__all__ = ["CONFIG", "CONFIG_FILES", "RESUME_FILES", "TRAINING_FILES", "WEIGHTS", "NonFiniteError",
           "check_finite", "checkpoint_problems", "is_checkpoint_dir", "model_files", "nonfinite_tensors",
           "weights_sha256"]


class NonFiniteError(ValueError):
    """A model holds NaN or Inf values; the message names the tensors."""


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


def checkpoint_problems(checkpoint_dir: str | os.PathLike, names: Iterable[str] = TRAINING_FILES) -> list[str]:
    """What stops a checkpoint (local or a URI) from being loaded: each of `names` missing, a
    safetensors file shorter or longer than its header says (a write or upload cut short), or a
    JSON file that does not parse. An empty list means every file is whole."""
    fs, root = get_fs(checkpoint_dir)
    problems = []
    for name in names:
        path = f"{root.rstrip('/')}/{name}"
        try:
            if not fs.isfile(path):
                problems.append(f"{path}: missing")
            elif name.endswith(".safetensors"):
                problems.extend(_safetensors_problem(fs, path))
            elif name.endswith(".json"):
                json.loads(fs.cat_file(path))
        except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            problems.append(f"{path}: unreadable ({e})")
    return problems


def _safetensors_problem(fs, path: str) -> list[str]:
    """A safetensors file is an 8-byte header length, a JSON header, then the tensors' bytes,
    whose end the header gives: the file's size must match exactly."""
    size = fs.size(path)
    with fs.open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return [f"{path}: truncated ({size} bytes, no safetensors header)"]
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            return [f"{path}: truncated ({size} bytes, header says {length} bytes of header alone)"]
        header = json.loads(f.read(length))
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    expected = 8 + length + max(ends, default=0)
    if size != expected:
        return [f"{path}: truncated or padded ({size} bytes, its header says {expected})"]
    return []


def nonfinite_tensors(tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an Inf, e.g. `model.named_parameters()`."""
    return [name for name, t in tensors
            if torch.is_floating_point(t) and not bool(torch.isfinite(t.detach()).all())]


def check_finite(checkpoint_dir: str | os.PathLike) -> None:
    """Raise `NonFiniteError` when the checkpoint's weights hold NaN or Inf (a diverged run):
    such a model is never registered or promoted."""
    from safetensors.torch import load_file

    path = Path(checkpoint_dir) / WEIGHTS
    bad = nonfinite_tensors(load_file(str(path)).items())
    if bad:
        raise NonFiniteError(
            f"{path}: {len(bad)} tensor(s) hold NaN/Inf values (first: {', '.join(bad[:5])}); the run "
            "diverged. Do not register it: retrain with a lower train.lr / train.grad_clip, or "
            "register an earlier finite checkpoint."
        )
