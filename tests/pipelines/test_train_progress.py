"""The progress line of a real (tiny) Ray Train run: rank 0 writes it, the driver relays it to the
caller (the Prefect task's logger in the retrain flow), and MLflow gets the time left."""

from __future__ import annotations

import math
import re

import pytest
from train_support import tiny_config

from pipelines.core.storage import read_json
from pipelines.train import run_training
from pipelines.train.telemetry import PROGRESS_FILE

pytestmark = pytest.mark.timeout(600)

STEPS = 6
LINE = re.compile(
    r"\[train\] progress: (?P<step>\d+)/6 steps \((?P<share>\d+)%\), (?P<rate>[\d.e+-]+) steps/s"
    r"(?:, (?P<left>\S+) left)?, \S+ elapsed; task (?P<task>\w+), loss (?P<loss>\S+), (?P<sps>[\d.e+-]+) samples/s"
)


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
