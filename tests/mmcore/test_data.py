"""Sample decoding, tokenizer, collate, image helper."""

from __future__ import annotations

import io
import json
import random

import pytest
import torch
from PIL import Image

from mmcore.data import (
    SPECIAL_TOKENS,
    collate,
    decode_sample,
    decode_text,
    encode,
    image_to_tensor,
    load_tokenizer,
    parse_sample,
)


def test_tokenizer_specials_round_trip(tokenizer, tmp_path):
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    ids = encode(tokenizer, "A Red circle on the left", 16)
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert len(encode(tokenizer, "red " * 40, 16)) == 16
    tokenizer.save_pretrained(str(tmp_path))
    loaded = load_tokenizer(tmp_path)
    assert loaded("a red circle")["input_ids"] == tokenizer("a red circle")["input_ids"]
    assert decode_text(loaded, [ids[1:] + [0, 0]]) == ["a red circle on the left"]
    assert decode_text(loaded, torch.tensor([[ids[1], tokenizer.sep_token_id, ids[2]]])) == ["a"]
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing")


def test_trained_vocabulary_is_numbered_canonically(tokenizer):
    """Specials first, then whole words, then ## pieces, each sorted: ids depend on the set alone."""
    vocab = sorted(tokenizer.get_vocab(), key=tokenizer.get_vocab().get)
    rest = vocab[len(SPECIAL_TOKENS):]
    assert vocab[: len(SPECIAL_TOKENS)] == SPECIAL_TOKENS
    assert rest == sorted(rest, key=lambda t: (t.startswith("##"), t))


_TRAIN_IN_A_NEW_PROCESS = """
import json, sys
from mmcore.data import train_tokenizer
texts = [f"a {s} {c} {k} {p}" for s in ("small", "large") for c in ("red", "green", "blue", "yellow", "purple")
         for k in ("circle", "square", "triangle", "diamond") for p in ("on the left", "in the middle", "on the right")]
tok = train_tokenizer(texts + ["how many shapes are there?", "what color is the triangle?"], vocab_size=400)
print(json.dumps([dict(sorted(tok.get_vocab().items())), tok("a purple diamond left of a ring?")["input_ids"]]))
"""


def test_the_same_texts_give_the_same_tokenizer_in_every_process():
    """HF's WordPiece trainer breaks ties in hash-map order, which changes from process to process:
    the same captions used to give a different vocabulary (and so a different model) per ingest."""
    import subprocess
    import sys

    runs = [subprocess.run([sys.executable, "-c", _TRAIN_IN_A_NEW_PROCESS], capture_output=True, text=True,
                           check=True, timeout=120).stdout for _ in range(4)]
    assert len(set(runs)) == 1, "four processes trained four different tokenizers"
    vocab, ids = json.loads(runs[0])
    assert {"purple", "diamond", "triangle", "?"} <= set(vocab)  # whole words stay whole
    # An unseen word made of seen characters still gets pieces, not [UNK] ("ring": r-i-n-g).
    inverse = {i: t for t, i in vocab.items()}
    ring = [inverse[i] for i in ids[8:-2]]  # between "[CLS] a purple diamond left of a" and "? [SEP]"
    assert vocab["[UNK]"] not in ids and len(ring) > 1 and "".join(p.removeprefix("##") for p in ring) == "ring", ring


def test_load_tokenizer_from_pretrained_bert_dir(tmp_path):
    from transformers import BertTokenizerFast

    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(3)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    bare = load_tokenizer(tmp_path)  # only vocab.txt, as in older BERT directories
    BertTokenizerFast(vocab=str(tmp_path / "vocab.txt")).save_pretrained(str(tmp_path / "saved"))
    for tok in (bare, load_tokenizer(tmp_path / "saved")):
        assert (tok.pad_token_id, tok.cls_token_id, tok.sep_token_id) == (0, 5, 6)
        assert encode(tok, "A red circle", 8) == [5, 8, 9, 10, 6]


