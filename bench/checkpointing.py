"""Peak memory of a CPU training step with and without `train.activation_checkpointing`.

    python bench/checkpointing.py --preset small --batch 16 --rounds 3

Each round is a pair of fresh processes, in alternating order (plain first in even rounds). A half
builds the preset's model and a batch of random images and captions, takes `--steps` pretraining
steps (AdamW), and reports the step's peak memory: the process's peak resident set
(`getrusage` ru_maxrss) minus its resident set just before the first step, i.e. what the steps
added on top of the model, the batch and the interpreter (activations, gradients, optimiser
state). The optimiser state and gradients are the same in both halves, so the difference is the
activations that checkpointing does not keep. Headline: the median over rounds of the per-round
ratio checkpointed / plain, with min and max; also the step-time ratio (the recompute's cost).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kib / 1024


def run_half(args) -> dict:
    import torch

    from mmcore.losses import build_loss
    from mmcore.model import build_model, model_config
    from pipelines.train.sharding import checkpoint_activations

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(model_config(args.preset), load_pretrained=False).train()
    blocks = checkpoint_activations(model) if args.half == "ckpt" else 0
    cfg, g = model.cfg, torch.Generator().manual_seed(0)
    ids = torch.randint(3, cfg.vocab_size, (args.batch, args.text_len), generator=g)
    ids[:, 0], ids[:, -1] = cfg.bos_id, cfg.eos_id
    batch = {"image": torch.randn(args.batch, 3, cfg.image.image_size, cfg.image.image_size, generator=g),
             "caption_ids": ids, "caption_mask": torch.ones_like(ids)}
    loss_fn, opt = build_loss("pretrain"), torch.optim.AdamW(model.parameters(), lr=1e-4)
    before = rss_mib()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss_fn(model(batch, "pretrain"))["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"half": args.half, "blocks": blocks, "before_mib": before, "peak_mib": peak,
            "step_peak_mib": peak - before, "step_s": statistics.median(times[1:] or times)}


def child(args, half: str) -> dict:
    argv = [sys.executable, __file__, "--half", half, "--preset", args.preset, "--batch", str(args.batch),
            "--text-len", str(args.text_len), "--steps", str(args.steps), "--threads", str(args.threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    out = subprocess.run(argv, capture_output=True, text=True, timeout=1800, env=env)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("HALF ")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"half {half} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][5:])


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}, {max(values):.3f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", help="mmcore model preset (default: small)")
    p.add_argument("--batch", type=int, default=16, help="samples per step")
    p.add_argument("--text-len", type=int, default=32, help="caption tokens per sample")
    p.add_argument("--steps", type=int, default=3, help="training steps per half (the peak is over all)")
    p.add_argument("--rounds", type=int, default=3, help="paired rounds (alternating order)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per half")
    p.add_argument("--half", choices=["plain", "ckpt"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.half:
        print("HALF " + json.dumps(run_half(args)), flush=True)
        return
    rows = []
    for rnd in range(args.rounds):
        order = ["plain", "ckpt"] if rnd % 2 == 0 else ["ckpt", "plain"]
        got = {h: child(args, h) for h in order}
        row = {"round": rnd, "order": order, **{f"{h}_{k}": got[h][k] for h in got for k in
                                                 ("step_peak_mib", "peak_mib", "step_s")},
               "blocks": got["ckpt"]["blocks"],
               "memory_ratio": got["ckpt"]["step_peak_mib"] / got["plain"]["step_peak_mib"],
               "time_ratio": got["ckpt"]["step_s"] / got["plain"]["step_s"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"step peak memory, checkpointed / plain: {spread([r['memory_ratio'] for r in rows])} (median (min, max))")
    print(f"step time, checkpointed / plain: {spread([r['time_ratio'] for r in rows])}")


if __name__ == "__main__":
    main()
