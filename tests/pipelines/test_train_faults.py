"""Training faults: non-finite steps, broken checkpoints, a train split too small for its
readers, and two live drivers on one run folder. In-process where the functions allow it (real
checkpoint files, real optimisers, a real 2-process gloo group); one short Ray Train run for the
NaN guard end to end."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mmcore.data import SampleConfig
from pipelines.config import TrainConfig, load_config
from pipelines.core.checkpoints import OPTIMIZER_TENSORS, WEIGHTS
from pipelines.train import TrainingError, read_trainer_state, run_training
from pipelines.train.job import DataSpec, RunSpec, TrainJob
from pipelines.train.optim import build_optimizer
from pipelines.train.resume import build_state, resume_candidates, save_train_checkpoint
from pipelines.train.state import (
    TrainStateError,
    complete_checkpoints,
    latest_checkpoint,
    optimizer_from_files,
)
from pipelines.train.steps import train_step
from pipelines.train.worker import Worker

pytestmark = pytest.mark.timeout(300)

CPU = Worker(rank=0, world_size=1, device=torch.device("cpu"), amp_dtype=None)
# Every file a training checkpoint needs (`pipelines.core.checkpoints.TRAINING_FILES`, spelt out).
NEEDED = ("model.safetensors", "config.json", "tokenizer.json", "trainer_state.json", "optimizer.safetensors",
          "optimizer.json", "scheduler.json")


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def job_factory():
    """`(run_path) -> TrainJob` for the debug model (32 px) with a small real tokenizer."""
    from mmcore.data import special_token_ids, train_tokenizer
    from mmcore.model import model_config

    texts = [f"a {c} {s} on a {b} background" for c in ("red", "blue", "green") for s in ("circle", "square")
             for b in ("white", "black")]
    tok = train_tokenizer(texts, vocab_size=60)
    mcfg = model_config("debug", vocab_size=len(tok), image_size=32, **special_token_ids(tok))

    def make(run_path: Path) -> TrainJob:
        return TrainJob(RunSpec(run_path.name, "pretrain", ["pretrain"], total_steps=10, path=str(run_path)),
                        DataSpec([], [], tok, SampleConfig(image_size=32, max_text_len=16, max_answer_len=4)),
                        mcfg, train=TrainConfig(warmup_steps=2))

    return make


def write_checkpoints(job: TrainJob, steps: list[int]) -> dict[int, Path]:
    """Real training checkpoints (model, tokenizer, optimiser with Adam state, scheduler, state)."""
    model, optimizer, scheduler, state = build_state(job, CPU, [])
    out = {}
    for step in steps:
        for p in model.parameters():  # some optimiser state worth saving
            p.grad = torch.full_like(p, 0.01)
        optimizer.step()
        scheduler.step()
        state["step"] = step
        out[step] = Path(job.run.path) / f"checkpoint-step{step:07d}"
        save_train_checkpoint(out[step], model, job, optimizer, scheduler, dict(state))
    return out


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# ----------------------------------------------------------------------------- broken checkpoints


@pytest.mark.parametrize("name", NEEDED)
@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_latest_checkpoint_skips_a_checkpoint_with_any_file_missing_or_cut_short(job_factory, tmp_path, name,
                                                                                 damage):
    job = job_factory(tmp_path / "run")
    ckpts = write_checkpoints(job, [2, 4])
    assert latest_checkpoint(job.run.path) == ckpts[4]
    bad = ckpts[4] / name
    if damage == "truncated":
        truncate(bad)
    else:
        bad.unlink()
    assert latest_checkpoint(job.run.path) == ckpts[2]
    from pipelines.core.checkpoints import TRAINING_FILES, checkpoint_problems

    assert set(TRAINING_FILES) == set(NEEDED)
    assert any(str(bad) in p for p in checkpoint_problems(ckpts[4]))
    assert checkpoint_problems(ckpts[2]) == [] and complete_checkpoints(job.run.path) == [ckpts[2]]


def test_truncated_optimizer_state_falls_back_to_the_previous_checkpoint(job_factory, tmp_path, capsys):
    """Ray Train hands the restarted worker its latest checkpoint, whose optimizer.safetensors was
    cut short: the worker says so, naming the file, and resumes from the previous one."""
    job = job_factory(tmp_path / "run")
    ckpts = write_checkpoints(job, [2, 4])
    bad = ckpts[4] / OPTIMIZER_TENSORS
    truncate(bad)
    candidates = resume_candidates(job, str(ckpts[4]))
    assert candidates == [str(ckpts[4]), str(ckpts[2])]
    model, optimizer, scheduler, state = build_state(job, CPU, candidates)
    assert state["step"] == 2 and [r["from_step"] for r in state["resumes"]] == [2]
    assert scheduler.last_epoch == 1 and all(s["step"] == 1 for s in optimizer.state.values())
    log = capsys.readouterr().out
    assert f"cannot resume from {ckpts[4]}: {bad}" in log and "falling back to the previous complete checkpoint" in log
    assert f"resumed from step 2 ({ckpts[2]})" in log


def test_optimizer_state_errors_name_the_file(job_factory, tmp_path):
    job = job_factory(tmp_path / "run")
    ckpt = write_checkpoints(job, [2])[2]
    truncate(ckpt / OPTIMIZER_TENSORS)
    _, optimizer, _, _ = build_state(job, CPU, [])
    with pytest.raises(TrainStateError, match=str(ckpt / OPTIMIZER_TENSORS)):
        optimizer_from_files(optimizer, ckpt)


# ----------------------------------------------------------------------------- the NaN/Inf guard


class Scale(torch.nn.Module):
    """A model with the training forward contract `(batch, task) -> output`."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Linear(3, 2)

    def forward(self, batch, task):
        return self.w(batch["x"])


