"""Metrics: hand-checked small cases, bootstrap variants, and agreement with pycocoevalcap."""

from __future__ import annotations

import json
import math
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from mmcore.metrics import (
    bleu4,
    bleu4_from_stats,
    bleu4_stats,
    cider_d,
    cider_d_scores,
    normalize_answer,
    ptb_tokenize,
    recall_from_ranks,
    retrieval_ranks,
    retrieval_recall,
    vqa_accuracy,
    vqa_scores,
)

COCO_MINI = Path("/work/shared/data/coco-mini/annotations")
# A fixed set with the punctuation, case and contractions the COCO tokenisation has to handle.
CANDIDATES = {
    1: "A man riding a wave on top of a surfboard.",
    2: "a red circle to the left of a small blue square",
    3: "Two dogs playing with a frisbee in the park",
    4: "A kitchen with a stove, a sink and a refrigerator.",
    5: "a cat that's sleeping on a laptop",
    6: "People walking down a street (in the rain).",
    7: "An old black-and-white photo of a train",
    8: "a plate of food",
}
REFERENCES = {
    1: ["A surfer rides a large wave in the ocean.", "A man on a surfboard riding a wave.",
        "a person surfing on top of a wave", "The surfer is riding the wave's crest!"],
    2: ["a red circle to the left of a small blue square", "a small blue square right of a red circle",
        "there is a red circle and a blue square"],
    3: ["Two dogs play with a frisbee.", "Dogs running after a frisbee in a grassy park.",
        "two brown dogs chasing a Frisbee"],
    4: ["A kitchen with a stove, sink, and fridge.", "A clean kitchen; white cabinets and a stove.",
        "The kitchen isn't very large: a sink and an oven."],
    5: ["A cat sleeping on a laptop computer.", "a grey cat lying on a keyboard", "The cat's asleep on the laptop"],
    6: ["People with umbrellas walk down a rainy street.", "pedestrians on a wet city street",
        "A busy street with people walking -- it's raining"],
    7: ["A black and white photo of an old train.", "an old steam train on the tracks", "A vintage train photo"],
    8: ["A plate with rice and vegetables.", "a white plate topped with food", "food on a plate"],
}


def test_bleu4_hand_checked():
    assert bleu4({0: "a b c d e"}, {0: ["a b c d e"]}) == pytest.approx(1.0)
    # precisions 4/5, 3/4, 2/3, 1/2; equal lengths so no brevity penalty
    expected = (0.8 * 0.75 * (2 / 3) * 0.5) ** 0.25
    assert bleu4({0: "a b c d e"}, {0: ["a b c d f"]}) == pytest.approx(expected, rel=1e-9)
    # brevity penalty: candidate of 4 words, closest reference 8 words -> exp(1 - 8/4)
    assert bleu4({0: "a b c d"}, {0: ["a b c d e f g h"]}) == pytest.approx(math.exp(-1), rel=1e-6)
    with pytest.raises(ValueError, match="same ids"):
        bleu4({0: "a"}, {1: ["a"]})


def test_bleu4_stats_recompute_corpus_score_on_resamples():
    stats = bleu4_stats(CANDIDATES, REFERENCES)
    assert bleu4_from_stats(list(stats.values())) == pytest.approx(bleu4(CANDIDATES, REFERENCES), abs=1e-12)
    ids = [1, 1, 3, 5, 8]  # a bootstrap resample (with repeats) is the corpus of those ids
    resampled = {i: CANDIDATES[k] for i, k in enumerate(ids)}
    refs = {i: REFERENCES[k] for i, k in enumerate(ids)}
    assert bleu4_from_stats(np.stack([stats[k] for k in ids])) == pytest.approx(bleu4(resampled, refs), abs=1e-12)


def test_cider_d_hand_checked():
    # two images, each caption exact: unigrams and bigram get equal idf weights -> cosine 1 for
    # n = 1, 2 and nothing for n = 3, 4 -> mean (1 + 1 + 0 + 0) / 4 * 10 = 5
    scores = cider_d_scores({0: "a b", 1: "c d"}, {0: ["a b"], 1: ["c d"]})
    assert scores == pytest.approx({0: 5.0, 1: 5.0})
    assert cider_d_scores({0: "c d", 1: "a b"}, {0: ["a b"], 1: ["c d"]}) == pytest.approx({0: 0.0, 1: 0.0})
    per = cider_d_scores(CANDIDATES, REFERENCES)
    assert np.mean(list(per.values())) == pytest.approx(cider_d(CANDIDATES, REFERENCES), abs=1e-12)


def test_vqa_accuracy_normalisation_and_partial_credit():
    assert normalize_answer("Two.") == "2" and normalize_answer("the Dog") == "dog"
    assert normalize_answer("dont know") == "don't know" and normalize_answer("yes!") == "yes"
    refs = {0: ["2", "two", "2"], 1: ["red", "red", "dark red"], 2: ["blue"]}
    scores = vqa_scores({0: "Two", 1: "red", 2: "green"}, refs)
    assert scores == pytest.approx({0: 1.0, 1: 2 / 3, 2: 0.0})
    assert vqa_accuracy({0: "Two", 1: "red", 2: "green"}, refs) == pytest.approx(5 / 9)


