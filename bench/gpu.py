"""bf16 training throughput and MFU of one model preset on one GPU (default: `base`).

Synthetic in-memory batches (no data loading), the project's own `train_step` (AdamW, clipping,
bf16 autocast), so the number is the model's ceiling on this device:

    python bench/gpu.py [--preset base] [--batch 64] [--steps 30] [--task pretrain] [--compile]

Prints samples/s, achieved TFLOP/s, MFU against the device's dense bf16 peak, and peak memory.
Exits with status 2 and a clear message when no CUDA device is present.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="base", choices=("debug", "small", "base"))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=30, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--task", default="pretrain", choices=("pretrain", "caption", "vqa", "retrieval"))
    p.add_argument("--text-len", type=int, default=32)
    p.add_argument("--compile", action="store_true", help="torch.compile the model first")
    return p.parse_args()


def synthetic_batch(cfg, batch: int, text_len: int, device: torch.device) -> dict:
    """Random images `(B, 3, S, S)` and token ids `(B, L)` shaped like a collated shard batch."""
    g = torch.Generator().manual_seed(0)
    size, vocab = cfg.image.image_size, cfg.vocab_size

    def ids(length: int) -> torch.Tensor:
        x = torch.randint(5, vocab, (batch, length), generator=g)
        x[:, 0], x[:, -1] = cfg.bos_id, cfg.eos_id
        return x

    out = {
        "image": torch.randn(batch, 3, size, size, generator=g),
        "caption_ids": ids(text_len), "question_ids": ids(text_len // 2), "answer_ids": ids(4),
        "has_qa": torch.ones(batch, dtype=torch.bool),
    }
    for name in ("caption", "question", "answer"):
        out[f"{name}_mask"] = torch.ones_like(out[f"{name}_ids"])
    return {k: v.to(device, non_blocking=True) for k, v in out.items()}


def main() -> int:
    args = parse()
    if not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device found (torch.cuda.is_available() is False). Run it on a "
              "machine with an NVIDIA GPU, e.g. an H200 node of the cluster.", file=sys.stderr)
        return 2
    from mmcore.losses import build_loss
    from mmcore.model import build_model, count_parameters, model_config
    from pipelines.train.optim import build_optimizer
    from pipelines.train.steps import train_step
    from pipelines.train.throughput import mfu, peak_flops, train_flops_per_sample

    device = torch.device("cuda", torch.cuda.current_device())
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    cfg = model_config(args.preset)
    model = build_model(cfg, load_pretrained=False).to(device).train()
    batch = synthetic_batch(cfg, args.batch, args.text_len, device)
    autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731

    def forward():
        with autocast():
            model(batch, args.task)

    flops = train_flops_per_sample(forward, args.batch)
    runner = torch.compile(model) if args.compile else model
    opt, sched = build_optimizer(model, 1e-4, 0.05, 10, args.steps + args.warmup, 0.1, fused=True)
    loss_fn = build_loss(args.task)
    for _ in range(args.warmup):
        train_step(runner, loss_fn, [batch], args.task, opt, sched, 1.0, autocast)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        out = train_step(runner, loss_fn, [batch], args.task, opt, sched, 1.0, autocast)
    torch.cuda.synchronize(device)
    rate = args.steps * args.batch / (time.perf_counter() - t0)
    peak = peak_flops(device)
    util = mfu(rate, flops, peak, 1)
    print(f"device            {torch.cuda.get_device_name(device)}")
    print(f"model             {args.preset} ({count_parameters(model) / 1e6:.1f}M params), task {args.task}, "
          f"batch {args.batch}, bf16 autocast{', compiled' if args.compile else ''}")
    print(f"loss (last step)  {float(out['loss']):.4f}")
    print(f"samples/s         {rate:.1f}")
    print(f"train FLOPs/sample {flops / 1e9:.2f} GFLOP (3 x measured forward)")
    print(f"achieved          {rate * flops / 1e12:.1f} TFLOP/s")
    print(f"MFU               {util:.1%}" if util is not None else "MFU               unknown (device peak not listed)")
    print(f"peak memory       {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
