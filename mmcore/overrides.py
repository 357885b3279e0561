"""Model overrides as dotted keys, without torch, so that the pipelines' config checks use the
same rule as `mmcore.model.model_config`."""

from __future__ import annotations

from typing import Any


def flatten_overrides(overrides: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested override dicts as dotted keys: `{"image": {"patch_size": 32}}` (what `--set
    model.overrides.image.patch_size=32` makes) is `{"image.patch_size": 32}`, so that an override
    sets one field and never replaces a whole part of the config with a dict."""
    flat: dict[str, Any] = {}
    for key, value in overrides.items():
        if isinstance(value, dict):
            flat.update(flatten_overrides(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
