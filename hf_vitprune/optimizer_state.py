"""Keep training when the parameters under an optimizer are sliced in the middle of a run.

A search that removes units as it goes (OFB's progressive shrinking) replaces parameters by
smaller ones. The optimizer must then train the new tensors in the old ones' places, with
their state (Adam's moments, SGD's momentum) sliced the same way, so that the run continues as
if the removed elements had never been there.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def base_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer under wrappers that hold it as ``.optimizer`` (accelerate's AcceleratedOptimizer)."""
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def replace_parameters(optimizer, replacements: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
    """Train each ``new`` in place of ``old``, its state ``old``'s sliced by ``index``.

    ``index`` holds, in ``new``'s shape, the flat positions in ``old`` of the elements ``new`` keeps
    (:func:`hf_vitprune.surgery.compaction_indices` gives them for a compaction). State tensors shaped
    like the parameter are gathered with it; scalars (the step count) are kept. A parameter the
    optimizer does not train is skipped.
    """
    inner = base_optimizer(optimizer)
    where = {id(p): (group, i) for group in inner.param_groups for i, p in enumerate(group["params"])}
    for old, new, index in replacements:
        if id(old) not in where:
            continue
        group, i = where.pop(id(old))
        group["params"][i] = new
        state = inner.state.pop(old, None)
        if state:
            inner.state[new] = {key: _sliced(key, value, old, index, inner) for key, value in state.items()}


def _sliced(key: str, value, old: torch.Tensor, index: torch.Tensor, optimizer: torch.optim.Optimizer):
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return value
    if value.shape != old.shape:
        raise ValueError(
            f"{type(optimizer).__name__} keeps its state {key!r} in shape {tuple(value.shape)} for a parameter of "
            f"shape {tuple(old.shape)}, so it cannot be sliced with the parameter mid-search. Use an optimizer whose "
            f"state is shaped like the parameters (AdamW, Adam, SGD: optim='adamw_torch'), or turn off the method's "
            f"mid-search compaction (OFB: physical_shrinking=False)."
        )
    return value.reshape(-1)[index.to(value.device)].clone()
