"""The ingest driver. `ingest`: raw source -> one immutable dataset version, cleaned in Ray tasks.

1. list the source into small Refs on the driver (ids checked, keys and input order assigned);
2. clean the Refs in Ray tasks (`stage.process_batch`; `process_stream` for URLs) on all Ray
   CPUs (fetch, verify, clean, hash, stage the cleaned bytes), collecting only small accounting
   rows; while Ray starts, the driver cleans the first Refs itself (`_HeadStart`);
3. fingerprint the inputs (the workers hashed the image files they read) -> the version id;
4. deduplicate globally on the driver (`dedup.py`), plan shards per split (`shards.py`);
5. write the shards in parallel (one Ray task each: a copy of staged tar members), each atomically;
6. write rejects.jsonl, report.json, and last manifest.json (the completion marker).

Each run stages (and, on a local disk, builds its version) in a folder of its own under
`<out_root>/_staging/`, so runs on the same inputs at the same time never share or delete each
other's files; the finished version is published by one rename (`publish`), never over a
complete one.

A re-run must start nothing, so the version is checked first (content fingerprint on the driver)
when the listing looks like one ingested before: `<out_root>/_index/<quick key>.json` records
every listing (names, sizes, mtimes) that made a version. Remote sources are fingerprinted by
ETag, which costs no reads, so they are always checked first.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import importlib
import itertools
import json
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from pipelines.config import DataConfig
from pipelines.core import dataset, storage
from pipelines.core.progress import Progress
from pipelines.ingest.dedup import DedupResult, deduplicate
from pipelines.ingest.fingerprint import fingerprint, list_source, local_path, quick_key
from pipelines.ingest.shards import plan_shards, write_shard
from pipelines.ingest.sources import detect_format, list_refs
from pipelines.ingest.sources.common import key_for

PIPELINE_VERSION = 4  # bump when cleaning code changes what a config produces
# Not part of what a config produces (the version id): where data is, and how it is fetched.
_NOT_CLEANING = ("source", "root", "synth_num", "synth_seed", "synth_audio", "format", "fetch_concurrency", "fetch_per_host",
                 "fetch_buffer_bytes", "url_cache")
URL_CACHE_DIR = "_urlcache"
# URLs per cleaning task at most (`remote_task_sizes`): rows stream back as a task goes, so a
# task may be long (~1-3 min of one CPU's downloads at 100-250 images/s); a worker holds its
# task's Refs (~1-2 KB each) until the task ends.
REMOTE_TASK_MOST = 16384
HEAD_MOST = 4096  # inputs the driver may clean while Ray starts (`_HeadStart`); it cleaned ~400-600 in 3-7 s
STALE_STAGING_S = 24 * 3600  # a staging folder untouched this long is a killed run's: removed


def task_sizes(n: int, cpus: int, most: int = 512, least: int = 16) -> list[int]:
    """Samples per task, in input order: `most` while much is left, then shrinking.

    A task start costs a little (scheduling, the config, one staging file per split), so tasks
    are a few seconds long where the input allows. Equal tasks would leave CPUs idle at the end
    for up to a whole task while the last ones finish; instead each task takes about what is
    left / (2 * cpus) (guided self-scheduling), so the last tasks are a fraction of a second
    long and the CPUs finish together.
    """
    sizes, left = [], n
    while left > 0:
        size = min(left, max(least, min(most, -(-left // (2 * max(cpus, 1))))))
        sizes.append(size)
        left -= size
    return sizes


def log(msg: str) -> None:
    print(f"[ingest] {msg}", file=sys.stderr, flush=True)


def cleaning_config(cfg: DataConfig) -> dict[str, Any]:
    return {k: v for k, v in cfg.model_dump(mode="json").items() if k not in _NOT_CLEANING}


def content_version_id(cfg: DataConfig, fmt: str, inputs: list[dict]) -> str:
    """The id a version is created under: a hash of the pipeline version, the format, the cleaning
    config and the inputs' fingerprints. Read it back with `pipelines.core.dataset.version_id`."""
    blob = json.dumps({"v": PIPELINE_VERSION, "fmt": fmt, "cfg": cleaning_config(cfg),
                       "inputs": [i["fingerprint"] for i in inputs]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@contextlib.contextmanager
def _gc_paused():
    """No cyclic GC inside: building ~10^4-10^6 small dicts (Refs, rows) otherwise triggers full
    collections over every object the process holds (Ray, pyarrow: ~0.1 s each), while the CPUs
    of the cluster wait for the driver. The dicts hold no cycles; what is cyclic is freed after."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def collect_refs(source: str, fmt: str, cfg: DataConfig) -> list[dict]:
    """All Refs with `order` and `key`; a repeated id is a `duplicate_id` reject."""
    refs, seen = [], set()
    for order, ref in enumerate(list_refs(source, fmt, cfg.columns)):
        ref["order"] = order
        sid = ref.get("id") or f"{ref.get('source', source)}#{order}"
        ref["key"] = key_for(sid)
        if not ref.get("reject") and ref["key"] in seen:
            ref.update(reject="duplicate_id", detail=f"id {sid!r} already seen", key=key_for(f"{sid}#{order}"))
        seen.add(ref["key"])
        refs.append(ref)
    return refs


def remote_task_sizes(n: int, cpus: int, most: int = REMOTE_TASK_MOST) -> list[int]:
    """Samples per task when the inputs come over a network: equal tasks, a whole multiple of
    `cpus` of them, none over `most`.

    A task ends only when its slowest download has answered or timed out, and its CPU idles
    meanwhile (one dead URL costs up to `data.http_timeout_s` per try). `task_sizes`' short last
    tasks would each pay that wait: 3,000 URLs with 2% that never answer (2 s timeout, 2 CPUs)
    were cleaned in 22 s in ~15 tasks and in 11.6 s in 2. The waits are then one per task; a
    task hands its rows back as it goes (`_stream_rows`), so progress shows however long it is.
    """
    if n <= 0:
        return []
    cpus = max(cpus, 1)
    count = cpus * -(-n // (cpus * most))
    base, extra = divmod(n, count)
    return [size for size in [base + 1] * extra + [base] * (count - extra) if size]


def cleaning_task_sizes(refs: list[dict], cpus: int) -> list[int]:
    """`remote_task_sizes` when any Ref's image or audio comes over a network, else `task_sizes`."""
    sizes = remote_task_sizes if any(map(_remote, refs)) else task_sizes
    return sizes(len(refs), cpus)


def _remote(ref: dict) -> bool:
    """Whether the Ref's image or audio comes over a network (a URL, or object storage)."""
    return any(isinstance(loc, dict) and storage.is_remote(loc.get("uri", "")) for loc in (ref.get("image"), ref.get("audio")))


def ref_chunks(refs: list[dict], sizes: list[int]) -> list[list[str]]:
    """The Refs as JSON lines, one list per cleaning task of `sizes`: what a task gets is what the
    source listed, as JSON says it, whichever process cleans it."""
    bounds = list(itertools.accumulate(sizes, initial=0))
    return [[json.dumps(r) for r in refs[lo:hi]] for lo, hi in itertools.pairwise(bounds)]


def _clean_all(refs: list[dict], cfg: DataConfig, staging: str, hash_files: bool, url_cache: str = "",
               connect: Callable[[], Any] | None = None) -> list[dict]:
    """The cleaning stage: Refs -> accounting rows (the bytes go to staging; what URLs gave, to
    `url_cache`), in input order.

    Ray is reached here (`_ensure_ray(connect)`) when it is not up yet, and while it starts (a
    local Ray: ~3-4 s, with ~half the CPU idle) the driver cleans the first inputs itself
    (`_HeadStart`); Ray cleans the others (`_clean_on_ray`).
    """
    import ray

    kwargs = {"cfg_dict": cfg.model_dump(mode="json"), "staging_dir": staging, "hash_files": hash_files,
              "url_cache": url_cache}
    rows: list[dict] = []
    lock = threading.Lock()  # the head start hands its rows over from its own thread
    t0 = time.time()
    first: list[tuple[float, int]] = []  # when the first rows came, and how many
    with Progress("[ingest] cleaned", total=len(refs), unit="samples") as bar:  # live on a TTY, else every 10 s
        def took(out: list[dict]) -> None:
            with lock:
                rows.extend(out)
                first[:] = first or [(time.time(), len(rows))]
                bar.update(len(out))

        head = None if ray.is_initialized() or not refs else _HeadStart(refs[:HEAD_MOST], kwargs, took)
        try:
            _ensure_ray(connect)
            claimed = head.close() if head else set()
            if head:
                log(f"Ray up after {time.time() - t0:.1f}s; the driver took {len(claimed)} inputs meanwhile")
            import_soon("mmcore.data.tokenizer")  # for `write_tokenizer`, while the workers clean
            _clean_on_ray([r for r in refs if r["order"] not in claimed], kwargs, took)
        except BaseException:
            if head:  # its inputs in flight finish (or time out), then the error goes on
                head.close()
                head.thread.join()
            raise
        if head:
            head.join()
    if first:  # what start-up costs, and the pace after it (when enough came after it to say)
        after = time.time() - first[0][0]
        pace = f", then {(len(rows) - first[0][1]) / after:.0f} samples/s" if after >= 1.0 else ""
        log(f"first rows back after {first[0][0] - t0:.1f}s{pace}")
    return sorted(rows, key=lambda r: r["order"])


def _clean_on_ray(refs: list[dict], kwargs: dict[str, Any], took: Callable[[list[dict]], None]) -> None:
    """`refs` cleaned in Ray tasks, each list of rows handed to `took`.

    Local files: one plain Ray task per chunk (`_clean_task`), all submitted at once: Ray runs
    one per CPU and starts the next as one ends, and the rows are taken as tasks end. A task
    whose staging files fail (an OSError) or whose worker dies is run again; it rewrites the
    same files (named by its first input). Inputs over a network: one streaming task per chunk,
    a whole number per CPU (`_stream_rows`), whose rows come back as it goes. Not a Ray Data
    job: the chunks are planned here and the outputs are small rows, so Ray Data added only its
    start: importing it in the driver and in each worker, and starting its executor.
    """
    import ray

    chunks = ref_chunks(refs, cleaning_task_sizes(refs, int(ray.cluster_resources().get("CPU", 1))))
    if not chunks:
        return
    if any(map(_remote, refs)):
        stream = ray.remote(_clean_stream_task).options(num_cpus=1, max_retries=0)
        _stream_rows(chunks, lambda lines, attempt: stream.remote(lines, attempt=attempt, **kwargs), took)
    else:
        clean = ray.remote(_clean_task).options(num_cpus=1, max_retries=3, retry_exceptions=[OSError])
        pending = [clean.remote(chunk, **kwargs) for chunk in chunks]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            took(ray.get(done[0]))


class _HeadStart:
    """The driver cleans the first inputs on a thread while Ray starts, and hands Ray the rest.

    A local Ray takes ~3-5 s to start on 2 cores, its processes using about half the CPU (and
    ~0.3 s more before its workers run a task), while the driver would only wait: on 4,000 local
    photos it cleaned ~600 meanwhile, with Ray's start ~0.2 s later; on a URL list its downloads
    (up to `data.fetch_per_host` to a host, as one more worker) start ~4 s sooner. It runs
    `stage.process_stream`, the code a URL task runs, so every input gives the same row and
    tar members whoever cleans it. Each input is claimed before it is started (`claim`: a group
    of local files, or one download); `close()` (Ray is up) ends the claims and returns the
    inputs claimed, which the thread finishes while Ray cleans the rest. A stream whose staging
    files fail (an OSError) is run again, as `_stream_rows` does, on its claimed inputs whose
    rows have not come back; any other error is raised by `join()`.
    """

    def __init__(self, refs: list[dict], kwargs: dict[str, Any], took: Callable[[list[dict]], None],
                 retries: int = 3):
        self.lines, self.kwargs, self.took, self.retries = [json.dumps(r) for r in refs], kwargs, took, retries
        self.lock = threading.Lock()
        self.open, self.claimed, self.got = True, set(), set()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="ingest head start", daemon=True)
        self.thread.start()

    def claim(self, orders: list[int]) -> bool:
        with self.lock:
            if self.open:
                self.claimed.update(orders)
            return self.open

    def close(self) -> set[int]:
        with self.lock:
            self.open = False
            return set(self.claimed)

    def join(self) -> None:
        self.thread.join()
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        try:  # the cleaning code's imports (Pillow, the HTTP client) on this thread, not the main one
            from pipelines.ingest.stage import process_stream

            lines, claim = self.lines, self.claim
            for attempt in range(self.retries + 1):
                try:
                    for out in process_stream(lines, **self.kwargs, attempt=attempt, claim=claim):
                        self.got.update(r["order"] for r in out)
                        self.took(out)
                    return
                except OSError as e:
                    with self.lock:
                        left = [line for line in self.lines if json.loads(line)["order"] in self.claimed - self.got]
                    if attempt >= self.retries:
                        raise
                    if not left:  # nothing of its own is missing: the rest is Ray's
                        return
                    log(f"the driver's cleaning failed ({type(e).__name__}); its {len(left)} inputs not cleaned yet run again")
                    lines, claim = left, lambda orders: True  # its own already: tagged -h<attempt>- still
        except BaseException as e:  # noqa: BLE001 - raised on the main thread by `join`
            self.close()
            self.error = e


def _stream_rows(chunks: list[list[str]], start: Callable[[list[str], int], Any], took: Callable[[list[dict]], None],
                 retries: int = 3) -> None:
    """Run `start(lines, attempt)` (a Ray streaming task: `stage.process_stream`) for each chunk
    at once and hand each list of rows to `took` as it comes.

    One download pool per task serves its whole chunk, so downloads stay in flight until its
    last URL; tasks that end one after another would each drain theirs first (10,000 URLs in 6
    tasks on 2 CPUs: ~1.5-2 s each with 2% of URLs never answering). A task whose staging files
    fail (an OSError) or whose worker dies is started again, up to `retries` times, on the inputs
    whose rows have not come back: Ray's own retry of a streaming task replays it and expects
    the same outputs, which downloads in the order they finish do not give.
    """
    import ray

    running = {start(chunk, 0): (chunk, 0) for chunk in chunks}
    got: set[int] = set()
    while running:
        (gen,), _ = ray.wait(list(running), num_returns=1)
        try:
            out = ray.get(next(gen))
        except StopIteration:
            del running[gen]
            continue
        except (OSError, ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError) as e:
            chunk, attempt = running.pop(gen)
            if attempt >= retries:
                raise
            left = [line for line in chunk if json.loads(line)["order"] not in got]
            log(f"a cleaning task failed ({type(e).__name__}); its {len(left)} inputs not cleaned yet run again")
            if left:
                running[start(left, attempt + 1)] = (left, attempt + 1)
            continue
        got.update(r["order"] for r in out)
        took(out)


def _clean_task(lines: list[str], **kwargs: Any) -> list[dict]:
    """One cleaning task, `stage.process_batch`, imported here in the worker: the driver never
    needs the cleaning code's imports (Pillow, soundfile, the HTTP client)."""
    from pipelines.ingest.stage import process_batch

    return process_batch(lines, **kwargs)


def _clean_stream_task(lines: list[str], **kwargs: Any) -> Iterator[list[dict]]:
    """`_clean_task` for `stage.process_stream`: a generator, so Ray streams its rows back."""
    from pipelines.ingest.stage import process_stream

    yield from process_stream(lines, **kwargs)


def _write_shards(plans: list[dict], vdir: str) -> list[dict]:
    """One Ray task per shard, spread over the cluster: the shards are already planned, and a
    task only copies staged bytes (~0.1 s per shard)."""
    import ray

    if not plans:
        return []
    write = ray.remote(_write_shard_task).options(num_cpus=1, max_retries=3, scheduling_strategy="SPREAD")
    return sorted(ray.get([write.remote(p, vdir) for p in plans]), key=lambda e: e["path"])


def _write_shard_task(plan: dict, vdir: str) -> dict:
    from pipelines.runtime import quiet_loggers

    quiet_loggers()
    return write_shard(plan, vdir)


def _ensure_ray(connect: Callable[[], Any] | None) -> None:
    """Ray, now that there is cleaning to do: `connect()` (the caller's cluster), or
    `init_ray(None)` (RAY_ADDRESS, else a local Ray), unless Ray is up already."""
    import ray

    from pipelines.runtime import init_ray

    if not ray.is_initialized():
        (connect or (lambda: init_ray(None, include_dashboard=False)))()


def ingest(source: str | Path, out_root: str | Path, cfg: DataConfig, fmt: str | None = None,
           connect: Callable[[], Any] | None = None) -> Path:
    """Ingest `source` into a new dataset version under `out_root`; returns its directory.

    Returns the existing version untouched when the same inputs and cleaning config were
    ingested before, without starting Ray. `connect` reaches Ray when there is cleaning to do
    (default: RAY_ADDRESS, else a local Ray; Ray already initialised is used as it is). A
    partial version (no manifest: an earlier run was killed) is redone. Runs at the same time on
    the same inputs are safe: each stages and builds in its own folder, and the first to finish
    publishes (`publish`); the others return its version.
    """
    source, out_root = str(source), str(out_root)
    fmt = fmt or cfg.format or detect_format(source)
    t0 = time.time()
    with _gc_paused():
        refs = collect_refs(source, fmt, cfg)
        listing = list_source(source)
        salt = json.dumps({"v": PIPELINE_VERSION, "fmt": fmt, "cfg": cleaning_config(cfg)}, sort_keys=True)
        key = quick_key(listing, refs, salt)[:32]
        hint = storage.join(out_root, dataset.INDEX_DIR, f"{key}.json")
        inputs: list[dict] | None = None
        if listing.remote or storage.exists(hint):
            inputs = [fingerprint(listing, refs)]
            vdir = storage.join(out_root, content_version_id(cfg, fmt, inputs))
            if dataset.is_complete(vdir):
                log(f"version {content_version_id(cfg, fmt, inputs)} already exists: {vdir} (nothing rewritten)")
                return storage.as_path(vdir)
    log(f"{len(refs)} inputs from {source} (format {fmt})")
    staging_root = storage.join(out_root, dataset.STAGING_DIR)
    storage.remove_older_than(staging_root, STALE_STAGING_S)  # leftovers of killed runs
    staging = storage.join(staging_root, f"{key}-{uuid.uuid4().hex[:12]}")  # this run's alone
    try:
        url_cache = storage.join(out_root, URL_CACHE_DIR, f"v{PIPELINE_VERSION}")
        rows = _clean_all(refs, cfg, staging, hash_files=inputs is None, url_cache=url_cache, connect=connect)
        log(f"cleaned {len(rows)} inputs in {time.time() - t0:.1f}s")
        with _gc_paused():
            if inputs is None:  # the workers hashed the image files; the driver hashes the rest
                digests = {local_path(r["image"]): r["file_sha"] for r in rows if r["file_sha"]}
                inputs = [fingerprint(listing, refs, digests)]
            vdir = _build_version(out_root, staging, cfg, fmt, inputs, rows)
            storage.write_json_atomic(hint, {"version": content_version_id(cfg, fmt, inputs), "source": source})
    finally:
        storage.remove(staging)
        if not storage.is_remote(staging_root):
            with contextlib.suppress(OSError):
                os.rmdir(storage.get_fs(staging_root)[1])  # `_staging/` once empty
    log(f"done in {time.time() - t0:.1f}s")
    return storage.as_path(vdir)


def import_soon(module: str) -> threading.Thread:
    """Import `module` on a daemon thread at the lowest CPU priority. The driver waits while the
    workers clean, and its cores often have room then (URL lists wait on the network);
    importing the tokenizer's transformers there, rather than after cleaning, takes ~0.9 s off
    the phase after cleaning. At the lowest priority (Linux: a thread's own nice value) it takes
    CPU time only where a core is idle, never from the workers on the same machine. An import of
    the same module on the main thread waits for this one (Python's module locks); an error
    here is left for that import to raise."""
    def run() -> None:
        with contextlib.suppress(OSError, AttributeError):  # not Linux: normal priority
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        with contextlib.suppress(Exception):
            importlib.import_module(module)

    thread = threading.Thread(target=run, name=f"import {module}", daemon=True)
    thread.start()
    return thread


def _build_version(out_root: str, staging: str, cfg: DataConfig, fmt: str, inputs: list[dict],
                   rows: list[dict]) -> str:
    """Deduplicate, shard and publish the version of `rows`; returns its directory. A complete
    version (another run's, or the same content under new names or mtimes) is left untouched.

    Locally the version is built inside this run's staging folder and renamed into place when
    complete (`publish`). Object stores have no rename: there the files go straight to the
    version folder, each written atomically, manifest last; a run at the same time writes the
    same bytes, and a complete version's files are never removed.
    """
    version = content_version_id(cfg, fmt, inputs)
    vdir = storage.join(out_root, version)
    if dataset.is_complete(vdir):
        log(f"version {version} already exists: {vdir} (same content; nothing rewritten)")
        return vdir
    build = vdir if storage.is_remote(vdir) else storage.join(staging, version)
    log(f"version {version}: {vdir}")
    t1 = time.time()
    result = deduplicate([r for r in rows if not r["reason"]], cfg.dedup_distance)
    plans = plan_shards(result.kept, result.extra_captions, cfg.shard_samples, cfg.shard_max_bytes)
    log(f"deduplicated and planned {len(plans)} shards in {time.time() - t1:.1f}s: "
        f"{sum(result.counts().values())} duplicates dropped or merged")
    t1 = time.time()
    entries = _write_shards(plans, build)
    log(f"wrote {len(entries)} shards in {time.time() - t1:.1f}s")
    finish(build, version, cfg, fmt, inputs, rows, result, entries)
    if build != vdir and not publish(build, vdir, storage.join(out_root, dataset.STAGING_DIR, f"{version}.lock")):
        log(f"version {version} was completed by another run first: {vdir} (this run's copy dropped)")
    log(f"{len(result.kept)} kept of {len(rows)}")
    return vdir


def publish(build: str, vdir: str, lock: str) -> bool:
    """Move the finished local version `build` to `vdir` in one rename: True; False when a
    complete version is there already (`build` then stays, for the caller to remove).

    An incomplete `vdir` (a killed run of an older release wrote in place) is moved aside and
    removed. All of it under a lock, so no run moves a version another has just completed.
    """
    build, vdir = storage.get_fs(build)[1], storage.get_fs(vdir)[1]
    with storage.local_lock(storage.get_fs(lock)[1]):
        if dataset.is_complete(vdir):
            return False
        if os.path.exists(vdir):
            leftover = f"{build}.leftover"
            os.rename(vdir, leftover)
            storage.remove(leftover)
        if not storage.rename_dir_noreplace(build, vdir):
            raise FileExistsError(f"{vdir} appeared while {build} was being published: another "
                                  "ingest not using the lock writes there; re-run this ingest")
        return True


def finish(vdir, version, cfg, fmt, inputs, rows, result, entries) -> None:
    """rejects.jsonl, report.json, then manifest.json (last: it marks the version complete)."""
    from pipelines.ingest.report import build_report, media_counts, rejects_lines

    report = build_report(version, rows, result, entries, cfg)
    storage.write_bytes_atomic(storage.join(vdir, dataset.REJECTS), rejects_lines(rows, result))
    storage.write_json_atomic(storage.join(vdir, dataset.REPORT), report)
    splits = dataset.entries_by_split(entries)
    manifest = {"version": version, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "format": fmt, "config": cfg.model_dump(mode="json"), "inputs": inputs, "splits": splits,
                "counts": {s: sum(e["samples"] for e in v) for s, v in splits.items()},
                "media": media_counts(result.kept),
                "tokenizer": write_tokenizer(vdir, train_texts(result), cfg)}
    storage.write_json_atomic(storage.join(vdir, dataset.MANIFEST), manifest)


def train_texts(result: DedupResult) -> Iterator[str]:
    """The train shards' texts, in shard order (what `dataset.sample_texts` reads back from them),
    from the accounting rows the driver holds: each kept train sample's captions and QA pairs,
    with what its duplicates merged in (`with_extra_captions`). Reading the shards back instead
    costs their bytes again, and webdataset's reader imports torch (~1.5 s)."""
    for row in result.kept:
        if row["split"] == "train":
            captions = json.loads(row["captions"]) + result.extra_captions.get(row["key"], [])
            # a sample without captions reads back as its empty primary caption (`parse_sample`)
            yield from dataset.texts_of(captions or [""], json.loads(row["qa"]) + row.get("merged_qa", []))


def write_tokenizer(vdir: str, texts: Iterable[str], cfg: DataConfig) -> dict[str, Any] | None:
    """Train the version's WordPiece tokenizer (`data.vocab_size`) on its train split's `texts`
    and write it to `<version>/tokenizer/`; returns the manifest entry (each file's sha256), or
    None when the train split has no text. Training breaks frequency ties in hash order, so a
    second training could give other ids: the version carries the one every run on it uses."""
    import tempfile

    from mmcore.data import train_tokenizer

    texts = list(texts)
    if not texts:
        return None
    t0 = time.time()
    tokenizer = train_tokenizer(texts, cfg.vocab_size)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        files = {name: storage.sha256_file(os.path.join(tmp, name)) for name in sorted(os.listdir(tmp))}
        for name in files:
            with open(os.path.join(tmp, name), "rb") as f:
                storage.write_bytes_atomic(storage.join(vdir, dataset.TOKENIZER_DIR, name), f.read())
    log(f"trained a {len(tokenizer)}-token tokenizer on {len(texts)} train texts in {time.time() - t0:.1f}s")
    return {"path": dataset.TOKENIZER_DIR, "vocab_size": len(tokenizer), "files": files}
