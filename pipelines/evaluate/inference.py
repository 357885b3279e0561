"""Model outputs for the test shards: embeddings, generated captions, VQA answers; for a model
with an audio encoder also transcripts, audio embeddings and answers to the spoken questions.

One shard is the unit of work, so the same function runs in-process or as one Ray task per
shard, and batches never straddle shards: the outputs are identical either way.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from pipelines.core.progress import Progress


@dataclass(frozen=True)
class InferenceSettings:
    image_size: int
    max_text_len: int
    max_answer_len: int
    batch_size: int
    max_len: int  # caption generation length
    num_beams: int
    audio_rate: int | None = None  # the audio encoder's sample rate; None: an image-text model
    audio_tokens: bool = False  # keep each clip's audio tokens (the audio-text re-ranking needs them)


def settings_for(cfg, checkpoint_dir) -> InferenceSettings:
    """Settings from the config's `eval`/`model` sections and the checkpoint's input size."""
    from mmcore.checkpoint import read_config

    model_cfg, _ = read_config(checkpoint_dir)
    return InferenceSettings(
        image_size=model_cfg.image.image_size,
        max_text_len=cfg.model.max_text_len,
        max_answer_len=cfg.model.max_answer_len,
        batch_size=cfg.eval.batch_size,
        max_len=cfg.eval.max_len,
        num_beams=cfg.eval.num_beams,
        audio_rate=model_cfg.audio.sample_rate if model_cfg.audio is not None else None,
        audio_tokens=model_cfg.audio is not None and cfg.eval.audio_rerank_k > 0,
    )


def _decode(raw: dict, tokenizer, s: InferenceSettings) -> dict[str, Any]:
    """A raw shard sample -> image tensor `(3, S, S)`, every caption's ids, every answerable QA
    pair's question ids (all read through `mmcore.data.parse_sample`)."""
    from mmcore.data import SampleConfig, decode_sample, encode, parse_sample
    from pipelines.core.audio import decode_audio_members
    from pipelines.ingest.synth import scene_objects

    if s.audio_rate:
        raw = decode_audio_members(raw, s.audio_rate)
    sample = parse_sample(raw)
    item = decode_sample(sample, tokenizer, SampleConfig(s.image_size, s.max_text_len, s.max_answer_len), train=False)
    qa = sample.answerable_qa
    audio = _audio_item(sample, qa, tokenizer, s) if s.audio_rate else {}
    return {
        **audio,
        "key": sample.key,
        "image": item["image"],
        "captions": list(sample.captions),
        "caption_ids": [torch.tensor(encode(tokenizer, c, s.max_text_len)) for c in sample.captions],
        "qa": qa,
        "question_ids": [torch.tensor(encode(tokenizer, p["question"], s.max_text_len)) for p in qa],
        "objects": scene_objects(sample.meta),
    }


def _audio_item(sample, qa: list[dict], tokenizer, s: InferenceSettings) -> dict[str, Any]:
    """The spoken caption's waveform `(T,)` (None without), the primary caption it speaks (and its
    ids), and each answerable QA pair's spoken question `(Tq,)` (None where it has none)."""
    from mmcore.data import encode
    from mmcore.data.sample import waveform

    return {
        "audio": waveform(sample.audio) if sample.audio is not None else None,
        "spoken_caption": sample.caption,
        "spoken_caption_ids": torch.tensor(encode(tokenizer, sample.caption, s.max_text_len)),
        "question_audio": [waveform(sample.spoken[p["audio"]]) if p.get("audio") in sample.spoken else None
                           for p in qa],
    }


@torch.no_grad()
def infer_audio(model, tokenizer, items: list[dict], images, s: InferenceSettings) -> dict[str, Any]:
    """`transcripts` (B, None without audio), `audio_captions` (B, the caption written from the
    image and its spoken description; None without audio), `audio_emb (B, E)` (zeros without),
    `transcript_emb (B, E)` of the spoken captions, `spoken_answers` (per item, per QA pair: str or
    None); with `s.audio_tokens` also `audio_tokens` (per item, its clip's valid tokens `(N_i, D)`,
    None without audio) and `transcript_ids` (per item, the spoken caption's ids)."""
    from mmcore.data import decode_text, pad_ids, pad_waves

    have = [i for i, it in enumerate(items) if it["audio"] is not None]
    transcripts: list[str | None] = [None] * len(items)
    audio_captions: list[str | None] = [None] * len(items)
    audio_emb = torch.zeros(len(items), model.cfg.embed_dim)
    tokens: list[torch.Tensor | None] = [None] * len(items)
    if have:
        wave, lengths = pad_waves([items[i]["audio"] for i in have])
        clip_tokens, clip_mask, audio_emb[have] = model.encode_audio(wave, lengths)
        for j, i in enumerate(have):
            tokens[i] = clip_tokens[j, clip_mask[j]].clone()
        said = decode_text(tokenizer, model.transcribe(wave, lengths, s.max_len, num_beams=s.num_beams))
        written = decode_text(tokenizer, model.caption_with_audio(images[have], wave, lengths, s.max_len,
                                                                  num_beams=s.num_beams))
        for i, text, caption in zip(have, said, written, strict=True):
            transcripts[i], audio_captions[i] = text, caption
    ids, mask = pad_ids([it["spoken_caption_ids"] for it in items], model.cfg.pad_id)
    _, transcript_emb = model.encode_text(ids, mask)
    asked = [(i, k) for i, it in enumerate(items) for k, q in enumerate(it["question_audio"]) if q is not None]
    answers: list[list[str | None]] = [[None] * len(it["question_audio"]) for it in items]
    if asked:
        wave, lengths = pad_waves([items[i]["question_audio"][k] for i, k in asked])
        out = model.answer_spoken(images[[i for i, _ in asked]], wave, lengths, s.max_answer_len)
        for (i, k), text in zip(asked, decode_text(tokenizer, out), strict=True):
            answers[i][k] = text
    out = {"transcripts": transcripts, "audio_captions": audio_captions, "audio_emb": audio_emb,
           "transcript_emb": transcript_emb, "spoken_answers": answers,
           "spoken_captions": [it["spoken_caption"] for it in items]}
    if s.audio_tokens:
        out["audio_tokens"] = tokens
        out["transcript_ids"] = [it["spoken_caption_ids"].tolist() for it in items]
    return out


