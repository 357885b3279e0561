"""Checkpoint format: `model.safetensors` + `config.json` + tokenizer files. Nothing is unpickled.

`config.json` holds `{"format": "mmcore", "version": 1, "model": FusionModelConfig.to_dict(),
"extra": {...}}`; loading rebuilds the model from it and loads the tensors strictly, so outputs
are bitwise identical to the saved model's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mmcore.data.tokenizer import load_tokenizer
from mmcore.model import FusionModel, FusionModelConfig, build_model

FORMAT, VERSION = "mmcore", 1
WEIGHTS, CONFIG = "model.safetensors", "config.json"


class CheckpointError(RuntimeError):
    """A checkpoint directory is missing, corrupt, or does not match its config."""


def save_checkpoint(directory: str | Path, model: FusionModel, tokenizer=None, extra: dict | None = None,
                    state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the model's weights, config and (if given) tokenizer into `directory`; returns it.
    `state`: the weights to write instead of `model.state_dict()` (the full state gathered from a
    model whose parameters are sharded across processes)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # contiguous copies: safetensors refuses views and shared storage.
    state = {k: v.detach().contiguous().cpu() for k, v in (model.state_dict() if state is None else state).items()}
    save_file(state, str(directory / WEIGHTS), metadata={"format": FORMAT})
    config = {"format": FORMAT, "version": VERSION, "model": model.cfg.to_dict(), "extra": extra or {}}
    (directory / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    return directory


def read_config(directory: str | Path) -> tuple[FusionModelConfig, dict[str, Any]]:
    """`(model config, extra)` from a checkpoint's config.json, without touching the weights."""
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{path} not found: {directory} is not an mmcore checkpoint directory")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the checkpoint is corrupt") from e
    if not isinstance(config, dict) or config.get("format") != FORMAT or "model" not in config:
        raise CheckpointError(f"{path} is not an mmcore checkpoint config (format != {FORMAT!r})")
    if config.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {config.get('version')}; this mmcore reads {VERSION}")
    try:
        return FusionModelConfig.from_dict(config["model"]), config.get("extra") or {}
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad model config: {e}") from e


def _load_weights(path: Path, device: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path} not found; the checkpoint has no weights")
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is corrupt or not a safetensors file: {e}") from e


def _check_keys(path: Path, model: FusionModel, state: dict[str, torch.Tensor]) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs config {tuple(v.shape)}"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"{path} does not match its config.json: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"shape mismatches {shapes[:5]}"
        )


def load_checkpoint(directory: str | Path, device: str = "cpu") -> tuple[FusionModel, Any, dict[str, Any]]:
    """`(model in eval mode, tokenizer or None, extra)` from a directory written by save_checkpoint."""
    directory = Path(directory)
    cfg, extra = read_config(directory)
    # Pretrained paths in the config are not re-read: the weights file holds the trained values.
    model = build_model(cfg, load_pretrained=False)
    state = _load_weights(directory / WEIGHTS, device)
    _check_keys(directory / WEIGHTS, model, state)
    model.load_state_dict(state, strict=True)
    model.to(device).eval()
    tokenizer = None
    if any((directory / f).is_file() for f in ("tokenizer.json", "vocab.txt")):
        try:
            tokenizer = load_tokenizer(directory)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"tokenizer files in {directory} are unreadable: {e}") from e
    return model, tokenizer, extra
