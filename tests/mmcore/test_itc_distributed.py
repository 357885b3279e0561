"""ITC under real torch.distributed (gloo, 2 CPU processes): negatives from both ranks, with gradients.

mmcore holds no distributed code; the trainer passes a gather function. Here it is
`torch.distributed.nn.functional.all_gather` (differentiable) + cat: any differentiable gather
serves. The one training passes, `pipelines.train.steps.gather_with_grad`, has its own gradient
test in `tests/pipelines/test_train_gather.py`.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mmcore.losses import ContrastiveLoss

WORLD, B, E = 2, 3, 8


def _data():
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(WORLD * B, E, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(WORLD * B, E, generator=g), dim=-1)
    return img, txt


def _gather(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(t), dim=0)


def _worker(rank: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    # A file rendezvous: no TCP port to pick and lose to another process between pick and bind.
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=WORLD)
    img, txt = _data()
    local_img = img[rank * B: (rank + 1) * B].clone().requires_grad_()
    local_txt = txt[rank * B: (rank + 1) * B].clone().requires_grad_()
    loss = ContrastiveLoss(_gather)(local_img, local_txt, torch.tensor(10.0))
    loss.backward()
    torch.save({"loss": loss.detach(), "img_grad": local_img.grad, "txt_grad": local_txt.grad},
               os.path.join(out_dir, f"rank{rank}.pt"))
    # Both ranks past their last collective before either tears down: a rank that closes its gloo
    # connections while the other still uses them can abort ("terminate called without an active
    # exception"), which failed this test now and then in the full suite.
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_itc_gather_across_two_ranks_matches_the_full_batch(tmp_path):
    # spawn, not fork: earlier tests leave a session Ray (gRPC threads) in this process, and a
    # forked child of a threaded process can die before running a line of the test.
    mp.start_processes(_worker, args=(str(tmp_path),), nprocs=WORLD, join=True, start_method="spawn")
    img, txt = _data()
    img.requires_grad_()
    txt.requires_grad_()
    full = ContrastiveLoss()(img, txt, torch.tensor(10.0))
    full.backward()
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        rows = slice(rank * B, (rank + 1) * B)
        assert torch.allclose(got["loss"], full.detach(), atol=1e-6)  # every rank sees all negatives
        # each rank computes the same global loss, and all_gather's backward sums over ranks, so a
        # rank's local gradient is WORLD x the full-batch one; DDP's gradient averaging divides it back
        assert torch.allclose(got["img_grad"], WORLD * img.grad[rows], atol=1e-6)
        assert torch.allclose(got["txt_grad"], WORLD * txt.grad[rows], atol=1e-6)
