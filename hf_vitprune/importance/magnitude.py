"""Group magnitude: the L2 norm of all weights a unit owns (the data-free baseline).

The groups are exactly what pruning removes (the slices each unit kind owns,
``architectures.UNIT_KINDS[kind].parameters``):

- head h: rows ``h*d_h:(h+1)*d_h`` of q_proj, k_proj, v_proj (weights and biases, where a bias
  exists), the same input columns of o_proj, and column h of the layer's own relative position
  bias table (BEiT). A bias table *shared* by all layers is not part of any layer's group (it is
  copied into every layer only at compaction), and o_proj's bias belongs to no head.
- MLP neuron j: row j of every input projection (fc1, or gate_proj and up_proj) with its bias,
  and column j of the output projection (its bias belongs to no neuron).

The per-group reductions are shared with the Taylor criterion through :func:`head_group_sum` and
:func:`neuron_group_sum`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ..architectures import UNIT_KINDS, EncoderLayer, find_encoder_layers
from . import ImportanceOptions, UnitScores

Elementwise = Callable[[nn.Parameter], torch.Tensor]


def head_group_parameters(layer: EncoderLayer) -> Iterator[tuple[nn.Parameter, str]]:
    """The parameters holding the layer's heads, each with how heads lie in it: 'rows', 'columns' or 'table'."""
    return UNIT_KINDS["heads"].parameters(layer)


def neuron_group_parameters(layer: EncoderLayer) -> Iterator[tuple[nn.Parameter, str]]:
    """The parameters holding the layer's MLP neurons, each with 'rows' or 'columns'."""
    return UNIT_KINDS["neurons"].parameters(layer)


def _reduce(values: torch.Tensor, layout: str, units: int) -> torch.Tensor:
    values = values.to(torch.float64)
    if layout == "rows":  # (units * width, ...) -> per unit
        return values.reshape(units, -1).sum(1)
    if layout == "columns":  # (out, units * width) -> per unit
        return values.reshape(values.shape[0], units, -1).sum((0, 2))
    if layout == "table":  # (distances, units)
        return values.sum(0)
    raise AssertionError(layout)


def head_group_sum(layer: EncoderLayer, elementwise: Elementwise) -> torch.Tensor:
    """``sum over each head's group of elementwise(param)``: a float64 CPU tensor of shape (num_heads,)."""
    total = torch.zeros(layer.num_heads, dtype=torch.float64)
    for parameter, layout in head_group_parameters(layer):
        total += _reduce(elementwise(parameter), layout, layer.num_heads).cpu()
    return total


def neuron_group_sum(layer: EncoderLayer, elementwise: Elementwise) -> torch.Tensor:
    """``sum over each neuron's group of elementwise(param)``: a float64 CPU tensor of shape (num_neurons,)."""
    total = torch.zeros(layer.num_neurons, dtype=torch.float64)
    for parameter, layout in neuron_group_parameters(layer):
        total += _reduce(elementwise(parameter), layout, layer.num_neurons).cpu()
    return total


def _squared(parameter: nn.Parameter) -> torch.Tensor:
    return parameter.detach().to(torch.float64).square()


@torch.no_grad()
def head_magnitude(model: nn.Module) -> list[torch.Tensor]:
    """L2 norm of every head's group, one (num_heads,) float64 tensor per layer."""
    return [head_group_sum(layer, _squared).sqrt() for layer in find_encoder_layers(model)]


@torch.no_grad()
def neuron_magnitude(model: nn.Module) -> list[torch.Tensor]:
    """L2 norm of every MLP neuron's group, one (num_neurons,) float64 tensor per layer."""
    return [neuron_group_sum(layer, _squared).sqrt() for layer in find_encoder_layers(model)]


def score_magnitude(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]] | None = None,
    *,
    options: ImportanceOptions | None = None,
) -> UnitScores:
    """Group L2 magnitude of every head and neuron. Needs no data: ``batches`` is ignored.

    Weights are identical on every process, so the scores are too; nothing is reduced.
    """
    return UnitScores(heads=head_magnitude(model), neurons=neuron_magnitude(model))
