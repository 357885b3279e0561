"""Every GPU measurement of the pretraining work in one go (under 10 minutes), figures to a folder.

    python bench/gpu.py --out bench/results/h200-2026-12-02        # on one GPU (an H200 node)
    python bench/gpu.py --device cpu --dry-run --out /tmp/gpu-dry   # checks the script on a CPU

Parts, in order; each writes `<out>/<part>.json`, and `<out>/summary.md` gathers them:
1. `mfu`: the preset (default `base`), bf16 autocast, synthetic in-memory batches, the project's
   own `train_step` (no data loading: the model's ceiling). A ladder of changes, each rung adding
   one to the rung before, so every change has its before and after: eager with foreach AdamW
   (as before) -> fused AdamW -> `torch.compile` (the batch has static shapes) -> a larger batch.
   And the ResNet-50 image encoder, NCHW against `channels_last`. SDPA is checked, not toggled:
   the run counts `scaled_dot_product_attention` calls per forward against the model's
   attention layers (BERT included: its `attn_implementation` is recorded).
2. `profile`: `torch.profiler` over a few steps of the fastest rung: the top kernels by device
   time, the share of time in GEMMs and in attention kernels, and the step time.
3. `loader`: the training loader (`pipelines.train.data`, as Ray Train workers run it) over
   WebDataset shards written here (256 px JPEGs), with `--loader-workers` processes: samples/s it
   delivers against what the model consumes at the fastest rung (target >= 1.5).
4. `nccl`: `bench/ddp_nccl.py` under torchrun on every local GPU (NCCL, DDP, the ITC all-gather).

`--dry-run` shrinks everything (the `debug` preset, a few steps, `torch.compile` with the `eager`
backend, gloo instead of NCCL) so that a test runs the whole script on a CPU in seconds.
Exits 2 with a clear message when `--device cuda` finds no GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the figures (created)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--dry-run", action="store_true", help="tiny sizes: check the script, not the GPU")
    p.add_argument("--preset", default="base", choices=("debug", "small", "base", "large"))
    p.add_argument("--batch", type=int, default=128, help="the ladder's batch (the last rung doubles it)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per rung (after --warmup)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--text-len", type=int, default=32)
    p.add_argument("--loader-workers", type=int, default=max((os.cpu_count() or 2) - 2, 1))
    p.add_argument("--parts", default="mfu,profile,loader,nccl", help="comma-separated subset")
    args = p.parse_args(argv)
    if args.dry_run:
        args.preset, args.batch, args.steps, args.warmup, args.loader_workers = "debug", 4, 2, 1, 1
    return args


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


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast_for(device: torch.device):
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def count_sdpa(model, batch: dict, device: torch.device) -> int:
    """`scaled_dot_product_attention` calls in one pretraining forward (BERT's, torchvision's MHA
    and mmcore's attention all call it through `torch.nn.functional`)."""
    import torch.nn.functional as F

    real, calls = F.scaled_dot_product_attention, [0]

    def counting(*a, **k):
        calls[0] += 1
        return real(*a, **k)

    F.scaled_dot_product_attention = counting
    try:
        with torch.no_grad(), autocast_for(device)():
            model(batch, "pretrain")
    finally:
        F.scaled_dot_product_attention = real
    return calls[0]


def expected_attention_calls(cfg) -> int:
    """Attention layers one pretraining forward runs: ViT + BERT self-attention, fusion self+cross
    (on 3B ITM pairs, one call each), decoder self+cross."""
    vit = cfg.image.num_layers if cfg.image.arch == "vit" else 0
    return vit + cfg.text.num_layers + 2 * cfg.fusion.num_layers + 2 * cfg.decoder.num_layers


def measure(args, device, preset: str, batch_size: int, fused: bool, compiled: bool, channels_last: bool = False,
            **overrides) -> dict:
    """samples/s, TFLOP/s, MFU and peak memory of `train_step` on a synthetic batch."""
    from mmcore.losses import build_loss
    from mmcore.model import build_model, model_config
    from pipelines.train.optim import build_optimizer
    from pipelines.train.steps import train_step
    from pipelines.train.throughput import mfu, peak_flops, train_flops_per_sample

    cfg = model_config(preset, **overrides)
    model = build_model(cfg, load_pretrained=False).to(device).train()
    if channels_last:  # as `pipelines.train.worker.speed_up` does for a ResNet on CUDA
        model.image_encoder.to(memory_format=torch.channels_last)
    batch = synthetic_batch(cfg, batch_size, args.text_len, device)
    autocast = autocast_for(device)

    def forward():
        with autocast():
            model(batch, "pretrain")

    flops = train_flops_per_sample(forward, batch_size)
    runner = model
    if compiled:
        runner = torch.compile(model, backend="eager" if args.dry_run else "inductor")
    opt, sched = build_optimizer(model, 1e-4, 0.05, 10, args.steps + args.warmup, 0.1, fused=fused)
    loss_fn = build_loss("pretrain")
    t_warm = time.perf_counter()
    for _ in range(args.warmup):
        train_step(runner, loss_fn, [batch], "pretrain", opt, sched, 1.0, autocast)
    sync(device)
    warm_s = time.perf_counter() - t_warm
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        out = train_step(runner, loss_fn, [batch], "pretrain", opt, sched, 1.0, autocast)
    sync(device)
    rate = args.steps * batch_size / (time.perf_counter() - t0)
    util = mfu(rate, flops, peak_flops(device), 1)
    return {"samples_per_s": rate, "tflops": rate * flops / 1e12, "mfu": util, "warmup_s": warm_s,
            "gflop_per_sample": flops / 1e9, "loss": float(out["loss"]),
            "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            "sdpa_calls": count_sdpa(model, batch, device), "attention_layers": expected_attention_calls(cfg)}


def part_mfu(args, device) -> dict:
    """The ladder (each rung = the one before + one change) and the ResNet layouts."""
    from mmcore.model import build_model, model_config

    with torch.device("meta"):
        bert = build_model(model_config(args.preset), load_pretrained=False).text_encoder.bert
    rungs = [("eager, foreach AdamW", args.batch, False, False), ("+ fused AdamW", args.batch, device.type == "cuda", False),
             ("+ torch.compile", args.batch, device.type == "cuda", True),
             (f"+ batch {2 * args.batch}", 2 * args.batch, device.type == "cuda", True)]
    ladder = []
    for name, batch, fused, compiled in rungs:
        row = {"change": name, "batch": batch, **measure(args, device, args.preset, batch, fused, compiled)}
        print(f"[mfu] {name}: {row['samples_per_s']:.1f} samples/s, MFU {row['mfu']}", flush=True)
        ladder.append(row)
    layouts = []
    for channels_last in (False, True):
        row = measure(args, device, args.preset, args.batch, device.type == "cuda", False,
                      channels_last=channels_last, image_encoder="resnet50")
        layouts.append({"layout": "channels_last" if channels_last else "NCHW", **row})
    return {"preset": args.preset, "bert_attn_implementation": bert.config._attn_implementation,
            "ladder": ladder, "resnet50_layout": layouts}


def part_profile(args, device, best: dict | None) -> dict:
    """torch.profiler over a few steps of the fastest rung: top kernels, GEMM and attention shares."""
    from torch.profiler import ProfilerActivity, profile

    from mmcore.losses import build_loss
    from mmcore.model import build_model, model_config
    from pipelines.train.optim import build_optimizer
    from pipelines.train.steps import train_step

    batch_size, compiled = (best["batch"], "compile" in best["change"]) if best else (args.batch, False)
    model = build_model(model_config(args.preset), load_pretrained=False).to(device).train()
    runner = torch.compile(model, backend="eager" if args.dry_run else "inductor") if compiled else model
    batch = synthetic_batch(model.cfg, batch_size, args.text_len, device)
    opt, sched = build_optimizer(model, 1e-4, 0.05, 10, 100, 0.1, fused=device.type == "cuda")
    loss_fn, autocast = build_loss("pretrain"), autocast_for(device)
    for _ in range(args.warmup):
        train_step(runner, loss_fn, [batch], "pretrain", opt, sched, 1.0, autocast)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    steps = max(args.steps // 4, 2)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            train_step(runner, loss_fn, [batch], "pretrain", opt, sched, 1.0, autocast)
        sync(device)
    return summarize_profile(prof, device, steps, batch_size, compiled)


def summarize_profile(prof, device, steps: int, batch_size: int, compiled: bool) -> dict:
    attr = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0]
    if device.type == "cuda":  # kernels only: the device time of CPU-side ops double-counts them
        events = [e for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA] or events
    total = sum(getattr(e, attr) for e in events) or 1.0
    gemm = ("gemm", "matmul", "mm", "cutlass", "xmma", "linear", "addmm", "bmm")
    attention = ("flash", "attention", "fmha", "sdpa")
    share = lambda keys: sum(getattr(e, attr) for e in events if any(k in e.key.lower() for k in keys)) / total  # noqa: E731
    top = sorted(events, key=lambda e: getattr(e, attr), reverse=True)[:15]
    return {"device": device.type, "steps": steps, "batch": batch_size, "compiled": compiled,
            "time_per_step_ms": total / 1e3 / steps, "gemm_share": share(gemm), "attention_share": share(attention),
            "top": [{"name": e.key[:120], "ms": getattr(e, attr) / 1e3, "share": getattr(e, attr) / total,
                     "calls": e.count} for e in top]}


def write_shards(folder: Path, num: int, per_shard: int) -> list[str]:
    """WebDataset shards of the project's sample format: 256 px JPEGs, a caption, the json member."""
    import io

    import numpy as np
    import webdataset as wds
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng, urls = np.random.default_rng(0), []
    for shard in range(0, num, per_shard):
        url = str(folder / f"shard-{shard // per_shard:06d}.tar")
        with wds.TarWriter(url) as sink:
            for i in range(shard, min(shard + per_shard, num)):
                pixels = rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)
                buf = io.BytesIO()
                Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
                caption = f"a {['red', 'blue', 'green'][i % 3]} {['circle', 'square'][i % 2]} number {i}"
                meta = {"id": str(i), "captions": [caption], "qa": [], "split": "train", "source": "bench",
                        "width": 256, "height": 256, "meta": {}}
                sink.write({"__key__": f"{i:08d}", "jpg": buf.getvalue(), "txt": caption, "json": json.dumps(meta)})
        urls.append(url)
    return urls


def part_loader(args, device, out: Path, model_rate: float | None) -> dict:
    """Samples/s the training loader delivers (as a Ray Train worker runs it) vs the model's rate."""
    from mmcore.data import SampleConfig, special_token_ids, train_tokenizer
    from mmcore.model import model_config
    from pipelines.config import TrainConfig
    from pipelines.train.job import DataSpec, RunSpec, TrainJob
    from pipelines.train.steps import build_train_loader
    from pipelines.train.worker import Worker

    num = 64 if args.dry_run else 4096
    urls = write_shards(out / "shards", num, per_shard=max(num // 16, 1))
    tok = train_tokenizer([f"a {c} {s} number {i}" for i in range(200) for c in ("red", "blue", "green")
                           for s in ("circle", "square")], vocab_size=300)
    mcfg = model_config(args.preset, vocab_size=len(tok), **special_token_ids(tok))
    sample = SampleConfig(image_size=mcfg.image.image_size, max_text_len=args.text_len, max_answer_len=8)
    job = TrainJob(RunSpec("bench-loader", "pretrain", ["pretrain"], total_steps=1), DataSpec(urls, [], tok, sample),
                   mcfg, train=TrainConfig(batch_size=args.batch, loader_workers=args.loader_workers, shuffle_buffer=256))
    worker = Worker(rank=0, world_size=1, device=device, amp_dtype=None)
    it = iter(build_train_loader(job, worker, start_step=0))
    for _ in range(2 * max(args.loader_workers, 1)):  # start-up: forks, first shards opened
        next(it)
    batches = 4 if args.dry_run else 60
    t0 = time.perf_counter()
    for _ in range(batches):
        b = next(it)
        if device.type == "cuda":
            b = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in b.items()}
    sync(device)
    rate = batches * args.batch / (time.perf_counter() - t0)
    return {"loader_workers": args.loader_workers, "batch": args.batch, "samples_per_s": rate,
            "model_samples_per_s": model_rate, "ratio": rate / model_rate if model_rate else None, "target": 1.5}


def part_nccl(args, device) -> dict:
    """bench/ddp_nccl.py on every local GPU via torchrun (gloo on CPU in a dry run)."""
    gpus = torch.cuda.device_count() if device.type == "cuda" else 1
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    cmd = [torchrun, "--standalone", f"--nproc_per_node={gpus}", str(ROOT / "bench" / "ddp_nccl.py"),
           "--steps", "2" if args.dry_run else "20", "--batch", "4" if args.dry_run else "32",
           "--preset", "debug" if args.dry_run else "small", *(["--cpu"] if device.type == "cpu" else [])]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    return {"ranks": gpus, "returncode": proc.returncode, "seconds": time.perf_counter() - t0,
            "output": proc.stdout[-2000:] + proc.stderr[-1000:]}


def fmt(value, spec: str = ".1f") -> str:
    return "n/a" if value is None else format(value, spec)


def summary(results: dict) -> str:
    """`summary.md`: every figure of the run in tables."""
    lines = [f"# bench/gpu.py: {results['device']}{' (dry run)' if results['dry_run'] else ''}", ""]
    if "mfu" in results:
        m = results["mfu"]
        lines += [f"## MFU ladder: `{m['preset']}`, bf16 (BERT attention: {m['bert_attn_implementation']})", "",
                  "| change | batch | samples/s | TFLOP/s | MFU | peak GiB | SDPA calls / attention layers |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['change']} | {r['batch']} | {r['samples_per_s']:.1f} | {r['tflops']:.1f} | {fmt(r['mfu'], '.1%')} "
                  f"| {fmt(r['peak_mem_gib'])} | {r['sdpa_calls']} / {r['attention_layers']} |" for r in m["ladder"]]
        lines += ["", "| ResNet-50 layout | samples/s | MFU |", "|---|---|---|"]
        lines += [f"| {r['layout']} | {r['samples_per_s']:.1f} | {fmt(r['mfu'], '.1%')} |" for r in m["resnet50_layout"]]
    if "profile" in results:
        p = results["profile"]
        lines += ["", f"## Profile: batch {p['batch']}, compiled {p['compiled']}, {p['time_per_step_ms']:.1f} ms/step; "
                  f"GEMM share {p['gemm_share']:.1%}, attention share {p['attention_share']:.1%}", "",
                  "| kernel / op | ms | share | calls |", "|---|---|---|---|"]
        lines += [f"| `{t['name']}` | {t['ms']:.2f} | {t['share']:.1%} | {t['calls']} |" for t in p["top"]]
    if "loader" in results:
        ld = results["loader"]
        lines += ["", "## Loader vs model", "", f"{ld['loader_workers']} loader workers, batch {ld['batch']}: "
                  f"{ld['samples_per_s']:.1f} samples/s delivered; the model takes {fmt(ld['model_samples_per_s'])}; "
                  f"ratio {fmt(ld['ratio'], '.2f')} (target {ld['target']})"]
    if "nccl" in results:
        n = results["nccl"]
        lines += ["", f"## NCCL / DDP: {n['ranks']} rank(s), exit {n['returncode']}, {n['seconds']:.0f}s", "", "```",
                  n["output"].strip()[-1500:], "```"]
    return "\n".join(lines) + "\n"


def run_parts(args, device, out: Path) -> dict:
    results: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                     "dry_run": args.dry_run}
    parts = set(args.parts.split(","))
    best = None
    steps = [("mfu", lambda: part_mfu(args, device)), ("profile", lambda: part_profile(args, device, best)),
             ("loader", lambda: part_loader(args, device, out, best["samples_per_s"] if best else None)),
             ("nccl", lambda: part_nccl(args, device))]
    for name, fn in steps:
        if name not in parts:
            continue
        t0 = time.perf_counter()
        with contextlib.suppress(KeyboardInterrupt):
            results[name] = fn()
        print(f"[gpu] {name} done in {time.perf_counter() - t0:.0f}s", flush=True)
        (out / f"{name}.json").write_text(json.dumps(results.get(name), indent=2, default=str))
        if name == "mfu":
            best = max(results["mfu"]["ladder"], key=lambda r: r["samples_per_s"])
        (out / "summary.md").write_text(summary(results))  # after every part: a cut-short run keeps its figures
    return results


def main(argv=None) -> int:
    args = parse(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device found (torch.cuda.is_available() is False). Run it on a machine "
              "with an NVIDIA GPU, or check the script with --device cpu --dry-run.", file=sys.stderr)
        return 2
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = run_parts(args, device, out)
    print(summary(results))
    print(f"[gpu] all parts in {time.perf_counter() - t0:.0f}s; figures in {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
