"""WordPiece tokenizer: trained locally with HF `tokenizers`, or loaded from a local directory.

Special tokens, in id order for a locally trained one: [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4.
Every encoded text is `[CLS] tokens [SEP]`; the decoder uses [CLS] as BOS and [SEP] as EOS, so a
caption's ids serve both the text encoder and the decoder's teacher forcing. A pretrained BERT
directory has other ids ([CLS]=101); read them with `special_token_ids` instead of assuming.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import BertTokenizerFast, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1000) -> PreTrainedTokenizerFast:
    """Train a lower-casing BERT-style WordPiece tokenizer on `texts` (captions, questions, answers).

    The same texts give the same tokenizer in every process when the vocabulary holds every
    training word whole, as on the synthetic sets (`reproducible_vocab`). Where `vocab_size` binds,
    a tie among the last merges can still go either way (1 run in 4 on coco-mini's captions at
    600 tokens: 521 tokens instead of 520)."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False
    )
    words: set[str] = set()
    tok.train_from_iterator(_noting_words(texts, words), trainer)
    tok.model = models.WordPiece(vocab=reproducible_vocab(tok, words), unk_token="[UNK]")
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]",
    )


def _noting_words(texts: Iterable[str], words: set[str]) -> Iterator[str]:
    """`texts`, unchanged, while their distinct words (normalised, pre-tokenised) go into `words`.
    Its own normaliser and pre-tokeniser: the tokenizer being trained is locked while it reads
    this iterator, and calling into it from here would deadlock."""
    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    for text in texts:
        words.update(w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
        yield text


def reproducible_vocab(tok: Tokenizer, words: set[str]) -> dict[str, int]:
    """The trained vocabulary cut to what the training words use, numbered canonically.

    HF's WordPiece trainer breaks ties between equally frequent merges in hash-map order, which
    differs from process to process (huggingface/tokenizers#1794). On a small corpus every word
    ends up whole, but the intermediate pieces it built on the way ("righ" before "right") differ,
    and with them the ids of every token after them: the same captions gave a different tokenizer,
    hence a different model, on every ingest. Kept: the specials, each piece some training word is
    split into (greedy longest match, so cutting the unused ones changes no training word's
    tokens), and every character seen, alone and as a `##` continuation, so that an unseen word
    made of seen characters still has pieces."""
    used = {piece.value for word in words for piece in tok.model.tokenize(word)}
    chars = {c for w in words for c in w}
    alphabet = chars | {"##" + c for c in chars}
    return canonical_vocab({t: 0 for t in (used | alphabet) - {"[UNK]"}})


def canonical_vocab(vocab: dict[str, int]) -> dict[str, int]:
    """Re-number a vocabulary: specials first, then whole words, then `##` pieces, each sorted."""
    rest = sorted(set(vocab) - set(SPECIAL_TOKENS), key=lambda t: (t.startswith("##"), t))
    return {token: i for i, token in enumerate(SPECIAL_TOKENS + rest)}


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """A tokenizer saved by `save_pretrained` (ours, or a local pretrained BERT's vocab.txt directory)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory {path} not found; train one or give a local model dir")
    try:
        if not (path / "tokenizer.json").is_file() and (path / "vocab.txt").is_file():
            # A bare BERT vocabulary (older HF dirs): build the fast WordPiece tokenizer from it.
            tok = BertTokenizerFast(vocab=str(path / "vocab.txt"))
        else:
            from transformers import AutoTokenizer  # imports torch: only where a tokenizer is loaded

            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"could not load a tokenizer from {path}: {e}") from e
    if tok.cls_token_id is None or tok.sep_token_id is None or tok.pad_token_id is None:
        raise ValueError(f"tokenizer in {path} lacks [CLS]/[SEP]/[PAD]; mmcore needs BERT-style specials")
    return tok


def special_token_ids(tokenizer) -> dict[str, int]:
    """`{"pad_id", "bos_id", "eos_id"}` for `mmcore.model.model_config(**...)`; vocab size is len(tokenizer)."""
    return {"pad_id": tokenizer.pad_token_id, "bos_id": tokenizer.cls_token_id, "eos_id": tokenizer.sep_token_id}


def encode(tokenizer, text: str, max_len: int) -> list[int]:
    """`[CLS] ... [SEP]` ids, truncated to max_len (the [SEP] is kept).

    Calls the Rust tokenizer directly where that was checked to give the same ids as
    `tokenizer(text, truncation=True, max_length=max_len)`: the transformers wrapper costs ~10x the
    tokenizing itself, a good part of a data loader's time on short captions.
    """
    backend = _direct_backend(tokenizer) if max_len >= 2 else None
    if backend is None:
        return tokenizer(text, truncation=True, max_length=max_len)["input_ids"]
    if backend.truncation is not None or backend.padding is not None:
        backend.no_truncation()  # left on by an earlier wrapper call, which sets what it needs each time
        backend.no_padding()
    ids = backend.encode(text).ids
    return ids if len(ids) <= max_len else ids[: max_len - 1] + ids[-1:]


_PROBES = ("", "a", "A photo of two dogs, running on the beach!", "x " * 40, "ünïcödé  tëxt\twith\nspaces")
_direct: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _direct_backend(tokenizer):
    """The tokenizer's Rust backend if its `[CLS] text [SEP]` output with our truncation matches the
    wrapper's on a few probes (checked once per tokenizer object), else None."""
    try:
        return _direct[tokenizer]
    except (KeyError, TypeError):
        pass
    backend = getattr(tokenizer, "backend_tokenizer", None)
    ok = backend is not None and tokenizer.sep_token_id is not None
    if ok:
        for text in _PROBES:
            for max_len in (2, 8, 64):
                want = tokenizer(text, truncation=True, max_length=max_len)["input_ids"]
                backend.no_truncation()
                backend.no_padding()
                ids = backend.encode(text).ids
                got = ids if len(ids) <= max_len else ids[: max_len - 1] + ids[-1:]
                ok = ok and got == want and ids[-1:] == [tokenizer.sep_token_id]
    try:
        _direct[tokenizer] = backend if ok else None
    except TypeError:  # not weak-referenceable: check again next time
        pass
    return backend if ok else None


def decode_text(tokenizer, ids) -> list[str]:
    """Generated ids `(B, T)` (tensor or lists) -> strings; stops at the first EOS ([SEP]), drops specials."""
    if hasattr(ids, "tolist"):  # a tensor (torch is not imported here: ingest trains tokenizers without it)
        ids = ids.tolist()
    eos = tokenizer.sep_token_id
    cut = [row[: row.index(eos)] if eos in row else row for row in ids]
    return [s.strip() for s in tokenizer.batch_decode(cut, skip_special_tokens=True)]
