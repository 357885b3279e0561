"""How the model is spread over the ranks (`scaling.strategy`), and the full state a checkpoint holds.

- `ddp`: a whole replica per rank; gradients all-reduced (`worker.wrap`).
- `fsdp`: FSDP2 (`torch.distributed.fsdp.fully_shard`): every transformer layer of the image
  encoder, text encoder, fusion and decoder is one unit whose parameters, gradients and optimiser
  state are sharded across the ranks, gathered for its forward and backward only. On GPU its
  mixed-precision policy computes in bf16 (`param_dtype`) and reduces gradients in
  `scaling.fsdp_reduce_dtype` (fp32 by default: a bf16 sum over many ranks loses the small
  gradients); the optimiser always updates fp32 shards. On CPU (gloo) everything stays fp32.

Checkpoints hold the full, unsharded state either way (`full_state`, in `optimizer.state_dict()`
form, parameters numbered in the optimiser's order), so a checkpoint written under FSDP loads
under DDP, for evaluation and for serving, and the other way round.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from pipelines.train.worker import Worker, unwrap

STRATEGIES = ("ddp", "fsdp")
REDUCE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Non-forward methods that run sharded parameters: FSDP gathers them around these calls too.
FORWARD_METHODS = ("encode_image", "encode_text", "itm_logits")
_RESNET_STAGE = re.compile(r"(^|\.)layer[1-4]$")


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The blocks FSDP gathers one at a time: each layer of every `nn.ModuleList` (BERT, fusion,
    decoder), of the torchvision ViT's `encoder.layers` and of a ResNet's four stages."""
    units: list[nn.Module] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) or name.endswith("encoder.layers") or _RESNET_STAGE.search(name):
            units.extend(module.children())
    return units


def checkpoint_activations(model: nn.Module) -> int:
    """`train.activation_checkpointing`: each transformer block (the units of `shard_units`) keeps
    only its inputs in the forward and recomputes its activations in the backward, trading one
    more forward of each block for the memory of its activations. Composable
    (`torch.distributed._composable.checkpoint`: forward hooks), so parameter names, state dicts
    and checkpoints are unchanged, and it composes with DDP and with FSDP2 (apply it before
    `shard_model`). The RNG state is replayed, so dropout masks are the same in the recompute.
    ResNet stages are left out: recomputing a BatchNorm in training mode would update its running
    statistics twice. Returns the number of blocks."""
    from torch.distributed._composable import checkpoint

    blocks = [u for u in shard_units(model)
              if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in u.modules())]
    for block in blocks:
        checkpoint(block)
    return len(blocks)


def mixed_precision(device: torch.device, reduce_dtype: str = "float32"):
    """bf16 compute with `reduce_dtype` gradient reduction on GPU; full precision on CPU."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if device.type != "cuda":
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=REDUCE_DTYPES[reduce_dtype])


def shard_model(model: nn.Module, device: torch.device, reduce_dtype: str = "float32", mesh=None) -> nn.Module:
    """`fully_shard` each unit (`shard_units`), then the root (the heads, embeddings and norms left
    over). In place; returns the model, now an `FSDPModule` whose parameters are DTensor shards.
    Needs the process group (Ray Train sets it up); `mesh` defaults to all ranks."""
    import warnings

    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    # FSDP2 warns for every layer that returns a view: an in-place op on it would skip the hooks.
    # mmcore's layers' callers never change outputs in place (test_train_fsdp checks FSDP's
    # gradients against DDP's), and the warning would repeat in every worker's log.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    lift_scalars(model)
    policy = mixed_precision(device, reduce_dtype)
    for unit in shard_units(model):
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    for method in FORWARD_METHODS:
        if hasattr(model, method):
            register_fsdp_forward_method(model, method)
    return model


def lift_scalars(model: nn.Module) -> list[str]:
    """`fully_shard` refuses 0-d parameters (the ITC temperature `heads.logit_scale`): make each one
    1-element 1-D (it broadcasts the same) and note its name on the model. Checkpoints keep the
    0-d shape (`full_state`, `load_optimizer_state`), so they stay one format."""
    names = []
    for name, param in list(model.named_parameters()):
        if param.ndim == 0:
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, nn.Parameter(param.detach().reshape(1),
                                                                   requires_grad=param.requires_grad))
            names.append(name)
    model.lifted_scalars = names
    return names


def _reshaped(state: dict[str, Any], names, shape: tuple[int, ...]) -> dict[str, Any]:
    """`state` (parameter name -> tensor, or -> optimiser state dict) with the lifted scalars'
    tensors (1-element ones; not Adam's `step`) reshaped to `shape`."""
    def fix(value):
        if isinstance(value, dict):
            return {k: fix(v) if k != "step" else v for k, v in value.items()}
        return value.reshape(shape) if torch.is_tensor(value) and value.numel() == 1 else value

    return {k: fix(v) if k in names else v for k, v in state.items()}


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer, worker: Worker):
    """`(weights, optimiser state)` for a checkpoint: full, on CPU, on rank 0; `(None, None)` on the
    other ranks. Under FSDP it gathers the shards, a collective every rank must join."""
    if not is_sharded(model):
        if not worker.is_main:
            return None, None
        return unwrap(model).state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # cpu_offload: rank 0 only
    weights = get_model_state_dict(model, options=options)
    optim = get_optimizer_state_dict(model, optimizer, options=options)
    if not worker.is_main:
        return None, None
    scalars = getattr(model, "lifted_scalars", ())
    optim["state"] = _reshaped(optim["state"], scalars, ())
    return _reshaped(weights, scalars, ()), by_index(optim)


def by_index(optim: dict[str, Any]) -> dict[str, Any]:
    """An optimiser state dict keyed by parameter names -> keyed by position, as
    `optimizer.state_dict()` numbers them (in param-group order)."""
    index = {name: i for i, name in enumerate(p for g in optim["param_groups"] for p in g["params"])}
    return {"state": {index[name]: value for name, value in optim["state"].items()},
            "param_groups": [{**g, "params": [index[p] for p in g["params"]]} for g in optim["param_groups"]]}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a full optimiser state (position-keyed, from a checkpoint) into this rank's optimiser;
    under FSDP each rank keeps its own shard of every tensor."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    named = {order[int(i)]: value for i, value in state["state"].items()}
    by_name = {"state": _reshaped(named, getattr(model, "lifted_scalars", ()), (1,)),
               "param_groups": [{**g, "params": [order[int(i)] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor parameter; any other tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t
