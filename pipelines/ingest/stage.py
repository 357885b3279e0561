"""The cleaning map of an ingest: one Ref in, one small accounting row out.

Runs in Ray tasks (`driver._clean_all`). For each Ref it cleans the text, fetches and cleans the image, and
assigns the split, a group of Refs at a time and step by step (see `process_batch`). Kept samples
are serialised as their final tar members into a staging file per batch and split (named by the
batch's first input position, so a retried task rewrites the same file), and only the small
accounting row (key, reason, hashes, where staged) flows back to the driver. Writing the shards
later copies those bytes (`shards.py`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import re
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from pipelines.config import DataConfig
from pipelines.core.storage import is_remote, join, open_atomic
from pipelines.ingest.audioclean import AudioReject, AudioSpec, CleanAudio, clean_audio
from pipelines.ingest.download import DownloadLimits, Downloads
from pipelines.ingest.fetch import FetchError, FetchLimits, fetch, scheme_of
from pipelines.ingest.imageclean import CleanImage, ImageReject, ImageSpec, clean_image
from pipelines.ingest.phash import phash_many
from pipelines.ingest.shards import MemberWriter
from pipelines.ingest.sources.common import safe_text
from pipelines.ingest.textclean import clean_captions, clean_qa
from pipelines.ingest.urlcache import UrlCache
from pipelines.runtime import quiet_loggers

META_FIELDS = ("order", "key", "id", "reason", "detail", "source", "image", "split", "phash",
               "pixel_sha", "caption_sha", "nbytes", "stage_file", "stage_offset", "captions", "dropped",
               "file_sha", "qa", "audio", "audio_sha", "audio_s")


def split_of(key: str, fractions: dict[str, float]) -> str:
    """The split is a function of the key alone: stable when data is added."""
    u = int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:15], 16) / 16**15
    total = sum(fractions.values())
    acc = 0.0
    for name, frac in fractions.items():
        acc += frac / total
        if u < acc:
            return name
    return list(fractions)[-1]


log = logging.getLogger(__name__)


def _text(value: Any, limit: int = 10_000) -> str:
    """A row's text field: always writable as UTF-8 (a lone surrogate would fail the whole batch)."""
    return safe_text(value if isinstance(value, str) else str(value or ""), limit)


def _row(ref: dict, reason: str = "", detail: str = "", **kw: Any) -> dict:
    loc = ref.get("image") if isinstance(ref.get("image"), dict) else {}
    aloc = ref.get("audio") if isinstance(ref.get("audio"), dict) else {}
    row = {"order": ref["order"], "key": ref["key"], "id": _text(ref.get("id")), "reason": reason,
           "detail": _text(detail, 500), "source": _text(ref.get("source")), "image": _text(loc.get("uri")),
           "split": "", "phash": "", "pixel_sha": "", "caption_sha": "", "nbytes": 0,
           "stage_file": "", "stage_offset": -1, "captions": "[]", "dropped": "[]", "file_sha": "",
           "qa": "[]", "audio": _text(aloc.get("uri")), "audio_sha": "", "audio_s": 0.0}
    row.update(kw)
    return row


_BYTES_LITERAL = re.compile(r"""b(['"]).*?(?<!\\)\1""")
_LONG_QUOTE = re.compile(r"""(['"])[^'"]{40,}\1""")


def error_summary(e: BaseException) -> str:
    """`Type: message` for a reject's detail, short and without the data that caused it: bytes
    literals and quoted texts over 40 characters (file or record contents) are left out."""
    msg = str(e).splitlines()[0] if str(e) else ""
    msg = _LONG_QUOTE.sub("'<text>'", _BYTES_LITERAL.sub("<bytes>", msg))
    return safe_text(f"{type(e).__name__}: {msg}" if msg else type(e).__name__, 160)


def _failed(ref: dict, step: str, e: BaseException) -> dict:
    """The reject row of a Ref whose `step` raised; the traceback goes to the log."""
    log.warning("ingest: %s failed on record %s (key %s); it is rejected as processing_error",
                step, _text(ref.get("id"), 200), ref.get("key"), exc_info=e)
    return _row(ref, "processing_error", f"{step}: {error_summary(e)}")


def _guarded(step: str, fn, item, *args):
    """`fn(item, *args)`, or the reject row of the item's Ref when it raises: one record that the
    code does not expect costs one reject, never the batch (and with it the whole ingest)."""
    try:
        return fn(item, *args)
    except Exception as e:  # noqa: BLE001 - any error here is about this one record
        return _failed(item.ref if isinstance(item, _Cleaned) else item, step, e)


