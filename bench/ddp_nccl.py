"""NCCL DDP check: the project's train_step under torch DDP on every local GPU, bf16 autocast.

    torchrun --nproc_per_node=$(nvidia-smi -L | wc -l) bench/ddp_nccl.py [--preset small]

Each rank trains on its own synthetic batch with ITC negatives gathered from all ranks
(`gather_with_grad`, as in Ray Train workers); prints per-rank loss, global samples/s, and checks
that the loss falls and that the DDP replicas stay identical. Exits 2 without CUDA.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", choices=("debug", "small", "base"))
    p.add_argument("--batch", type=int, default=32, help="per rank")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--cpu", action="store_true", help="dry run with gloo on CPU (checks the script)")
    args = p.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        print("bench/ddp_nccl.py: no CUDA device; run it with torchrun on a GPU node.", file=sys.stderr)
        return 2
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench.gpu import synthetic_batch
    from mmcore.losses import build_loss
    from mmcore.model import build_model, model_config
    from pipelines.train.optim import build_optimizer
    from pipelines.train.steps import gather_with_grad, train_step

    dist.init_process_group("gloo" if args.cpu else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu") if args.cpu else torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    sync = (lambda: None) if args.cpu else torch.cuda.synchronize
    if not args.cpu:
        torch.cuda.set_device(device)
    torch.manual_seed(0)  # identical initial weights on every rank, as DDP requires
    cfg = model_config(args.preset)
    model = build_model(cfg, load_pretrained=False).to(device).train()
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=None if args.cpu else [device.index])
    batch = synthetic_batch(cfg, args.batch, 32, device)
    gathered = gather_with_grad(torch.full((2, 3), float(rank), device=device))
    assert gathered.shape == (2 * world, 3) and gathered[-1, 0].item() == world - 1
    loss_fn = build_loss("pretrain", gather_fn=gather_with_grad if world > 1 else None)
    opt, sched = build_optimizer(model, 3e-4, 0.05, 5, args.steps, 0.1, fused=not args.cpu)
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=not args.cpu)  # noqa: E731
    losses = []
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        out = train_step(ddp, loss_fn, [batch], "pretrain", opt, sched, 1.0, autocast)
        losses.append(float(out["loss"]))
    sync()
    rate = args.steps * args.batch * world / (time.perf_counter() - t0)
    checksum = torch.stack([q.detach().float().sum() for q in model.parameters()]).sum().reshape(1)
    sums = [torch.zeros_like(checksum) for _ in range(world)]
    dist.all_gather(sums, checksum)
    same = all(torch.equal(s, sums[0]) for s in sums)
    if rank == 0:
        print(f"{dist.get_backend()} ddp: world {world}, preset {args.preset}, batch {args.batch}/rank, {'fp32' if args.cpu else 'bf16'}")
        print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}; {rate:.1f} samples/s; replicas identical: {same}")
    dist.destroy_process_group()
    ok = losses[-1] < losses[0] and same
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
