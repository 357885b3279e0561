"""Caption and answer text cleaning: NFC, no control characters or HTML tags, one space."""

from __future__ import annotations

import html
import math
import re
import unicodedata

from pipelines.ingest.rejects import Reject

# A tag: `<` then a name (or `/name`, `!--`, `!DOCTYPE`), to the next `>`. `x < 5 and y > 3` is
# no tag: a `<` with a space or digit after it is text.
_TAG = re.compile(r"<(?:/?[A-Za-z][A-Za-z0-9:-]*(?:[\s/][^<>]{0,500})?|!--[^<>]{0,500}?--|![A-Za-z][^<>]{0,500})>")
_SPACE = re.compile(r"\s+")


class TextReject(Reject):
    """A caption or question that cannot be kept."""


def strip_tags(text: str) -> str:
    """Tags replaced by a space, until none is left (`<scr<b>ipt>` is a tag once `<b>` is gone)."""
    while True:
        out = _TAG.sub(" ", text)
        if out == text:
            return out
        text = out


def normalize(text: str | bytes) -> str:
    """Decode (UTF-8, strict), unescape HTML entities, NFC, drop control characters, strip tags,
    collapse whitespace. No tag is left in the result (a `<` followed by a space or digit is text)."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TextReject("invalid_encoding", f"not UTF-8 ({e.reason} at byte {e.start})") from e
    if not isinstance(text, str):
        raise TextReject("bad_field_type", f"expected text, got {type(text).__name__}")
    try:
        text.encode("utf-8")  # lone surrogates (e.g. from "\\ud800" in JSON) are not text
    except UnicodeEncodeError as e:
        raise TextReject("invalid_encoding", f"unencodable character at {e.start}") from e
    # Tags go last, after everything that could make one: unescaping (`&lt;script&gt;` stripped
    # first, then unescaped, was a live `<script>`) and dropping invisible characters (`<s\u200bcript>`).
    text = unicodedata.normalize("NFC", html.unescape(text))
    if not text.isprintable():  # printable text has no Cc/Cf/Cs/Co character: skip the scan
        text = "".join(" " if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co") else c for c in text)
    return _SPACE.sub(" ", strip_tags(text)).strip()


def clean_caption(text: str | bytes, min_chars: int, max_chars: int) -> str:
    """A normalised caption, or TextReject(caption_empty|caption_too_short|caption_too_long)."""
    out = normalize(text)
    if not out:
        raise TextReject("caption_empty")
    if len(out) < min_chars:
        raise TextReject("caption_too_short", f"{len(out)} < {min_chars} chars")
    if len(out) > max_chars:
        raise TextReject("caption_too_long", f"{len(out)} > {max_chars} chars")
    return out


def clean_captions(raw: list, min_chars: int, max_chars: int) -> tuple[list[str], list[str]]:
    """(kept captions, reasons of the dropped ones), de-duplicated in first-seen order."""
    kept: list[str] = []
    reasons: list[str] = []
    for item in raw if isinstance(raw, list) else [raw]:
        try:
            text = clean_caption(item, min_chars, max_chars)
        except TextReject as e:
            reasons.append(e.reason)
            continue
        if text not in kept:
            kept.append(text)
    return kept, reasons


def answer_text(value) -> str:
    """One answer as text. Numbers and booleans are answers too (`2` -> "2", `2.0` -> "2",
    `True` -> "yes", as VQA writes them); `null`, NaN and infinities are no answer (""); an
    object's `answer` field is the answer (VQA v2); anything else is a `bad_field_type`."""
    if isinstance(value, dict):
        value = value.get("answer", "")
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "" if not math.isfinite(value) else str(int(value)) if value.is_integer() else repr(value)
    return normalize(value)


def clean_qa(raw: list, max_chars: int) -> tuple[list[dict], list[str]]:
    """Question-answer pairs with non-empty question and at least one non-empty answer
    (`answers` or `answer`: one answer or a list of them, each read by `answer_text`)."""
    kept: list[dict] = []
    reasons: list[str] = []
    for item in raw if isinstance(raw, list) else [raw]:
        try:
            if not isinstance(item, dict) or "question" not in item:
                raise TextReject("bad_qa", "a QA pair needs a 'question' and 'answers'")
            answers = item.get("answers", item.get("answer", []))
            answers = answers if isinstance(answers, list) else [answers]
            question = clean_caption(item["question"], 1, max_chars)
            answers = [a for a in map(answer_text, answers) if a]
            if not answers:
                raise TextReject("bad_qa", f"no answer for {question!r}")
            pair = {"question": question, "answers": answers}
            if isinstance(item.get("audio"), dict) and item["audio"].get("uri"):  # the question spoken (a locator)
                pair["audio"] = item["audio"]
            kept.append(pair)
        except TextReject as e:
            reasons.append(e.reason)
    return kept, reasons