GROUP = 32  # Refs taken through each step together (see `process_batch`)
READ_AHEAD_BYTES = 8 << 20  # image bytes a group reads before decoding (the rest: read when decoded)
STREAM_ROWS = 512  # rows `process_stream` hands back at a time (~4 s of one worker's URLs at 100 ms)


@dataclass
class _Cleaned:
    """A Ref whose text (and later image) passed cleaning, on its way to hashes and tar members."""

    ref: dict
    captions: list[str]
    qa: list[dict]
    dropped: list[str]
    data: bytes | None = None  # the image's bytes, once read
    file_sha: str = ""
    img: CleanImage | None = None
    aud: CleanAudio | None = None
    qa_audio: dict[str, CleanAudio] = dataclasses.field(default_factory=dict)  # member name -> spoken question


def _clean_text(ref: dict, cfg: DataConfig) -> dict | _Cleaned:
    """The Ref's reject row, or its cleaned captions and QA pairs."""
    if ref.get("reject"):
        return _row(ref, ref["reject"], ref.get("detail", ""))
    captions, dropped = clean_captions(ref["captions"], cfg.min_caption_chars, cfg.max_caption_chars)
    qa, qa_dropped = clean_qa(ref["qa"], cfg.max_caption_chars)
    if not captions and not qa:
        return _row(ref, dropped[0] if dropped else "no_captions", "no usable caption or QA pair")
    if not ref.get("image") and not ref.get("audio"):
        return _row(ref, "missing_field", "no image or audio")
    return _Cleaned(ref, captions, qa, dropped + qa_dropped)


def _read(c: _Cleaned, cfg: DataConfig, hash_files: bool) -> dict | _Cleaned:
    """Read the image's bytes: the reject row, or `c` with them.

    With `hash_files`, a whole local image file read here also gets its sha256 (`file_sha`): the
    driver's content fingerprint then need not read it again (`fingerprint.py`).
    """
    loc = c.ref["image"]
    try:
        c.data = fetch(loc, limits=FetchLimits.of(cfg))
    except FetchError as e:
        return _row(c.ref, e.reason, e.detail)
    if hash_files and loc["kind"] == "path" and not is_remote(loc["uri"]):
        c.file_sha = hashlib.sha256(c.data).hexdigest()
    return c


def _clean_image(c: _Cleaned, cfg: DataConfig, spec: ImageSpec, hash_files: bool) -> dict | _Cleaned:
    """Read the image if that is not done yet, verify and clean it: the reject row, or `c` with
    the cleaned image (and its raw bytes let go)."""
    if c.img is not None or not c.ref.get("image"):  # cleaned by an earlier ingest (`urlcache.py`), or none
        return c
    if c.data is None and isinstance(r := _read(c, cfg, hash_files), dict):
        return r
    data, c.data = c.data, b""
    try:
        c.img = clean_image(data, spec)
    except ImageReject as e:
        return _row(c.ref, e.reason, e.detail, file_sha=c.file_sha)
    return c


def _sample(c: _Cleaned, phash: int | None, cfg: DataConfig) -> tuple[dict, dict]:
    """(accounting row, tar sample) of a cleaned Ref: `jpg` when it has an image, `flac` when it
    has audio (the `json` member then says what the audio was: `audio`)."""
    ref, img, aud = c.ref, c.img, c.aud
    split = split_of(ref["key"], cfg.split_fractions)
    doc = {"id": ref["id"], "captions": c.captions, "qa": c.qa, "split": split, "source": ref["source"]}
    meta = dict(ref["meta"])
    if img is not None:
        doc.update(width=img.width, height=img.height)
        meta["format"] = img.format
    if aud is not None:
        doc["audio"] = {"duration_s": aud.duration_s, "sample_rate": aud.sample_rate, "channels": aud.channels,
                        "format": aud.format, "subtype": aud.subtype}
    doc["meta"] = meta
    txt = c.captions[0] if c.captions else ""
    staged = {"__key__": ref["key"], "txt": txt.encode("utf-8"), "json": json.dumps(doc, ensure_ascii=False).encode("utf-8")}
    if img is not None:
        staged["jpg"] = img.jpeg
    if aud is not None:
        staged["flac"] = aud.flac
    staged.update({name: a.flac for name, a in c.qa_audio.items()})
    row = _row(ref, split=split, phash="" if phash is None else f"{phash:016x}", pixel_sha=img.pixel_sha if img else "",
               caption_sha=hashlib.sha256("\n".join(sorted(c.captions)).encode()).hexdigest(),
               captions=json.dumps(c.captions, ensure_ascii=False), dropped=json.dumps(c.dropped),
               file_sha=c.file_sha, qa=json.dumps(c.qa, ensure_ascii=False),
               audio_sha=aud.pcm_sha if aud else "", audio_s=aud.duration_s if aud else 0.0)
    return row, staged


