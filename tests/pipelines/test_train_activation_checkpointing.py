"""`train.activation_checkpointing`: each transformer block recomputes its activations in the backward.

- On one process: the gradients of a pretraining step equal those without it (dropout on, so the
  RNG replay is checked too), the parameter names are unchanged, and every block really runs its
  forward twice (once more in the backward).
- Under FSDP2 on 2 gloo processes: the full (gathered) gradients equal those of the same sharded
  model without it. `test_train_fsdp.py` also runs a whole Ray Train FSDP run with it on.

Tolerance: recomputation runs the same kernels on the same inputs, so the gradients agree to
rounding (measured: exactly equal on this CPU); the tests allow 1e-5 relative + 1e-7 absolute.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mmcore.losses import build_loss
from mmcore.model import build_model, model_config
from pipelines.train.sharding import checkpoint_activations, shard_model, shard_units

pytestmark = pytest.mark.timeout(300)

DROPOUT = {f"{part}.dropout": 0.1 for part in ("image", "text", "fusion", "decoder")}
TOLERANCE = {"rtol": 1e-5, "atol": 1e-7}


def debug_model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(model_config("debug", **DROPOUT), load_pretrained=False).train()


def pretrain_batch(model, seed: int, size: int = 4) -> dict:
    """A pretraining batch of random images and captions (BOS ... EOS), `(B, 3, S, S)` and `(B, L)`."""
    cfg, g = model.cfg, torch.Generator().manual_seed(seed)
    ids = torch.randint(3, cfg.vocab_size, (size, 10), generator=g)
    ids[:, 0], ids[:, -1] = cfg.bos_id, cfg.eos_id
    image = torch.randn(size, 3, cfg.image.image_size, cfg.image.image_size, generator=g)
    return {"image": image, "caption_ids": ids, "caption_mask": torch.ones_like(ids)}


def step_gradients(model, batch: dict, seed: int = 1) -> tuple[float, dict[str, torch.Tensor]]:
    """One pretraining forward + backward from a fixed RNG state (dropout, ITM negatives)."""
    torch.manual_seed(seed)
    loss = build_loss("pretrain")(model(batch, "pretrain"))["loss"]
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradients_match_without_checkpointing():
    plain = debug_model()
    ckpt = copy.deepcopy(plain)
    blocks = checkpoint_activations(ckpt)
    assert blocks == len(shard_units(ckpt)) == 2 + 2 + 1 + 2  # ViT, BERT, fusion and decoder layers
    assert list(ckpt.state_dict()) == list(plain.state_dict())  # names (and checkpoints) unchanged
    calls = {"plain": 0, "ckpt": 0}
    for key, model in (("plain", plain), ("ckpt", ckpt)):  # a LayerNorm inside the first block
        first = next(m for m in shard_units(model)[0].modules() if isinstance(m, torch.nn.LayerNorm))
        first.register_forward_hook(lambda *_, key=key: calls.__setitem__(key, calls[key] + 1))

    batch = pretrain_batch(plain, seed=0)
    loss_a, grads_a = step_gradients(plain, batch)
    loss_b, grads_b = step_gradients(ckpt, batch)
    assert calls == {"plain": 1, "ckpt": 2}  # the checkpointed block ran again in the backward
    assert loss_b == loss_a
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 50
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, **TOLERANCE, msg=name)


def test_batchnorm_stages_are_not_recomputed():
    """A ResNet stage's BatchNorm would update its running statistics twice: left out."""
    torch.manual_seed(0)
    model = build_model(model_config("debug", image_encoder="resnet18", image_size=32), load_pretrained=False)
    resnet_stages = [u for u in shard_units(model) if any(isinstance(m, torch.nn.BatchNorm2d) for m in u.modules())]
    assert resnet_stages  # the test means something: the ResNet has stages among the units
    assert checkpoint_activations(model) == len(shard_units(model)) - len(resnet_stages)


def _fsdp_gradients(rank: int, rendezvous: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        plain = debug_model()
        ckpt = copy.deepcopy(plain)
        checkpoint_activations(ckpt)
        cpu = torch.device("cpu")
        shard_model(plain, cpu)
        shard_model(ckpt, cpu)
        batch = pretrain_batch(plain, seed=10 + rank)  # each rank its own data, as in training
        loss_a, grads_a = step_gradients(plain, batch, seed=rank)
        loss_b, grads_b = step_gradients(ckpt, batch, seed=rank)
        full_a = {n: g.full_tensor() for n, g in grads_a.items()}  # collectives: every rank joins
        full_b = {n: g.full_tensor() for n, g in grads_b.items()}
        worst = max(float(((full_b[n] - g).abs() / (g.abs() + 1e-7)).max()) for n, g in full_a.items())
        close = all(torch.allclose(full_b[n], g, **TOLERANCE) for n, g in full_a.items())
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump({"loss": [loss_a, loss_b], "names": sorted(full_a) == sorted(full_b), "n": len(full_a),
                       "close": close, "worst_rel": worst}, f)
    finally:
        dist.destroy_process_group()


def test_gradients_match_under_fsdp_on_two_gloo_ranks(tmp_path):
    mp.start_processes(_fsdp_gradients, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2,
                       join=True, start_method="spawn")
    for rank in (0, 1):
        facts = json.loads((tmp_path / f"rank{rank}.json").read_text())
        print(f"rank {rank}: {facts}")
        assert facts["names"] and facts["n"] > 50
        assert facts["loss"][0] == pytest.approx(facts["loss"][1], rel=1e-6)
        assert facts["close"], facts


def test_validation_and_generation_under_no_grad_are_unchanged():
    """Validation and serving run the same model without gradients: the hooks change nothing."""
    plain = debug_model().eval()
    ckpt = copy.deepcopy(plain)
    checkpoint_activations(ckpt)
    batch = pretrain_batch(plain, seed=3)
    with torch.no_grad():
        torch.manual_seed(1)
        a = plain(batch, "pretrain")
        torch.manual_seed(1)
        b = ckpt(batch, "pretrain")
        assert torch.equal(a.image_emb, b.image_emb) and torch.equal(a.lm_logits, b.lm_logits)
        assert torch.equal(plain.generate(batch["image"], 5), ckpt.generate(batch["image"], 5))
