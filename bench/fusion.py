"""Which fusion to choose: cross-attention, gated weighted sum and concat + MLP under one budget.

Each (fusion, seed) trains the config's model in its own process (one torch thread, so `--jobs`
runs go side by side): pretraining (ITC + ITM + LM) then fine-tuning on the config's tasks, with
the project's losses, optimiser, schedule and sample decoding, on a dataset version's train split,
global batch `train.batch_size` x `scaling.num_workers` (its max, if a range). The checkpoint is then
scored by the pipeline's own evaluation (`pipelines.evaluate.evaluate`, the report card of `mmfusion run`). Prints
and writes a table: every report-card metric as mean +- std over the seeds, wall time, parameters.

    python bench/fusion.py --data DATASET_VERSION_DIR [--seeds 3] [--pre 250] [--fine 250] [--jobs 2]

Training is in-process rather than on Ray Train so that nine runs fit an afternoon on two cores;
the steps are the same `train_step`-style updates the trainer makes (no gradient accumulation).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

FUSIONS = ("cross_attention", "gated", "concat")
SHOWN = ("i2t_r1", "t2i_r1", "itm_acc", "vqa_acc", "vqa_count", "vqa_colour", "vqa_size", "vqa_shape",
         "vqa_yesno", "bleu4", "cider_d", "grounding_f1")


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="local", help="config file or preset (default: local)")
    p.add_argument("--data", required=True, help="dataset version directory (mmfusion data ingest prints it)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--pre", type=int, default=250, help="pretraining steps (default 250)")
    p.add_argument("--fine", type=int, default=250, help="fine-tuning steps (default 250)")
    p.add_argument("--jobs", type=int, default=2, help="runs at once, one CPU thread each (default 2)")
    p.add_argument("--fusions", default=",".join(FUSIONS))
    p.add_argument("--out", default=None, help="also write the table to this Markdown file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--one", nargs=3, metavar=("FUSION", "SEED", "RESULT_JSON"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def train_phase(model, train, decode, collate, tasks, steps, lr, cfg, seed) -> None:
    import torch

    from mmcore.losses import build_loss
    from pipelines.train.optim import build_optimizer

    t = cfg.train
    weights = {"itc_weight": t.itc_weight, "itm_weight": t.itm_weight, "lm_weight": t.lm_weight,
               "label_smoothing": t.label_smoothing}
    losses = {task: build_loss(task, **weights) for task in set(tasks)}
    opt, sched = build_optimizer(model, lr, t.weight_decay, t.warmup_steps, steps, t.min_lr_ratio)
    rng, batch = random.Random(seed), t.batch_size * cfg.scaling.max_workers
    model.train()
    for step in range(steps):
        task = tasks[step % len(tasks)]
        out = losses[task](model(collate([decode(s, rng) for s in rng.sample(train, batch)]), task))
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        if (step + 1) % 50 == 0:
            print(f"  [{tasks}] step {step + 1}/{steps} loss {float(out['loss'].detach()):.3f}", flush=True)


def run_one(args: argparse.Namespace, fusion: str, seed: int, result: Path) -> None:
    """Train one fusion with one seed, evaluate it, write `{metrics, wall_s, params}` to `result`."""
    import torch

    from mmcore.checkpoint import save_checkpoint
    from mmcore.data import SampleConfig, collate, decode_sample, special_token_ids, train_tokenizer
    from mmcore.model import build_model, count_parameters, model_config
    from pipelines.config import load_config
    from pipelines.core.dataset import read_shard, sample_texts, shard_paths
    from pipelines.evaluate import evaluate

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    home = Path(tempfile.mkdtemp(prefix=f"fusion-{fusion}-{seed}-"))
    cfg = load_config(args.config, [*args.overrides, f"services.home={home}", "eval.parallel=local"])
    start = time.perf_counter()
    urls = [str(u) for u in shard_paths(args.data, "train")]
    train = [s for u in urls for s in read_shard(u)]
    tok = train_tokenizer(sample_texts(urls), cfg.model.vocab_size)
    mcfg = model_config(cfg.model.preset, vocab_size=len(tok), fusion=fusion, image_size=cfg.model.image_size,
                        **special_token_ids(tok))
    model = build_model(mcfg)
    scfg = SampleConfig(mcfg.image.image_size, cfg.model.max_text_len, cfg.model.max_answer_len)
    pad = tok.pad_token_id or 0

    def decode(sample, rng):
        return decode_sample(sample, tok, scfg, train=True, rng=rng)

    batcher = lambda items: collate(items, pad_id=pad)  # noqa: E731
    train_phase(model, train, decode, batcher, ["pretrain"], args.pre, cfg.train.lr, cfg, seed)
    train_phase(model, train, decode, batcher, list(cfg.train.finetune_tasks), args.fine, cfg.train.finetune_lr,
                cfg, seed + 1)
    train_s = time.perf_counter() - start
    ckpt = save_checkpoint(home / "checkpoint", model.eval(), tok)
    card = evaluate(cfg, ckpt, args.data, home / "eval")
    result.write_text(json.dumps({"fusion": fusion, "seed": seed, "metrics": card["metrics"],
                                  "train_s": train_s, "params": count_parameters(model)}))


def launch(args: argparse.Namespace, fusion: str, seed: int, out_dir: Path) -> dict:
    result = out_dir / f"{fusion}-{seed}.json"
    cmd = [sys.executable, __file__, "--config", args.config, "--data", args.data, "--pre", str(args.pre),
           "--fine", str(args.fine), *[f"--set={s}" for s in args.overrides], "--one", fusion, str(seed), str(result)]
    log = out_dir / f"{fusion}-{seed}.log"
    with open(log, "w") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise SystemExit(f"{fusion} seed {seed} failed (exit {code}); see {log}")
    print(f"[fusion] {fusion} seed {seed} done", flush=True)
    return json.loads(result.read_text())


def summarise(runs: list[dict], fusions: list[str]) -> str:
    def cell(values: list[float], fmt: str) -> str:
        if not values:
            return "n/a"
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):{fmt}} ± {sd:{fmt}}"

    head = "| metric | " + " | ".join(fusions) + " |\n|---|" + "---|" * len(fusions)
    rows = []
    for m in SHOWN:
        cells = [cell([r["metrics"][m] for r in runs if r["fusion"] == f and r["metrics"].get(m) is not None], ".3f")
                 for f in fusions]
        rows.append(f"| {m} | " + " | ".join(cells) + " |")
    rows.append("| train wall s | " + " | ".join(cell([r["train_s"] for r in runs if r["fusion"] == f], ".0f")
                                                for f in fusions) + " |")
    rows.append("| parameters | " + " | ".join(f"{next(r['params'] for r in runs if r['fusion'] == f):,}"
                                                for f in fusions) + " |")
    return "\n".join([head, *rows])


def main() -> None:
    args = parse()
    if args.one:
        fusion, seed, result = args.one
        return run_one(args, fusion, int(seed), Path(result))
    fusions = [f for f in args.fusions.split(",") if f]
    out_dir = Path(tempfile.mkdtemp(prefix="fusion-bench-"))
    print(f"[fusion] {len(fusions)} fusions x {args.seeds} seeds, {args.pre} + {args.fine} steps; logs in {out_dir}",
          flush=True)
    jobs = [(f, s) for s in range(args.seeds) for f in fusions]  # alternate fusions within each seed
    with ThreadPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(lambda job: launch(args, job[0], job[1], out_dir), jobs))
    table = summarise(runs, fusions)
    print(table)
    if args.out:
        Path(args.out).write_text(f"{args.pre} + {args.fine} steps, {args.seeds} seeds, config {args.config}, "
                                  f"data {Path(args.data).name}\n\n{table}\n")


if __name__ == "__main__":
    main()
