"""Pruning a model to a plan: gating units during training, then physically removing them."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from .architectures import (
    UNIT_KINDS,
    compact_units,
    copy_with_tensors,
    family_of,
    find_encoder_layers,
    meta_copy,
    unshare_position_bias,
)
from .convolution import ATTENTION, check_layer_type, convert_layer, patch_grid
from .embedding import EmbeddingGate, compact_embedding
from .modeling import convert_to_pruned
from .plan import PruningPlan
from .tokens import CONFIG_KEY as TOKEN_CONFIG_KEY
from .tokens import attach_token_pruning, check_token_family, stages_for, token_pruning_of


def _as_plan(plan: PruningPlan | Mapping) -> PruningPlan:
    """``plan``, or the plan a dict spells in :meth:`PruningPlan.from_dict` form (as in pruning_plan.json)."""
    if isinstance(plan, PruningPlan):
        return plan
    if isinstance(plan, Mapping):
        return PruningPlan.from_dict(plan)
    raise TypeError(
        f"Expected a PruningPlan, got {type(plan).__name__}: pass PruningPlan(heads={{layer: [kept, ...]}}, "
        f"neurons={{...}}), or a dict in PruningPlan.from_dict form."
    )


def apply_plan(model: nn.Module, plan: PruningPlan | Mapping) -> nn.Module:
    """Physically remove the heads and neurons ``plan`` drops, in place, and return ``model``.

    q/k/v lose the rows of dropped heads, o_proj the matching columns (and BEiT's relative
    position bias its columns; a shared table is first copied into every layer); MLP input
    projections lose rows, the output projection columns. The model becomes the matching
    ``Pruned*`` class with a config recording every layer's widths, so ``save_pretrained``
    and ``from_pretrained`` round-trip it. Masks attached with :func:`attach_masks` are dropped
    with the modules they were hooked on. Other registered unit kinds are cut by their own
    ``UnitKind.compact``, the embedding width by :func:`embedding.compact_embedding`. ``plan``
    may be a dict in :meth:`PruningPlan.from_dict` form.
    """
    family_of(model)
    plan = _as_plan(plan)
    plan.validate(model)
    if plan.embedding is not None and token_pruning_of(model) is not None:
        raise ValueError(
            "The plan narrows the embedding width of a model with token pruning, whose selectors read the full "
            "width. Narrow the embedding width first, then add token pruning (add_token_pruning)."
        )
    if plan.embedding is not None and any(layer.is_convolution for layer in find_encoder_layers(model)):
        raise ValueError(
            "The plan narrows the embedding width of a model whose attention was turned into convolutions in some "
            "layers; the convolutions read the full width. Narrow the embedding width first, then convert layers."
        )
    unshare_position_bias(model)
    for layer in find_encoder_layers(model):
        kept = {kind.name: plan.kept(kind.name, layer.index, kind.count(layer)) for kind in UNIT_KINDS.values()}
        compact_units(layer, kept)
    if plan.embedding is not None:
        compact_embedding(model, plan.embedding)
    return convert_to_pruned(model)


def add_token_pruning(model: nn.Module, keep_ratios: Sequence[float], depths: Sequence[int] | None = None,
                      selector_width: int | None = None) -> nn.Module:
    """Give ``model`` (dense or structurally pruned) a token path, in place, and return it.

    Stage ``s`` keeps ``keep_ratios[s]`` of the image's patch tokens before encoder layer
    ``depths[s]`` (default: spread over the depth as in SPViT, 3/6/9 of 12 layers); see
    :mod:`hf_vitprune.tokens`. The selectors start untrained: train them (``PruningTrainer`` with
    a token-pruning method) before relying on the model. The model becomes its ``Pruned*`` class
    with the stages in its config (``token_pruning``), so it saves and reloads.
    """
    check_token_family(model)
    stages = stages_for(model, keep_ratios, depths, selector_width)
    late = [layer.index for layer in find_encoder_layers(model) if layer.is_convolution and layer.index >= min(stages.depths)]
    if late:
        raise ValueError(
            f"Layers {late} are convolutions over the patch grid, which a token stage before them would break up "
            f"(the first stage runs before layer {min(stages.depths)}). Put the stages after the last convolution "
            f"layer (depths=...)."
        )
    attach_token_pruning(model, stages)
    setattr(model.config, TOKEN_CONFIG_KEY, stages.to_dict())
    return convert_to_pruned(model)


def convert_attention(model: nn.Module, layer_types: Mapping[int, str],
                      mixing: Mapping[int, torch.Tensor] | None = None,
                      norms: Mapping[int, nn.BatchNorm2d] | None = None) -> nn.Module:
    """Turn the attention of the layers in ``layer_types`` (index -> ``"conv1x1"``/``"conv3x3"``/``"attention"``)
    into convolutions over the patch grid, in place, and return ``model``.

    The convolutions share the attention's value and output projections (:mod:`hf_vitprune.convolution`);
    ``mixing[i]`` is layer ``i``'s ``heads x 9`` head-to-tap matrix (columns summing to one; default: every
    head alike) and ``norms[i]`` the BatchNorm whose state it takes (default: a fresh one). The model becomes
    its ``Pruned*`` class with each layer's type in ``per_layer_config``, so it saves and reloads.
    """
    family_of(model)
    layers = find_encoder_layers(model)
    patch_grid(model)  # a ValueError when the tokens are not a grid
    mixing, norms = dict(mixing or {}), dict(norms or {})
    for index, layer_type in layer_types.items():
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(layers):
            raise ValueError(f"convert_attention: layer {index!r} does not exist; the model has layers 0 to "
                             f"{len(layers) - 1}.")
        check_layer_type(layer_type, f"convert_attention: layer {index}")
        layer = layers[index]
        if layer_type == ATTENTION or layer.is_convolution:
            if layer.is_convolution and layer_type != layer.attention.layer_type:
                raise ValueError(f"convert_attention: layer {index} is already a {layer.attention.layer_type} "
                                 f"convolution; it cannot become {layer_type!r}.")
            continue
        if layer.num_heads == 0 or not hasattr(layer.attention, "v_proj"):
            raise ValueError(f"convert_attention: layer {index} has no heads left, so no value projection to build "
                             f"a convolution from; keep it as attention.")
        weights = mixing.get(index)
        if weights is None:
            weights = torch.full((layer.num_heads, 9), 1.0 / layer.num_heads, device=layer.attention.o_proj.weight.device)
        if tuple(weights.shape) != (layer.num_heads, 9):
            raise ValueError(f"convert_attention: mixing[{index}] has shape {tuple(weights.shape)}; layer {index} needs "
                             f"({layer.num_heads}, 9), one row per head and one column per 3x3 kernel tap.")
        convert_layer(model, layer, layer_type, weights, norms.get(index))
    return convert_to_pruned(model)


def compacted_shapes(model: nn.Module, plan: PruningPlan) -> nn.Module:
    """``model`` with ``plan`` applied, on the meta device: the shapes it would have, without copying a weight."""
    return apply_plan(meta_copy(model), plan)


def compaction_indices(model: nn.Module, plan: PruningPlan) -> dict[str, torch.Tensor]:
    """Where each parameter of ``apply_plan(model, plan)`` comes from: by parameter name, the flat indices into
    ``model``'s parameter of that name of the elements it keeps, in the compacted shape.

    Whatever is laid out like the parameters (an optimizer's moments) is sliced with these exactly as the
    surgery slices the weights. They are read off a compacted copy whose parameters hold their own element
    positions, so every kind of slice (rows, columns, head-dim channels in every head, the embedding width)
    is covered without restating it.
    """
    positions = apply_plan(copy_with_tensors(model, _positions), plan)
    return {name: p.detach().to(torch.long) for name, p in positions.named_parameters()}


def _positions(parameter: nn.Parameter) -> nn.Parameter:
    """A tensor shaped like ``parameter`` holding each element's flat position (float64: exact to 2**53)."""
    return nn.Parameter(torch.arange(parameter.numel(), dtype=torch.float64).reshape(parameter.shape),
                        requires_grad=False)


class UnitMasks:
    """Gates attention heads, MLP neurons (and any registered kind with a gate) without changing any shape.

    A gate multiplies a unit's channels at the input of the module its kind names (a head's
    context before ``o_proj``, a neuron's activation before the MLP output projection), so a
    zero gate gives exactly the logits of the compacted model and no gradient reaches the gated
    unit's weights through the forward pass. Kinds with ``output_gates`` (head dims) multiply
    the outputs of the modules named (q, k and v). Gates may be fractional (soft masks).
    ``gates[kind]`` holds one tensor per layer; ``head_gates`` / ``neuron_gates`` are those of
    heads and neurons. With ``embedding=True`` the residual stream is gated too
    (``embedding.gate``, an :class:`EmbeddingGate`; it recomputes every LayerNorm, so it is off
    unless asked for). Use :func:`attach_masks` to create one; ``remove()`` detaches it.
    """

    def __init__(self, model: nn.Module, embedding: bool = False):
        self.layers = find_encoder_layers(model)
        kinds = [kind for kind in UNIT_KINDS.values() if kind.gate is not None or kind.output_gates is not None]
        self.gates: dict[str, list[torch.Tensor]] = {
            kind.name: [torch.ones(kind.count(layer)) for layer in self.layers] for kind in kinds
        }
        self._handles = []
        for layer in self.layers:
            for kind in kinds:
                if kind.count(layer) == 0:  # nothing to gate (no heads left, or a convolution in the attention's place)
                    continue
                if kind.gate is not None:
                    module, channels = kind.gate(layer)
                    hook = self._gate(kind.name, layer.index, channels)
                    self._handles.append(module.register_forward_pre_hook(hook))
                if kind.output_gates is not None:
                    modules, copies = kind.output_gates(layer)
                    for module in modules:
                        hook = self._output_gate(kind.name, layer.index, copies)
                        self._handles.append(module.register_forward_hook(hook))
        self.embedding = EmbeddingGate(model) if embedding else None

    @property
    def head_gates(self) -> list[torch.Tensor]:
        return self.gates["heads"]

    @head_gates.setter
    def head_gates(self, value: list[torch.Tensor]) -> None:
        self.gates["heads"] = value

    @property
    def neuron_gates(self) -> list[torch.Tensor]:
        return self.gates["neurons"]

    @neuron_gates.setter
    def neuron_gates(self, value: list[torch.Tensor]) -> None:
        self.gates["neurons"] = value

    def _gate(self, kind: str, index: int, repeat: int):
        def hook(module: nn.Module, args: tuple) -> tuple:
            hidden = args[0]
            gate = self.gates[kind][index].to(device=hidden.device, dtype=hidden.dtype)
            if repeat > 1:
                gate = gate.repeat_interleave(repeat)
            return (hidden * gate, *args[1:])

        return hook

    def _output_gate(self, kind: str, index: int, copies: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            gate = self.gates[kind][index].to(device=output.device, dtype=output.dtype)
            return output * gate.repeat(copies)

        return hook

    def set_plan(self, plan: PruningPlan) -> UnitMasks:
        """Gate to zero exactly the units ``plan`` drops (and open all others)."""
        _check_gateable(plan)
        if plan.embedding is not None and self.embedding is None:
            raise ValueError(
                "The plan prunes the embedding width, but these masks do not gate it: create them with "
                "UnitMasks(model, embedding=True), or use attach_masks(model, plan)."
            )
        for layer in self.layers:
            for name, per_layer in self.gates.items():
                gate = torch.zeros(len(per_layer[layer.index]))
                gate[plan.kept(name, layer.index, len(gate))] = 1.0
                per_layer[layer.index] = gate
        if self.embedding is not None:
            gate = torch.zeros(len(self.embedding.gate))
            gate[plan.embedding if plan.embedding is not None else slice(None)] = 1.0
            self.embedding.gate = gate
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self.embedding is not None:
            self.embedding.remove()

    def __enter__(self) -> UnitMasks:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(zip(self.head_gates, self.neuron_gates))


def _check_gateable(plan: PruningPlan) -> None:
    for kind in UNIT_KINDS.values():
        if kind.gate is None and kind.output_gates is None and plan.units_of(kind.name):
            raise ValueError(
                f"The plan keeps a subset of {kind.name}, but unit kind {kind.name!r} has no gate "
                f"(UnitKind.gate), so masks cannot drop its units; use apply_plan to remove them."
            )


def attach_masks(model: nn.Module, plan: PruningPlan | Mapping | None = None) -> UnitMasks:
    """Attach gates to every head, MLP neuron and head dim of ``model`` (and the embedding width when ``plan``
    prunes it); with ``plan`` (or its dict), close the dropped ones."""
    family_of(model)
    if plan is not None:
        plan = _as_plan(plan)
        plan.validate(model)  # before hooking anything: a bad plan must not leave gates attached
        _check_gateable(plan)
    masks = UnitMasks(model, embedding=plan is not None and plan.embedding is not None)
    if plan is not None:
        masks.set_plan(plan)
    return masks
