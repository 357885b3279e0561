"""Ingest: raw image-text sources -> cleaned, deduplicated, split WebDataset shards.

`ingest(source, out_root, cfg, fmt=None, connect=None) -> Path` (the version directory);
`synth.synthesize(out_dir, num, seed)` makes the synthetic shapes source;
`pipelines.core.dataset` reads a version (`shard_paths`, `read_manifest`, `read_report`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipelines.config import DataConfig


def ingest(source: str | Path, out_root: str | Path, cfg: DataConfig, fmt: str | None = None,
           connect: Callable[[], Any] | None = None) -> Path:
    """See `pipelines.ingest.driver.ingest` (imported lazily: Ray loads only when a job runs)."""
    from pipelines.ingest.driver import ingest as _ingest

    return _ingest(source, out_root, cfg, fmt, connect)


__all__ = ["ingest"]
