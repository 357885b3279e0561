"""The training stream and the resume state, without Ray: real tar shards, real DataLoader workers."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import torch

from pipelines.train.data import (
    ReaderSpec,
    StreamConfig,
    batches_done_by_worker,
    epoch_samples,
    raw_stream,
    train_loader,
)
from pipelines.train.optim import build_optimizer, param_groups, warmup_cosine
from pipelines.train.state import (
    latest_checkpoint,
    optimizer_from_files,
    optimizer_to_files,
    scheduler_from_file,
    scheduler_to_file,
    write_trainer_state,
)


def write_shards(root: Path, counts: list[int], words=lambda s, i: 3) -> list[str]:
    """Tar shards of samples `k{shard}-{i}` with a `txt` member only (enough for the stream), of
    `words(shard, i)` words."""
    urls = []
    for s, n in enumerate(counts):
        path = root / f"shard-{s:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(n):
                data = " ".join([f"caption {s} {i}", *["word"] * (words(s, i) - 3)]).encode()
                info = tarfile.TarInfo(f"k{s}-{i:04d}.txt")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        urls.append(str(path))
    return urls


def keys(samples) -> list[str]:
    return [s["__key__"] for s in samples]


@pytest.mark.parametrize("counts,readers", [([5, 3], 6), ([7, 2, 4], 2), ([4], 3)])
def test_one_epoch_covers_every_sample_once_across_readers(tmp_path, counts, readers):
    urls = write_shards(tmp_path, counts)
    seen = []
    for r in range(readers):
        spec = ReaderSpec(tuple(urls), r, readers, seed=1, shuffle_buffer=4)
        mine = keys(epoch_samples(spec, epoch=0))
        assert mine, f"reader {r} got no samples ({len(urls)} shards, {readers} readers)"
        seen += mine
    assert sorted(seen) == sorted(f"k{s}-{i:04d}" for s, n in enumerate(counts) for i in range(n))


def test_raw_stream_is_endless_and_skip_continues_the_same_order(tmp_path):
    urls = tuple(write_shards(tmp_path, [3, 2]))
    spec = ReaderSpec(urls, reader=1, num_readers=3, seed=7, shuffle_buffer=3)
    stream = raw_stream(spec)
    full = keys(next(stream) for _ in range(25))  # several epochs of a 1-2 sample reader share
    resumed = raw_stream(ReaderSpec(urls, 1, 3, seed=7, shuffle_buffer=3, skip=11))
    assert keys(next(resumed) for _ in range(14)) == full[11:]


def test_empty_shards_raise_instead_of_hanging(tmp_path):
    urls = tuple(write_shards(tmp_path, [0]))
    with pytest.raises(RuntimeError, match="got no samples"):
        next(raw_stream(ReaderSpec(urls, 0, 1, seed=0, shuffle_buffer=2)))


def _loader(urls, start_batch, workers, rank=0, world=2):
    cfg = StreamConfig(tuple(urls), rank, world, workers, batch_size=3, seed=5, shuffle_buffer=4,
                         start_batch=start_batch)
    # decode keeps the key and a random draw (augmentation stand-in): both must resume exactly.
    return iter(train_loader(cfg, lambda s, rng: (s["__key__"], rng.random(), float(torch.rand(()))),
                               collate=list))


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_resumes_at_the_same_batch_with_loader_workers(tmp_path, workers):
    """Fewer shards (2) than readers (2 ranks x 2 workers): no hang, and batch n+k after a resume
    at n is batch n+k of the uninterrupted stream, augmentation randomness included."""
    torch.set_num_threads(1)
    urls = write_shards(tmp_path, [4, 3])
    straight = _loader(urls, 0, workers, rank=1)
    batches = [next(straight) for _ in range(9)]
    resumed = _loader(urls, 5, workers, rank=1)
    assert [next(resumed) for _ in range(4)] == batches[5:]


def _words_of_key(key: str) -> int:
    s, i = key[1:].split("-")
    return 3 + int(i) % 3  # 3, 4 or 5 words (see `_curriculum_loader`)


def _curriculum_loader(urls, start_batch, workers, easy_batches=5, max_words=3):
    cfg = StreamConfig(tuple(urls), 1, 2, workers, batch_size=3, seed=5, shuffle_buffer=4,
                         start_batch=start_batch, easy_batches=easy_batches, easy_max_words=max_words)
    return iter(train_loader(cfg, lambda s, rng: (s["__key__"], rng.random(), float(torch.rand(()))),
                               collate=list))


@pytest.mark.parametrize("workers", [0, 2])
def test_curriculum_draws_short_captions_first_and_resumes_exactly(tmp_path, workers):
    """The first `easy_batches` batches of a rank hold only samples of at most `max_words` words;
    later ones all lengths. A resume inside the short phase, or after it, continues the same
    batches as the uninterrupted stream."""
    torch.set_num_threads(1)
    urls = write_shards(tmp_path, [12, 9], words=lambda s, i: 3 + i % 3)
    straight = _curriculum_loader(urls, 0, workers)
    batches = [next(straight) for _ in range(14)]
    words = [[_words_of_key(key) for key, *_ in batch] for batch in batches]
    assert all(w == 3 for batch in words[:5] for w in batch), words[:5]
    assert {w for batch in words[5:] for w in batch} == {3, 4, 5}, words[5:]
    for start in (2, 5, 8):
        resumed = _curriculum_loader(urls, start, workers)
        assert [next(resumed) for _ in range(14 - start)] == batches[start:], f"resume at batch {start}"


def test_curriculum_without_a_short_enough_caption_names_the_setting(tmp_path):
    urls = write_shards(tmp_path, [4], words=lambda s, i: 6)
    with pytest.raises(RuntimeError, match="train.curriculum_max_words"):
        next(_curriculum_loader(urls, 0, 0, max_words=5))


def test_dict_batches_cross_from_loader_workers_as_tensors(tmp_path):
    """Tensor batches travel from a loader worker as numpy (no shared-memory fd per tensor) and
    arrive as the same tensors, with the same batch order as reading in-process."""
    urls = write_shards(tmp_path, [6, 5])

    def decode(s, rng):
        return {"key": s["__key__"], "x": torch.full((2, 3), rng.random()), "n": torch.tensor(len(s["__key__"]))}

    def collate(samples):
        return {"key": [s["key"] for s in samples], "x": torch.stack([s["x"] for s in samples]),
                "n": torch.stack([s["n"] for s in samples]), "mask": torch.ones(len(samples), dtype=torch.bool)}

    got = {}
    for workers in (0, 1):
        cfg = StreamConfig(tuple(urls), 0, 1, workers, batch_size=4, seed=1, shuffle_buffer=3)
        it = iter(train_loader(cfg, decode, collate))
        got[workers] = [next(it) for _ in range(5)]
    for a, b in zip(got[0], got[1], strict=True):
        assert a["key"] == b["key"]
        for k in ("x", "n", "mask"):
            assert torch.is_tensor(b[k]) and b[k].dtype == a[k].dtype and torch.equal(a[k], b[k])


def test_batches_done_by_worker_matches_round_robin():
    for n in range(12):
        assert sum(batches_done_by_worker(n, w, 3) for w in range(3)) == n


def test_optimizer_and_scheduler_round_trip_without_pickle(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    opt, sched = build_optimizer(model, 1e-2, 0.1, warmup_steps=2, total_steps=10, min_ratio=0.1)
    for _ in range(3):
        model(torch.randn(5, 4)).pow(2).mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    optimizer_to_files(opt, tmp_path)
    scheduler_to_file(sched, tmp_path)
    opt2, sched2 = build_optimizer(model, 1e-2, 0.1, warmup_steps=2, total_steps=10, min_ratio=0.1)
    optimizer_from_files(opt2, tmp_path)
    scheduler_from_file(sched2, tmp_path)
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for pid in a["state"]:
        for name, value in a["state"][pid].items():
            assert torch.equal(value, b["state"][pid][name])
    assert sched2.get_last_lr() == sched.get_last_lr() and sched2.last_epoch == 3


def test_lr_scales_give_the_named_parameters_their_own_rate_through_the_schedule():
    """train.image_lr_scale's groups: parameters whose name holds the key run at lr x scale, the
    warm-up and cosine scaling both rates alike; decay still skips 1-D parameters; a scale of 1
    leaves the usual two groups."""
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"image_encoder": torch.nn.Linear(4, 3), "decoder": torch.nn.Linear(3, 2)})
    assert len(build_optimizer(model, 1e-2, 0.1, 2, 10, 0.1, lr_scales={"image_encoder.": 1.0})[0].param_groups) == 2
    opt, sched = build_optimizer(model, 1e-2, 0.1, warmup_steps=2, total_steps=10, min_ratio=0.1,
                                 lr_scales={"image_encoder.": 3.0})
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    enc, dec = model["image_encoder"], model["decoder"]
    assert by_param[id(enc.weight)]["weight_decay"] == 0.1 and by_param[id(enc.bias)]["weight_decay"] == 0.0
    for _ in range(4):
        ratio = by_param[id(enc.weight)]["lr"] / by_param[id(dec.weight)]["lr"]
        assert ratio == pytest.approx(3.0) and by_param[id(enc.bias)]["lr"] == by_param[id(enc.weight)]["lr"]
        dec(enc(torch.randn(5, 4))).pow(2).mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    assert by_param[id(dec.weight)]["lr"] < 1e-2  # the cosine has begun
    with pytest.raises(ValueError, match="lr_scales need the base lr"):
        param_groups(model, 0.1, lr_scales={"image_encoder.": 2.0})


def test_warmup_cosine_schedule_shape():
    f = warmup_cosine(warmup_steps=4, total_steps=20, min_ratio=0.1)
    assert f(0) < f(3) <= 1.0
    assert f(4) == pytest.approx(1.0)
    assert f(20) == pytest.approx(0.1) and f(50) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(4, 25))


def test_latest_checkpoint_picks_highest_complete_step(tmp_path):
    from safetensors.torch import save_file

    from pipelines.core.checkpoints import TRAINING_FILES

    for step, complete in [(4, True), (8, True), (12, False)]:
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        for name in TRAINING_FILES if complete else ():  # whole files of each kind
            if name.endswith(".safetensors"):
                save_file({"w": torch.zeros(2)}, str(d / name))
            else:
                (d / name).write_text("{}")
        write_trainer_state(d, {"step": step})
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-8"
    assert latest_checkpoint(tmp_path / "missing") is None


def test_each_stage_alternates_its_configured_tasks():
    """`pretrain` steps run train.pretrain_tasks in turn, `finetune` steps train.finetune_tasks; a
    task named directly trains alone, and a bad list names the key to fix."""
    from pipelines.config import load_config
    from pipelines.train.driver import TrainingError, resolve_tasks

    cfg = load_config("debug", ["train.pretrain_tasks=[caption, caption, pretrain]", "train.finetune_tasks=[vqa]"])
    assert resolve_tasks(cfg, "pretrain") == ["caption", "caption", "pretrain"]
    assert resolve_tasks(cfg, "finetune") == ["vqa"]
    assert resolve_tasks(cfg, "retrieval") == ["retrieval"]
    assert resolve_tasks(load_config("debug"), "pretrain") == ["pretrain"]  # the default: all losses at once
    with pytest.raises(TrainingError, match=r"train.pretrain_tasks=\['captions'\]"):
        resolve_tasks(load_config("debug", ["train.pretrain_tasks=[captions]"]), "pretrain")


def test_curriculum_tasks_are_checked_and_only_pretraining_has_them():
    from pipelines.config import load_config
    from pipelines.train.driver import TrainingError, curriculum_tasks

    cfg = load_config("debug", ["train.curriculum_steps=10", "train.curriculum_tasks=[asr]"])
    assert curriculum_tasks(cfg, "pretrain") == ["asr"]
    assert curriculum_tasks(cfg, "finetune") == []
    assert curriculum_tasks(load_config("debug", ["train.curriculum_tasks=[asr]"]), "pretrain") == []  # no curriculum
    with pytest.raises(TrainingError, match=r"train.curriculum_tasks=\['asrr'\] names 'asrr'"):
        curriculum_tasks(load_config("debug", ["train.curriculum_steps=10", "train.curriculum_tasks=[asrr]"]), "pretrain")
