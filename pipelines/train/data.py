"""Streaming WebDataset shards into training batches, the same number of batches on every rank.

Every *reader* (one per rank x DataLoader worker) produces an endless, deterministic stream:
epoch after epoch, a seeded permutation of the shards is split across the readers, the raw
samples pass a seeded shuffle buffer, and only then are they decoded and batched. Because the
stream never ends, the training loop (not the data) decides how many steps run, so every rank
runs exactly the same number of steps whatever the shard count: no DDP hang on uneven shards.
When there are fewer shards than readers, every reader reads every shard and keeps every R-th
sample instead, so no reader is ever left without data.

The stream is addressable: after `n` batches consumed by a rank, each reader knows how many raw
samples it produced, and a resumed run skips exactly those (cheaply: before JPEG decoding), so
the data order continues where the checkpoint left it.

A curriculum (`StreamConfig.easy_batches`, `easy_max_words`) draws a rank's first batches only
from the samples whose primary caption is short, then from all: shortest utterances first, as
Deep Speech 2's SortaGrad does. Each reader keeps two streams, the short one and the full one,
each addressable as above, so a resume inside or after the short phase continues exactly.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import itertools
import os
import random
import signal
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mmcore.data.shard import parse_sample
from pipelines.core.dataset import read_shard

Sample = dict[str, Any]


def stable_seed(*parts: Any) -> int:
    """A 63-bit seed from any printable parts, the same in every process (unlike `hash`)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# ----------------------------------------------------------------------------- the raw stream


@dataclass(frozen=True)
class ReaderSpec:
    """Which slice of the data one reader produces, and from where it starts."""

    urls: tuple[str, ...]
    reader: int  # global reader index: rank * loader_workers + worker id
    num_readers: int
    seed: int
    shuffle_buffer: int
    skip: int = 0  # raw samples (after shuffling) already consumed before a resume
    max_words: int = 0  # > 0: only samples whose primary caption has at most this many words


def caption_words(sample: Sample) -> int:
    """Words in a raw sample's primary caption (what a spoken sample says)."""
    return len(parse_sample(sample).caption.split())


def epoch_samples(spec: ReaderSpec, epoch: int, read: Callable[[str], Iterator[Sample]] = read_shard):
    """One epoch of this reader's raw samples, before shuffling.

    Shards are permuted per epoch (seeded); with at least as many shards as readers each reader
    takes every R-th shard of the permutation, otherwise it reads all and keeps every R-th sample.
    """
    order = list(spec.urls)
    random.Random(stable_seed(spec.seed, "shards", epoch)).shuffle(order)
    if len(order) >= spec.num_readers:
        for url in order[spec.reader :: spec.num_readers]:
            yield from read(url)
        return
    index = 0
    for url in order:
        for sample in read(url):
            if index % spec.num_readers == spec.reader:
                yield sample
            index += 1


def endless_samples(spec: ReaderSpec, read: Callable[[str], Iterator[Sample]] = read_shard):
    """Epochs forever (only the short samples when `spec.max_words`). Raises a clear error when an
    epoch yields nothing (empty shards, or no caption short enough)."""
    epoch = 0
    while True:
        produced = 0
        for sample in epoch_samples(spec, epoch, read):
            if spec.max_words and caption_words(sample) > spec.max_words:
                continue
            produced += 1
            yield sample
        if produced == 0 and spec.max_words:
            raise RuntimeError(
                f"reader {spec.reader}/{spec.num_readers}: no training sample in {len(spec.urls)} shard(s) "
                f"has a caption of at most {spec.max_words} words, so the curriculum has nothing to draw. "
                "Raise train.curriculum_max_words, or turn the curriculum off with train.curriculum_steps=0."
            )
        if produced == 0:
            raise RuntimeError(
                f"reader {spec.reader}/{spec.num_readers} got no samples from {len(spec.urls)} "
                f"shard(s) (first: {spec.urls[0] if spec.urls else None}). Check that the dataset "
                f"version's train shards are not empty."
            )
        epoch += 1


