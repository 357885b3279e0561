"""Calibrated image-text matching: after fine-tuning, fit ITM's score on the validation split.

The score is a logistic regression (Platt scaling, over three numbers rather than one) on the ITM
head's logit and the caption decoder's mean and lowest token log-probability of the text
(`FusionModel.itm_features`). It is fitted on the validation split's pairs, built exactly as
evaluation builds the test split's: each image's first caption against its hardest negative
(`ranking.itm_pairs`). Training is untouched; the fitted weights go into the checkpoint
(`heads.itm_calibration`, with `itm_calibration` turned on in its config), so every later reader
of the checkpoint (evaluation, the registry, serving) scores matches the calibrated way.

Why: the decoder must name every word of a caption from the image, so a caption with one wrong
colour or shape has one unlikely token; the head, trained on far fewer such near misses, does
not see it as well. On the kept runs of the default recipe the decoder's two numbers separated
evaluation's pairs 0.95-0.98 of the time, the head 0.77-0.87 (bench/results/learning-2026-12-04.md).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mmcore.heads import ITM_IDENTITY

# Fewer validation pairs than this: too few to fit three weights and a bias; the head stays alone.
MIN_PAIRS = 20
# L2 penalty on the standardised weights: the validation pairs are often almost separable, and
# without it the weights would grow without bound (scores of +-1e3 for the same decisions).
L2 = 1e-2


def fit_logistic(x: Tensor, y: Tensor, l2: float = L2) -> Tensor:
    """Weights `(F + 1,)` (the last is the bias) of an L2-regularised logistic regression of labels
    `y (P,)` in {0, 1} on features `x (P, F)`: deterministic (full-batch L-BFGS in float64 on
    standardised features, the result mapped back to the raw features)."""
    x, y = x.double(), y.double()
    mu, sd = x.mean(0), x.std(0).clamp(min=1e-6)
    z = (x - mu) / sd
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=500, tolerance_grad=1e-10, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y) + l2 * (w * w).sum() / 2
        loss.backward()
        return loss

    opt.step(closure)
    raw = w.detach() / sd
    return torch.cat([raw, (b.detach() - (raw * mu).sum()).reshape(1)]).float()


def pair_features(model, merged: dict, batch_size: int) -> tuple[Tensor, Tensor]:
    """`(x (2M, 3), y (2M,))`: `itm_features` of each image's positive pair, then of its hardest
    negative (`ranking.itm_pairs`), labelled 1 and 0."""
    from mmcore.data import pad_ids
    from pipelines.evaluate.ranking import itm_pairs

    images, pos, neg = itm_pairs(merged)
    ids, mask = pad_ids([torch.tensor(t) for t in merged["text_ids"]], model.cfg.pad_id)
    tokens = merged["image_tokens"]
    rows = [model.itm_features(tokens[images[s: s + batch_size]], ids[t[s: s + batch_size]], mask[t[s: s + batch_size]])
            for t in (pos, neg) for s in range(0, len(images), batch_size)]
    x = torch.cat(rows) if rows else torch.zeros(0, 3)
    return x, torch.cat([torch.ones(len(images)), torch.zeros(len(images))])


def pair_accuracy(scores: Tensor, y: Tensor) -> float:
    """The share of pairs on the right side of 0 (positives and negatives are equally many)."""
    return float(((scores > 0).float() == y).float().mean()) if len(y) else float("nan")


def calibrate_itm(cfg, checkpoint, data_dir) -> dict[str, Any]:
    """Fit the calibrated ITM score of the local `checkpoint` directory on `data_dir`'s validation
    split and write it into the checkpoint (in place, each file replaced atomically). Fits again
    from the head's own logits when already calibrated, so a retried step gives the same weights.
    Returns what it did: `weights`, `val_pairs`, `val_acc_head`, `val_acc_calibrated`, or
    `skipped` with the reason (the checkpoint is then left as it was)."""
    from mmcore.checkpoint import load_checkpoint
    from pipelines.core.dataset import shard_paths
    from pipelines.evaluate.inference import infer_shards, merge, settings_for
    from pipelines.evaluate.run import _use_ray
    from pipelines.runtime import init_ray

    start, checkpoint = time.time(), Path(checkpoint)
    repair(checkpoint)
    urls = shard_paths(data_dir, "val")
    if not urls:
        return _skip(checkpoint, f"{data_dir} has no validation shards (data.split_fractions)")
    use_ray = _use_ray(cfg, len(urls))
    if use_ray:
        init_ray(cfg)
    merged = merge(infer_shards(str(checkpoint), urls, settings_for(cfg, checkpoint), use_ray,
                                cfg.eval.ray_cpus_per_task, label="[calibrate] validation"))
    model, _, _ = load_checkpoint(checkpoint)
    model.eval()
    x, y = pair_features(model, merged, cfg.eval.batch_size)
    if len(y) // 2 < MIN_PAIRS:
        return _skip(checkpoint, f"the validation split has {len(y) // 2} matching pairs, fewer than {MIN_PAIRS}")
    weights = fit_logistic(x, y)
    result = {"val_pairs": len(y) // 2, "val_acc_head": pair_accuracy(x[:, 0], y),
              "val_acc_calibrated": pair_accuracy(x @ weights[:3] + weights[3], y)}
    if result["val_acc_calibrated"] < result["val_acc_head"] or not torch.isfinite(weights).all():
        weights = torch.tensor(ITM_IDENTITY)  # the fit does not beat the head: the head alone
        result["val_acc_calibrated"] = result["val_acc_head"]
    result["weights"] = [round(float(v), 6) for v in weights]
    write_calibration(checkpoint, weights, result)
    print(f"[calibrate] ITM on {result['val_pairs']} validation pairs: head {result['val_acc_head']:.3f} -> "
          f"calibrated {result['val_acc_calibrated']:.3f} (weights {result['weights']}; {time.time() - start:.1f}s)",
          flush=True)
    return result


def _skip(checkpoint: Path, reason: str) -> dict[str, Any]:
    print(f"[calibrate] skipped for {checkpoint}: {reason}; ITM scores with its head alone", flush=True)
    return {"skipped": reason}


def repair(checkpoint: Path) -> None:
    """Make a checkpoint whose weights hold `heads.itm_calibration` but whose config does not turn
    `itm_calibration` on (an interrupted `write_calibration`) loadable again, as uncalibrated."""
    from safetensors import safe_open

    from mmcore.checkpoint import CONFIG, WEIGHTS

    with safe_open(str(checkpoint / WEIGHTS), framework="pt") as f:
        has_buffer = "heads.itm_calibration" in f.keys()
    if has_buffer and not json.loads((checkpoint / CONFIG).read_text())["model"].get("itm_calibration"):
        write_calibration(checkpoint, torch.tensor(ITM_IDENTITY), {"repaired": "interrupted calibration"})


def write_calibration(checkpoint: Path, weights: Tensor, result: dict[str, Any]) -> None:
    """Put `weights (4,)` in the checkpoint's `heads.itm_calibration` and turn `itm_calibration` on
    in its config (with `result` under `extra.itm_calibration`). Each file is replaced atomically;
    a write interrupted between the two leaves weights the config does not name, which `repair`
    (run first by `calibrate_itm`) makes whole again."""
    from safetensors.torch import load_file, save

    from mmcore.checkpoint import CONFIG, FORMAT, WEIGHTS
    from pipelines.core.storage import write_bytes_atomic

    state = load_file(str(checkpoint / WEIGHTS))
    state["heads.itm_calibration"] = weights.float().contiguous()
    write_bytes_atomic(checkpoint / WEIGHTS, save(state, metadata={"format": FORMAT}))
    config = json.loads((checkpoint / CONFIG).read_text())
    config["model"]["itm_calibration"] = True
    config.setdefault("extra", {})["itm_calibration"] = result
    write_bytes_atomic(checkpoint / CONFIG, (json.dumps(config, indent=2, sort_keys=True)).encode())
