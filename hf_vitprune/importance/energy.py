"""Output energy: how much each head and MLP neuron writes into the residual stream, from data.

A unit's *output energy* is the mean over tokens of the squared norm of its contribution to the
residual stream, after the layer scale (DINOv2, BEiT) where the model has one:

- head h: ``|| lambda * (context_h @ W_o[:, h]^T) ||^2``;
- MLP neuron j: ``a_j^2 * || lambda * W_out[:, j] ||^2``, with ``a_j`` its activation (the input of
  the MLP's output projection).

Removing a unit removes exactly that contribution, so under a quadratic model of the loss around
the dense model's residual stream with isotropic curvature, the loss grows in proportion to it:
heads and neurons, of any layer, are on one scale (the issue of putting a stationary probability
and a squared weight norm side by side does not arise). A neuron that never activates on the
calibration set has energy 0 whatever its weights.

Only sums over images are kept (:class:`OutputEnergy`), so shards of a calibration set on several
processes add up exactly (:meth:`OutputEnergy.all_reduce`). The statistics are collected in the
same calibration pass as the head graph (:func:`hf_vitprune.importance.graph.collect_calibration_statistics`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..architectures import find_encoder_layers
from . import all_reduce_sum


@dataclass
class OutputEnergy:
    """Per layer: summed (over images) mean-over-tokens head energies and neuron activation second moments."""

    head_sums: list[torch.Tensor]  # (H_l,) float64 each
    activation_sums: list[torch.Tensor]  # (F_l,) float64 each: sum over images of mean_tokens a_j^2
    num_images: int = 0

    @classmethod
    def empty(cls, num_heads: list[int], num_neurons: list[int]) -> OutputEnergy:
        return cls([torch.zeros(h, dtype=torch.float64) for h in num_heads],
                   [torch.zeros(f, dtype=torch.float64) for f in num_neurons], 0)

    def all_reduce(self, group: Any = None) -> OutputEnergy:
        """Sum over all torch.distributed processes (in place); a no-op without an initialised process group."""
        parts = [*self.head_sums, *self.activation_sums]
        sizes = [t.numel() for t in parts]
        flat = torch.cat([*parts, torch.tensor([float(self.num_images)], dtype=torch.float64)])
        summed = all_reduce_sum(flat, group)
        pieces = list(summed[:-1].split(sizes))
        count = len(self.head_sums)
        self.head_sums, self.activation_sums = pieces[:count], pieces[count:]
        self.num_images = int(round(summed[-1].item()))
        return self

    def head_energy(self) -> list[torch.Tensor]:
        """Mean output energy of every head, one (H_l,) float64 tensor per layer."""
        self._check()
        return [sums / self.num_images for sums in self.head_sums]

    @torch.no_grad()
    def neuron_energy(self, model: nn.Module) -> list[torch.Tensor]:
        """Mean output energy of every MLP neuron: E[a_j^2] times the squared (layer-scaled) output column norm."""
        self._check()
        result = []
        for layer, sums in zip(find_encoder_layers(model), self.activation_sums):
            weight = layer.mlp_out.weight.detach().to(torch.float64)  # (hidden, F)
            scale = layer.mlp_scale
            if scale is not None:
                weight = weight * scale.detach().to(torch.float64).reshape(-1, 1)
            result.append(sums / self.num_images * weight.pow(2).sum(0).cpu())
        return result

    def _check(self) -> None:
        if self.num_images <= 0:
            raise ValueError("OutputEnergy holds no image; collect it on a non-empty calibration set first.")


def head_energy_of(contributions: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Per image and head, the mean over tokens of ``||scale * contribution||^2``.

    ``contributions``: (batch, heads, tokens, hidden) residual contributions of each head.
    """
    if scale is not None:
        contributions = contributions * scale.detach().to(contributions.dtype)
    return contributions.float().pow(2).sum(-1).mean(-1)  # (batch, heads)
