"""Ray Train with data and checkpoints on object storage (a real S3 API: moto's server).

The dataset version lives at `s3://train/data/<version>`, the run at `s3://train/runs/<name>`;
re-running the same command with the same run name and more steps resumes from the last
checkpoint in the bucket.
"""

from __future__ import annotations

import fsspec
import pytest
from train_support import losses, tiny_config

from mmcore.checkpoint import read_config
from pipelines.config import load_config
from pipelines.ingest import ingest
from pipelines.train import latest_checkpoint, read_trainer_state, run_training

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]  # ~90 s: two Ray Train runs and an ingest


def test_pretrain_on_s3_resumes_by_run_name(ray_s3, s3_server, tiny_source, tmp_path):
    fs = fsspec.filesystem("s3")
    fs.mkdir("train")
    data = ingest(tiny_source, "s3://train/data", load_config("debug").data)
    assert str(data).startswith("s3://train/data/")

    def config(steps: int, home=tmp_path, *extra: str):
        return tiny_config(home, f"train.steps={steps}", *extra, "train.checkpoint_every=2", "train.storage=s3://train/runs",
                           "scaling.num_workers=1", "train.loader_workers=1")

    def checkpoints() -> list[str]:
        fs.invalidate_cache()
        return sorted(p.rsplit("/", 1)[-1] for p in fs.ls("train/runs/remote") if "/checkpoint-step" in p)

    first = run_training(config(4), data, "pretrain", run_name="remote")
    assert read_trainer_state(first)["step"] == 4
    assert checkpoints() == ["checkpoint-step0000002", "checkpoint-step0000004"]
    assert latest_checkpoint("s3://train/runs/remote") == "s3://train/runs/remote/checkpoint-step0000004"

    # Resumed from another host's state dir, with another vocabulary size configured: the model
    # config and tokenizer come from the bucket's checkpoint, as they would from a local one.
    other = tmp_path / "host2"
    ckpt = run_training(config(6, other, "model.vocab_size=300"), data, "pretrain", run_name="remote")
    state = read_trainer_state(ckpt)
    assert ckpt == other / "checkpoints" / "remote" / "checkpoint-step0000006"  # downloaded from the bucket
    assert read_config(ckpt)[0] == read_config(first)[0]  # vocabulary 400, as first trained
    assert state["step"] == 6 and [r["from_step"] for r in state["resumes"]] == [4]
    assert [(r["start_step"], r["batches_read"]) for r in state["ranks"]] == [(4, 2)]  # no step redone
    assert state["data_position"]["batches_per_rank"] == 6
    assert sorted(losses(state)) == [2, 4, 6]  # the first run's history, continued
    assert (ckpt / "tokenizer.json").read_bytes() == (first / "tokenizer.json").read_bytes()
    assert checkpoints() == ["checkpoint-step0000004", "checkpoint-step0000006"]  # train.keep_checkpoints=2
    assert not (tmp_path / "ray_results").exists() and not (other / "ray_results").exists()  # all in the bucket
