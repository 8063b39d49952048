"""Whole and local views of parameters that FSDP shards, so the methods' tensor code runs under FSDP.

Under accelerate's FSDP plugin (version 2, ``fully_shard``) a parameter is, outside the forward
pass, a ``DTensor`` of which each process holds a slice of rows. Pruning code needs two views of
it:

- the *whole* tensor (:func:`full_tensor`, an all-gather), for what depends on whole heads and
  neurons: their norms, the budgeted projection, the hard prune, the compaction;
- this process's *local* slice (:func:`local_tensor`, differentiable), for terms summed over
  elements, such as the ADMM penalty, whose gradient then lands on the slice this process owns.

Tensors that shadow a parameter (ADMM's Z and U) are kept laid out like it (:func:`shard_like`),
so each process stores only its slice between updates. On a model that is not sharded, every
function here returns its argument: the same code serves one process, DDP and FSDP.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor


def is_sharded(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, DTensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every process (an all-gather: every process must call it)."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This process's slice of a sharded tensor (gradients flow back to the slice), or the tensor itself."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def shard_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``value`` laid out as ``like``: this process's slice as a DTensor when ``like`` is sharded, else whole.

    ``value`` must be equal on every process when it is whole (each keeps its own slice; nothing is sent).
    """
    if is_sharded(like):
        if is_sharded(value):
            return value
        return distribute_tensor(value.to(like.device), like.device_mesh, like.placements, src_data_rank=None)
    return full_tensor(value).to(like.device)


def sum_over_shards(local_sum: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``local_sum`` (a sum over this process's slices) with the value of the sum over all slices.

    The gradient stays the local one: each process owns the gradient of its slices, which FSDP does
    not average, while the value (logged, checked for NaN) is the whole model's on every process.
    """
    if not is_sharded(like):
        return local_sum
    total = local_sum.detach().clone()
    torch.distributed.all_reduce(total, group=like.device_mesh.get_group())
    return local_sum + (total - local_sum.detach())


def has_sharded_parameters(model: nn.Module) -> bool:
    return any(is_sharded(parameter) for parameter in model.parameters())



def gathered_model(model: nn.Module) -> nn.Module:
    """A plain copy of a sharded model with its whole weights, on every process (collective).

    Built from the model's own class and config and loaded strictly, so it is the model FSDP was
    given, as one process would hold it: what compaction slices, and what is evaluated and saved.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from .architectures import model_class

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    reference = next(iter(state.values()))
    plain = model_class(model)(copy.deepcopy(model.config))
    plain.to(device=reference.device, dtype=reference.dtype)
    plain.load_state_dict(state, strict=True)
    plain.train(model.training)
    return plain
