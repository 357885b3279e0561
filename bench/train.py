"""Training throughput: Ray Train + WebDataset streaming vs a plain in-memory PyTorch loop.

Same model (the config's preset), same batch, same number of steps, one worker, one thread each.
Each round is a pair, run in alternating order (baseline first in even rounds, pipeline first in
odd ones), each half in a fresh process:
1. baseline: a single-process loop over batches decoded once into memory (no I/O, no Ray), timed
   over the loop;
2. pipeline: what a user waits for: `init_ray` (a fresh local Ray) and `run_training` on one Ray
   Train worker streaming the shards, to the returned final checkpoint (worker start-up, the
   final validation and checkpoint included), timed from before `init_ray` to the return;
3. the loader alone: the same WebDataset stream without the model (once per round, in the
   baseline's process).
The headline is the median over rounds of the paired ratio pipeline/baseline, with the spread
(min and max) beside it; never the best of either side. Where the pipeline's time goes is
printed per round: Ray start-up, the steady-state training time (steps at the later windows'
rate) and the rest (worker start-up, the first window's warm-up, validation, checkpoint).

    python bench/train.py [--data VERSION_DIR] [--steps 400] [--batch 16] [--rounds 3] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="debug", help="config file or preset (default: debug)")
    p.add_argument("--data", default=None, help="dataset version dir; default: synthesise + ingest one")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    p.add_argument("--rounds", type=int, default=3, help="paired rounds, alternating order (default 3)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--half", choices=("baseline", "pipeline"), help=argparse.SUPPRESS)  # one half, in a child
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--round-index", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def make_dataset(cfg, root: Path) -> str:
    from pipelines.ingest import ingest
    from pipelines.ingest.synth import synthesize

    raw = synthesize(root / "raw", cfg.data.synth_num, cfg.data.synth_seed)
    return str(ingest(raw, root / "datasets", cfg.data))


def baseline(job, steps: int, threads: int) -> float:
    """Samples/s of a plain loop over in-memory batches (decoded before timing)."""
    from pipelines.core.dataset import read_shard
    from pipelines.train.optim import build_optimizer
    from pipelines.train.resume import initial_model
    from pipelines.train.steps import build_losses, sample_codec, train_step

    torch.set_num_threads(threads)
    decode, collate = sample_codec(job, train=True)
    raw = itertools.islice((s for u in job.data.train_urls for s in read_shard(u)), 8 * job.train.batch_size)
    samples = [decode(s) for s in raw]
    batches = [collate(samples[i : i + job.train.batch_size]) for i in range(0, len(samples) - job.train.batch_size + 1, job.train.batch_size)]
    model = initial_model(job, None)
    opt, sched = build_optimizer(model, job.run.lr, job.train.weight_decay, job.train.warmup_steps, steps, job.train.min_lr_ratio)
    loss_fn = build_losses(job, 1, gather=False)[job.run.tasks[0]]
    warm = 3
    for i in range(steps + warm):
        if i == warm:
            t0 = time.perf_counter()
        train_step(model, loss_fn, [batches[i % len(batches)]], job.run.tasks[0], opt, sched, job.train.grad_clip)
    return steps * job.train.batch_size / (time.perf_counter() - t0)


def loader_alone(job, batches: int) -> float:
    """Samples/s of the training stream by itself (one rank, the configured loader workers)."""
    from pipelines.train.steps import build_train_loader
    from pipelines.train.worker import Worker

    worker = Worker(rank=0, world_size=1, device=torch.device("cpu"), amp_dtype=None)
    it = iter(build_train_loader(job, worker, start_step=0))
    next(it)  # start-up (fork, first shard open) is not throughput
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * job.train.batch_size / (time.perf_counter() - t0)


def steady_rate(history: list[dict]) -> float:
    """Samples/s over the later half of the log windows (equal steps each: a harmonic mean)."""
    rates = [h["samples_per_s"] for h in history if h.get("samples_per_s")]
    later = rates[len(rates) // 2 :]
    return len(later) / sum(1 / r for r in later)


def load_cfg(args):
    from pipelines.config import load_config

    overrides = [
        f"train.steps={args.steps}", f"train.batch_size={args.batch}", "scaling.num_workers=1",
        f"scaling.cpus_per_worker={args.threads}", f"train.log_every={max(args.steps // 10, 1)}",
        f"train.checkpoint_every={args.steps}", f"train.eval_every={args.steps}", "train.val_max_samples=16",
        f"services.home={Path(args.work) / 'home'}", *args.overrides,
    ]
    return load_config(args.config, overrides)


def run_half(args) -> dict:
    """One half of a round, in this (fresh) process; returns its figures."""
    from pipelines.runtime import init_ray, quiet_environment
    from pipelines.train import build_job, run_training
    from pipelines.train.state import read_trainer_state

    quiet_environment()
    cfg = load_cfg(args)
    if args.half == "baseline":
        job = build_job(cfg, args.data, "pretrain", run_name="bench-baseline")
        return {"baseline": baseline(job, args.steps, args.threads),
                "loader": loader_alone(job, max(args.steps // 2, 10))}
    t0 = time.perf_counter()
    init_ray(cfg)
    t_ray = time.perf_counter() - t0
    state = read_trainer_state(run_training(cfg, args.data, "pretrain", run_name=f"bench{args.round_index}"))
    wall = time.perf_counter() - t0
    steady = steady_rate(state["history"])
    samples = args.steps * args.batch
    return {"pipeline": samples / wall, "wall_s": wall, "ray_start_s": t_ray, "steady": steady,
            "train_s": samples / steady, "trainer_overall": float(state["samples_per_s"])}


def child(args, half: str, rnd: int, data: str, work: Path) -> dict:
    """Run one half in a fresh interpreter (its own Ray, its own caches), as a user would."""
    argv = [sys.executable, __file__, "--half", half, "--work", str(work), "--data", data, "--round-index", str(rnd),
            "--config", args.config, "--steps", str(args.steps), "--batch", str(args.batch),
            "--threads", str(args.threads), *[f"--set={o}" for o in args.overrides]]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=3600)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("HALF ")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"bench half {half} (round {rnd}) failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][5:])


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} (min {min(values):.3f}, max {max(values):.3f}, n={len(values)})"


def report(cfg, args, rounds: list[dict]) -> None:
    ratios = [r["pipeline"] / r["baseline"] for r in rounds]
    print(f"\n=== bench/train.py: pretrain, preset {cfg.model.preset}, batch {args.batch}, {args.steps} steps, "
          f"1 worker, {len(rounds)} paired rounds (alternating order)")
    print(f"baseline in-memory loop        median {spread([r['baseline'] for r in rounds])} samples/s")
    print(f"Ray Train + WebDataset (user)  median {spread([r['pipeline'] for r in rounds])} samples/s")
    print(f"  its steady state             median {spread([r['steady'] for r in rounds])} samples/s")
    print(f"loader alone                   median {spread([r['loader'] for r in rounds])} samples/s")
    print(f"ratio pipeline / baseline      median {spread(ratios)}   (target >= 0.9)")
    print(f"ratio steady / baseline        median {spread([r['steady'] / r['baseline'] for r in rounds])}")
    print(f"ratio loader / model           median {spread([r['loader'] / r['steady'] for r in rounds])}   (target >= 3)")


def main() -> int:
    args = parse()
    if args.half:
        print("HALF " + json.dumps(run_half(args)), flush=True)
        return 0
    from pipelines.runtime import init_ray, quiet_environment

    quiet_environment()
    # Ray starts worker processes at nice 15; the baseline runs at nice 0. Compare like with like.
    os.environ.setdefault("RAY_worker_niceness", "0")
    # A busy machine starts a raylet slowly; Ray's default wait (10 s) then fails the start.
    os.environ.setdefault("RAY_raylet_start_wait_time_s", "120")
    work = Path(tempfile.mkdtemp(prefix="mmfusion-bench-"))
    args.work = str(work)
    cfg = load_cfg(args)
    data = args.data
    if data is None:
        import ray

        init_ray(cfg)
        data = make_dataset(cfg, work)
        ray.shutdown()  # each pipeline half starts its own Ray, as a user's command does
    rounds = []
    for rnd in range(args.rounds):
        order = ("baseline", "pipeline") if rnd % 2 == 0 else ("pipeline", "baseline")
        row = {}
        for half in order:
            row.update(child(args, half, rnd, data, work))
        rounds.append(row)
        print(f"  round {rnd} ({' then '.join(order)}): baseline {row['baseline']:.1f}/s, pipeline "
              f"{row['pipeline']:.1f}/s = {row['pipeline'] / row['baseline']:.3f} (wall {row['wall_s']:.1f}s: Ray "
              f"start {row['ray_start_s']:.1f}s, training {row['train_s']:.1f}s at {row['steady']:.1f}/s, other "
              f"{row['wall_s'] - row['ray_start_s'] - row['train_s']:.1f}s), loader {row['loader']:.1f}/s", flush=True)
    report(cfg, args, rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
