"""The official VQA v2 layout: questions and annotations files paired by question_id, COCO images.

Tiny files with the real field names: `v2_OpenEnded_mscoco_<split>_questions.json`,
`v2_mscoco_<split>_annotations.json`, `<split>/COCO_<split>_<image_id:012d>.jpg`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipelines.config import load_config
from pipelines.core.dataset import SPLITS, read_report, read_shard, shard_paths
from pipelines.ingest import ingest
from pipelines.ingest.sources import detect_format, list_refs
from pipelines.ingest.synth import synthesize

IMAGE_IDS = (9, 25, 30, 34, 36)  # real train2014 ids; 36's questions get no annotations
UNANSWERED = 36


def _answers(answer: str, qid: int) -> dict:
    """A VQA v2 annotation: ten human answers (eight agree), the majority, and the types."""
    answers = [answer] * 8 + ["not sure", answer.upper()]
    return {"question_id": qid, "image_id": qid // 1000, "question_type": "what", "answer_type": "other",
            "multiple_choice_answer": answer,
            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)]}


@pytest.fixture(scope="module")
def vqa_v2(tmp_path_factory) -> tuple[Path, dict[int, list[dict]]]:
    """A VQA v2 folder (train2014 with annotations, test2015 without); returns it and the synthetic
    QA pairs per image id."""
    raw = synthesize(tmp_path_factory.mktemp("raw"), num=len(IMAGE_IDS), seed=5)
    rows = [json.loads(x) for x in (raw / "samples.jsonl").read_text().splitlines()]
    root = tmp_path_factory.mktemp("vqa")
    (root / "train2014").mkdir()
    questions, annotations, truth = [], [], {}
    for image_id, row in zip(IMAGE_IDS, rows, strict=True):
        shutil.copy(raw / row["image"], root / "train2014" / f"COCO_train2014_{image_id:012d}.jpg")
        truth[image_id] = row["qa"]
        for j, qa in enumerate(row["qa"]):
            qid = image_id * 1000 + j
            questions.append({"image_id": image_id, "question": qa["question"], "question_id": qid})
            if image_id != UNANSWERED:
                annotations.append(_answers(qa["answers"][0], qid))
    annotations.pop()  # the last question of image 34 has no annotation: that pair is dropped
    annotations.append(_answers("orphan", 777000))  # an answer to no question
    questions.append({"question": "where is the image id?", "question_id": 5})
    info = {"info": {"description": "tiny VQA v2"}, "license": {"name": "CC BY 4.0"}, "data_type": "mscoco"}
    (root / "v2_OpenEnded_mscoco_train2014_questions.json").write_text(json.dumps(
        {**info, "task_type": "Open-Ended", "data_subtype": "train2014", "questions": questions}))
    (root / "v2_mscoco_train2014_annotations.json").write_text(json.dumps(
        {**info, "data_subtype": "train2014", "annotations": annotations}))
    (root / "v2_OpenEnded_mscoco_test2015_questions.json").write_text(json.dumps(
        {**info, "task_type": "Open-Ended", "data_subtype": "test2015",
         "questions": [{"image_id": 1, "question": "what is this?", "question_id": 1000},
                       {"image_id": 1, "question": "is it red?", "question_id": 1001},
                       {"image_id": 8, "question": "how many?", "question_id": 8000}]}))
    return root, truth


def test_split_files_pair_by_question_id_one_ref_per_image(vqa_v2):
    root, truth = vqa_v2
    assert detect_format(str(root)) == "vqa"
    refs = list(list_refs(str(root), "vqa"))
    kept = {r["id"]: r for r in refs if not r["reject"]}
    answered = [i for i in IMAGE_IDS if i != UNANSWERED]
    assert list(kept) == [f"COCO_train2014_{i:012d}" for i in answered]
    for image_id in answered:
        ref = kept[f"COCO_train2014_{image_id:012d}"]
        assert ref["image"] == {"kind": "path", "uri": f"{root}/train2014/COCO_train2014_{image_id:012d}.jpg"}
        assert ref["meta"] == {"image_id": image_id, "coco_file": f"COCO_train2014_{image_id:012d}.jpg",
                               "vqa_split": "train2014"}
        assert [p["question"] for p in ref["qa"]] == [p["question"] for p in truth[image_id]]
        first = truth[image_id][0]["answers"][0]
        assert ref["qa"][0]["answers"] == [first] * 8 + ["not sure", first.upper()]  # all ten, in order
    assert kept["COCO_train2014_000000000034"]["qa"][-1]["answers"] == []
    rejects = {r["id"]: (r["reject"], r["detail"]) for r in refs if r["reject"]}
    assert {k: v[0] for k, v in rejects.items() if "#" not in k} == {
        "COCO_train2014_000000000036": "no_answers", "orphan-q777000": "unknown_question_id",
        "COCO_test2015_000000000001": "no_answers", "COCO_test2015_000000000008": "no_answers"}
    assert "2 question(s) about image 1, no *_test2015_annotations.json beside it" in rejects["COCO_test2015_000000000001"][1]
    assert [v[0] for k, v in rejects.items() if "#" in k] == ["missing_field"]


def test_a_questions_file_alone_reads_its_folder(vqa_v2):
    root, _ = vqa_v2
    alone = str(root / "v2_OpenEnded_mscoco_train2014_questions.json")
    assert detect_format(alone) == "vqa"
    from_folder = [r for r in list_refs(str(root), "vqa") if "test2015" not in r["source"]]
    assert list(list_refs(alone, "vqa")) == from_folder


def test_vqa_v2_folder_ingests(ray_local, vqa_v2, tmp_path):
    root, truth = vqa_v2
    vdir = ingest(root, tmp_path / "out", load_config("debug").data)
    report = read_report(vdir)
    assert report["kept"] == len(IMAGE_IDS) - 1
    assert report["rejected"] == {"missing_field": 1, "no_answers": 3, "unknown_question_id": 1}
    assert report["captions"]["dropped"] == {"bad_qa": 1}  # the question with no annotation
    samples = {s["__key__"]: json.loads(s["json"]) for split in SPLITS
               for url in shard_paths(vdir, split) for s in read_shard(url)}
    assert {doc["meta"]["image_id"] for doc in samples.values()} == set(IMAGE_IDS) - {UNANSWERED}
    assert sum(len(doc["qa"]) for doc in samples.values()) == sum(len(truth[i]) for i in IMAGE_IDS if i != UNANSWERED) - 1
    assert all(len(pair["answers"]) == 10 for doc in samples.values() for pair in doc["qa"])
