"""Pruning a model to a plan: gating units during training, then physically removing them."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from .architectures import compact_layer, family_of, find_encoder_layers, unshare_position_bias
from .modeling import convert_to_pruned
from .plan import PruningPlan


def apply_plan(model: nn.Module, plan: PruningPlan) -> nn.Module:
    """Physically remove the heads and neurons ``plan`` drops, in place, and return ``model``.

    q/k/v lose the rows of dropped heads, o_proj the matching columns (and BEiT's relative
    position bias its columns; a shared table is first copied into every layer); MLP input
    projections lose rows, the output projection columns. The model becomes the matching
    ``Pruned*`` class with a config recording every layer's widths, so ``save_pretrained``
    and ``from_pretrained`` round-trip it. Masks attached with :func:`attach_masks` are dropped
    with the modules they were hooked on.
    """
    family_of(model)
    plan.validate(model)
    unshare_position_bias(model)
    for layer in find_encoder_layers(model):
        compact_layer(
            layer,
            plan.kept_heads(layer.index, layer.num_heads),
            plan.kept_neurons(layer.index, layer.num_neurons),
        )
    return convert_to_pruned(model)


class UnitMasks:
    """Gates attention heads and MLP neurons without changing any shape (training-time pruning).

    A gate multiplies a head's context before ``o_proj`` and a neuron's activation before the
    MLP output projection, so a zero gate gives exactly the logits of the compacted model and
    no gradient reaches the gated unit's weights through the forward pass. Gates may be
    fractional (soft masks). Use :func:`attach_masks` to create one; ``remove()`` detaches it.
    """

    def __init__(self, model: nn.Module):
        self.layers = find_encoder_layers(model)
        self.head_gates = [torch.ones(layer.num_heads) for layer in self.layers]
        self.neuron_gates = [torch.ones(layer.num_neurons) for layer in self.layers]
        self._handles = []
        for layer in self.layers:
            i, head_dim = layer.index, layer.head_dim
            self._handles.append(
                layer.attention.o_proj.register_forward_pre_hook(self._gate(lambda i=i: self.head_gates[i], head_dim))
            )
            self._handles.append(layer.mlp_out.register_forward_pre_hook(self._gate(lambda i=i: self.neuron_gates[i], 1)))

    @staticmethod
    def _gate(gates, repeat: int):
        def hook(module: nn.Module, args: tuple) -> tuple:
            hidden = args[0]
            gate = gates().to(device=hidden.device, dtype=hidden.dtype)
            if repeat > 1:
                gate = gate.repeat_interleave(repeat)
            return (hidden * gate, *args[1:])

        return hook

    def set_plan(self, plan: PruningPlan) -> UnitMasks:
        """Gate to zero exactly the units ``plan`` drops (and open all others)."""
        for layer in self.layers:
            heads = torch.zeros(layer.num_heads)
            heads[plan.kept_heads(layer.index, layer.num_heads)] = 1.0
            neurons = torch.zeros(layer.num_neurons)
            neurons[plan.kept_neurons(layer.index, layer.num_neurons)] = 1.0
            self.head_gates[layer.index], self.neuron_gates[layer.index] = heads, neurons
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> UnitMasks:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(zip(self.head_gates, self.neuron_gates))


def attach_masks(model: nn.Module, plan: PruningPlan | None = None) -> UnitMasks:
    """Attach gates to every head and MLP neuron of ``model``; with ``plan``, close the dropped ones."""
    family_of(model)
    if plan is not None:
        plan.validate(model)  # before hooking anything: a bad plan must not leave gates attached
    masks = UnitMasks(model)
    if plan is not None:
        masks.set_plan(plan)
    return masks
