"""The all-gather training passes to the ITC loss (`steps.gather_with_grad`), under real
torch.distributed (gloo, 2 CPU processes): the forward sees every rank's rows, and the backward
gives each rank the gradient of its own rows."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mmcore.losses import ContrastiveLoss, WordRegionLoss
from pipelines.train.steps import build_losses, gather_with_grad

WORLD, B, E = 2, 3, 8


def _data():
    g = torch.Generator().manual_seed(1)
    img = torch.nn.functional.normalize(torch.randn(WORLD * B, E, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(WORLD * B, E, generator=g), dim=-1)
    return img, txt


def _worker(rank: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=WORLD)
    img, txt = _data()
    local_img = img[rank * B: (rank + 1) * B].clone().requires_grad_()
    local_txt = txt[rank * B: (rank + 1) * B].clone().requires_grad_()
    gathered = gather_with_grad(local_img)
    loss = ContrastiveLoss(gather_with_grad)(local_img, local_txt, torch.tensor(10.0))
    loss.backward()
    torch.save({"gathered": gathered.detach(), "loss": loss.detach(), "img_grad": local_img.grad,
                "txt_grad": local_txt.grad}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()  # both ranks past their last collective before either tears down
    dist.destroy_process_group()


def _words(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank r's captions: B x (3 + r) tokens (ranks pad their batches to different lengths)."""
    g = torch.Generator().manual_seed(10 + rank)
    words = torch.nn.functional.normalize(torch.randn(B, 3 + rank, E, generator=g), dim=-1)
    mask = torch.ones(B, 3 + rank)
    mask[0, -1] = 0  # a padded token
    return words, mask


def _word_region_worker(rank: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=WORLD)
    img, _ = _data()
    patches = img.view(WORLD * B, 1, E).expand(-1, 4, -1)[rank * B: (rank + 1) * B].clone().requires_grad_()
    words, mask = _words(rank)
    words.requires_grad_()
    loss = WordRegionLoss(gather_with_grad)(patches, words, mask, torch.tensor(10.0))
    loss.backward()
    torch.save({"loss": loss.detach(), "words_grad": words.grad}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_word_region_loss_gathers_captions_of_different_lengths(tmp_path):
    mp.start_processes(_word_region_worker, args=(str(tmp_path),), nprocs=WORLD, join=True, start_method="spawn")
    img, _ = _data()
    patches = img.view(WORLD * B, 1, E).expand(-1, 4, -1)
    parts = [_words(r) for r in range(WORLD)]
    longest = max(w.shape[1] for w, _ in parts)
    words = torch.cat([torch.nn.functional.pad(w, (0, 0, 0, longest - w.shape[1])) for w, _ in parts]).requires_grad_()
    mask = torch.cat([torch.nn.functional.pad(m, (0, longest - m.shape[1])) for _, m in parts])
    full = WordRegionLoss()(patches, words, mask, torch.tensor(10.0))
    full.backward()
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert torch.allclose(got["loss"], full.detach(), atol=1e-6)
        rows, length = slice(rank * B, (rank + 1) * B), 3 + rank
        assert got["words_grad"].shape == (B, length, E)
        assert torch.allclose(got["words_grad"], WORLD * words.grad[rows, :length], atol=1e-6)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_gather_with_grad_matches_the_full_batch_forward_and_backward(tmp_path):
    mp.start_processes(_worker, args=(str(tmp_path),), nprocs=WORLD, join=True, start_method="spawn")
    img, txt = _data()
    img.requires_grad_()
    txt.requires_grad_()
    full = ContrastiveLoss()(img, txt, torch.tensor(10.0))
    full.backward()
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        rows = slice(rank * B, (rank + 1) * B)
        assert torch.equal(got["gathered"], img.detach())  # rank order, every rank's rows
        assert torch.allclose(got["loss"], full.detach(), atol=1e-6)
        # Every rank computes the same global loss and the backward sums over ranks, so a rank's
        # gradient is WORLD x the full-batch one; DDP's gradient averaging divides it back.
        assert torch.allclose(got["img_grad"], WORLD * img.grad[rows], atol=1e-6)
        assert torch.allclose(got["txt_grad"], WORLD * txt.grad[rows], atol=1e-6)


ROWS = (3, 1)  # rank 1's batch had two samples without audio: audio retrieval left them out


def _uneven_worker(rank: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=WORLD)
    img, txt = _data()
    start = sum(ROWS[:rank])
    local_img = img[start: start + ROWS[rank]].clone().requires_grad_()
    local_txt = txt[start: start + ROWS[rank]].clone().requires_grad_()
    loss = ContrastiveLoss(gather_with_grad)(local_img, local_txt, torch.tensor(10.0))
    loss.backward()
    torch.save({"loss": loss.detach(), "img_grad": local_img.grad, "txt_grad": local_txt.grad},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_ranks_with_different_row_counts_gather_their_rows_only(tmp_path):
    mp.start_processes(_uneven_worker, args=(str(tmp_path),), nprocs=WORLD, join=True, start_method="spawn")
    img, txt = _data()
    n = sum(ROWS)
    img, txt = img[:n].clone().requires_grad_(), txt[:n].clone().requires_grad_()
    full = ContrastiveLoss()(img, txt, torch.tensor(10.0))  # the 4 real pairs, no padding rows
    full.backward()
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        rows = slice(sum(ROWS[:rank]), sum(ROWS[: rank + 1]))
        assert torch.allclose(got["loss"], full.detach(), atol=1e-6)
        assert got["img_grad"].shape == (ROWS[rank], E)
        assert torch.allclose(got["img_grad"], WORLD * img.grad[rows], atol=1e-6)
        assert torch.allclose(got["txt_grad"], WORLD * txt.grad[rows], atol=1e-6)


def test_contrastive_loss_of_no_pairs_is_zero_with_a_graph():
    emb = torch.zeros(0, E, requires_grad=True)
    loss = ContrastiveLoss()(emb, emb, torch.tensor(10.0, requires_grad=True))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()


def test_training_losses_gather_only_with_peers():
    from types import SimpleNamespace

    job = SimpleNamespace(all_tasks=["pretrain"], loss_weights={})
    assert build_losses(job, world_size=2, gather=True)["pretrain"].itc.gather_fn is gather_with_grad
    assert build_losses(job, world_size=1, gather=True)["pretrain"].itc.gather_fn is None
    assert build_losses(job, world_size=2, gather=False)["pretrain"].itc.gather_fn is None
