"""`mmfusion tune`: hyperparameter search on Ray Tune with ASHA early stopping.

Each trial pretrains, fine-tunes and scores the validation split (the test split stays out of the
search), on the same Ray as the rest of the pipeline: a local Ray by default, the cluster named
by services.ray_address / RAY_ADDRESS otherwise. ASHA compares trials at every validation point
(train.eval_every steps of each phase, then the final score) and stops the worse ones. Each trial
is an MLflow run under one run for the search. The command prints a table of the trials and the
best config as YAML; the YAML is also written to --out, for `--config`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mmfusion.commands.common import add_config_args, config_from_args

EPILOG = """\
search space (--search, repeatable; or --space FILE with one `key: distribution` a line):
  train.lr=loguniform(1e-4,1e-2)      a float, uniform in log space
  train.itm_weight=uniform(0.5,2)     a float
  train.warmup_steps=randint(0,40)    an integer, both ends included
  train.lm_weight=choice(0.5,1,2)     one of the values, at random
  model.fusion=grid(cross_attention,gated,concat)   every value, each its own trial (x --samples)
  model.overrides.fusion.num_layers=choice(1,2)     a key of mmcore's model config
Without --search or --space: train.lr, train.warmup_steps, train.itm_weight, train.lm_weight and
model.overrides.fusion.num_layers. The budget (train.steps, train.finetune_steps, train.eval_every),
data, scaling and services are the same for every trial: set them with --set.

metrics (--metric): val_i2t_r1 (default: registry.primary_metric on the validation split),
val_t2i_r1, val_i2t_r5, val_vqa_acc, val_itm_acc, val_bleu4, val_cider_d, val_pretrain_loss,
... Retrieval recalls are reported at every validation point, so ASHA can stop a trial during
pretraining; VQA, ITM and BLEU only at the end of a trial (ASHA then has one rung to decide on).

examples:
  mmfusion tune --config debug --samples 4
  mmfusion tune --config local --samples 8 --search 'train.lr=loguniform(3e-4,3e-3)' \\
      --search 'train.itm_weight=choice(1,2,4)' --metric val_itm_acc
  mmfusion tune --config debug --space space.yaml --set train.steps=40 --out best.yaml
  mmfusion run --config best.yaml            # train with the winner
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "tune", help="hyperparameter search (Ray Tune, ASHA): pretrain + fine-tune + validation per trial",
        description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(p)
    p.add_argument("--samples", type=int, default=4, metavar="N",
                   help="trials to sample (grid() values multiply it; default: %(default)s)")
    p.add_argument("--search", action="append", default=[], metavar="KEY=DIST",
                   help="one searched key and its distribution, e.g. 'train.lr=loguniform(1e-4,1e-2)' (repeatable)")
    p.add_argument("--space", metavar="FILE", help="YAML search space: dotted keys to distributions (or lists)")
    p.add_argument("--metric", default=None, help="what to optimise (default: val_ + registry.primary_metric)")
    p.add_argument("--mode", choices=("min", "max"), default=None,
                   help="min or max (default: max, or per registry.higher_is_better; min for *_loss)")
    p.add_argument("--concurrency", type=int, default=None, metavar="N",
                   help="trials at a time (default: as many as the Ray cluster's CPUs hold at "
                        "scaling.num_workers x scaling.cpus_per_worker each)")
    p.add_argument("--grace", type=int, default=1, metavar="R",
                   help="ASHA: validation reports a trial makes before it can be stopped (default: %(default)s)")
    p.add_argument("--reduction", type=float, default=2.0, metavar="F",
                   help="ASHA: keep the best 1/F of the trials at each rung (default: %(default)s)")
    p.add_argument("--seed", type=int, default=None, help="seed of the random sampling (default: none)")
    p.add_argument("--data", default=None, metavar="DIR",
                   help="dataset version to search on (default: prepare the config's data like `mmfusion run`)")
    p.add_argument("--name", default=None, help="search name: Tune folder and MLflow parent run (default: tune-<time>)")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="where to write the best config YAML (default: $MMFUSION_HOME/tune/<name>/best.yaml)")
    p.set_defaults(func=run)


def build_spec(args: argparse.Namespace, cfg):
    from pipelines.tune import SearchSpec, default_space, load_space_file, parse_search_args

    dims = (load_space_file(args.space) if args.space else []) + parse_search_args(args.search)
    dims = dims or default_space(cfg)
    metric = args.metric or f"val_{cfg.registry.primary_metric}"
    mode = args.mode or ("min" if metric.endswith("_loss") else ("max" if cfg.registry.higher_is_better else "min"))
    return SearchSpec(dims=dims, samples=args.samples, metric=metric, mode=mode, concurrency=args.concurrency,
                      grace=args.grace, reduction=args.reduction, seed=args.seed, name=args.name, data_dir=args.data)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    from pipelines.config import home_dir
    from pipelines.tune import best_config_yaml, results_table, run_search
    from pipelines.tune.search import check_spec

    spec = build_spec(args, cfg)
    check_spec(cfg, spec)  # bad input fails here, before Ray and data preparation
    import ray

    ours = not ray.is_initialized()  # a caller's Ray (a test session) stays up
    result = run_search(cfg, spec)
    if ours:
        ray.shutdown()  # worker log lines reach the driver late: let none land inside the table
    sys.stdout.flush()
    print(f"\n## mmfusion tune {result.name}: {len(result.rows)} trial(s), {spec.metric} ({spec.mode})\n")
    print(results_table(result))
    text = best_config_yaml(result)
    if not text:
        print("\nmmfusion tune: no trial reported the metric; see the errors above", file=sys.stderr)
        return 1
    out = Path(args.out) if args.out else home_dir(cfg) / "tune" / result.name / "best.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"\nbest config ({out}; pass it back with --config):\n")
    print(text)
    print(f"trials in MLflow: experiment {result.experiment}, parent run {result.name}; Tune results: {result.storage}")
    return 0
