"""Builders of raw test inputs for the ingest tests: images of every awkward kind, a bad-input
corpus in the raw JSONL format with the reason each case must be rejected with, and a local
HTTP server that also serves errors, slow replies and wrong content types."""

from __future__ import annotations

import http.server
import io
import json
import shutil
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.ingest.synth import make_sample


def scene(i: int, seed: int = 7) -> Image.Image:
    return make_sample(seed, i)[1]


def encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_with_header_size(width: int, height: int) -> bytes:
    """A small real PNG whose IHDR claims width x height (CRC fixed): a decompression bomb."""
    png = encode(scene(0), "PNG")
    ihdr = b"IHDR" + struct.pack(">II", width, height) + png[24:29]
    return png[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr) & 0xFFFFFFFF) + png[33:]


def exif_rotated_jpeg() -> bytes:
    """A 120x80 JPEG whose EXIF orientation (6) says: rotate 90 degrees -> shown as 80x120."""
    img = scene(1).resize((120, 80))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(img, "JPEG", exif=exif.tobytes())


def awkward_images() -> dict[str, bytes]:
    """Images that must be KEPT after conversion to RGB."""
    base = scene(2)
    grey16 = (np.asarray(base.convert("L")).astype(np.uint16) * 257)
    rgba = np.asarray(base.convert("RGBA")).copy()
    rgba[:40, :, 3] = 0  # top rows fully transparent -> white after compositing
    return {
        "cmyk": encode(scene(3).convert("CMYK"), "JPEG"),
        "palette": encode(scene(4).convert("P"), "PNG"),
        "grey": encode(scene(5).convert("L"), "PNG"),
        "grey16": encode(Image.fromarray(grey16), "PNG"),
        "alpha": encode(Image.fromarray(rgba), "PNG"),
        "exif": exif_rotated_jpeg(),
        "webp": encode(scene(6), "WEBP"),
    }


