"""Reading a dataset version back: a summary (`inspect_version`) and a full check
(`validate_version`: every checksum, every sample decoded)."""

from __future__ import annotations

import hashlib
import io
from typing import Any

import soundfile as sf

from mmcore.data import parse_sample
from pipelines.core.dataset import (
    SPLITS,
    all_split_entries,
    read_manifest,
    read_report,
    read_shard,
    split_entries,
)
from pipelines.core.storage import get_fs, join


def iter_samples(paths: list[str]):
    """Samples of the given shards, in order (webdataset's tar reader; local or object storage)."""
    for path in paths:
        yield from read_shard(path)


def inspect_version(version_dir: str, num_samples: int = 3) -> dict[str, Any]:
    manifest, report = read_manifest(version_dir), read_report(version_dir)
    splits = {s: {"samples": sum(e["samples"] for e in v), "shards": len(v), "bytes": sum(e["bytes"] for e in v)}
              for s, v in all_split_entries(manifest).items()}
    examples = []
    paths = [join(version_dir, e["path"]) for e in split_entries(manifest, "train")][:1]
    for sample in map(parse_sample, iter_samples(paths)):
        doc = sample.meta
        example = {"key": sample.key, "caption": sample.caption, "captions": len(doc["captions"]), "qa": len(sample.qa)}
        if "width" in doc:
            example["size"] = [doc["width"], doc["height"]]
        if "audio" in doc:
            example["audio_s"] = doc["audio"]["duration_s"]
        examples.append(example)
        if len(examples) >= num_samples:
            break
    return {"version": manifest["version"], "created": manifest["created"], "format": manifest.get("format"),
            "inputs": manifest["inputs"], "splits": splits, "seen": report["seen"], "kept": report["kept"],
            "rejected": report["rejected"], "duplicates": report["duplicates"], "dedup": report.get("dedup"),
            "media": report.get("media"), "examples": examples}


def _check_sample(uri: str, split: str, sample: dict) -> list[str]:
    """Problems of one sample: members missing, an image that is not RGB JPEG, audio that is not
    mono FLAC at the version's rate, the wrong split."""
    from PIL import Image

    key = sample.get("__key__")
    missing = sorted({"txt", "json"} - sample.keys()) + ([] if {"jpg", "flac"} & sample.keys() else ["jpg|flac"])
    if missing:
        return [f"{uri}: {key}: missing members {missing}"]
    problems = []
    if "jpg" in sample:
        img = Image.open(io.BytesIO(sample["jpg"]))
        img.load()
        if img.mode != "RGB":
            problems.append(f"{uri}: {key}: mode {img.mode} (expected RGB)")
    parsed = parse_sample(sample)
    spoken = [p["audio"] for p in parsed.qa if isinstance(p, dict) and p.get("audio")]
    for name in (["flac"] if "flac" in sample else []) + spoken:
        if name not in sample:
            problems.append(f"{uri}: {key}: a QA pair names member {name!r}, which the sample lacks")
            continue
        info = sf.info(io.BytesIO(sample[name]))
        if info.format != "FLAC" or info.channels != 1 or info.frames == 0:
            problems.append(f"{uri}: {key}: {name}: {info.format} {info.channels} ch {info.frames} frames "
                            "(expected mono FLAC)")
    got = parsed.split
    if got != split:
        problems.append(f"{uri}: {key}: split {got} (expected {split})")
    return problems


def _check_shard(version_dir: str, split: str, entry: dict) -> tuple[list[str], int]:
    """(problems, samples decoded) for one shard."""
    uri = join(version_dir, entry["path"])
    fs, path = get_fs(uri)
    if not fs.exists(path):
        return [f"{uri}: missing"], 0
    data = fs.cat_file(path)
    problems = []
    if hashlib.sha256(data).hexdigest() != entry["sha256"] or len(data) != entry["bytes"]:
        problems.append(f"{uri}: sha256/size differ from the manifest")
    n = 0
    try:
        for sample in iter_samples([uri]):
            problems += _check_sample(uri, split, sample)
            n += 1
    except Exception as e:  # noqa: BLE001 - report, don't crash: this is a validator
        problems.append(f"{uri}: unreadable after {n} samples: {type(e).__name__}: {e}")
    if n != entry["samples"]:
        problems.append(f"{uri}: {n} samples decoded, manifest says {entry['samples']}")
    return problems, n


def validate_version(version_dir: str) -> dict[str, Any]:
    """`{"ok", "problems": [...], "samples": n}`: every checksum checked, every sample decoded."""
    manifest, report = read_manifest(version_dir), read_report(version_dir)
    problems: list[str] = []
    total = 0
    for split in SPLITS:
        for entry in split_entries(manifest, split):
            p, n = _check_shard(version_dir, split, entry)
            problems += p
            total += n
    if total != report["kept"]:
        problems.append(f"{total} samples in shards, report says kept={report['kept']}")
    accounted = report["kept"] + sum(report["rejected"].values()) + report["duplicates"]
    if accounted != report["seen"]:
        problems.append(f"report: seen {report['seen']} != kept + rejected + duplicates = {accounted}")
    return {"ok": not problems, "problems": problems, "samples": total}
