"""The progress line of a real (tiny) Ray Train run: rank 0 writes it, the driver relays it to the
caller (the Prefect task's logger in the retrain flow), and MLflow gets the time left."""

from __future__ import annotations

import math
import os
import re

import pytest
from train_support import tiny_config

from pipelines.core.storage import read_json
from pipelines.train import run_training
from pipelines.train.telemetry import PROGRESS_FILE

pytestmark = pytest.mark.timeout(600)

STEPS = 6


def line_pattern(run: str, total: int | str = r"\d+") -> re.Pattern:
    """Rank 0's progress line of run `run`."""
    return re.compile(
        rf"\[train\] {run}: (?P<step>\d+)/{total} steps \((?P<share>\d+)%\), (?P<rate>[\d.e+-]+) steps/s"
        r"(?:, (?P<left>\S+) left)?, \S+ elapsed; task (?P<task>\w+), loss (?P<loss>\S+), (?P<sps>[\d.e+-]+) samples/s"
    )


LINE = line_pattern("progress", STEPS)


@pytest.fixture(scope="module")
def progress_run(ray_local, tiny_dataset, tmp_path_factory):
    """Two workers, six steps, a progress line at every step (`progress_every_s=0`): the lines
    the driver relayed, the config and the final checkpoint."""
    home = tmp_path_factory.mktemp("home")
    cfg = tiny_config(home, f"train.steps={STEPS}", "train.checkpoint_every=0", "train.loader_workers=0",
                      "train.progress_every_s=0", "train.log_every=3", "train.pretrain_tasks=[pretrain,caption]")
    lines: list[str] = []
    ckpt = run_training(cfg, tiny_dataset, "pretrain", run_name="progress", on_progress=lines.append)
    return lines, cfg, ckpt


def test_the_driver_relays_rank_0s_progress_lines_with_sane_values(progress_run):
    lines, _, _ = progress_run
    parsed = [LINE.fullmatch(line) for line in lines]
    assert all(parsed), lines
    steps = [int(m["step"]) for m in parsed]
    # The relay polls: it may miss a line written between two polls, never reorders, and always
    # gets the last one.
    assert steps == sorted(set(steps)) and steps[-1] == STEPS, lines
    for m in parsed:
        step = int(m["step"])
        assert int(m["share"]) == round(100 * step / STEPS)
        assert m["task"] == ("pretrain", "caption")[(step - 1) % 2]  # the task of the step just done
        assert 0.0 < float(m["loss"]) < 20.0 and math.isfinite(float(m["loss"]))
        assert float(m["rate"]) > 0
        # samples/s = steps/s x the global batch (8 per rank x 2 ranks), both rounded to 3 digits
        assert float(m["sps"]) == pytest.approx(16 * float(m["rate"]), rel=0.01)
        assert (m["left"] is None) == (step == STEPS)  # a time left until the last step


def test_the_run_folder_holds_the_last_line_and_mlflow_the_time_left(progress_run):
    lines, cfg, ckpt = progress_run
    facts = read_json(ckpt.parent / PROGRESS_FILE)
    assert facts["line"] == lines[-1]
    assert facts["step"] == facts["total"] == STEPS and facts["eta_s"] == 0.0
    assert facts["task"] == "caption" and facts["samples_per_s"] > 0

    from mlflow.tracking import MlflowClient

    from pipelines.config import mlflow_tracking_uri

    client = MlflowClient(mlflow_tracking_uri(cfg))
    experiment = client.get_experiment_by_name(cfg.registry.experiment)
    (run,) = client.search_runs([experiment.experiment_id], filter_string="attributes.run_name = 'progress'")
    progress = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "progress")}
    eta = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "eta_s")}
    assert progress == {3: 0.5, 6: 1.0}  # at the log points (train.log_every=3)
    assert sorted(eta) == [3, 6] and eta[3] > 0 and eta[6] == 0.0


def rank0_job(run_uri: str, total: int):
    """What `TrainProgress` reads of a job and a worker (rank 0 of one, a line at every step)."""
    from types import SimpleNamespace

    run = SimpleNamespace(name="live", total_steps=total, progress_every_s=0.0, uri=run_uri)
    job = SimpleNamespace(run=run, train=SimpleNamespace(batch_size=4), grad_accum=1)
    return job, SimpleNamespace(is_main=True, world_size=1)


def test_on_a_terminal_rank_0s_lines_are_one_live_line_and_the_run_log_gets_plain_ones(tmp_path, capsys):
    """Rank 0 (`TrainProgress`) writes its lines into the run folder, never to its stdout (which
    Ray forwards to the driver's console); the driver's relay redraws them in place on a real
    pseudo-terminal and hands the run's log (`on_progress`) one every `train.progress_every_s`
    and the last."""
    import os
    import pty
    import time

    import torch
    from test_progress import read_all

    from pipelines.train.telemetry import LIVE_EVERY_S, TrainProgress, progress_every_s, relay_progress

    total, logged = 5, []
    master, slave = pty.openpty()
    try:
        with open(slave, "w", closefd=False) as console:
            assert progress_every_s(10.0, console) == LIVE_EVERY_S  # rank 0 writes often: the line is live
            job, worker = rank0_job(str(tmp_path), total)
            with relay_progress(str(tmp_path), logged.append, every_s=10.0, console=console, poll_s=0.02):
                rank0 = TrainProgress(job, worker, start_step=0)
                for step in range(total):
                    time.sleep(0.15)
                    rank0.step(("pretrain", "caption")[step % 2], {"loss": torch.tensor(3.0 - step / 10)})
        out = read_all(master)
    finally:
        os.close(master)
        os.close(slave)
    assert capsys.readouterr().out == ""  # nothing from rank 0 itself
    frames = [line_pattern("live").fullmatch(f.rstrip()) for f in out.split("\r\x1b[2K") if f]
    assert all(frames), out
    steps = [int(m["step"]) for m in frames]
    assert steps == sorted(set(steps)) and steps[-1] == total and len(steps) >= 3, out
    assert frames[-1]["task"] == "pretrain" and float(frames[-1]["loss"]) == pytest.approx(2.6)
    assert out.count("\n") == 1 and out.endswith("\n")  # one line, ended when training ends
    # the log: the first line and the last (every 10 s; the whole run took under a second)
    assert [int(line_pattern("live").fullmatch(x)["step"]) for x in logged] == [steps[0], total]
    assert logged[-1] == frames[-1].string


def test_in_a_log_rank_0s_lines_are_plain_lines_once_each(tmp_path):
    import time

    import torch

    from pipelines.train.telemetry import TrainProgress, progress_every_s, relay_progress

    read_fd, write_fd = os.pipe()
    logged: list[str] = []
    with os.fdopen(write_fd, "w") as console:
        assert progress_every_s(10.0, console) == 10.0
        job, worker = rank0_job(str(tmp_path), 3)
        with relay_progress(str(tmp_path), logged.append, every_s=10.0, console=console, poll_s=0.02):
            rank0 = TrainProgress(job, worker, start_step=0)
            for _ in range(3):
                time.sleep(0.15)
                rank0.step("caption", {"loss": torch.tensor(1.0)})
    with os.fdopen(read_fd) as reader:
        printed = reader.read().splitlines()
    assert "\r" not in "".join(printed)
    assert printed == logged and [int(line_pattern("live").fullmatch(x)["step"]) for x in printed] == [1, 2, 3]
