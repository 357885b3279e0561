"""`evaluate`: a model over a dataset version's fixed test split -> report card + per-sample file."""

from __future__ import annotations

import hashlib
import json
import time
from functools import cache
from pathlib import Path
from typing import Any

from pipelines.config import Config, home_dir
from pipelines.core.checkpoints import weights_sha256
from pipelines.core.dataset import benchmark_id
from pipelines.core.records import compute_metrics, write_records
from pipelines.evaluate.audio import audio_fields
from pipelines.evaluate.inference import infer_shards, merge, settings_dict, settings_for
from pipelines.evaluate.ranking import itm_logits, reranked_ranks
from pipelines.ingest.synth import PHRASE_VOCAB as SHAPES_VOCAB


def _caption_scores(merged: dict) -> tuple[dict, dict]:
    from mmcore.metrics import bleu4_stats, cider_d_scores

    cands = {k: g for k, g in zip(merged["keys"], merged["generated"], strict=True)}
    refs = {k: list(c) for k, c in zip(merged["keys"], merged["captions"], strict=True)}
    return bleu4_stats(cands, refs), cider_d_scores(cands, refs)


def _vqa(qa: list[dict], answers: list[str]) -> list[dict]:
    from mmcore.metrics import vqa_scores
    from mmcore.metrics.grounding import question_type

    preds = {i: a for i, a in enumerate(answers)}
    scores = vqa_scores(preds, {i: p["answers"] for i, p in enumerate(qa)})
    return [{"question": p["question"], "answers": p["answers"], "predicted": a, "score": scores[i],
             "type": p.get("type") or question_type(p["question"])}
            for i, (p, a) in enumerate(zip(qa, answers, strict=True))]


def _grounding(generated: str, objects: list | None) -> list[int] | None:
    """`[tp, fp, fn]` of a caption's object phrases against the scene's objects (synthetic set)."""
    from mmcore.metrics.grounding import grounding_counts

    if not objects:
        return None
    return list(grounding_counts(generated, [tuple(o) for o in objects], SHAPES_VOCAB))


def build_records(model, merged: dict, cfg: Config) -> list[dict]:
    """One per-sample record per test image (format in `pipelines.core.records`), with the audio
    fields (`pipelines.evaluate.audio.audio_fields`) for a model with an audio encoder."""
    ranks = reranked_ranks(model, merged, cfg.eval.itm_rerank_k, cfg.eval.batch_size)
    itm = itm_logits(model, merged, cfg.eval.batch_size)
    bleu, cider = _caption_scores(merged)
    t2i: list[list[int]] = [[] for _ in merged["keys"]]
    for t, owner in enumerate(merged["text_owner"].tolist()):
        t2i[owner].append(int(ranks["t2i"][t]))
    audio = (audio_fields(merged, _vqa, model, cfg.eval.audio_rerank_k, cfg.eval.batch_size)
             if "transcripts" in merged else None)
    records = []
    for i, key in enumerate(merged["keys"]):
        rec = {"key": key, "i2t_rank": int(ranks["i2t"][i]), "t2i_ranks": t2i[i],
               "generated": merged["generated"][i], "references": merged["captions"][i],
               "bleu_stats": [float(x) for x in bleu[key]], "cider_d": float(cider[key]),
               "vqa": _vqa(merged["qa"][i], merged["answers"][i]), "itm": None,
               "grounding": _grounding(merged["generated"][i], merged["objects"][i])}
        if i in itm:
            pos, neg, neg_t = itm[i]
            rec["itm"] = {"pos_logit": pos, "neg_logit": neg, "neg_key": merged["keys"][int(merged["text_owner"][neg_t])],
                          "correct": int(pos > 0) + int(neg <= 0)}
        if audio is not None:
            rec.update(audio[i])
        records.append(rec)
    return records


@cache
def metric_code_version() -> str:
    """A hash of the code that turns model outputs into metrics (mmcore.metrics, the per-sample
    records, the retrieval ranking): when it changes, earlier reports are not comparable."""
    import mmcore.metrics
    import pipelines.core.records
    import pipelines.evaluate.audio
    import pipelines.evaluate.ranking

    files = sorted(Path(mmcore.metrics.__file__).parent.glob("*.py"))
    files += [Path(m.__file__) for m in (pipelines.core.records, pipelines.evaluate.ranking, pipelines.evaluate.audio)]
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def eval_protocol(cfg: Config) -> dict[str, Any]:
    """The settings that decide a report's numbers besides the model and the test shards; part of
    the benchmark id, so the gate never compares reports made under different settings."""
    e = cfg.eval
    return {"itm_rerank_k": e.itm_rerank_k, "audio_rerank_k": e.audio_rerank_k, "num_beams": e.num_beams, "max_len": e.max_len,
            "max_text_len": cfg.model.max_text_len, "max_answer_len": cfg.model.max_answer_len,
            "metric_code": metric_code_version()}


