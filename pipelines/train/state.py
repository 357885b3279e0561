"""The resumable half of a checkpoint: optimiser, scheduler, step and data position.

A checkpoint directory is an mmcore checkpoint (weights, config, tokenizer files) plus the files
written here (their names: `pipelines.core.checkpoints`):
- `trainer_state.json`: readable; `step`, `data_position`, latest `metrics`, run facts.
- `optimizer.safetensors` + `optimizer.json`: the optimiser's tensors and its plain fields.
- `scheduler.json`: the LR scheduler's state (plain numbers).
Nothing here is pickled, so loading a checkpoint never runs code from it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from pipelines.core.checkpoints import (
    OPTIMIZER_META,
    OPTIMIZER_TENSORS,
    SCHEDULER_STATE,
    TRAINER_STATE,
    checkpoint_problems,
)
from pipelines.core.storage import get_fs, is_remote


class TrainStateError(RuntimeError):
    """A checkpoint's training state is missing or unreadable; names the file."""


def optimizer_to_files(optimizer: torch.optim.Optimizer, directory: Path, sd: dict | None = None) -> None:
    """Split `optimizer.state_dict()` (or `sd`, a full state in that form gathered from a sharded
    model: `pipelines.train.sharding.full_state`) into tensors (safetensors) and plain values (JSON)."""
    from safetensors.torch import save_file

    sd = optimizer.state_dict() if sd is None else sd
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for pid, pstate in sd["state"].items():
        for name, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{name}"] = value.detach().to("cpu").contiguous()
            else:
                plain.setdefault(str(pid), {})[name] = value
    save_file(tensors, str(directory / OPTIMIZER_TENSORS))
    meta = {"param_groups": sd["param_groups"], "plain_state": plain}
    (directory / OPTIMIZER_META).write_text(json.dumps(meta))


def optimizer_from_files(optimizer: torch.optim.Optimizer, directory: Path, load=None) -> None:
    """Load what `optimizer_to_files` wrote into an optimiser built over the same parameters;
    `load(state_dict)` does the loading when given (a sharded model's: `sharding.load_optimizer_state`)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(directory / OPTIMIZER_TENSORS))
    except (SafetensorError, OSError, ValueError) as e:  # SafetensorError: a truncated file
        raise TrainStateError(f"{directory / OPTIMIZER_TENSORS}: truncated or unreadable ({e})") from e
    try:
        meta = json.loads((directory / OPTIMIZER_META).read_text())
        _load_optimizer(optimizer, tensors, meta, load)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TrainStateError(f"{directory / OPTIMIZER_META}: cannot restore the optimiser ({e!r})") from e


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict, load=None) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        pid, _, name = key.partition(".")
        state.setdefault(int(pid), {})[name] = value
    for pid, values in meta["plain_state"].items():
        state.setdefault(int(pid), {}).update(values)
    # JSON has no tuples; optimisers keep e.g. `betas` as one.
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
              for g in meta["param_groups"]]
    (load or optimizer.load_state_dict)({"state": state, "param_groups": groups})


def scheduler_to_file(scheduler, directory: Path) -> None:
    sd = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    (directory / SCHEDULER_STATE).write_text(json.dumps(sd))


def scheduler_from_file(scheduler, directory: Path) -> None:
    try:
        sd = json.loads((directory / SCHEDULER_STATE).read_text())
    except (OSError, ValueError) as e:
        raise TrainStateError(f"{directory / SCHEDULER_STATE}: cannot read scheduler state ({e})") from e
    sd["lr_lambdas"] = [None] * len(scheduler.lr_lambdas)
    try:
        scheduler.load_state_dict(sd)
    except (KeyError, TypeError, ValueError) as e:
        raise TrainStateError(f"{directory / SCHEDULER_STATE}: cannot restore the scheduler ({e!r})") from e


def write_trainer_state(directory: Path, state: dict[str, Any]) -> None:
    tmp = directory / (TRAINER_STATE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True, default=str))
    os.replace(tmp, directory / TRAINER_STATE)


def read_trainer_state(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / TRAINER_STATE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise TrainStateError(
            f"{path}: missing. Is {directory} a training checkpoint (written by pipelines.train)?"
        ) from e
    except ValueError as e:
        raise TrainStateError(f"{path}: not valid JSON ({e})") from e


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | str | None:
    """The complete checkpoint with the highest step under a run directory, or None: a `Path`
    for a local run, a URI for one on object storage."""
    found = complete_checkpoints(run_dir)
    return found[0] if found else None


def complete_checkpoints(run_dir: str | os.PathLike) -> list[Path | str]:
    """The run's complete checkpoints, highest step first (`Path`s, or URIs on object storage).

    A checkpoint with any file it needs to resume missing, cut short or unparsable (a write or an
    upload interrupted; `pipelines.core.checkpoints.checkpoint_problems`) is skipped, with a log
    line naming the bad file."""
    fs, root = get_fs(run_dir)
    if not fs.isdir(root):
        return []
    found: list[tuple[int, str]] = []
    for state_path in fs.glob(f"{root.rstrip('/')}/*/{TRAINER_STATE}"):
        ckpt = state_path.rsplit("/", 1)[0]
        try:
            step = int(json.loads(fs.cat_file(state_path))["step"])
        except (OSError, ValueError, KeyError, TypeError):
            step = None
        problems = checkpoint_problems(fs.unstrip_protocol(ckpt) if is_remote(run_dir) else ckpt)
        if step is None or problems:
            detail = "; ".join(problems) or f"{state_path}: no step"
            print(f"[train] skipping incomplete checkpoint {ckpt}: {detail}", flush=True)
            continue
        found.append((step, ckpt))
    found.sort(key=lambda sc: sc[0], reverse=True)
    return [fs.unstrip_protocol(c) if is_remote(run_dir) else Path(c) for _, c in found]
