"""Training test support: the tiny two-worker config the Ray Train tests share, and loss curves."""

from __future__ import annotations

from pipelines.config import load_config

STEPS, CKPT_EVERY = 10, 4


def tiny_config(home, *extra: str):
    return load_config("debug", [
        f"services.home={home}", f"train.steps={STEPS}", f"train.checkpoint_every={CKPT_EVERY}",
        "train.batch_size=8", "train.log_every=2", "train.eval_every=0", "train.warmup_steps=2",
        "train.loader_workers=2", "train.val_max_samples=16", "eval.batch_size=16",
        "scaling.num_workers=2", "scaling.cpus_per_worker=1", *extra,
    ])


def losses(state: dict, key: str = "pretrain_loss") -> dict[int, float]:
    return {int(h["step"]): h[key] for h in state["history"] if key in h}