def _use_ray(cfg: Config, num_shards: int) -> bool:
    mode = cfg.eval.parallel
    return mode == "ray" or (mode == "auto" and num_shards >= max(1, cfg.eval.ray_min_shards))


def _write(out_dir: Path, card: dict, records: list[dict]) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    per_sample = write_records(out_dir, records)
    path = out_dir / "report_card.json"
    path.write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    return path, per_sample


def evaluate(cfg: Config, model_uri, data_dir, out_dir=None) -> dict[str, Any]:
    """Score `model_uri` (checkpoint dir or `models:/...`) on `data_dir`'s test split.

    Returns the report card: `metrics`, `benchmark`, `dataset_version`, `examples`,
    `report_card_path`, `per_sample_path`, sample counts and the settings used.
    """
    from mmcore.checkpoint import load_checkpoint
    from pipelines.core.dataset import shard_paths
    from pipelines.core.model_uri import resolve_model
    from pipelines.runtime import init_ray

    start = time.time()
    ckpt = resolve_model(cfg, model_uri)
    protocol = eval_protocol(cfg)
    version, benchmark = benchmark_id(data_dir, protocol)
    urls = shard_paths(data_dir, "test")
    if not urls:
        raise ValueError(f"{data_dir}: the test split has no shards; ingest more data or change data.split_fractions")
    settings = settings_for(cfg, ckpt)
    use_ray = _use_ray(cfg, len(urls))
    if use_ray:
        init_ray(cfg)
    print(f"[eval] {model_uri} on {benchmark}: {len(urls)} test shard(s), {'Ray' if use_ray else 'in-process'}",
          flush=True)
    merged = merge(infer_shards(str(ckpt), urls, settings, use_ray, cfg.eval.ray_cpus_per_task))
    model, tokenizer, _ = load_checkpoint(ckpt)
    records = build_records(model, merged, cfg)
    weights = weights_sha256(ckpt)
    card = {
        "model_uri": str(model_uri), "checkpoint": str(ckpt), "weights_sha256": weights,
        "dataset_version": version, "benchmark": benchmark, "protocol": protocol,
        "num_images": len(records), "num_captions": sum(len(r["t2i_ranks"]) for r in records),
        "num_questions": sum(len(r["vqa"]) for r in records),
        "num_audio": sum(r.get("asr") is not None for r in records),
        "num_spoken_questions": sum(len(r.get("spoken_vqa", [])) for r in records),
        "metrics": compute_metrics(records),
        "examples": [{"key": r["key"], "generated": r["generated"], "references": r["references"]}
                     for r in records[: cfg.eval.num_samples_shown]],
        "settings": {**settings_dict(settings), "itm_rerank_k": cfg.eval.itm_rerank_k,
                     "audio_rerank_k": cfg.eval.audio_rerank_k},
    }
    out = Path(out_dir) if out_dir else home_dir(cfg) / "evaluations" / version / weights[:12]
    card["explanations"] = explain_examples(model, tokenizer, urls, [e["key"] for e in card["examples"]],
                                            out / "attention", cfg)
    card_path, per_sample = _write(out, card, records)
    print(f"[eval] done in {time.time() - start:.1f}s: {format_metrics(card['metrics'])}", flush=True)
    return {**card, "report_card_path": str(card_path), "per_sample_path": str(per_sample)}


def explain_examples(model, tokenizer, urls: list[str], keys: list[str], out_dir: Path, cfg: Config) -> list[str]:
    """Attention pictures (`mmfusion explain`) of the shown test examples: `<out_dir>/<key>.png`."""
    from mmcore.data import load_image, parse_sample
    from pipelines.core.dataset import read_shard
    from pipelines.evaluate.explain import explain, save_explanation

    wanted, paths = set(keys), {}
    for url in urls:
        for sample in map(parse_sample, read_shard(url)):
            if sample.key in wanted:
                expl = explain(model, tokenizer, load_image(sample.image), None, cfg.eval.max_len)
                paths[sample.key] = str(save_explanation(expl, out_dir / f"{sample.key}.png"))
        if len(paths) == len(wanted):
            break
    return [paths[k] for k in keys if k in paths]


def format_metrics(metrics: dict) -> str:
    return ", ".join(f"{k}={v:.4f}" if v is not None else f"{k}=n/a" for k, v in metrics.items())
