"""COCO captions: `annotations/captions_<split>.json` + `<split>/` image folders."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

from pipelines.core.storage import get_fs, join, read_json
from pipelines.ingest.sources.common import image_loc, make_ref, parent_of, reject_ref


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
    folder, name = parent_of(json_uri), json_uri.rsplit("/", 1)[-1]
    split = name.removeprefix("captions_").removesuffix(".json")
    root = folder.rsplit("/", 1)[0] if folder.rsplit("/", 1)[-1] == "annotations" else folder
    fs, path = get_fs(join(root, split))
    return join(root, split) if fs.isdir(path) else root


def _entries(data: dict, field: str, json_uri: str, rejects: list[dict]) -> list:
    """`data[field]` as a list; anything else is one reject (the file's field is unusable)."""
    value = data.get(field, [])
    if isinstance(value, list):
        return value
    rejects.append(reject_ref(f"{json_uri}#{field}", "malformed_record",
                              f"{json_uri}: '{field}' must be a list, not {type(value).__name__}", json_uri))
    return []


def _valid_id(value) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def _captions_by_image(data: dict, json_uri: str, rejects: list[dict]) -> dict:
    """image_id -> its captions; an annotation that is not an object with an id is a reject."""
    caps: dict = defaultdict(list)
    for i, ann in enumerate(_entries(data, "annotations", json_uri, rejects)):
        if not isinstance(ann, dict) or not _valid_id(ann.get("image_id")):
            rejects.append(reject_ref(f"{json_uri}#annotation{i}", "malformed_record",
                                      f"{json_uri}: annotation {i} must be an object with an integer or text "
                                      f"'image_id', not {type(ann).__name__}", json_uri))
            continue
        caps[ann["image_id"]].append(ann.get("caption", ""))
    return caps


def _image_ref(img, i: int, caps: dict, base: str, json_uri: str) -> dict:
    """The Ref of one `images` entry (a reject when it is not an object with a file name)."""
    if not isinstance(img, dict) or not _valid_id(img.get("id", "")):
        return reject_ref(f"{json_uri}#image{i}", "malformed_record",
                          f"{json_uri}: image {i} must be an object with an integer or text 'id'", json_uri)
    name = img.get("file_name")
    if not name:
        return reject_ref(img.get("id"), "missing_field", f"{json_uri}: image without file_name", json_uri)
    if not isinstance(name, str):
        return reject_ref(img.get("id"), "bad_field_type", f"{json_uri}: image {i}: file_name must be text", json_uri)
    meta = {k: img[k] for k in ("id", "license", "coco_url", "flickr_url", "date_captured") if k in img}
    meta["coco_file"] = name
    stem = name.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    return make_ref(stem, image_loc(name, base), caps.get(img.get("id"), []), [], meta, json_uri)


def read_coco(json_uri: str) -> Iterator[dict]:
    """One Ref per image (all its captions); orphan captions and malformed entries are rejects."""
    try:
        data = read_json(json_uri)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        yield reject_ref(json_uri, "malformed_json", f"{json_uri}: not JSON ({type(e).__name__})", json_uri)
        return
    if not isinstance(data, dict):
        yield reject_ref(json_uri, "malformed_json", f"{json_uri}: a COCO captions file holds an object", json_uri)
        return
    rejects: list[dict] = []
    caps = _captions_by_image(data, json_uri, rejects)
    base = _image_base(json_uri)
    known = set()
    for i, img in enumerate(_entries(data, "images", json_uri, rejects)):
        if isinstance(img, dict) and _valid_id(img.get("id")):
            known.add(img["id"])
        yield _image_ref(img, i, caps, base, json_uri)
    yield from rejects
    for image_id in sorted(set(caps) - known, key=str):
        yield reject_ref(f"orphan-{image_id}", "unknown_image_id", f"{json_uri}: captions for image_id {image_id} with no image entry", json_uri)


def list_coco(source: str) -> Iterator[dict]:
    for json_uri in caption_files(source):
        yield from read_coco(json_uri)
