"""Mid-search removal for the ADMM methods: units that Z has left out of its support for several
Z/U updates in a row are cut out physically, so the rest of the search trains a smaller model.

Why: measured on the benchmark model, the support of the first projection and the one at the
hard prune differ by about one neuron per layer, yet the ADMM phase trained the full-width model
for half the epochs. A unit that has stayed outside the support while the penalty pulled it
towards zero for ``admm_remove_after`` updates is removed (the trainer slices the weights and the
optimizer state, as for OFB's progressive shrinking); the units still in play keep their ADMM
state, so the plan can still change among them.

:class:`SupportHistory` counts, per unit, the updates in a row it has spent outside the support;
:func:`reindex` and :func:`keep_scores` carry a plan and scores over to the smaller model.
"""

from __future__ import annotations

import torch
from torch import nn

from ..architectures import find_encoder_layers
from ..importance import UnitScores
from ..plan import PruningPlan

KINDS = ("heads", "neurons")


def unit_widths(model: nn.Module) -> dict[str, list[int]]:
    """Heads and MLP neurons per layer."""
    layers = find_encoder_layers(model)
    return {"heads": [layer.num_heads for layer in layers], "neurons": [layer.num_neurons for layer in layers]}


class SupportHistory:
    """How many Z/U updates in a row every head and neuron has spent outside Z's support."""

    def __init__(self, counts: dict[str, list[torch.Tensor]]):
        self.counts = {kind: [c.to(torch.int64).cpu() for c in counts[kind]] for kind in KINDS}

    @classmethod
    def start(cls, model: nn.Module) -> SupportHistory:
        return cls({kind: [torch.zeros(w, dtype=torch.int64) for w in widths]
                    for kind, widths in unit_widths(model).items()})

    def record(self, model: nn.Module, support: PruningPlan) -> None:
        """One more update: units in ``support`` restart at 0, the others count one more."""
        for kind, widths in unit_widths(model).items():
            for layer, width in enumerate(widths):
                inside = torch.zeros(width, dtype=torch.bool)
                inside[support.kept(kind, layer, width)] = True
                counts = self.counts[kind][layer]
                self.counts[kind][layer] = torch.where(inside, torch.zeros_like(counts), counts + 1)

    def removal(self, after: int) -> PruningPlan | None:
        """The plan that keeps every unit outside the support for fewer than ``after`` updates, or None when no
        unit has been out that long. Only layers that lose a unit are named; a layer whose every unit of a kind
        is due keeps them to the hard prune (an emptied branch has no weights left for ADMM to hold)."""
        kept = {kind: {} for kind in KINDS}
        for kind in KINDS:
            for layer, counts in enumerate(self.counts[kind]):
                staying = torch.nonzero(counts < after).flatten().tolist()
                if 0 < len(staying) < counts.numel():
                    kept[kind][layer] = staying
        if not any(kept.values()):
            return None
        return PruningPlan.of({kind: layers for kind, layers in kept.items() if layers})

    def keep(self, removal: PruningPlan) -> None:
        """Drop the counts of the units ``removal`` cut out (its indices refer to the model before the cut)."""
        for kind in KINDS:
            self.counts[kind] = [c[removal.kept(kind, layer, c.numel())] for layer, c in enumerate(self.counts[kind])]

    def state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}{kind}.{layer}": counts for kind in KINDS for layer, counts in enumerate(self.counts[kind])}

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], prefix: str) -> SupportHistory | None:
        counts = {}
        for kind in KINDS:
            found = {int(k.rsplit(".", 1)[1]): v for k, v in tensors.items() if k.startswith(f"{prefix}{kind}.")}
            counts[kind] = [found[i] for i in range(len(found))]
        return cls(counts) if counts["heads"] else None


def reindex(plan: PruningPlan, removal: PruningPlan, widths: dict[str, list[int]]) -> PruningPlan:
    """``plan`` (indices into the model before ``removal``) with indices into the model ``removal`` leaves.

    Every unit ``plan`` keeps must survive ``removal``: the history removes only units outside the support.
    """
    kept = {}
    for kind in KINDS:
        per_layer = {}
        for layer, width in enumerate(widths[kind]):
            position = {unit: i for i, unit in enumerate(removal.kept(kind, layer, width))}
            per_layer[layer] = [position[unit] for unit in plan.kept(kind, layer, width)]
        kept[kind] = per_layer
    allow_empty = [kind for kind in KINDS if plan.allows_empty(kind)]
    return PruningPlan.of(kept, allow_empty=allow_empty)


def keep_scores(scores: UnitScores, removal: PruningPlan) -> UnitScores:
    """The scores of the units ``removal`` keeps."""
    return UnitScores(heads=[s[removal.kept("heads", i, s.numel())] for i, s in enumerate(scores.heads)],
                      neurons=[s[removal.kept("neurons", i, s.numel())] for i, s in enumerate(scores.neurons)])