# (case name, expected reason, line writer). Each writer returns a JSONL object (or raw bytes).
def build_bad_corpus(root: Path) -> dict[str, str]:
    """Write `root/samples.jsonl` + images; returns {id: expected reason or "kept"}."""
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str] = {}
    lines: list[bytes] = []

    def add(sid: str, reason: str, image_bytes: bytes | None, captions=None, name=None, raw: bytes | None = None):
        expected[sid] = reason
        if raw is not None:
            lines.append(raw)
            return
        name = name or f"{sid}.img"
        if image_bytes is not None:
            (img_dir / name).write_bytes(image_bytes)
        caps = captions if captions is not None else [f"a test scene number {sid}"]
        lines.append(json.dumps({"id": sid, "image": f"images/{name}", "captions": caps}).encode())

    for i in range(6):
        add(f"good{i}", "kept", encode(scene(10 + i)))
    for name, data in awkward_images().items():
        add(f"conv-{name}", "kept", data)
    png = encode(scene(20), "PNG")
    jpg = encode(scene(21))
    add("zero", "empty_file", b"")
    add("trunc", "truncated_image", jpg[: len(jpg) // 2])
    add("corrupt", "corrupt_image", png[:200] + bytes(b ^ 0x5A for b in png[200:400]) + png[400:])
    add("notimage", "not_an_image", b"this is plain text, not an image\n" * 10)
    add("ppm", "unsupported_format", encode(scene(22), "PPM"))
    add("bomb", "decompression_bomb", png_with_header_size(200_000, 200_000))
    add("small", "too_small", encode(scene(23).resize((10, 10)), "PNG"))
    add("thin", "bad_aspect_ratio", encode(scene(24).resize((400, 30)), "PNG"))
    add("nofile", "missing_image", None, name="does-not-exist.jpg")
    add("emptycap", "caption_empty", encode(scene(25)), captions=["  <b> </b> \u200b "])
    add("shortcap", "caption_too_short", encode(scene(26)), captions=["ab"])
    add("longcap", "caption_too_long", encode(scene(27)), captions=["word " * 200])
    add("badjson", "malformed_json", None, raw=b'{"id": "badjson", "image": ')
    add("nofield", "missing_field", None, raw=json.dumps({"id": "nofield", "captions": ["a caption"]}).encode())
    add("badutf8", "invalid_encoding", None, raw=b'{"id": "badutf8", "image": "x.jpg", "captions": ["caf\xe9"]}')
    add("surrogate", "invalid_encoding", encode(scene(28)), captions=["bad \ud800 text"])
    # duplicates: the same id twice; the same image+captions; same image other captions; near copy
    lines.append(json.dumps({"id": "good0", "image": "images/good0.img", "captions": ["again"]}).encode())
    expected["good0#dup"] = "duplicate_id"
    shutil.copy(img_dir / "good1.img", img_dir / "zz-exact.img")
    add("zz-exact", "duplicate_exact", None, captions=["a test scene number good1"], name="zz-exact.img")
    shutil.copy(img_dir / "good2.img", img_dir / "zz-merge.img")
    add("zz-merge", "duplicate_merged", None, captions=["another caption for this scene"], name="zz-merge.img")
    add("zz-near", "duplicate_near", encode(scene(13).resize((100, 100)), quality=70))
    (root / "samples.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return expected


# ----------------------------------------------------------------------------- HTTP server


class QuietHandler(http.server.BaseHTTPRequestHandler):
    """The tests' request handlers: no access log, and `_send(code, ctype, body, **headers)`
    (`Retry_After="1"` sends `Retry-After: 1`)."""

    def log_message(self, *args):  # keep test output clean
        pass

    def _send(self, code: int, ctype: str, body: bytes, **headers) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k.replace("_", "-"), v)
        self.end_headers()
        self.wfile.write(body)


class _Handler(QuietHandler):
    image = b""
    hits: dict[str, int] = {}

    def do_GET(self):  # noqa: N802 - http.server's naming
        n = self.hits[self.path] = self.hits.get(self.path, 0) + 1
        if self.path.startswith("/ok"):
            self._send(200, "image/jpeg", self.image)
        elif self.path.startswith("/flaky"):  # fails once, then works: a retry must fetch it
            self._send(503, "text/plain", b"busy") if n == 1 else self._send(200, "image/jpeg", self.image)
        elif self.path.startswith("/html"):
            self._send(200, "text/html; charset=utf-8", b"<html>not an image</html>")
        elif self.path.startswith("/missing"):
            self._send(404, "text/plain", b"no such image")
        elif self.path.startswith("/error"):
            self._send(500, "text/plain", b"server error")
        elif self.path.startswith("/slow"):
            time.sleep(3)
            self._send(200, "image/jpeg", self.image)
        else:
            self._send(404, "text/plain", b"?")


class _ThreadingServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # many connections at once: no SYN queue overflow (1 s retransmits)


class LocalHTTPServer:
    """A threaded HTTP server with `handler` on `host` (random port); `url(path)` for links,
    `url(path, host)` to reach it under another name (e.g. "localhost")."""

    def __init__(self, handler: type, host: str = "127.0.0.1"):
        self.server = _ThreadingServer((host, 0), handler)
        self.host = host
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, path: str, host: str | None = None) -> str:
        return f"http://{host or self.host}:{self.server.server_address[1]}{path}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


class ImageServer(LocalHTTPServer):
    """The corpus's image server on 127.0.0.1: `hits` counts requests per path."""

    def __init__(self, image: bytes):
        handler = type("Handler", (_Handler,), {"image": image, "hits": {}})
        super().__init__(handler)
        self.hits = handler.hits


def stage_rows(source, fmt: str, tmp_path: Path, cfg) -> list[dict]:
    """The accounting rows of every input of `source` through the real cleaning step (one per Ref:
    nothing is lost on the way)."""

    from pipelines.ingest import stage
    from pipelines.ingest.driver import collect_refs

    refs = collect_refs(str(source), fmt, cfg)
    rows = stage.process_batch([json.dumps(r) for r in refs], cfg.model_dump(mode="json"), str(tmp_path / "stage"))
    assert [r["order"] for r in rows] == [r["order"] for r in refs]
    return rows