def square_loss(poison: bool = False):
    def loss(out):
        value = out.pow(2).mean()
        return {"loss": value * float("nan") if poison else value}

    return loss


def test_nonfinite_loss_skips_the_update_and_keeps_optimizer_and_schedule_consistent():
    torch.manual_seed(0)
    model = Scale()
    optimizer, scheduler = build_optimizer(model, 0.1, 0.0, warmup_steps=1, total_steps=10, min_ratio=0.1)
    batch = [{"x": torch.randn(4, 3)}]
    train_step(model, square_loss(), batch, "t", optimizer, scheduler, 1.0)
    params = [p.detach().clone() for p in model.parameters()]
    adam = {k: v.clone() for k, v in optimizer.state[model.w.weight].items()}
    out = train_step(model, square_loss(poison=True), batch, "t", optimizer, scheduler, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))  # no update
    assert all(torch.equal(adam[k], v) for k, v in optimizer.state[model.w.weight].items())  # Adam untouched
    assert all(p.grad is None for p in model.parameters())  # no NaN gradient left for the next step
    assert scheduler.last_epoch == 2  # the schedule follows the step count, skipped steps included
    assert float(out["skipped"]) == 1.0 and math.isnan(float(out["loss"]))
    out = train_step(model, square_loss(), batch, "t", optimizer, scheduler, 1.0)
    assert float(out["skipped"]) == 0.0 and not torch.equal(params[0], model.w.weight)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _skip_worker(rank: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = Scale()  # not DDP-wrapped: nothing but the guard's reduction tells rank 0 about rank 1
    optimizer, scheduler = build_optimizer(model, 0.1, 0.0, warmup_steps=1, total_steps=10, min_ratio=0.1)
    before = model.w.weight.detach().clone()
    out = train_step(model, square_loss(poison=rank == 1), [{"x": torch.randn(4, 3)}], "t", optimizer, scheduler, 1.0)
    torch.save({"skipped": out.get("skipped"), "loss": out["loss"], "changed": not torch.equal(before, model.w.weight)},
               f"{out_dir}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_ranks_skip_together_when_one_rank_is_nonfinite(tmp_path):
    mp.start_processes(_skip_worker, args=(str(tmp_path),), nprocs=2, join=True, start_method="spawn")
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert not got["changed"] and float(got["skipped"]) == 1.0, rank
        assert math.isnan(float(got["loss"])), rank  # the step's loss reads non-finite on every rank


def test_nonfinite_streak_is_counted_and_fails_at_the_limit_naming_step_and_loss():
    from pipelines.train.guard import NonFiniteTrainingError, track_nonfinite

    state: dict = {}

    def step(n: int, skipped: bool) -> None:
        out = {"skipped": torch.tensor(float(skipped)), "loss": torch.tensor(float("nan") if skipped else 1.0),
               "grad_norm": torch.tensor(float("inf") if skipped else 0.5)}
        track_nonfinite(state, out, n, limit=3)

    for n, skipped in enumerate([True, True, False, True, True], start=1):
        step(n, skipped)
    assert state == {"nonfinite_steps": 4, "nonfinite_streak": 2}
    with pytest.raises(NonFiniteTrainingError, match=r"3 steps in a row .* at step 6 \(loss nan, grad_norm inf\)"):
        step(6, True)
    assert state["nonfinite_steps"] == 5


def test_a_nan_model_is_never_checkpointed_or_registered(job_factory, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from mmcore.checkpoint import save_checkpoint
    from pipelines.config import mlflow_tracking_uri
    from pipelines.registry import register_and_gate

    job = job_factory(tmp_path / "run")
    model, optimizer, scheduler, state = build_state(job, CPU, [])
    with torch.no_grad():
        next(model.parameters())[0] = float("nan")
    target = tmp_path / "never"
    with pytest.raises(ValueError, match="NaN/Inf"):
        save_train_checkpoint(target, model, job, optimizer, scheduler, state)
    assert not target.exists()
    from pipelines.core.checkpoints import NonFiniteError, check_finite

    # A NaN model saved by other means: the registry refuses it before touching MLflow.
    nan_ckpt = save_checkpoint(tmp_path / "nan", model, job.data.tokenizer)
    with pytest.raises(NonFiniteError, match=str(nan_ckpt / WEIGHTS)):
        check_finite(nan_ckpt)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config("debug", [f"services.home={tmp_path / 'home'}"])
    card, per_sample = tmp_path / "report_card.json", tmp_path / "per_sample.jsonl"
    card.write_text(json.dumps({"metrics": {"i2t_r1": 0.9}}))
    per_sample.write_text(json.dumps({"key": "k0", "i2t_rank": 0, "t2i_ranks": [0]}) + "\n")
    report = {"metrics": {"i2t_r1": 0.9}, "benchmark": "dsv1:abc", "dataset_version": "dsv1",
              "report_card_path": str(card), "per_sample_path": str(per_sample)}
    with pytest.raises(NonFiniteError):
        register_and_gate(cfg, nan_ckpt, report, {"dataset_version": "dsv1"})
    assert MlflowClient(mlflow_tracking_uri(cfg)).search_registered_models() == []


def tiny_config(home, *extra: str):
    return load_config("debug", [
        f"services.home={home}", "train.batch_size=4", "train.log_every=1", "train.eval_every=0",
        "train.warmup_steps=1", "train.loader_workers=0", "train.val_max_samples=8", "eval.batch_size=8",
        "scaling.num_workers=2", "scaling.cpus_per_worker=1", "train.max_failures=0", *extra,
    ])


def test_diverging_run_skips_counts_and_stops_with_a_clear_error(ray_local, tiny_dataset, tmp_path):
    """NaN losses on rank 1 at steps 2, 4, 5, 6: both ranks skip them, the count reaches the
    checkpoints, and the third in a row stops the run (no retry) with no checkpoint at step 6."""
    cfg = tiny_config(tmp_path, "train.steps=8", "train.checkpoint_every=2", "train.max_nonfinite_steps=3",
                      "train.nonfinite_at_steps=[2,4,5,6]")
    with pytest.raises(TrainingError, match=r"stopped at step 6: 3 steps in a row .* at step 6 \(loss nan"):
        run_training(cfg, tiny_dataset, "pretrain", run_name="diverging")
    run = tmp_path / "ray_results" / "diverging"
    assert sorted(p.name for p in run.glob("checkpoint-step*")) == ["checkpoint-step0000002",
                                                                    "checkpoint-step0000004"]
    state = read_trainer_state(run / "checkpoint-step0000004")
    assert state["nonfinite_steps"] == 2 and state["metrics"]["nonfinite_steps"] == 2
    assert [h["step"] for h in state["history"] if "pretrain_loss" in h] == [1, 3]  # skipped steps: no loss
    assert all(math.isfinite(h["pretrain_loss"]) for h in state["history"] if "pretrain_loss" in h)
    from pipelines.core.checkpoints import check_finite

    check_finite(run / "checkpoint-step0000004")


# ----------------------------------------------------------------------------- small splits


def test_train_split_smaller_than_the_readers_names_the_counts_and_the_fix(ray_local, tmp_path):
    from pipelines.core.dataset import read_manifest, split_entries
    from pipelines.ingest import ingest
    from pipelines.ingest.synth import synthesize

    data_cfg = load_config("debug", ["data.split_fractions={train: 0.2, val: 0.4, test: 0.4}"]).data
    version = ingest(synthesize(tmp_path / "raw", num=12, seed=3), tmp_path / "datasets", data_cfg)
    samples = sum(e["samples"] for e in split_entries(read_manifest(version), "train"))
    assert 0 < samples < 8, samples
    loaders = samples // 2 + 1  # 2 workers x this many loader workers: one reader too many, or two
    cfg = tiny_config(tmp_path, "train.steps=2", f"train.loader_workers={loaders}")
    with pytest.raises(TrainingError) as err:
        run_training(cfg, version, "pretrain", run_name="small")
    message = str(err.value)
    assert f"has {samples} sample(s), fewer than the {2 * loaders} data readers" in message
    assert f"scaling.num_workers=2 x train.loader_workers={loaders}" in message
    assert "Lower train.loader_workers" in message and "ingest more data" in message


# ----------------------------------------------------------------------------- one driver per run


HOLD = textwrap.dedent("""
    import sys, time
    from pipelines.train.runlock import run_lock
    with run_lock(sys.argv[1]):
        print("held", flush=True)
        time.sleep(120)
""")


def test_a_second_live_driver_of_a_run_fails_fast_and_a_dead_one_leaves_no_lock(ray_local, tiny_dataset, tmp_path):
    cfg = tiny_config(tmp_path, "train.steps=2", "train.checkpoint_every=2")
    run = tmp_path / "ray_results" / "twin"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"  # (before the fix: an import error here)
        with pytest.raises(TrainingError, match=rf"run twin: run folder {run} is in use by another live training "
                                                rf"process \(pid {holder.pid} on .*pass another run name"):
            run_training(cfg, tiny_dataset, "pretrain", run_name="twin")
        assert not list(run.glob("checkpoint-*"))
    finally:
        holder.kill()  # SIGKILL: the kernel drops its lock
        holder.wait(timeout=30)
    ckpt = run_training(cfg, tiny_dataset, "pretrain", run_name="twin")
    assert read_trainer_state(ckpt)["step"] == 2
    assert json.loads((run / ".driver.lock").read_text())["pid"] != holder.pid
