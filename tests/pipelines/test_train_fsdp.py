"""`scaling.strategy: fsdp` (FSDP2 `fully_shard`) on real Ray Train, 2 CPU workers (gloo).

- 20 steps of FSDP follow DDP's loss curve (same data, same init, same seeds).
- A rank dies under FSDP: the group restarts from the step-4 checkpoint and ends with the same
  losses as the uninterrupted FSDP run (step-exact resume, as under DDP); that run has
  `train.activation_checkpointing` on, and its losses equal the plain run's from step 1.
- A checkpoint written under FSDP is the same pickle-free format: it loads for evaluation
  (`mmcore.checkpoint.load_checkpoint`) and a DDP run resumes from it, optimiser state included.
- The ~1.1B `large` preset shards on the meta device over a real 2-process gloo group (no weights
  allocated): every layer is its own FSDP unit and each rank holds half the parameters.

Tolerance: the losses are per step, averaged over the 2 ranks; FSDP reduce-scatters where DDP
all-reduces, so the fp32 sums are added in another order and drift apart by rounding only. Measured
on this machine: at most 1.4e-7 relative over 20 steps; the test allows 1e-5 relative (+1e-6 absolute).
These runs train with `train.itm_weight=0`: ITM's hard negatives are drawn in proportion to the ITC
similarities (`torch.multinomial`), so a last-bit difference in one similarity can, now and then,
draw another negative. That is a discrete change, not rounding (CI once saw 1.3e-4 at step 10), and
with weight 0 the draw cannot steer the weights. The ITM loss is still computed, so its head and
its pass through the fusion are still in every step's graph.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from train_support import CKPT_EVERY, losses, tiny_config

from pipelines.train import read_trainer_state, run_training

pytestmark = pytest.mark.timeout(900)

STEPS = 20
TOLERANCE = {"rel": 1e-5, "abs": 1e-6}


def config(home, *extra: str):
    return tiny_config(home, f"train.steps={STEPS}", "train.log_every=1", "train.itm_weight=0", *extra)


@pytest.fixture(scope="module")
def ddp_run(ray_local, tiny_dataset, tmp_path_factory):
    cfg = config(tmp_path_factory.mktemp("ddp"))
    return run_training(cfg, tiny_dataset, "pretrain", run_name="ddp")


@pytest.fixture(scope="module")
def fsdp_run(ddp_run, tiny_dataset, tmp_path_factory):
    """The same run under FSDP (the DDP run's tokenizer: the same token ids)."""
    home = tmp_path_factory.mktemp("fsdp")
    cfg = config(home, "scaling.strategy=fsdp", f"model.tokenizer={ddp_run}")
    return home, run_training(cfg, tiny_dataset, "pretrain", run_name="fsdp")


def test_fsdp_matches_ddp_losses_for_20_steps(ddp_run, fsdp_run):
    ddp, fsdp = losses(read_trainer_state(ddp_run)), losses(read_trainer_state(fsdp_run[1]))
    assert sorted(ddp) == sorted(fsdp) == list(range(1, STEPS + 1))
    worst = max(abs(fsdp[s] - ddp[s]) / abs(ddp[s]) for s in ddp)
    print(f"FSDP vs DDP: largest relative loss difference over {STEPS} steps {worst:.2e}")
    for step in ddp:
        assert fsdp[step] == pytest.approx(ddp[step], **TOLERANCE), (step, fsdp[step], ddp[step])
    assert fsdp[STEPS] < fsdp[1] - 0.3  # and it learns
    # The weights end up the same too, not just the losses.
    a, b = load_file(str(ddp_run / "model.safetensors")), load_file(str(fsdp_run[1] / "model.safetensors"))
    assert a.keys() == b.keys()
    drift = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert drift < 1e-3, drift


def test_fsdp_checkpoint_is_full_and_pickle_free(fsdp_run, ddp_run):
    from mmcore.checkpoint import load_checkpoint

    ckpt = fsdp_run[1]
    names = sorted(p.name for p in ckpt.iterdir())
    assert not [n for n in names if n.endswith((".pt", ".pth", ".bin", ".pkl"))], names
    # Full (gathered) tensors, named as the unsharded model's: DDP's checkpoint has the same shapes.
    ours, theirs = load_file(str(ckpt / "model.safetensors")), load_file(str(ddp_run / "model.safetensors"))
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    opt_ours = load_file(str(ckpt / "optimizer.safetensors"))
    opt_theirs = load_file(str(ddp_run / "optimizer.safetensors"))
    assert {k: v.shape for k, v in opt_ours.items()} == {k: v.shape for k, v in opt_theirs.items()}
    assert json.loads((ckpt / "optimizer.json").read_text())["param_groups"] == \
        json.loads((ddp_run / "optimizer.json").read_text())["param_groups"]
    model, tokenizer, extra = load_checkpoint(ckpt)  # what evaluation and serving do
    assert extra["step"] == STEPS and tokenizer is not None
    assert all(torch.equal(v, ours[k]) for k, v in model.state_dict().items())


def test_fsdp_worker_death_resumes_step_exact(fsdp_run, ddp_run, tiny_dataset, tmp_path):
    """Rank 1 dies at step 6 under FSDP; the group restarts from the step-4 checkpoint (the shards
    rebuilt from its full state) and the losses after it equal the uninterrupted FSDP run's. This
    run also recomputes its activations (`train.activation_checkpointing`): the losses before the
    failure equal the plain FSDP run's too."""
    cfg = config(tmp_path, "scaling.strategy=fsdp", "train.fail_at_step=6", "train.max_failures=1",
                 f"model.tokenizer={ddp_run}", "train.activation_checkpointing=true")
    state = read_trainer_state(run_training(cfg, tiny_dataset, "pretrain", run_name="fsdp-crashy"))
    assert state["step"] == STEPS
    assert [r["from_step"] for r in state["resumes"]] == [CKPT_EVERY]
    assert (tmp_path / "ray_results" / "fsdp-crashy" / ".fail-at-step-6").is_file()
    curve, reference = losses(state), losses(read_trainer_state(fsdp_run[1]))
    assert sorted(curve) == sorted(reference)
    for step in range(1, STEPS + 1):
        assert curve[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-5), step


def test_ddp_resumes_an_fsdp_checkpoint(fsdp_run, ddp_run, tiny_dataset):
    """The same run continued under DDP, 4 more steps: it restores the FSDP run's optimiser and
    schedule from step 20 (Adam's moments, not a fresh optimiser) and keeps learning."""
    home, fsdp_ckpt = fsdp_run
    cfg = config(home, f"train.steps={STEPS + 4}", f"model.tokenizer={ddp_run}")
    state = read_trainer_state(run_training(cfg, tiny_dataset, "pretrain", run_name="fsdp"))
    assert state["step"] == STEPS + 4
    assert [r["from_step"] for r in state["resumes"]] == [STEPS]
    before = losses(read_trainer_state(fsdp_ckpt))
    after = losses(state)
    assert min(after[s] for s in range(STEPS + 1, STEPS + 5)) < before[1] - 0.3


def _shard_large_on_meta(rank: int, rendezvous: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        from torch.distributed.fsdp import FSDPModule

        from mmcore.model import build_model, count_parameters, model_config
        from pipelines.train.sharding import shard_model

        with torch.device("meta"):
            model = build_model(model_config("large"), load_pretrained=False)
        total = count_parameters(model)
        shard_model(model, torch.device("cpu"))
        params = dict(model.named_parameters())
        local = sum(p.to_local().numel() for p in params.values())
        units = sum(isinstance(m, FSDPModule) for m in model.modules())
        facts = {"total": total, "local": local, "units": units, "names": len(params),
                 "all_dtensor": all(hasattr(p, "to_local") for p in params.values()),
                 "all_meta": all(p.is_meta for p in params.values())}
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(facts, f)
    finally:
        dist.destroy_process_group()


def test_large_preset_shards_on_the_meta_device(tmp_path):
    mp.start_processes(_shard_large_on_meta, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2,
                       join=True, start_method="spawn")
    facts = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    total = facts[0]["total"]
    assert 1.0e9 < total < 1.2e9
    for f in facts:
        assert f["all_dtensor"] and f["all_meta"]  # sharded, and nothing was allocated
        # 24 ViT + 24 BERT + 12 fusion + 12 decoder layers, each its own unit, and the root
        assert f["units"] == 24 + 24 + 12 + 12 + 1
        assert abs(f["local"] - total / 2) < 0.01 * total  # half each (dim-0 chunks, padded)
    assert facts[0]["local"] + facts[1]["local"] == total