def test_vqa_with_fewer_than_three_references_needs_only_those():
    # One reference answer (the synthetic set, CLEVR-style data): an exact match is fully right;
    # the old min(matches / 3, 1) gave it 1/3 and capped the set's accuracy at 0.33.
    assert vqa_scores({0: "Red", 1: "blue"}, {0: ["red"], 1: ["red"]}) == {0: 1.0, 1: 0.0}
    assert vqa_scores({0: "yes"}, {0: ["yes", "no"]}) == {0: 0.5}
    ten = ["cat"] * 2 + ["dog"] * 8  # VQA's ten answers: two agreeing annotators give 2/3
    assert vqa_scores({0: "cat"}, {0: ten}) == pytest.approx({0: 2 / 3})


def test_retrieval_hand_checked_and_chunked():
    # 3 images; texts 0,1 -> image 0, text 2 -> image 1, text 3 -> image 2
    image = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    text = torch.tensor([[0, 1.0, 0], [0.9, 0.1, 0], [0, 0.5, 0.6], [0, 0, 1.0]])
    text = torch.nn.functional.normalize(text, dim=-1)
    t2i = torch.tensor([0, 0, 1, 2])
    ranks = retrieval_ranks(image, text, t2i)
    # image 0: its caption text 1 is the top text; image 1: text 0 beats its caption text 2;
    # image 2: its caption text 3 is the top text
    assert ranks["i2t"].tolist() == [0, 1, 0]
    # text 0 prefers image 1; text 2 prefers image 2
    assert ranks["t2i"].tolist() == [1, 0, 1, 0]
    r = retrieval_recall(image, text, t2i, ks=(1, 2))
    assert r == pytest.approx({"i2t_r1": 2 / 3, "i2t_r2": 1.0, "t2i_r1": 0.5, "t2i_r2": 1.0})
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(50, 8), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(120, 8), dim=-1)
    t2i = torch.randint(0, 50, (120,))
    big, small = retrieval_ranks(img, txt, t2i, chunk=1000), retrieval_ranks(img, txt, t2i, chunk=7)
    assert torch.equal(big["i2t"], small["i2t"]) and torch.equal(big["t2i"], small["t2i"])
    assert recall_from_ranks(big) == retrieval_recall(img, txt, t2i)


needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap's PTBTokenizer needs java")


def _coco_reference(candidates, references):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in references.items()})
    res = tok.tokenize({k: [{"caption": c}] for k, c in candidates.items()})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, per = Cider().compute_score(gts, res)
    return bleu[3], cider, dict(zip(gts.keys(), per, strict=True))


def _check_against_coco(candidates, references):
    ref_bleu, ref_cider, ref_per = _coco_reference(candidates, references)
    assert bleu4(candidates, references) == pytest.approx(ref_bleu, abs=1e-4)
    assert cider_d(candidates, references) == pytest.approx(ref_cider, abs=1e-4)
    ours = cider_d_scores(candidates, references)
    assert all(ours[k] == pytest.approx(ref_per[k], abs=1e-4) for k in ref_per)


@needs_java
def test_agrees_with_pycocoevalcap_on_fixed_examples():
    _check_against_coco(CANDIDATES, REFERENCES)


@needs_java
@pytest.mark.skipif(not COCO_MINI.is_dir(), reason="coco-mini not present")
def test_agrees_with_pycocoevalcap_on_coco_mini():
    caps = defaultdict(list)
    for f in sorted(COCO_MINI.glob("captions_*.json")):
        for a in json.loads(f.read_text())["annotations"]:
            caps[a["image_id"]].append(a["caption"])
    # the first caption of each image is the "candidate", scored against the others
    candidates = {k: v[0] for k, v in caps.items() if len(v) > 1}
    _check_against_coco(candidates, {k: caps[k][1:] for k in candidates})


@needs_java
def test_ptb_tokenize_matches_stanford_tokenizer():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    texts = ["A man's dog isn't running.", "Don't stop (the car)!", 'He said "hello" to me...',
             "It's 3.5 miles, 1,000 feet -- wow", "Mr. Smith and Dr. Jones at St. Louis.",
             "The U.S. flag; yes: no?", "can't won't cannot gonna I'm they're we've you'll I'd",
             "black-and-white photo", "a man.  a dog. The END", "price $5 or 50% off",
             "an image of a [toy] {box}", "the boys' toys", "ok.. two dots", "what?!", "A.", "1/2 cup"]
    ref = PTBTokenizer().tokenize({i: [{"caption": t}] for i, t in enumerate(texts)})
    for i, t in enumerate(texts):
        assert " ".join(ptb_tokenize(t)) == ref[i][0], t
