"""`mmfusion train pretrain|finetune|calibrate`: distributed training with Ray Train.

`calibrate` fits a fine-tuned checkpoint's image-text matching score on the validation split, as
the retrain flow (`mmfusion run`) does after fine-tuning (train.calibrate_itm).

The checkpoint directory is printed as the LAST line of stdout, so scripts can capture it:
    CKPT=$(mmfusion train pretrain --data datasets/<version> | tail -n 1)
"""

from __future__ import annotations

import argparse
import sys

from mmcore.tasks import TASKS
from mmfusion.commands.common import add_config_args, config_from_args

# `finetune` alternates the tasks in train.finetune_tasks; any model task but pretrain trains alone
# (`pipelines.train.driver.TASKS`). mmcore.tasks imports no torch, so `--help` stays fast.
FINETUNE_CHOICES = ("finetune", *(t for t in TASKS if t != "pretrain"))

EPILOG = """\
examples:
  mmfusion train pretrain --data .mmfusion/datasets/<version> --set train.steps=100
  mmfusion train pretrain --data DIR --set scaling.num_workers=4 --set scaling.use_gpu=true
  mmfusion train finetune --data DIR --init .mmfusion/ray_results/<run>/checkpoint-step0000400
  mmfusion train finetune --data DIR --init models:/mmfusion-debug@champion --task caption
  mmfusion train calibrate --data DIR --model .mmfusion/ray_results/<run>/checkpoint-step0000720
  mmfusion train pretrain --data DIR --run-name nightly   # same name again: resumes that run
  mmfusion train pretrain --data DIR --set model.preset=large --set scaling.strategy=fsdp
      --set scaling.num_workers=[4,8] --set scaling.use_gpu=true   (sharded; elastic: survives a lost node)

keys worth --set: train.steps, train.finetune_steps, train.batch_size, train.checkpoint_every,
train.max_failures, train.compile, scaling.num_workers (a count, or [min, max] for elastic training),
scaling.strategy (ddp | fsdp), scaling.use_gpu (see pipelines/config.py)
"""


def register(subparsers) -> None:
    train = subparsers.add_parser(
        "train",
        help="pretrain or fine-tune the fusion model on a dataset version (Ray Train)",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    modes = train.add_subparsers(dest="mode", metavar="MODE", required=True)
    pre = modes.add_parser("pretrain", help="ITC + ITM + captioning LM from scratch (or from --init)",
                           epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(pre)
    fine = modes.add_parser("finetune", help="fine-tune a checkpoint: caption, VQA, retrieval or an audio task",
                            epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(fine)
    fine.add_argument(
        "--task", choices=FINETUNE_CHOICES, default="finetune",
        help="what to fine-tune; 'finetune' alternates the tasks in train.finetune_tasks (default); "
             "the audio tasks need model.audio_encoder",
    )
    cal = modes.add_parser(
        "calibrate", help="fit a checkpoint's image-text matching score on the validation split (in place)",
        description="Fit ITM's score as a logistic regression on the matching head's logit and the caption "
        "decoder's mean and lowest token log-probability, on DATA's validation split (each image's first caption "
        "against its hardest negative, as evaluation pairs them), and write it into the checkpoint. Training "
        "is untouched. The retrain flow (`mmfusion run`) does this after fine-tuning unless train.calibrate_itm=false.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(cal)
    cal.add_argument("--data", required=True, metavar="DIR", help="dataset version directory with a val split")
    cal.add_argument("--model", required=True, metavar="DIR", help="checkpoint directory to calibrate (changed in place)")
    cal.set_defaults(func=run_calibrate)


def _common(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser)
    parser.add_argument("--data", required=True, metavar="DIR",
                        help="dataset version directory (local path or URI) printed by `mmfusion data ingest`")
    parser.add_argument("--init", default=None, metavar="URI",
                        help="start from this checkpoint directory or models:/NAME@alias (or models:/NAME/VERSION)")
    parser.add_argument("--run-name", default=None, metavar="NAME",
                        help="Ray Train run name; re-using one resumes its last checkpoint "
                             "(default: derived from task, data version and config)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    from pipelines.train import TrainingError, run_training

    task = "pretrain" if args.mode == "pretrain" else args.task
    if args.mode == "finetune" and args.init is None:
        print("mmfusion train finetune: --init is required (a checkpoint dir or models:/NAME@alias)", file=sys.stderr)
        return 2
    try:
        path = run_training(cfg, args.data, task, init_from=args.init, run_name=args.run_name)
    except TrainingError as e:
        print(f"mmfusion train: {e}", file=sys.stderr)
        return 1
    import ray

    # Worker log lines reach the driver asynchronously; stop Ray first so none can follow the path.
    ray.shutdown()
    sys.stdout.flush()
    print(path)
    return 0


def run_calibrate(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    from mmcore.checkpoint import CheckpointError
    from pipelines.core.checkpoints import is_checkpoint_dir
    from pipelines.evaluate.calibrate import calibrate_itm

    if not is_checkpoint_dir(args.model):
        print(f"mmfusion train calibrate: {args.model} is not a checkpoint directory (no model.safetensors "
              "and config.json); pass one printed by `mmfusion train finetune`", file=sys.stderr)
        return 2
    try:
        result = calibrate_itm(cfg, args.model, args.data)
    except (CheckpointError, OSError, ValueError) as e:
        print(f"mmfusion train calibrate: {e}", file=sys.stderr)
        return 1
    if "skipped" in result:
        print(f"mmfusion train calibrate: not calibrated: {result['skipped']}", file=sys.stderr)
        return 1
    return 0
