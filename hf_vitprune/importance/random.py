"""Random importance: the chance baseline every other criterion has to beat."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..architectures import find_encoder_layers
from . import ImportanceOptions, UnitScores


def score_random(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]] | None = None,
    *,
    options: ImportanceOptions | None = None,
) -> UnitScores:
    """Uniform [0, 1) scores for every head and neuron. Needs no data: ``batches`` is ignored.

    Drawn on the CPU from a private ``torch.Generator`` seeded with ``options.seed``, layer by layer
    (heads, then neurons), so the scores depend only on the seed and the layer widths: identical
    on every process and across devices, and the global RNG state is left untouched.
    """
    options = options or ImportanceOptions()
    generator = torch.Generator(device="cpu").manual_seed(options.seed)
    heads, neurons = [], []
    for layer in find_encoder_layers(model):
        heads.append(torch.rand(layer.num_heads, generator=generator, dtype=torch.float64))
        neurons.append(torch.rand(layer.num_neurons, generator=generator, dtype=torch.float64))
    return UnitScores(heads=heads, neurons=neurons)
