"""Ray Train on real local Ray (CPU, gloo): DDP, worker death, resume by run name, fine-tuning.

Tiny on purpose: the debug model, batch 8, 10 steps, on the session's `tiny_dataset`.
"""

from __future__ import annotations

import json

import pytest
from train_support import CKPT_EVERY, STEPS, losses, tiny_config

from pipelines.core.checkpoints import checkpoint_problems
from pipelines.core.dataset import shard_paths
from pipelines.train import TrainingError, read_trainer_state, run_training

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def pretrain(ray_local, tiny_dataset, tmp_path_factory):
    """One uninterrupted two-worker pretraining run: (config, final checkpoint dir)."""
    cfg = tiny_config(tmp_path_factory.mktemp("home"))
    return cfg, run_training(cfg, tiny_dataset, "pretrain", run_name="straight")


def test_two_worker_ddp_pretraining_learns_and_keeps_ranks_in_step(pretrain, tiny_dataset):
    cfg, ckpt = pretrain
    # 2 ranks x 2 loader workers = 4 readers over fewer train shards: must not hang or starve.
    assert len(shard_paths(tiny_dataset, "train")) < 4
    for name in ("model.safetensors", "config.json", "tokenizer.json", "trainer_state.json",
                 "optimizer.safetensors", "optimizer.json", "scheduler.json"):
        assert (ckpt / name).is_file(), name
    state = read_trainer_state(ckpt)
    assert state["step"] == STEPS and ckpt.name == f"checkpoint-step{STEPS:07d}"
    ranks = sorted(state["ranks"], key=lambda r: r["rank"])
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["step"] == STEPS and r["batches_read"] == STEPS for r in ranks)
    assert state["data_position"]["batches_per_rank"] == STEPS
    assert state["data_position"]["samples_seen"] == STEPS * 8 * 2
    curve = losses(state)
    assert sorted(curve) == list(range(2, STEPS + 1, 2))
    assert curve[STEPS] < curve[2] - 0.3, curve
    assert state["metrics"]["samples_per_s"] > 0
    assert 0.0 <= state["metrics"]["val_i2t_r1"] <= 1.0


def test_worker_death_resumes_from_last_checkpoint_without_replay(pretrain, tiny_dataset, tmp_path):
    """Rank 1 dies at step 6; Ray Train restarts the group from the step-4 checkpoint and the
    run reaches step 10 with the same losses as the uninterrupted run (same data, same order)."""
    # The straight run's tokenizer: training one is not deterministic across processes (HF
    # WordPiece ties), and the comparison below needs the same token ids.
    cfg = tiny_config(tmp_path, "train.fail_at_step=6", "train.max_failures=1", f"model.tokenizer={pretrain[1]}")
    ckpt = run_training(cfg, tiny_dataset, "pretrain", run_name="crashy")
    state = read_trainer_state(ckpt)
    assert state["step"] == STEPS
    assert [r["from_step"] for r in state["resumes"]] == [CKPT_EVERY]
    assert all(r["start_step"] == CKPT_EVERY and r["batches_read"] == STEPS - CKPT_EVERY for r in state["ranks"])
    assert (tmp_path / "ray_results" / "crashy" / ".fail-at-step-6").is_file()  # it really died once
    curve, reference = losses(state), losses(read_trainer_state(pretrain[1]))
    assert sorted(curve) == sorted(reference)  # every logged step once: none repeated, none lost
    for step in (8, 10):  # after the resume: identical batches, optimiser and schedule
        assert curve[step] == pytest.approx(reference[step], rel=1e-4, abs=1e-4)


def ray_train_workers() -> list:
    """This test session's live Ray Train worker processes (Ray titles them `ray::RayTrainWorker...`).
    Only descendants of this process, the driver that started the local Ray: another Ray on the
    machine (a user's, another test run's) has workers of the same title."""
    import os

    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if cmdline.startswith("ray::RayTrainWorker"):
            try:
                if any(parent.pid == os.getpid() for parent in proc.parents()):
                    found.append(proc)
            except psutil.Error:  # ended while we looked
                continue
    return found


