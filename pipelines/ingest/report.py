"""report.json and rejects.jsonl from the accounting rows and the dedup result."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from pipelines.config import DataConfig
from pipelines.core.dataset import SPLITS, entries_by_split
from pipelines.ingest.dedup import DedupResult


def media_counts(kept: list[dict]) -> dict[str, dict[str, float]]:
    """Per split, the kept samples with an image, with audio, and the audio's seconds."""
    out = {}
    for split in SPLITS:
        mine = [r for r in kept if r["split"] == split]
        out[split] = {"images": sum(1 for r in mine if r["pixel_sha"]),
                      "audio": sum(1 for r in mine if r.get("audio_sha")),
                      "audio_s": round(sum(r.get("audio_s") or 0.0 for r in mine), 3)}
    return out


def build_report(version: str, rows: list[dict], result: DedupResult, entries: list[dict], cfg: DataConfig) -> dict[str, Any]:
    """Counts with `seen == kept + sum(rejected) + duplicates`, checked before returning."""
    rejected = Counter(r["reason"] for r in rows if r["reason"])
    dups = result.counts()
    dropped_text = Counter(reason for r in rows if not r["reason"] for reason in json.loads(r["dropped"]))
    per_split = {}
    media = media_counts(result.kept)
    for split, mine in entries_by_split(entries).items():
        per_split[split] = {"samples": sum(e["samples"] for e in mine), "shards": len(mine),
                            "bytes": sum(e["bytes"] for e in mine), **media[split]}
    report = {
        "version": version,
        "seen": len(rows),
        "kept": len(result.kept),
        "rejected": dict(sorted(rejected.items())),
        "duplicates": sum(dups.values()),
        "dedup": {"exact": dups.get("duplicate_exact", 0), "merged": dups.get("duplicate_merged", 0),
                  "near": dups.get("duplicate_near", 0), "distance": cfg.dedup_distance},
        "per_split": per_split,
        "media": {k: round(sum(m[k] for m in media.values()), 3) for k in ("images", "audio", "audio_s")},
        "captions": {"kept": sum(len(json.loads(r["captions"])) for r in result.kept)
                     + sum(len(v) for v in result.extra_captions.values()),
                     "dropped": dict(sorted(dropped_text.items()))},
    }
    total = report["kept"] + sum(rejected.values()) + report["duplicates"]
    if total != report["seen"]:
        raise AssertionError(f"ingest accounting broken: seen {report['seen']} != {total}")
    return report


def rejects_lines(rows: list[dict], result: DedupResult) -> bytes:
    """One JSON line per dropped input: rejects, then duplicates (with the key they copy)."""
    lines = []
    for r in rows:
        if r["reason"]:
            lines.append({"key": r["key"], "id": r["id"], "reason": r["reason"], "detail": r["detail"],
                          "source": r["source"], "image": r["image"], **_audio(r)})
    by_key = {r["key"]: r for r in rows}
    for d in result.dropped:
        r = by_key[d["key"]]
        lines.append({"key": d["key"], "id": r["id"], "reason": d["reason"], "of": d["of"],
                      "source": r["source"], "image": r["image"], **_audio(r)})
    return "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines).encode("utf-8")


def _audio(row: dict) -> dict:
    """The `audio` field of a rejects line: only for an input that named audio."""
    return {"audio": row["audio"]} if row.get("audio") else {}