def shuffled(samples: Iterator[Sample], buffer: int, seed: int) -> Iterator[Sample]:
    """A seeded reservoir shuffle: deterministic for a given input order and seed."""
    rng = random.Random(seed)
    pool: list[Sample] = []
    for sample in samples:
        if len(pool) < max(buffer, 1):
            pool.append(sample)
            continue
        j = rng.randrange(len(pool))
        pool[j], sample = sample, pool[j]
        yield sample
    rng.shuffle(pool)
    yield from pool


def raw_stream(spec: ReaderSpec, read: Callable[[str], Iterator[Sample]] = read_shard) -> Iterator[Sample]:
    """This reader's endless shuffled raw stream, with the first `spec.skip` samples dropped."""
    stream = shuffled(endless_samples(spec, read), spec.shuffle_buffer, stable_seed(spec.seed, "buf", spec.reader))
    for _ in range(spec.skip):
        next(stream)
    return stream


# ----------------------------------------------------------------------------- batches


def batches_done_by_worker(batches_consumed: int, worker: int, num_workers: int) -> int:
    """How many batches loader worker `worker` had produced when the rank consumed
    `batches_consumed` batches (DataLoader takes batches from its workers round-robin)."""
    if batches_consumed <= worker:
        return 0
    return (batches_consumed - worker + num_workers - 1) // num_workers


@dataclass(frozen=True)
class StreamConfig:
    """One rank's training stream. `decode(raw_sample) -> dict`, `collate(list) -> batch`."""

    urls: tuple[str, ...]
    rank: int
    world_size: int
    loader_workers: int  # DataLoader workers; 0 reads in the training process
    batch_size: int
    seed: int
    shuffle_buffer: int
    start_batch: int = 0  # batches this rank consumed before (resume)
    easy_batches: int = 0  # this rank's first batches come only from short-caption samples
    easy_max_words: int = 0  # "short": a primary caption of at most this many words


class ShardStream(IterableDataset):
    """Endless fixed-size batches for one rank; one reader per DataLoader worker."""

    def __init__(self, cfg: StreamConfig, decode: Callable[[Sample], Any], collate: Callable[[list], Any]):
        super().__init__()
        self.cfg, self.decode, self.collate = cfg, decode, collate

    def reader_spec(self, worker: int) -> ReaderSpec:
        c = self.cfg
        workers = max(c.loader_workers, 1)
        skip = batches_done_by_worker(c.start_batch, worker, workers) * c.batch_size
        return ReaderSpec(
            urls=c.urls,
            reader=c.rank * workers + worker,
            num_readers=c.world_size * workers,
            seed=c.seed,
            shuffle_buffer=c.shuffle_buffer,
            skip=skip,
        )

    def samples(self, worker: int) -> Iterator[Sample]:
        """Reader `worker`'s raw samples from its next batch on: its share of the first
        `easy_batches` batches from the short-caption stream, then the full stream. Each stream
        skips what this reader consumed of it before a resume."""
        c = self.cfg
        spec = self.reader_spec(worker)
        done = spec.skip // c.batch_size  # this reader's batches consumed before
        easy = batches_done_by_worker(c.easy_batches, worker, max(c.loader_workers, 1)) if c.easy_max_words else 0
        if done < easy:
            short = replace(spec, skip=done * c.batch_size, max_words=c.easy_max_words)
            yield from itertools.islice(raw_stream(short), (easy - done) * c.batch_size)
        yield from raw_stream(replace(spec, skip=max(done - easy, 0) * c.batch_size))

    def __iter__(self):
        info = get_worker_info()
        workers = max(self.cfg.loader_workers, 1)
        # DataLoader starts its round-robin at worker 0, but after `start_batch` batches the next
        # batch is due from logical worker `start_batch % workers`: rotate the roles to match.
        logical = ((info.id if info else 0) + self.cfg.start_batch) % workers
        spec = self.reader_spec(logical)
        stream = self.samples(logical)
        index = spec.skip // self.cfg.batch_size  # this reader's batch number
        while True:
            # Augmentation and caption / QA choice are seeded by (reader, batch number): a batch is
            # a pure function of its position, so a resumed run sees exactly the batches it would have.
            seed = stable_seed(spec.seed, "batch", spec.reader, index)
            torch.manual_seed(seed)
            rng = random.Random(seed)
            yield to_wire(self.collate([self.decode(next(stream), rng) for _ in range(self.cfg.batch_size)]))
            index += 1