@torch.no_grad()
def infer_batch(model, tokenizer, items: list[dict], s: InferenceSettings) -> dict[str, Any]:
    """B decoded items -> `image_emb (B, E)`, `image_tokens (B, N, D)`, `text_emb (T, E)` for all
    T captions, `text_ids` (T lists), `text_owner (T,)` batch-local image index, `generated` (B),
    `answers` (one list of predicted answers per item)."""
    from mmcore.data import decode_text, pad_ids

    pad = model.cfg.pad_id
    images = torch.stack([it["image"] for it in items])
    image_tokens, image_emb = model.encode_image(images)
    generated = decode_text(tokenizer, model.generate(images, s.max_len, num_beams=s.num_beams))
    text_ids = [ids for it in items for ids in it["caption_ids"]]
    owner = [i for i, it in enumerate(items) for _ in it["caption_ids"]]
    ids, mask = pad_ids(text_ids, pad)
    _, text_emb = model.encode_text(ids, mask)
    answers: list[list[str]] = [[] for _ in items]
    q_owner = [i for i, it in enumerate(items) for _ in it["question_ids"]]
    if q_owner:
        q_ids, q_mask = pad_ids([q for it in items for q in it["question_ids"]], pad)
        out = model.generate(images[q_owner], s.max_answer_len, prompt_ids=q_ids, prompt_mask=q_mask)
        for i, text in zip(q_owner, decode_text(tokenizer, out), strict=True):
            answers[i].append(text)
    audio = infer_audio(model, tokenizer, items, images, s) if s.audio_rate else {}
    return {
        **audio,
        "keys": [it["key"] for it in items],
        "image_emb": image_emb, "image_tokens": image_tokens, "text_emb": text_emb,
        "text_ids": [t.tolist() for t in text_ids], "text_owner": torch.tensor(owner, dtype=torch.long),
        "generated": generated, "answers": answers,
        "captions": [it["captions"] for it in items], "qa": [it["qa"] for it in items],
        "objects": [it["objects"] for it in items],
    }


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Concatenate batch/shard outputs in order; `text_owner` becomes a global image index."""
    if not parts:
        raise ValueError("no model outputs to merge: the test split is empty")
    out: dict[str, Any] = {}
    for name in ("image_emb", "image_tokens", "text_emb", "audio_emb", "transcript_emb"):
        if name in parts[0]:
            out[name] = torch.cat([p[name] for p in parts])
    offsets, total = [], 0
    for p in parts:
        offsets.append(total)
        total += len(p["keys"])
    out["text_owner"] = torch.cat([p["text_owner"] + off for p, off in zip(parts, offsets, strict=True)])
    for name in ("keys", "text_ids", "generated", "answers", "captions", "qa", "objects",
                 "transcripts", "audio_captions", "spoken_answers", "spoken_captions", "audio_tokens",
                 "transcript_ids"):
        if name in parts[0]:
            out[name] = [x for p in parts for x in p[name]]
    return out


def infer_shard(checkpoint_dir: str, url: str, s: InferenceSettings, num_threads: int | None = None) -> dict:
    """All model outputs for one shard (loads the checkpoint; runs in a Ray task or in-process)."""
    from mmcore.checkpoint import load_checkpoint
    from pipelines.core.dataset import read_shard

    if num_threads:
        torch.set_num_threads(num_threads)
    model, tokenizer, _ = load_checkpoint(checkpoint_dir)
    if tokenizer is None:
        raise ValueError(f"{checkpoint_dir} has no tokenizer files; evaluation needs them to read captions")
    parts, batch = [], []
    for sample in read_shard(url):
        batch.append(_decode(sample, tokenizer, s))
        if len(batch) == s.batch_size:
            parts.append(infer_batch(model, tokenizer, batch, s))
            batch = []
    if batch:
        parts.append(infer_batch(model, tokenizer, batch, s))
    if not parts:
        raise ValueError(f"test shard {url} holds no samples")
    return merge(parts)


def infer_shards(checkpoint_dir: str, urls: list[str], s: InferenceSettings, use_ray: bool,
                 cpus_per_task: float = 1.0, label: str = "[eval] inference") -> list[dict]:
    """Outputs of every shard, in shard order (Ray tasks run them in parallel when `use_ray`);
    `label` names the work in the progress lines."""
    start = time.time()
    with Progress(label, total=len(urls), unit="shards") as bar:  # live on a TTY, else every 10 s
        if not use_ray:
            outs = []
            for url in urls:
                outs.append(infer_shard(checkpoint_dir, url, s))
                bar.update()
            return outs
        import ray

        task = ray.remote(num_cpus=cpus_per_task)(infer_shard)
        threads = max(1, int(cpus_per_task))
        refs = [task.remote(checkpoint_dir, url, s, threads) for url in urls]
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            bar.update(len(ready))
    outs = ray.get(refs)
    print(f"{label.split()[0]} {len(urls)} shards on Ray: {sum(len(o['keys']) for o in outs)} samples "
          f"({time.time() - start:.1f}s)", flush=True)
    return outs


def settings_dict(s: InferenceSettings) -> dict:
    return asdict(s)
