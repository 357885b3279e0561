"""VQA-style JSON: question-answer pairs per image, grouped into one sample per image.

Accepted shapes: a list of `{"image" | "image_id", "question", "answers" | "answer"}` entries, or
`{"images": [{"id", "file_name"}], "questions": [{"question_id", "image_id", "question"}],
  "annotations": [{"question_id", "answers": [{"answer"}] }]}` (VQA v2 style, one file).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator

from pipelines.ingest.layout import get_fs
from pipelines.ingest.sources.common import image_loc, make_ref, reject_ref


def _entries(data) -> Iterator[dict]:
    """Flatten both shapes into `{"image", "question", "answers", "captions"?}` dicts."""
    if isinstance(data, list):
        yield from data
        return
    files = {img.get("id"): img.get("file_name") for img in data.get("images", [])}
    answers = {a.get("question_id"): a.get("answers", []) for a in data.get("annotations", [])}
    for q in data.get("questions", []):
        image = q.get("image") or files.get(q.get("image_id"))
        yield {**q, "image": image, "answers": q.get("answers") or answers.get(q.get("question_id"), [])}


def list_vqa(source: str) -> Iterator[dict]:
    fs, path = get_fs(source)
    with fs.open(path, "rb") as f:
        data = json.loads(f.read().decode("utf-8"))
    base = source.rsplit("/", 1)[0]
    groups: dict[str, dict] = {}
    order: list[str] = []
    qa = defaultdict(list)
    for i, e in enumerate(_entries(data)):
        image = e.get("image") if isinstance(e, dict) else None
        if not image or "question" not in e:
            yield reject_ref(f"{source}#{i}", "missing_field", "a VQA entry needs 'image' and 'question'", source)
            continue
        if image not in groups:
            order.append(image)
            groups[image] = {"captions": list(e.get("captions", []))}
        answers = e.get("answers", e.get("answer", []))
        qa[image].append({"question": e["question"], "answers": answers})
    for image in order:
        stem = str(image).rsplit("/", 1)[-1].rsplit(".", 1)[0]
        yield make_ref(stem, image_loc(image, base), groups[image]["captions"], qa[image], {"image": image}, source)
