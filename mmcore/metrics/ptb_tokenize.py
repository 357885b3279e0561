"""A Python re-implementation of the COCO caption evaluation's tokenisation.

pycocoevalcap runs Stanford CoreNLP 3.4.1's PTBTokenizer (`-preserveLines -lowerCase`, java) and
then drops the punctuation tokens in PUNCTUATIONS. Quirks kept on purpose so scores match:
brackets become `-lrb-`, `-rsb-`, ... and, being lower-cased, are *not* dropped (the list holds
`-LRB-`); `?!` stays; abbreviations such as `mr.`, `u.s.`, `p.m.` and a lone `a.` keep their period;
contractions split PTB-style (`isn't` -> `is n't`, `can't` -> `ca n't`, `cannot` -> `can not`).
"""

from __future__ import annotations

import re

PUNCTUATIONS = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":",
                "-", "--", "...", ";"}
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_ABBREVIATIONS = "mr|mrs|ms|dr|st|jr|sr|mt|vs|etc|prof|inc|ltd|co|ave|gen|capt|sgt|lt|col|rev|jan|feb|aug|sept|oct|nov|dec"
_TOKEN = re.compile(
    rf"""
    https?://\S+ | www\.\S+                          # URLs stay whole
  | [\w.+-]+@[\w-]+(?:\.[\w-]+)+                     # e-mail addresses
  | (?:[^\W\d_]\.){{2,}}                              # acronyms: u.s.  p.m.
  | (?:{_ABBREVIATIONS})\.(?=\s|$)                   # known abbreviations keep their period
  | [^\W\d_]\.$                                      # a lone letter + period at a chunk end: "a."
  | \d+(?:[.,:/]\d+)+                                # 3.5  1,000  9:30  1/2
  | 'em\b                                            # PTB keeps 'em as one token
  | \w+(?:[-'/&.]\w+)*'?                             # words, with inner - ' / & . and a final '
  | \.\.\. | -- | [?!]+ | `+ | '+ | \S
    """,
    re.VERBOSE,
)
_CONTRACTION = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")
_SPECIAL = {"cannot": ["can", "not"], "gonna": ["gon", "na"], "gotta": ["got", "ta"],
            "wanna": ["wan", "na"], "lemme": ["lem", "me"]}


def _split_word(tok: str) -> list[str]:
    if tok in _SPECIAL:
        return _SPECIAL[tok]
    if len(tok) > 1 and tok.endswith("'") and not tok.startswith("'"):
        return [*_split_word(tok[:-1]), "'"]  # plural possessive: boys' -> boys '
    m = _CONTRACTION.match(tok)
    if m and m.group(1)[-1].isalnum():
        return [m.group(1), m.group(2)]
    return [tok]


def ptb_tokenize(text: str) -> list[str]:
    """Lower-cased PTB tokens of `text` with punctuation removed, as pycocoevalcap's PTBTokenizer."""
    tokens: list[str] = []
    for chunk in text.lower().split():
        for tok in _TOKEN.findall(chunk):
            tok = _BRACKETS.get(tok, tok)
            tokens.extend(_split_word(tok) if tok[0].isalnum() else [tok])
    return [t for t in tokens if t not in PUNCTUATIONS and t != '"']

