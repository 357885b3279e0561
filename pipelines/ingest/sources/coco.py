"""COCO captions: `annotations/captions_<split>.json` + `<split>/` image folders."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

from pipelines.core.storage import get_fs, join, read_json
from pipelines.ingest.sources.common import image_loc, make_ref, reject_ref


def caption_files(source: str) -> list[str]:
    """The captions JSON files of a COCO folder (or the one file given)."""
    fs, path = get_fs(source)
    if fs.isfile(path):
        return [source]
    found = sorted(fs.glob(join(path, "annotations", "captions_*.json")))
    if not found:
        raise FileNotFoundError(
            f"{source}: no annotations/captions_*.json. A COCO source is the folder holding "
            "annotations/ and the image folders, or one captions JSON file."
        )
    prefix = source.split("://")[0] + "://" if "://" in source else ""
    return [prefix + f if prefix and not f.startswith(prefix) else f for f in found]


def _image_base(json_uri: str) -> str:
    """`.../annotations/captions_val2017.json` -> `.../val2017`, else the JSON's own folder."""
    folder, name = json_uri.rsplit("/", 1)
    split = name.removeprefix("captions_").removesuffix(".json")
    root = folder.rsplit("/", 1)[0] if folder.rsplit("/", 1)[-1] == "annotations" else folder
    fs, path = get_fs(join(root, split))
    return join(root, split) if fs.isdir(path) else root


def read_coco(json_uri: str) -> Iterator[dict]:
    """One Ref per image (all its captions); orphan captions are rejects."""
    data = read_json(json_uri)
    base = _image_base(json_uri)
    caps: dict = defaultdict(list)
    for ann in data.get("annotations", []):
        caps[ann.get("image_id")].append(ann.get("caption", ""))
    known = set()
    for img in data.get("images", []):
        known.add(img.get("id"))
        name = img.get("file_name")
        if not name:
            yield reject_ref(img.get("id"), "missing_field", f"{json_uri}: image without file_name", json_uri)
            continue
        meta = {k: img[k] for k in ("id", "license", "coco_url", "flickr_url", "date_captured") if k in img}
        meta["coco_file"] = name
        stem = name.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        yield make_ref(stem, image_loc(name, base), caps.get(img.get("id"), []), [], meta, json_uri)
    for image_id in sorted(set(caps) - known, key=str):
        yield reject_ref(f"orphan-{image_id}", "unknown_image_id", f"{json_uri}: captions for image_id {image_id} with no image entry", json_uri)


def list_coco(source: str) -> Iterator[dict]:
    for json_uri in caption_files(source):
        yield from read_coco(json_uri)