def to_wire(batch: Any) -> Any:
    """A batch as it crosses from a loader worker: a dict's tensors as numpy arrays, pickled by
    value in the one message. A tensor would go through shared memory instead, and the training
    process would fetch each one's file descriptor over a fresh socket (~0.5 ms per tensor, 8 per
    batch: 4% of a debug-model step). Other batches pass unchanged."""
    if not isinstance(batch, dict):
        return batch
    return {k: v.numpy() if torch.is_tensor(v) else v for k, v in batch.items()}


def from_wire(batch: Any, pin_memory: bool = False) -> Any:
    if not isinstance(batch, dict):
        return batch
    out = {}
    for k, v in batch.items():
        if isinstance(v, np.ndarray):
            v = torch.from_numpy(v)
            v = v.pin_memory() if pin_memory else v
        out[k] = v
    return out


def _as_is(batch):
    return batch


class BatchLoader:
    """Iterates a DataLoader of wire batches, yielding batches of tensors (pinned for a GPU)."""

    def __init__(self, loader: DataLoader, pin_memory: bool):
        self.loader, self.pin_memory = loader, pin_memory

    def __iter__(self):
        for batch in self.loader:
            yield from_wire(batch, self.pin_memory)


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent_pid: int, worker_id: int = 0) -> None:
    """A DataLoader `worker_init_fn`: the kernel SIGKILLs this loader worker when its rank dies.

    Without it, a rank killed from outside (or one that `os._exit`s) leaves its forked loader
    workers behind as orphans. They hold the dead rank's sockets open, so Ray does not see the
    actor die, and the surviving ranks wait in a collective for minutes. The signal fires when the
    thread that forked us exits, which in Ray Train is the training thread: the loader is done then.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:  # the rank died before the prctl took effect
        os._exit(0)


def train_loader(cfg: StreamConfig, decode, collate, pin_memory: bool = False) -> BatchLoader:
    """The rank's endless batch loader; iterate it with `next()`, it never stops."""
    workers = cfg.loader_workers
    loader = DataLoader(
        ShardStream(cfg, decode, collate),
        batch_size=None,  # batches are built inside the workers, fixed size
        collate_fn=_as_is,  # keep the numpy arrays (the default would turn them back into tensors)
        num_workers=workers,
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
        multiprocessing_context="fork" if workers > 0 else None,
        worker_init_fn=functools.partial(die_with_parent, os.getpid()) if workers > 0 else None,
    )
    return BatchLoader(loader, pin_memory)


# ----------------------------------------------------------------------------- validation


def val_batches(
    urls: list[str], rank: int, world_size: int, batch_size: int, max_samples: int, decode, collate
) -> Iterator[Any]:
    """One finite pass over the first `max_samples` val samples, every `world_size`-th sample on
    this rank (ranks may get one batch more or less: callers must not run collectives per batch)."""
    chunk: list = []
    for index, sample in enumerate(s for url in urls for s in read_shard(url)):
        if index >= max_samples:
            break
        if index % world_size != rank:
            continue
        chunk.append(decode(sample))
        if len(chunk) == batch_size:
            yield collate(chunk)
            chunk = []
    if chunk:
        yield collate(chunk)
