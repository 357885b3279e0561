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
from pipelines.ingest.sources.common import (
    as_list,
    has_surrogates,
    image_loc,
    make_ref,
    parent_of,
    reject_ref,
    text_of,
)

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
    if isinstance(value, (bytes, bytearray)):
        value = text_of(value)
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            return as_list(json.loads(value))
        except (ValueError, RecursionError):  # not a JSON list after all: one text
            return [value]
    return [v for v in as_list(value) if v is not None and v != ""]


class _BadRow(ValueError):
    """A row the table reader could not give (it names why); the rows after it go on."""


def _csv_rows(uri: str) -> tuple[list[str], Iterator[dict | _BadRow]]:
    fs, path = get_fs(uri)
    with fs.open(path, "rb") as f:
        # utf-8-sig: a byte-order mark is not part of the first column's name
        text = f.read().decode("utf-8-sig", errors="surrogateescape")  # bad bytes -> per-row reject
    reader = csv.reader(io.StringIO(text, newline=""))
    header = _next_row(reader)
    if isinstance(header, _BadRow):
        raise ValueError(f"{uri}: the header row cannot be read ({header}); fix the file's first line")
    return header or [], _csv_dicts(reader, header or [])


def _next_row(reader) -> list[str] | _BadRow | None:
    try:
        return next(reader)
    except StopIteration:
        return None
    except csv.Error as e:  # e.g. a field over csv.field_size_limit(): that row only
        return _BadRow(f"malformed_csv: {e}")


def _csv_dicts(reader, header: list[str]) -> Iterator[dict | _BadRow]:
    while (row := _next_row(reader)) is not None:
        if row != []:  # a blank line is no row (as csv.DictReader has it)
            yield row if isinstance(row, _BadRow) else dict(zip(header, row, strict=False))


def _parquet_rows(uri: str) -> tuple[list[str], Iterator[dict]]:
    import pyarrow.parquet as pq

    fs, path = get_fs(uri)
    with fs.open(path, "rb") as f:
        table = pq.read_table(f)
    return table.column_names, (row for batch in table.to_batches(4096) for row in batch.to_pylist())


def _cell_problem(row: dict | _BadRow, image) -> tuple[str, str] | None:
    """(reason, detail) for a row that cannot be read, else None."""
    if isinstance(row, _BadRow):
        reason, _, why = str(row).partition(": ")
        return reason, why
    if any(has_surrogates(text_of(v)) for v in row.values() if isinstance(v, (str, bytes))):
        return "invalid_encoding", "a cell is not UTF-8"
    if image is None or text_of(image).strip() == "":
        return "missing_field", "empty image cell"
    return None


def list_tabular(source: str, fmt: str, mapping: dict[str, str]) -> Iterator[dict]:
    """One Ref per id (or per image where there is no id column); a repeated id naming another
    image is a `duplicate_id` reject (never merged into the first image)."""
    header, rows = (_csv_rows if fmt == "csv" else _parquet_rows)(source)
    cols = {role: _column(role, header, mapping) for role in DEFAULTS}
    if not cols["image"]:
        raise KeyError(f"{source}: no image column among {header}; set data.columns.image=<name>")
    groups: dict[str, dict] = {}
    for i, row in enumerate(rows, start=2 if fmt == "csv" else 0):
        where = f"{source}:{i}"
        image = None if isinstance(row, _BadRow) else row.get(cols["image"][0])
        problem = _cell_problem(row, image)
        if problem is None:
            problem = _add_row(groups, row, text_of(image), cols, i)
        if problem:
            yield reject_ref(where, problem[0], f"{where}: {problem[1]}", source)
    base = parent_of(source)
    for sid, g in groups.items():
        yield make_ref(sid, image_loc(g["image"], base), g["captions"], g["qa"], {"rows": g["rows"]}, source)


def _add_row(groups: dict[str, dict], row: dict, image: str, cols: dict, i: int) -> tuple[str, str] | None:
    """Add a row's captions and QA pair to its id's group; a problem when the id names another image."""
    sid = text_of(row[cols["id"][0]]) if cols["id"] and row.get(cols["id"][0]) not in (None, "") else image
    g = groups.setdefault(sid, {"image": image, "captions": [], "qa": [], "rows": []})
    if g["image"] != image:
        return "duplicate_id", f"id {sid!r} names image {image!r}, but row {g['rows'][0]} gave it {g['image']!r}"
    for c in cols["caption"] + cols["captions"]:
        g["captions"].extend(_texts(row.get(c)))
    if cols["question"] and row.get(cols["question"][0]) not in (None, ""):
        answers = _texts(row.get(cols["answers"][0])) if cols["answers"] else []
        g["qa"].append({"question": row[cols["question"][0]], "answers": answers})
    g["rows"].append(i)
    return None


def tabular_files(source: str, fmt: str) -> list[str]:
    fs, path = get_fs(source)
    if fs.isfile(path):
        return [source]
    return [join(source, p.rsplit("/", 1)[-1]) for p in sorted(fs.glob(join(path, f"*.{fmt}")))]