def test_worker_sigkilled_from_outside_with_busy_loaders_restarts_promptly(pretrain, tiny_dataset, tmp_path):
    """A rank SIGKILLed by someone else (OOM killer, a lost node) while its DataLoader workers are
    busy. Its loader workers must die with it; otherwise they hold its sockets, Ray never sees the
    actor die, and the other rank blocks in a collective for minutes (it took ~8 minutes before)."""
    import threading
    import time

    import psutil

    steps = 60
    cfg = tiny_config(tmp_path, f"train.steps={steps}", "train.max_failures=1", "train.log_every=10",
                      f"model.tokenizer={pretrain[1]}")
    run_dir = tmp_path / "ray_results" / "killed"
    killed: dict = {}

    def kill_a_rank_after_the_first_checkpoint():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            # A whole checkpoint, not merely its directory: killed mid-upload, the group rightly
            # finds nothing to resume from and starts over, and there is no resume to check.
            if any(not checkpoint_problems(d) for d in run_dir.glob("checkpoint-step*")):
                busy = [p for p in ray_train_workers() if p.children()]
                if busy:
                    killed["children"] = busy[0].children()
                    killed["at"] = time.monotonic()
                    busy[0].kill()  # SIGKILL, from outside the process
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_a_rank_after_the_first_checkpoint, daemon=True)
    killer.start()
    ckpt = run_training(cfg, tiny_dataset, "pretrain", run_name="killed")
    finished = time.monotonic()
    killer.join(timeout=5)
    assert killed, "no Ray Train worker with busy loader workers was found to kill"
    state = read_trainer_state(ckpt)
    assert state["step"] == steps
    assert len(state["resumes"]) == 1 and state["resumes"][0]["from_step"] % CKPT_EVERY == 0
    # Restarted promptly: Ray saw the death at once instead of waiting on the orphans' sockets.
    assert finished - killed["at"] < 240, f"the run took {finished - killed['at']:.0f}s after the kill"
    gone, alive = psutil.wait_procs(killed["children"], timeout=10)
    assert not alive, f"loader workers outlived their rank: {[p.pid for p in alive]}"


def test_finetune_from_pretrain_checkpoint_and_rerun_resumes(pretrain, tiny_dataset, tmp_path):
    """Caption + VQA fine-tuning from the pretraining checkpoint. The first attempt dies with no
    retries left; re-running the same command with the same run name resumes it."""
    _, init = pretrain
    cfg = tiny_config(tmp_path, "train.finetune_steps=4", "train.checkpoint_every=2", "scaling.num_workers=1",
                      "train.loader_workers=1", "train.fail_at_step=3", "train.max_failures=0")
    with pytest.raises(TrainingError, match="training run ft failed"):
        run_training(cfg, tiny_dataset, "finetune", init_from=init, run_name="ft")
    ckpt = run_training(cfg, tiny_dataset, "finetune", init_from=init, run_name="ft")
    state = read_trainer_state(ckpt)
    assert state["step"] == 4 and state["task"] == "finetune" and state["tasks"] == ["caption", "vqa"]
    assert [r["from_step"] for r in state["resumes"]] == [2]
    assert state["lineage"]["init_from"] == str(init)
    assert {"caption_loss", "vqa_loss"} <= set(state["metrics"])
    # Fine-tuning keeps the pretraining checkpoint's model shape and tokenizer.
    assert json.loads((ckpt / "config.json").read_text())["model"] == json.loads((init / "config.json").read_text())["model"]
    assert (ckpt / "tokenizer.json").read_bytes() == (init / "tokenizer.json").read_bytes()
    # A finished run re-run (e.g. a retried flow task) trains nothing and returns the same checkpoint.
    assert run_training(cfg, tiny_dataset, "finetune", init_from=init, run_name="ft") == ckpt


def test_bad_inputs_fail_with_clear_errors(ray_local, tiny_dataset, tmp_path):
    cfg = tiny_config(tmp_path)
    with pytest.raises(TrainingError, match="too small for scaling.num_workers=8"):
        run_training(tiny_config(tmp_path, "scaling.num_workers=8"), tiny_dataset, "pretrain")
    with pytest.raises(TrainingError, match="unknown training task"):
        run_training(cfg, tiny_dataset, "segmentation")
    with pytest.raises(TrainingError, match="not a checkpoint directory"):
        run_training(cfg, tiny_dataset, "caption", init_from=tmp_path)
    with pytest.raises(TrainingError, match="not a complete dataset version"):
        run_training(cfg, tmp_path, "pretrain")
