"""`mmfusion train`'s arguments: the fine-tuning tasks are the training driver's, from one list."""

from __future__ import annotations

import pytest

from mmfusion.cli import build_parser
from mmfusion.commands.train import FINETUNE_CHOICES
from pipelines.train.driver import TASKS


def test_finetune_task_choices_are_the_drivers_tasks_but_pretrain():
    assert set(FINETUNE_CHOICES) == set(TASKS) - {"pretrain"}


@pytest.mark.parametrize("task", ["finetune", "caption", "asr", "audio_caption"])
def test_finetune_accepts_each_task(task: str):
    args = build_parser().parse_args(["train", "finetune", "--data", "d", "--init", "c", "--task", task])
    assert (args.mode, args.task) == ("finetune", task)


def test_finetune_refuses_an_unknown_task(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "finetune", "--data", "d", "--init", "c", "--task", "pretrain"])
    assert "invalid choice: 'pretrain'" in capsys.readouterr().err
