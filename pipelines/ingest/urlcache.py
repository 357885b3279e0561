"""What cleaning each image URL gave, kept between ingests: a re-run after a kill, or on a URL
list that grew, downloads only the URLs it has not cleaned before.

One file per (URL, image cleaning settings) under `<root>/_urlcache/v<PIPELINE_VERSION>/`:
the cleaned JPEG with its size, format and perceptual-hash thumbnail, or the reason the image was
rejected (`not_an_image`, `too_small`, ...: a property of its bytes). Failed downloads are not
kept (a timeout or a 503 may pass), so the next run tries them again. Each file is written
under a temporary name and renamed, right after its image is cleaned: a killed ingest keeps
everything it finished, readers never see half a file, and ingests running at once that clean
the same URL write the same bytes. Deleting the folder is always safe: it only costs downloads.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json

from pipelines.core import storage
from pipelines.ingest.imageclean import CleanImage, ImageSpec

MAGIC = b"mmfusion-urlcache-1\n"


class UrlCache:
    def __init__(self, folder: str, spec: ImageSpec):
        self.folder = folder
        self.salt = json.dumps(dataclasses.asdict(spec), sort_keys=True)

    def path(self, url: str) -> str:
        key = hashlib.sha256(f"{self.salt}\n{url}".encode("utf-8", "surrogatepass")).hexdigest()
        return storage.join(self.folder, key[:2], f"{key}.bin")

    def get(self, url: str) -> CleanImage | tuple[str, str] | None:
        """The cleaned image, (reason, detail) of a rejected one, or None: not cleaned before
        (or an unreadable entry, which is then done again)."""
        fs, path = storage.get_fs(self.path(url))
        try:
            with fs.open(path, "rb") as f:
                blob = f.read()
            if not blob.startswith(MAGIC):
                return None
            head, _, jpeg = blob[len(MAGIC):].partition(b"\n")
            doc = json.loads(head)
            if doc.get("url") != url:
                return None
            if "reason" in doc:
                return doc["reason"], doc.get("detail", "")
            return CleanImage(jpeg, int(doc["width"]), int(doc["height"]), doc["format"],
                              base64.b64decode(doc["thumb"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def put(self, url: str, result: CleanImage | tuple[str, str]) -> None:
        if isinstance(result, CleanImage):
            doc = {"url": url, "width": result.width, "height": result.height, "format": result.format,
                   "thumb": base64.b64encode(result.thumb).decode("ascii")}
            body = result.jpeg
        else:
            doc, body = {"url": url, "reason": result[0], "detail": result[1]}, b""
        head = json.dumps(doc, ensure_ascii=True).encode("ascii")
        storage.write_bytes_atomic(self.path(url), MAGIC + head + b"\n" + body)