_AUDIO_FETCH_REASONS = {"missing_image": "missing_audio", "unreadable_image": "unreadable_audio"}


def _clean_audio(c: _Cleaned, cfg: DataConfig, spec: AudioSpec) -> dict | _Cleaned:
    """Read and clean the Ref's audio and its spoken questions, if it has any: the reject row, or
    `c` with the cleaned audio (each spoken question becomes member `q<k>.flac`, which its QA pair
    names as `audio`)."""
    if c.ref.get("audio") and c.aud is None:
        got = _audio_of(c.ref["audio"], cfg, spec)
        if isinstance(got, tuple):
            return _row(c.ref, got[0], got[1], file_sha=c.file_sha)
        c.aud = got
    for k, pair in enumerate(c.qa):
        if isinstance(pair.get("audio"), dict):
            got = _audio_of(pair["audio"], cfg, spec)
            if isinstance(got, tuple):
                return _row(c.ref, got[0], f"question {k} spoken: {got[1]}", file_sha=c.file_sha)
            c.qa_audio[f"q{k}.flac"] = got
            pair["audio"] = f"q{k}.flac"
    return c


def _audio_of(loc: dict, cfg: DataConfig, spec: AudioSpec) -> CleanAudio | tuple[str, str]:
    """The cleaned audio at `loc`, or (reason, detail) why there is none."""
    limits = dataclasses.replace(FetchLimits.of(cfg), max_bytes=cfg.max_audio_bytes)
    try:
        data = fetch(loc, limits=limits)
    except FetchError as e:  # fetch speaks of images: say audio
        detail = e.detail.replace("data.max_image_bytes", "data.max_audio_bytes")
        return _AUDIO_FETCH_REASONS.get(e.reason, e.reason), detail
    try:
        return clean_audio(data, spec)
    except AudioReject as e:
        return e.reason, e.detail


def _phashes(results: list) -> list:
    """The perceptual hash of each cleaned image in `results`, or its reject row where hashing it
    failed (the group is hashed at once, and only when that fails one image at a time)."""
    cleaned = [r for r in results if isinstance(r, _Cleaned) and r.img is not None]
    try:
        return [int(h) for h in phash_many([c.img.thumb for c in cleaned])]
    except Exception:  # noqa: BLE001 - find the image that fails; the others are hashed alone
        return [_guarded("phash", lambda c: int(phash_many([c.img.thumb])[0]), c) for c in cleaned]


def _process_group(results: list, cfg: DataConfig, spec: ImageSpec, hash_files: bool) -> list:
    """Each text-cleaned Ref (`_Cleaned`, or already a reject row) of a group through the other
    steps: its reject row, or its (row, tar sample)."""
    results = list(results)
    held = 0
    for i, r in enumerate(results):  # read ahead, while the bytes held stay under the cap
        if isinstance(r, _Cleaned) and r.ref.get("image") and r.img is None and held < READ_AHEAD_BYTES:
            results[i] = r = _guarded("read_image", _read, r, cfg, hash_files)
            held += len(r.data) if isinstance(r, _Cleaned) else 0
    results = [_guarded("clean_image", _clean_image, r, cfg, spec, hash_files) if isinstance(r, _Cleaned) else r
               for r in results]
    return _serialise(results, cfg)


def _serialise(results: list, cfg: DataConfig) -> list:
    """The audio of each Ref cleaned (`_clean_audio`), then the images hashed and each made a tar
    sample: each a reject row or (row, tar sample)."""
    aspec = AudioSpec.of(cfg)
    results = [_guarded("clean_audio", _clean_audio, r, cfg, aspec) if isinstance(r, _Cleaned) else r
               for r in results]
    hashes = iter(_phashes(results))
    out = []
    for r in results:
        if isinstance(r, _Cleaned):
            h = next(hashes) if r.img is not None else None
            c, r = r, _guarded("serialise", _sample, r, h, cfg) if not isinstance(h, dict) else h  # h: a reject row
            # its bytes are in the tar sample now: the callers' lists of Refs (a whole task's
            # URLs) hold the Ref until the task ends, and must not hold its image that long
            c.data, c.img, c.aud, c.qa_audio = None, None, None, {}
        out.append(r)
    return out


