"""VQA accuracy: the standard answer normalisation of the VQA evaluation, then min(matches / 3, 1).

The "/ 3" assumes VQA's ten human answers per question: three annotators agreeing make an answer
fully right. A question with fewer reference answers (synthetic sets, GQA/CLEVR-style data: one
answer) needs as many matches as it has references, at most three, so an exact match scores 1, not
1/3 (which capped such a set's accuracy at 0.33).
"""

from __future__ import annotations

import re

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Im": "I'm", "im": "i'm", "Ive": "I've", "ive": "i've", "isnt": "isn't",
    "itd": "it'd", "itll": "it'll", "lets": "let's", "shouldnt": "shouldn't", "thats": "that's",
    "theres": "there's", "theyre": "they're", "theyve": "they've", "wasnt": "wasn't", "werent": "weren't",
    "whats": "what's", "wheres": "where's", "whos": "who's", "wont": "won't", "wouldnt": "wouldn't",
    "youd": "you'd", "youll": "you'll", "youre": "you're", "youve": "you've",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
          ",", "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: the official evaluation's pattern
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def _punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def normalize_answer(answer: str) -> str:
    """Official VQA normalisation: punctuation, number words to digits, articles dropped, contractions."""
    text = _punctuation(answer.replace("\n", " ").replace("\t", " ").strip().lower())
    words = [_NUMBERS.get(w, w) for w in text.split() if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def vqa_scores(predictions: dict, references: dict) -> dict:
    """`{id: min(#references equal to the prediction / min(3, #references), 1)}` after normalising
    both sides (with ten references: the usual min(matches / 3, 1))."""
    missing = [k for k in predictions if k not in references]
    if missing:
        raise ValueError(f"predictions {missing[:5]} have no reference answers")
    scores = {}
    for k, pred in predictions.items():
        p = normalize_answer(pred)
        matches = sum(normalize_answer(r) == p for r in references[k])
        needed = min(3, len(references[k])) or 1
        scores[k] = min(matches / needed, 1.0)
    return scores


def vqa_accuracy(predictions: dict, references: dict) -> float:
    """Mean VQA accuracy of `{id: answer}` against `{id: [reference answers]}`."""
    if not predictions:
        raise ValueError("vqa_accuracy needs at least one prediction")
    scores = vqa_scores(predictions, references)
    return sum(scores.values()) / len(scores)
