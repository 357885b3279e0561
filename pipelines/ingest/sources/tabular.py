"""CSV and Parquet manifests with configurable column names.

`DataConfig.columns` maps roles to column names: `id`, `image` (path or URL), `caption` (one
column, or several separated by commas), `captions` (a list column, or JSON list text),
`question`, `answers`. Rows without an `id` column are grouped by image, so a table with one
caption per row becomes one sample per image.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator

from pipelines.core.storage import get_fs, join
from pipelines.ingest.sources.common import as_list, has_surrogates, image_loc, make_ref, reject_ref

DEFAULTS = {
    "id": ("id", "key", "sample_id"),
    "image": ("image", "image_path", "file_name", "filepath", "url", "image_url"),
    "caption": ("caption", "text", "title"),
    "captions": ("captions",),
    "question": ("question",),
    "answers": ("answers", "answer"),
}


def _column(role: str, header: list[str], mapping: dict[str, str]) -> list[str]:
    if role in mapping:
        cols = [c.strip() for c in mapping[role].split(",") if c.strip()]
        missing = [c for c in cols if c not in header]
        if missing:
            raise KeyError(f"columns {missing} (data.columns.{role}) not in the table; it has {header}")
        return cols
    return [c for c in DEFAULTS[role] if c in header][:1]


def _texts(value) -> list:
    """A cell holding one text, a list, or a JSON list as text -> list of texts."""
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            return as_list(json.loads(value))
        except json.JSONDecodeError:
            return [value]
    return [v for v in as_list(value) if v is not None and v != ""]


def _csv_rows(uri: str) -> tuple[list[str], Iterator[dict]]:
    fs, path = get_fs(uri)
    with fs.open(path, "rb") as f:
        text = f.read().decode("utf-8", errors="surrogateescape")  # bad bytes -> per-row reject
    reader = csv.DictReader(io.StringIO(text, newline=""))
    return list(reader.fieldnames or []), iter(list(reader))


def _parquet_rows(uri: str) -> tuple[list[str], Iterator[dict]]:
    import pyarrow.parquet as pq

    fs, path = get_fs(uri)
    with fs.open(path, "rb") as f:
        table = pq.read_table(f)
    return table.column_names, (row for batch in table.to_batches(4096) for row in batch.to_pylist())


def list_tabular(source: str, fmt: str, mapping: dict[str, str]) -> Iterator[dict]:
    header, rows = (_csv_rows if fmt == "csv" else _parquet_rows)(source)
    cols = {role: _column(role, header, mapping) for role in DEFAULTS}
    if not cols["image"]:
        raise KeyError(f"{source}: no image column among {header}; set data.columns.image=<name>")
    base = source.rsplit("/", 1)[0]
    groups: dict[str, dict] = {}
    for i, row in enumerate(rows, start=2 if fmt == "csv" else 0):
        where = f"{source}:{i}"
        if any(isinstance(v, str) and has_surrogates(v) for v in row.values()):
            yield reject_ref(where, "invalid_encoding", f"{where}: a cell is not UTF-8", source)
            continue
        image = row.get(cols["image"][0])
        if not image:
            yield reject_ref(where, "missing_field", f"{where}: empty image cell", source)
            continue
        sid = str(row[cols["id"][0]]) if cols["id"] and row.get(cols["id"][0]) else str(image)
        g = groups.setdefault(sid, {"image": image, "captions": [], "qa": [], "rows": []})
        for c in cols["caption"] + cols["captions"]:
            g["captions"].extend(_texts(row.get(c)))
        if cols["question"] and row.get(cols["question"][0]):
            answers = _texts(row.get(cols["answers"][0])) if cols["answers"] else []
            g["qa"].append({"question": row[cols["question"][0]], "answers": answers})
        g["rows"].append(i)
    for sid, g in groups.items():
        yield make_ref(sid, image_loc(g["image"], base), g["captions"], g["qa"], {"rows": g["rows"]}, source)


def tabular_files(source: str, fmt: str) -> list[str]:
    fs, path = get_fs(source)
    if fs.isfile(path):
        return [source]
    return [join(source, p.rsplit("/", 1)[-1]) for p in sorted(fs.glob(join(path, f"*.{fmt}")))]