def _is_web(r: Any) -> bool:
    if not isinstance(r, _Cleaned):
        return False
    loc = r.ref.get("image") or {}
    return loc.get("kind") == "url" or scheme_of(str(loc.get("uri", ""))) in ("http", "https")


def _host(c: _Cleaned) -> str:
    try:
        return (urllib.parse.urlsplit(str(c.ref["image"]["uri"]).strip()).hostname or "").lower()
    except ValueError:  # a malformed URL: fetch rejects it as bad_url
        return ""


Claim = Callable[[list[int]], bool]  # may these inputs (by `order`) be started? See `process_stream`


def _order(r: dict | _Cleaned) -> int:
    return r.ref["order"] if isinstance(r, _Cleaned) else r["order"]


def _results(refs: list[dict], cfg: DataConfig, spec: ImageSpec, hash_files: bool,
             cache: UrlCache | None, claim: Claim | None = None) -> Iterator:
    """Every Ref's result (reject row or (row, tar sample)): local images a group at a time,
    URLs as their downloads finish (`_web_results`). With `claim`, each group (each download)
    is claimed first, and the first refusal ends the inputs started."""
    texts = [_guarded("clean_text", _clean_text, ref, cfg) for ref in refs]
    web = [r for r in texts if _is_web(r)]
    rest = [r for r in texts if not _is_web(r)]
    for start in range(0, len(rest), GROUP):
        group = rest[start : start + GROUP]
        if claim is not None and not claim([_order(r) for r in group]):
            return
        yield from _process_group(group, cfg, spec, hash_files)
    if web:
        yield from _web_results(web, cfg, spec, cache, claim)


def _web_results(cleaned: list[_Cleaned], cfg: DataConfig, spec: ImageSpec, cache: UrlCache | None,
                 claim: Claim | None = None) -> Iterator:
    """URL images: those cleaned by an earlier ingest from `cache`, the others downloaded many
    at a time (`download.py`) and cleaned as they arrive, while the rest download."""
    todo, done = [], []
    for c in cleaned:
        got = cache.get(c.ref["image"]["uri"]) if cache else None
        if isinstance(got, CleanImage):
            c.img = got
        elif isinstance(got, tuple):
            c = _row(c.ref, got[0], got[1])
        (todo if got is None else done).append(c)
    for start in range(0, len(done), GROUP):
        group = done[start : start + GROUP]
        if claim is not None and not claim([_order(r) for r in group]):
            return
        yield from _serialise(group, cfg)
    limits = FetchLimits.of(cfg)
    one = None if claim is None else lambda c: claim([c.ref["order"]])
    with Downloads(todo, _host, lambda c: fetch(c.ref["image"], limits=limits), DownloadLimits.of(cfg), one) as dl:
        for arrived in dl.batches(GROUP):
            yield from _serialise([_guarded("clean_image", _clean_fetched, c, got, cfg, spec, cache)
                                   for c, got in arrived], cfg)


def _clean_fetched(c: _Cleaned, got: Any, cfg: DataConfig, spec: ImageSpec, cache: UrlCache | None) -> dict | _Cleaned:
    """A downloaded image cleaned (and what that gave kept in `cache`); a failed download's row."""
    if isinstance(got, FetchError):
        return _row(c.ref, got.reason, got.detail)
    if isinstance(got, BaseException):
        return _failed(c.ref, "read_image", got)
    c.data = got
    r = _clean_image(c, cfg, spec, False)
    if cache is not None and (isinstance(r, _Cleaned) or r["reason"] != "processing_error"):
        try:
            cache.put(c.ref["image"]["uri"], r.img if isinstance(r, _Cleaned) else (r["reason"], r["detail"]))
        except OSError as e:  # the sample is fine; only a re-run will download it again
            log.warning("ingest: cannot keep %s in the URL cache: %s", c.ref["image"]["uri"], e)
    return r


