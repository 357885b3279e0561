"""A tiny speech-recognition run on the spoken synthetic set through Ray Train: the shards' FLAC
members reach the audio encoder, and what the trained model transcribes depends on the clip it
hears. Scored against each clip's own caption, its word error rate is far below the same
transcripts scored against another clip's caption (what a model deaf to the audio gets) and below
the untrained model's. The clips are the train split's: this checks the wiring and that it learns
to hear, in seconds; how well it generalises is bench/audio.py's question."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipelines.core.audio import decode_audio_members
from pipelines.core.dataset import read_shard, shard_paths
from pipelines.evaluate.audio import wer_counts

CLIPS = 32


def _wer(hypotheses: list[str], references: list[str]) -> float:
    counts = [wer_counts(r, h) for r, h in zip(references, hypotheses, strict=True)]
    return sum(e for e, _ in counts) / sum(w for _, w in counts)


def _transcripts(checkpoint, raws: list[dict]) -> list[str]:
    from mmcore.checkpoint import load_checkpoint
    from mmcore.data import decode_text, pad_waves, waveform

    model, tok, _ = load_checkpoint(checkpoint)
    wave, lengths = pad_waves([waveform(r["flac"]) for r in raws])
    return decode_text(tok, model.eval().transcribe(wave, lengths, max_len=30))


@pytest.fixture
def cfg(tmp_path, monkeypatch):
    from pipelines.config import load_config

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return load_config("debug", [
        f"services.home={tmp_path / 'home'}", "model.audio_encoder=debug", "model.image_size=32",
        "model.overrides={audio.num_layers: 1}", "train.steps=60", "train.pretrain_tasks=[asr]",
        "train.batch_size=8", "train.lr=3.0e-3", "train.warmup_steps=5", "train.label_smoothing=0.0",
        "train.eval_every=0", "train.checkpoint_every=60", "train.log_every=20", "train.loader_workers=0",
        "scaling.num_workers=1", "scaling.cpus_per_worker=1",
    ])


def test_a_tiny_asr_run_hears_what_it_transcribes(cfg, spoken_dataset, ray_local):
    from pipelines.train import run_training
    from pipelines.train.driver import build_job

    torch.set_num_threads(1)
    raws = [decode_audio_members(r, 16_000) for u in shard_paths(spoken_dataset, "train") for r in read_shard(u)]
    raws = raws[:CLIPS]
    refs = [r["txt"].decode() for r in raws]
    job = build_job(cfg, str(spoken_dataset), "pretrain")
    assert job.data.sample.audio and job.model.audio.num_layers == 1

    ckpt = run_training(cfg, spoken_dataset, "pretrain")
    said = _transcripts(ckpt, raws)
    own, deaf = _wer(said, refs), _wer(said, refs[1:] + refs[:1])

    from mmcore.checkpoint import save_checkpoint
    from mmcore.model import build_model

    torch.manual_seed(0)
    untrained = save_checkpoint(Path(ckpt).parent / "untrained", build_model(job.model).eval(), job.data.tokenizer)
    before = _wer(_transcripts(untrained, raws), refs)
    print(f"WER: {own:.3f} trained, {deaf:.3f} against another clip's caption, {before:.3f} untrained")
    assert own < 0.6 * deaf, f"WER {own:.3f} on its own clips vs {deaf:.3f} against another clip's caption"
    assert own < 0.5 * before and own < 0.5, f"WER {own:.3f} after training, {before:.3f} untrained"


def test_the_curriculum_trains_its_own_tasks(cfg, spoken_dataset, ray_local):
    """Pretraining set to captioning alone, but every step inside a curriculum of ASR steps
    (`train.curriculum_tasks`): the run learns to transcribe, which only ASR steps teach."""
    from pipelines.train import run_training

    torch.set_num_threads(1)
    cfg.train.pretrain_tasks, cfg.train.curriculum_tasks = ["caption"], ["asr"]
    cfg.train.curriculum_steps, cfg.train.curriculum_max_words = cfg.train.steps, 100
    raws = [decode_audio_members(r, 16_000) for u in shard_paths(spoken_dataset, "train") for r in read_shard(u)]
    raws = raws[:CLIPS]
    refs = [r["txt"].decode() for r in raws]
    said = _transcripts(run_training(cfg, spoken_dataset, "pretrain"), raws)
    own, deaf = _wer(said, refs), _wer(said, refs[1:] + refs[:1])
    assert own < 0.6 * deaf and own < 0.5, f"WER {own:.3f} on its own clips vs {deaf:.3f} against another's caption"


def test_audio_tasks_need_an_audio_encoder(cfg, spoken_dataset):
    from pipelines.train import TrainingError
    from pipelines.train.driver import build_job

    cfg.model.audio_encoder, cfg.model.overrides = None, {}
    with pytest.raises(TrainingError, match="model.audio_encoder"):
        build_job(cfg, str(spoken_dataset), "pretrain")
