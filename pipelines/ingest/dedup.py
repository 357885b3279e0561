"""The global deduplication step, run on the driver over the small accounting rows.

Exact duplicates share the cleaned pixels and the cleaned audio samples (`content_key`; an
audio-only sample is keyed by its audio, an image-only one by its pixels): with the same captions
and QA pairs the later copy is dropped, with different ones they are merged into the first (captions and QA pairs united; the
keeper's row carries the QA pairs merged into it as `merged_qa`, which the shard writer adds). Near duplicates are
images whose perceptual hashes differ in at most `distance` bits, with the same audio (or none):
the later copy is dropped. Audio has no near-duplicate test (exact hashes only).
"First" means smallest key, so the choice is deterministic, and since this runs over the whole
version before shards are written, no near-copy of a test image survives in another split.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field


@dataclass
class DedupResult:
    kept: list[dict]  # accounting rows of the samples to write
    dropped: list[dict] = field(default_factory=list)  # {"key", "reason", "of"}
    extra_captions: dict[str, list[str]] = field(default_factory=dict)  # keeper key -> merged

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for d in self.dropped:
            out[d["reason"]] += 1
        return dict(out)


def content_key(row: dict) -> str:
    """What two samples must share to be exact copies: the cleaned image's and audio's hashes."""
    audio = row.get("audio_sha") or ""
    return f"{row['pixel_sha']}:{audio}" if audio else row["pixel_sha"]


def _exact(rows: list[dict], result: DedupResult) -> list[dict]:
    """Collapse rows with identical pixels and audio; returns the keepers."""
    first: dict[str, dict] = {}
    keepers = []
    for row in rows:
        keeper = first.get(content_key(row))
        if keeper is None:
            first[content_key(row)] = row
            keepers.append(row)
            continue
        have = set(json.loads(keeper["captions"])) | set(result.extra_captions.get(keeper["key"], []))
        new = [c for c in json.loads(row["captions"]) if c not in have]
        if new:
            result.extra_captions.setdefault(keeper["key"], []).extend(new)
        new_qa = _new_qa(keeper, row)
        if new_qa:
            keeper["merged_qa"] = keeper.get("merged_qa", []) + new_qa
        reason = "duplicate_merged" if new or new_qa else "duplicate_exact"
        result.dropped.append({"key": row["key"], "reason": reason, "of": keeper["key"]})
    return keepers


def _new_qa(keeper: dict, row: dict) -> list[dict]:
    """The QA pairs of `row` that its keeper (with what was merged into it) does not have."""
    have = [_unspoken(p) for p in json.loads(keeper.get("qa") or "[]") + keeper.get("merged_qa", [])]
    new: list[dict] = []
    for pair in map(_unspoken, json.loads(row.get("qa") or "[]")):
        if pair not in have and pair not in new:
            new.append(pair)
    return new


def _unspoken(pair: dict) -> dict:
    """A QA pair without its spoken question: that audio is a member of its own sample, which a
    duplicate's merged pair cannot point at."""
    return {k: v for k, v in pair.items() if k != "audio"} if isinstance(pair, dict) else pair


def _bands(h: int, n: int) -> list[tuple[int, int]]:
    """Split 64 bits into n bands: two hashes within n-1 bits agree on at least one band."""
    width = -(-64 // n)
    return [(i, (h >> (i * width)) & ((1 << width) - 1)) for i in range(n)]


def _near(rows: list[dict], distance: int, result: DedupResult) -> list[dict]:
    """Greedy in key order: drop a row within `distance` bits of an earlier keeper."""
    if distance < 0:
        return rows
    n_bands = min(distance + 1, 64)
    buckets: dict[tuple, list[tuple[int, str]]] = {}
    keepers = []
    for row in rows:
        if not row["phash"]:  # no image: nothing to compare
            keepers.append(row)
            continue
        h = int(row["phash"], 16)
        bands = [(row.get("audio_sha") or "", *band) for band in _bands(h, n_bands)]
        match = None
        for band in bands:
            for other, key in buckets.get(band, ()):  # .get: a miss must not add an empty bucket
                if (h ^ other).bit_count() <= distance:
                    match = key
                    break
            if match:
                break
        if match:
            result.dropped.append({"key": row["key"], "reason": "duplicate_near", "of": match})
            continue
        keepers.append(row)
        for band in bands:
            buckets.setdefault(band, []).append((h, row["key"]))
    return keepers


def deduplicate(rows: list[dict], distance: int) -> DedupResult:
    """Rows are the kept accounting rows (any order); returns keepers sorted by input order."""
    result = DedupResult(kept=[])
    ordered = sorted(rows, key=lambda r: r["key"])
    keepers = _near(_exact(ordered, result), distance, result)
    result.kept = sorted(keepers, key=lambda r: r["order"])
    return result