def process_batch(lines: list[str], cfg_dict: dict, staging_dir: str, hash_files: bool = False,
                  url_cache: str = "") -> list[dict]:
    """One cleaning task: Refs (JSON lines) -> their accounting rows, in input order; never
    raises for bad data: a record that fails any step is a reject row (`processing_error` when
    the error was not one the steps expect, with its traceback in the log). Only the staging
    files' own I/O errors raise (the task is then retried).

    The kept samples are staged as tar members in one file per split, so that writing a split's
    shards later reads only that split's bytes. `nbytes` is the sample's exact size in a tar.

    The Refs go through the steps GROUP at a time rather than one Ref through all of them:
    clean the text; read the image files (and hash them), up to READ_AHEAD_BYTES; decode, resize
    and re-encode each image; hash the cleaned images and write their tar members. Decoding an
    image evicts everything else from the CPU caches, so the code of every other step would
    otherwise run cold once per image (measured: ~20 us per numpy call instead of ~1-2; in all,
    the grouped steps make a batch ~5-8% cheaper). What a group holds is bounded: the bytes read
    ahead, and its cleaned JPEGs.

    Image URLs instead download many at a time (`data.fetch_concurrency`, see `download.py`),
    and each group is whatever has arrived, cleaned while the rest downloads. With `url_cache`
    (a folder), URLs cleaned by an earlier ingest are not downloaded again (`urlcache.py`).
    """
    refs, cfg, spec, cache = _setup(lines, cfg_dict, url_cache)
    first = min(r["order"] for r in refs)
    return _stage(_results(refs, cfg, spec, hash_files, cache), staging_dir, f"{first:09d}")


def process_stream(lines: list[str], cfg_dict: dict, staging_dir: str, hash_files: bool = False,
                   url_cache: str = "", attempt: int = 0, most: int = STREAM_ROWS,
                   claim: Claim | None = None) -> Iterator[list[dict]]:
    """`process_batch` that hands its rows back as it goes: lists of up to `most` rows, in the
    order the inputs finished. One download pool serves all of `lines`, so that downloads stay
    in flight until the last URL, rather than draining at the end of each task (the slowest
    download, up to `data.http_timeout_s`, leaves the other slots idle there).

    Each list's kept samples are in staging files of their own, complete before the list is
    handed back (`stage-<first input>-r<attempt>-<list number>-<split>.members`): what was
    handed back stays valid if a later list fails, and a re-run of the inputs not handed back
    yet (`attempt` + 1, see `driver._stream_rows`) writes other files.

    With `claim` (the driver's head start while Ray starts, `driver._HeadStart`), an input is
    started only once `claim([its order, ...])` says yes, a group of local files or one download
    at a time; after the first no, the stream ends with the inputs already started, and the
    others are left to whoever claims them. Its files are then named `-h<attempt>-` (never
    those of a Ray task on the same first input)."""
    refs, cfg, spec, cache = _setup(lines, cfg_dict, url_cache)
    first = min(r["order"] for r in refs)
    results = _results(refs, cfg, spec, hash_files, cache, claim)
    who = "h" if claim is not None else "r"
    for part in itertools.count():
        rows = _stage(itertools.islice(results, most), staging_dir, f"{first:09d}-{who}{attempt}-{part:05d}")
        if not rows:
            return
        yield rows


def _setup(lines: list[str], cfg_dict: dict, url_cache: str) -> tuple[list[dict], DataConfig, ImageSpec, UrlCache | None]:
    quiet_loggers()
    cfg = DataConfig.model_validate(cfg_dict)
    spec = ImageSpec.of(cfg)
    cache = UrlCache(url_cache, spec) if url_cache and cfg.url_cache else None
    return [json.loads(line) for line in lines], cfg, spec, cache


def _stage(results: Iterable, staging_dir: str, tag: str) -> list[dict]:
    """The rows of `results`, in input order, with each kept sample written as tar members to
    `stage-<tag>-<split>.members` (one file per split, renamed into place when all are written)."""
    rows: list[dict] = []
    writers: dict[str, MemberWriter] = {}  # stage file -> its writer, streaming into the file
    with contextlib.ExitStack() as files:  # each renamed into place when the batch is done
        for result in results:
            if isinstance(result, dict):
                rows.append(result)
                continue
            row, sample = result
            stage_file = join(staging_dir, f"stage-{tag}-{row['split']}.members")
            if stage_file not in writers:
                writers[stage_file] = MemberWriter(files.enter_context(open_atomic(stage_file)))
            offset, length = writers[stage_file].add(sample)
            row.update(stage_file=stage_file, stage_offset=offset, nbytes=length)
            rows.append(row)
        for writer in writers.values():
            writer.finish()
    rows.sort(key=lambda r: r["order"])  # URLs come back as their downloads finish
    return rows
