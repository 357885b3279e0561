"""CSV and Parquet manifests with configurable column names.

`DataConfig.columns` maps roles to column names: `id`, `image` (path or URL), `audio` (path or
URL), `caption` (one column, or several separated by commas), `captions` (a list column, or JSON
list text), `question`, `answers`. Rows without an `id` column are grouped by image (or audio),
so a table with one caption per row becomes one sample per file.

Audio captioning tables read as they come: AudioCaps-style `file, caption` rows (one caption a
row, grouped by file) and Clotho's `file_name, caption_1 .. caption_5`. A cell of the image
column that names an audio file (`.wav`, `.flac`, ...; see `AUDIO_SUFFIXES`) is the sample's
audio, and with no `caption` column the `caption_<n>` columns are its captions.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator

from pipelines.core.storage import get_fs, join
from pipelines.ingest.sources.common import (
    as_list,
    has_surrogates,
    image_loc,
    is_audio_name,
    make_ref,
    parent_of,
    reject_ref,
    text_of,
)

DEFAULTS = {
    "id": ("id", "key", "sample_id"),
    "image": ("image", "image_path", "file_name", "filepath", "url", "image_url"),
    "audio": ("audio", "audio_path", "audio_file", "audio_url", "file", "wav"),
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
    found = [c for c in DEFAULTS[role] if c in header][:1]
    if role == "caption" and not found:  # Clotho: caption_1 .. caption_5
        numbered = [c for c in header if re.fullmatch(r"caption_\d+", c)]
        found = sorted(numbered, key=lambda c: int(c.rsplit("_", 1)[1]))
    return found


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


def _cell_problem(row: dict | _BadRow, media: tuple) -> tuple[str, str] | None:
    """(reason, detail) for a row that cannot be read, else None."""
    if isinstance(row, _BadRow):
        reason, _, why = str(row).partition(": ")
        return reason, why
    if any(has_surrogates(text_of(v)) for v in row.values() if isinstance(v, (str, bytes))):
        return "invalid_encoding", "a cell is not UTF-8"
    if all(m is None or text_of(m).strip() == "" for m in media):
        return "missing_field", "empty image and audio cells"
    return None


def _media(row: dict | _BadRow, cols: dict) -> tuple[str | None, str | None]:
    """(image, audio) cells of a row as text (None when empty); an audio file named in the image
    column (Clotho's `file_name`) is the audio."""
    if isinstance(row, _BadRow):
        return None, None
    cells = [row.get(cols[role][0]) if cols[role] else None for role in ("image", "audio")]
    image, audio = (None if c is None or text_of(c).strip() == "" else text_of(c) for c in cells)
    if image is not None and audio is None and is_audio_name(image):
        image, audio = None, image
    return image, audio


def list_tabular(source: str, fmt: str, mapping: dict[str, str]) -> Iterator[dict]:
    """One Ref per id (or per image / audio file where there is no id column); a repeated id
    naming another file is a `duplicate_id` reject (never merged into the first sample)."""
    header, rows = (_csv_rows if fmt == "csv" else _parquet_rows)(source)
    cols = {role: _column(role, header, mapping) for role in DEFAULTS}
    if not cols["image"] and not cols["audio"]:
        raise KeyError(f"{source}: no image or audio column among {header}; "
                       "set data.columns.image=<name> or data.columns.audio=<name>")
    groups: dict[str, dict] = {}
    for i, row in enumerate(rows, start=2 if fmt == "csv" else 0):
        where = f"{source}:{i}"
        media = _media(row, cols)
        problem = _cell_problem(row, media) or _add_row(groups, row, media, cols, i)
        if problem:
            yield reject_ref(where, problem[0], f"{where}: {problem[1]}", source)
    base = parent_of(source)
    for sid, g in groups.items():
        image, audio = (image_loc(m, base) if m is not None else None for m in g["media"])
        yield make_ref(sid, image, g["captions"], g["qa"], {"rows": g["rows"]}, source, audio=audio)


def _add_row(groups: dict[str, dict], row: dict, media: tuple, cols: dict, i: int) -> tuple[str, str] | None:
    """Add a row's captions and QA pair to its id's group; a problem when the id names other files."""
    name = media[0] if media[0] is not None else media[1]
    sid = text_of(row[cols["id"][0]]) if cols["id"] and row.get(cols["id"][0]) not in (None, "") else name
    g = groups.setdefault(sid, {"media": media, "captions": [], "qa": [], "rows": []})
    if g["media"] != media:
        return "duplicate_id", f"id {sid!r} names {_names(media)}, but row {g['rows'][0]} gave it {_names(g['media'], False)}"
    for c in cols["caption"] + cols["captions"]:
        g["captions"].extend(_texts(row.get(c)))
    if cols["question"] and row.get(cols["question"][0]) not in (None, ""):
        answers = _texts(row.get(cols["answers"][0])) if cols["answers"] else []
        g["qa"].append({"question": row[cols["question"][0]], "answers": answers})
    g["rows"].append(i)
    return None


def _names(media: tuple, label: bool = True) -> str:
    """An (image, audio) pair as the text of a report: `image 'x.jpg' + audio 'x.wav'`."""
    return " + ".join(f"{kind} {m!r}" if label else repr(m)
                      for kind, m in zip(("image", "audio"), media, strict=True) if m is not None)


def tabular_files(source: str, fmt: str) -> list[str]:
    fs, path = get_fs(source)
    if fs.isfile(path):
        return [source]
    return [join(source, p.rsplit("/", 1)[-1]) for p in sorted(fs.glob(join(path, f"*.{fmt}")))]
