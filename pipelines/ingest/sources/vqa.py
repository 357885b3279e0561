"""VQA: question-answer pairs per image, grouped into one sample per image.

Accepted shapes:
- one JSON file holding a list of `{"image", "question", "answers" | "answer"}` entries, or
  `{"images": [{"id", "file_name"}], "questions": [{"question_id", "image_id", "question"}],
  "annotations": [{"question_id", "answers": [{"answer"}]}]}` (VQA v2 style, one file);
- the official VQA v2 layout: a folder holding `v2_OpenEnded_mscoco_<split>_questions.json`
  (`{"data_subtype", "questions": [...]}`), `v2_mscoco_<split>_annotations.json`
  (`{"annotations": [{"question_id", "answers": [{"answer", ...}], ...}]}`), paired by
  `question_id`, and the COCO images `<split>/COCO_<split>_<image_id:012d>.jpg` (a questions
  file passed alone is read the same way, from its own folder).

Every question needs answers (the QA contract): an image whose questions have none, such as a
test split's, is a `no_answers` reject.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterator

from pipelines.core.storage import get_fs, join, read_json
from pipelines.ingest.sources.common import as_list, image_loc, make_ref, parent_of, reject_ref

QUESTIONS_GLOB = "*_questions.json"
_SPLIT_IN_NAME = re.compile(r"_([^_]+)_questions\.json$")  # ..._train2014_questions.json


def question_files(source: str) -> list[str]:
    """The `*_questions.json` files of a VQA v2 folder, as URIs, sorted."""
    fs, path = get_fs(source)
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.glob(join(path, QUESTIONS_GLOB)))
    if not names:
        raise FileNotFoundError(
            f"{source}: no {QUESTIONS_GLOB}. A VQA folder holds the VQA v2 questions and annotations "
            "files (v2_OpenEnded_mscoco_<split>_questions.json, v2_mscoco_<split>_annotations.json)."
        )
    return [join(source, name) for name in names]


def is_split_questions(data) -> bool:
    """A VQA v2 questions file: questions naming images by id, answers in another file."""
    if not isinstance(data, dict) or not isinstance(data.get("questions"), list) or not data["questions"]:
        return False
    if {"images", "annotations"} & data.keys():
        return False
    return not any("image" in q for q in data["questions"][:5] if isinstance(q, dict))


def _split_name(questions_uri: str, data: dict) -> str:
    split = data.get("data_subtype")
    if not split:
        found = _SPLIT_IN_NAME.search(questions_uri)
        split = found.group(1) if found else ""
    if not split:
        raise ValueError(f"{questions_uri}: no data_subtype and no <split> in the name "
                         "(v2_OpenEnded_mscoco_<split>_questions.json); cannot find its answers and images")
    return split


def _answers_by_question(folder: str, split: str) -> tuple[str | None, dict]:
    """(annotations file URI or None, question_id -> answer strings) of one split."""
    fs, path = get_fs(folder)
    found = sorted(fs.glob(join(path, f"*_{split}_annotations.json")))
    if not found:
        return None, {}
    uri = join(folder, found[0].rsplit("/", 1)[-1])
    answers = {}
    data = read_json(uri)
    for a in _objects(data.get("annotations") if isinstance(data, dict) else None):
        if _hashable(a.get("question_id")):
            # all ten human answers, repeats included: VQA accuracy counts how many gave each
            answers[a["question_id"]] = [x.get("answer", "") if isinstance(x, dict) else x
                                         for x in as_list(a.get("answers"))]
    return uri, answers


def _objects(value) -> list[dict]:
    """The objects of a JSON list (anything else in it, or a non-list, is skipped: not a record)."""
    return [x for x in value if isinstance(x, dict)] if isinstance(value, list) else []


def _hashable(value) -> bool:
    return isinstance(value, (int, str, float)) and not isinstance(value, bool)


def _image_folder(folder: str, split: str) -> str:
    """`<folder>/<split>` when it exists (COCO's layout), else the folder itself."""
    fs, path = get_fs(join(folder, split))
    return join(folder, split) if fs.isdir(path) else folder


def read_split_files(questions_uri: str, data: dict) -> Iterator[dict]:
    """Refs of one VQA v2 split: one per image with all its answered questions; images with no
    answered question and answers with no question are rejects."""
    folder = parent_of(questions_uri)
    try:
        split = _split_name(questions_uri, data)
    except ValueError as e:  # the whole file: one reject that says how to name it
        yield reject_ref(questions_uri, "unknown_split", str(e), questions_uri)
        return
    answers_uri, answers = _answers_by_question(folder, split)
    base = _image_folder(folder, split)
    image_split = split.replace("test-dev", "test")  # test-dev questions are about test images
    qa: dict[int, list[dict]] = defaultdict(list)
    for i, q in enumerate(data["questions"]):
        try:
            image_id = int(q["image_id"])
            qid = q.get("question_id")
            qa[image_id].append({"question": q["question"], "answers": answers.get(qid, []) if _hashable(qid) else []})
        except (KeyError, TypeError, ValueError, AttributeError):
            yield reject_ref(f"{questions_uri}#{i}", "missing_field",
                             f"{questions_uri}: question {i} needs 'question' and an integer 'image_id'", questions_uri)
    for image_id, pairs in qa.items():
        name = f"COCO_{image_split}_{image_id:012d}.jpg"
        stem = name.rsplit(".", 1)[0]
        if not any(p["answers"] for p in pairs):
            where = f"no answers in {answers_uri}" if answers_uri else f"no *_{split}_annotations.json beside it"
            yield reject_ref(stem, "no_answers", f"{questions_uri}: {len(pairs)} question(s) about image "
                             f"{image_id}, {where}; a QA pair needs answers (a test split has none)", questions_uri)
            continue
        meta = {"image_id": image_id, "coco_file": name, "vqa_split": split}
        yield make_ref(stem, image_loc(name, base), [], pairs, meta, questions_uri)
    asked = {q.get("question_id") for q in _objects(data["questions"]) if _hashable(q.get("question_id"))}
    for qid in sorted(set(answers) - asked, key=str):
        yield reject_ref(f"orphan-q{qid}", "unknown_question_id",
                         f"{answers_uri}: answers for question_id {qid} with no question in {questions_uri}", answers_uri)


def _entries(data) -> Iterator[dict]:
    """Flatten the one-file shapes into `{"image", "question", "answers", "captions"?}` dicts."""
    if isinstance(data, list):
        yield from data
        return
    if not isinstance(data, dict):
        return
    files = {img.get("id"): img.get("file_name") for img in _objects(data.get("images")) if _hashable(img.get("id"))}
    answers = {a.get("question_id"): a.get("answers", []) for a in _objects(data.get("annotations"))
               if _hashable(a.get("question_id"))}
    questions = data.get("questions")
    for q in questions if isinstance(questions, list) else []:
        if not isinstance(q, dict):
            yield q  # a reject, below
            continue
        image_id, qid = q.get("image_id"), q.get("question_id")
        image = q.get("image") or (files.get(image_id) if _hashable(image_id) else None)
        yield {**q, "image": image, "answers": q.get("answers") or (answers.get(qid, []) if _hashable(qid) else [])}


def read_one_file(source: str, data) -> Iterator[dict]:
    """Refs of a one-file VQA source, one per image in first-seen order."""
    base = parent_of(source)
    groups: dict[str, dict] = {}
    order: list[str] = []
    qa = defaultdict(list)
    for i, e in enumerate(_entries(data)):
        image = e.get("image") if isinstance(e, dict) else None
        if not image or "question" not in e:
            yield reject_ref(f"{source}#{i}", "missing_field", f"{source}: entry {i}: a VQA entry is an object "
                             "with 'image' and 'question'", source)
            continue
        if not isinstance(image, str):
            yield reject_ref(f"{source}#{i}", "bad_field_type", f"{source}: entry {i}: 'image' must be a path "
                             f"or URL string, not {type(image).__name__}", source)
            continue
        if image not in groups:
            order.append(image)
            groups[image] = {"captions": as_list(e.get("captions"))}
        answers = e.get("answers", e.get("answer", []))
        qa[image].append({"question": e["question"], "answers": answers})
    for image in order:
        stem = str(image).rsplit("/", 1)[-1].rsplit(".", 1)[0]
        yield make_ref(stem, image_loc(image, base), groups[image]["captions"], qa[image], {"image": image}, source)


def list_vqa(source: str) -> Iterator[dict]:
    fs, path = get_fs(source)
    for uri in question_files(source) if fs.isdir(path) else [source]:
        try:
            data = read_json(uri)
        except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
            yield reject_ref(uri, "malformed_json", f"{uri}: not JSON ({type(e).__name__})", uri)
            continue
        yield from (read_split_files(uri, data) if is_split_questions(data) else read_one_file(uri, data))