def _wrapper_ids(tok, text: str, max_len: int) -> list[int]:
    return tok(text, truncation=True, max_length=max_len)["input_ids"]


def test_encode_matches_the_transformers_wrapper(tokenizer, tmp_path):
    """`encode` calls the Rust tokenizer directly: same ids as the wrapper, also after a wrapper
    call left another truncation length set on the shared backend, and for a BERT vocab.txt."""
    from mmcore.data.tokenizer import _direct_backend

    rng = random.Random(0)
    words = ["red", "circle", "Left", "ÜBER", "café", "dogs!", "x", "##", "[MASK]", "a.b", "  ", "\t", "zzqx"]
    texts = ["", "a red circle", "Ünïcödé,   spaced\n text"] + [
        " ".join(rng.choice(words) for _ in range(rng.randint(0, 40))) for _ in range(200)]
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "red", "circle", "left", "x", "##s"]) + "\n")
    for tok in (tokenizer, load_tokenizer(tmp_path / "bert")):
        assert _direct_backend(tok) is not None  # the fast path is really taken
        for i, text in enumerate(texts):
            max_len = rng.choice([2, 3, 5, 16, 32, 64])
            if i % 3 == 0:
                _wrapper_ids(tok, "some other text", rng.choice([3, 7, 50]))  # leaves truncation set
            assert encode(tok, text, max_len) == _wrapper_ids(tok, text, max_len), (text, max_len)


def test_train_image_is_torchvisions_resized_crop():
    """Same pixels as torchvision's resized_crop + ToTensor + Normalize for the drawn box, and
    boxes that follow RandomResizedCrop's rules (area and aspect ranges, inside the image)."""
    from torchvision import transforms as T
    from torchvision.transforms import functional as F

    from mmcore.data.transforms import CROP_RATIO, CROP_SCALE, MEAN, STD, crop_box, train_image

    rng = random.Random(3)
    img = Image.fromarray(torch.randint(0, 256, (48, 80, 3), dtype=torch.uint8).numpy())
    reference = T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])
    for _ in range(20):
        state = rng.getstate()
        left, top, right, bottom = crop_box(img.width, img.height, rng)
        rng.setstate(state)
        got = train_image(img, 32, rng)
        want = reference(F.resized_crop(img, top, left, bottom - top, right - left, [32, 32], antialias=True))
        assert got.shape == (3, 32, 32) and torch.allclose(got, want, atol=1e-5)
    for w, h in [(80, 48), (64, 64), (30, 200), (200, 30)]:
        for _ in range(200):
            left, top, right, bottom = crop_box(w, h, rng)
            assert 0 <= left < right <= w and 0 <= top < bottom <= h
            cw, ch = right - left, bottom - top
            assert CROP_RATIO[0] - 0.05 <= cw / ch <= CROP_RATIO[1] + 0.05  # drawn or the fallback
            if w == h:  # square: a drawn box always fits, so its area is in range
                assert CROP_SCALE[0] - 0.05 <= cw * ch / (w * h) <= CROP_SCALE[1] + 0.05
    assert crop_box(80, 48, random.Random(9)) == crop_box(80, 48, random.Random(9))


def test_decode_sample_eval_and_train(samples, tokenizer, sample_cfg):
    s = samples[0]
    meta = json.loads(s["json"])
    ev = decode_sample(s, tokenizer, sample_cfg, train=False)
    assert ev["image"].shape == (3, 32, 32) and ev["key"] == s["__key__"] and ev["has_qa"]
    assert decode_text(tokenizer, [ev["caption_ids"][1:].tolist()]) == [s["txt"].decode()]
    # eval answer = most common reference answer
    assert decode_text(tokenizer, [ev["answer_ids"][1:].tolist()]) == [meta["qa"][0]["answers"][0]]
    rng = random.Random(0)
    seen = {decode_text(tokenizer, [decode_sample(s, tokenizer, sample_cfg, True, rng)["caption_ids"][1:].tolist()])[0]
            for _ in range(20)}
    assert seen == set(meta["captions"])
    # already-decoded members give the same tensors as raw bytes
    decoded = {"__key__": s["__key__"], "jpg": Image.open(io.BytesIO(s["jpg"])), "txt": s["txt"].decode(), "json": meta}
    assert torch.equal(decode_sample(decoded, tokenizer, sample_cfg, False)["caption_ids"], ev["caption_ids"])
    assert torch.equal(decode_sample(decoded, tokenizer, sample_cfg, False)["image"], ev["image"])


def test_sample_without_qa_and_collate(samples, tokenizer, sample_cfg):
    meta = json.loads(samples[1]["json"])
    no_qa = dict(samples[1], json=json.dumps({**meta, "qa": []}).encode())
    items = [decode_sample(x, tokenizer, sample_cfg, False) for x in (samples[0], no_qa)]
    assert not items[1]["has_qa"]
    b = collate(items)
    assert b["has_qa"].tolist() == [True, False]
    assert b["image"].shape == (2, 3, 32, 32) and b["key"] == [samples[0]["__key__"], samples[1]["__key__"]]
    for name in ("caption", "question", "answer"):
        ids, mask = b[f"{name}_ids"], b[f"{name}_mask"]
        assert ids.shape == mask.shape and (ids[mask == 0] == 0).all()
        assert mask.sum(1).tolist() == [len(x[f"{name}_ids"]) for x in items]
    with pytest.raises(KeyError, match="jpg"):
        decode_sample({"__key__": "x", "txt": b"hi"}, tokenizer, sample_cfg, False)


def test_parse_sample_reads_the_members_once():
    doc = {"id": "a", "captions": ["a red circle", "a circle"], "split": "val", "width": 3, "height": 2,
           "qa": [{"question": "colour?", "answers": ["red"]}, {"question": "", "answers": ["x"]},
                  {"question": "shape?", "answers": []}]}
    raw = {"__key__": "k1", "jpg": b"\xff\xd8", "txt": b"a red circle", "json": json.dumps(doc).encode()}
    s = parse_sample(raw)
    assert (s.key, s.image, s.caption, s.captions, s.split) == ("k1", b"\xff\xd8", "a red circle", doc["captions"], "val")
    assert s.qa == doc["qa"] and s.answerable_qa == [{"question": "colour?", "answers": ["red"]}]
    assert s.meta == doc
    # A QA-only sample: `txt` is "" and the model still sees one (empty) caption.
    qa_only = parse_sample({"__key__": "k2", "txt": b"", "json": json.dumps({**doc, "captions": []}).encode()})
    assert qa_only.caption == "" and qa_only.captions == [""] and qa_only.image is None
    # No `txt`: the first stored caption is the primary one; no `json`: no metadata.
    assert parse_sample({"json": json.dumps(doc)}).caption == "a red circle"
    assert parse_sample({"__key__": "k3", "txt": "hi"}).captions == ["hi"]


def test_decode_sample_takes_a_parsed_sample(samples, tokenizer, sample_cfg):
    raw = samples[0]
    a = decode_sample(raw, tokenizer, sample_cfg, train=False)
    b = decode_sample(parse_sample(raw), tokenizer, sample_cfg, train=False)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["answer_ids"], b["answer_ids"])
    assert (a["key"], a["captions"], a["qa"]) == (b["key"], b["captions"], b["qa"])


def test_image_to_tensor(samples, tmp_path):
    path = tmp_path / "x.jpg"
    path.write_bytes(samples[0]["jpg"])
    a = image_to_tensor(path, 48)
    assert a.shape == (1, 3, 48, 48)
    assert torch.equal(a, image_to_tensor(Image.open(path), 48))
    with pytest.raises(FileNotFoundError):
        image_to_tensor(tmp_path / "missing.jpg", 48)
