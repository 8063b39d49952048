"""Parameters and forward FLOPs of a (dense, masked or pruned) vision transformer.

FLOPs are 2 x multiply-adds of the matrix products of one image's forward pass: the patch
embedding convolution, every linear layer and the two attention matmuls (QK^T and AV).
Element-wise work (norms, softmax, activations, biases) is not counted, as in
``torch.utils.flop_counter``. Layers outside the encoder (pooler, classifiers) act on one
pooled vector per image.

Encoder layers are costed per unit of every registered kind (``architectures.UNIT_KINDS``:
heads, neurons), with the tokens each layer sees, so the same numbers predict what a
``PruningPlan`` will leave, which is how budgets are hit exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from torch import nn

from .architectures import (
    BUILTIN_UNIT_KINDS,
    UNIT_KINDS,
    EncoderLayer,
    embedding_width,
    family_of,
    find_encoder_layers,
    find_shared_position_bias,
    layer_tokens,
    num_patches,
    num_tokens,
)
from .convolution import layer_type_of
from .modeling import is_recorded
from .plan import PruningPlan
from .surgery import compacted_shapes
from .tokens import token_pruning_of


@dataclass(frozen=True)
class LayerCost:
    """What one unit of each registered kind costs in a layer, and what the layer costs regardless.

    ``unit_params`` / ``unit_flops`` map a kind's name to one unit's cost; the cost of a layer
    keeping ``n_k`` units of each kind is ``fixed + sum_k n_k * cost_k`` for parameters and
    ``sum_k n_k * cost_k`` for FLOPs, which is what makes budgets exact knapsacks.
    """

    unit_params: dict[str, int]
    unit_flops: dict[str, int]
    fixed_params: int
    fixed_flops: int = 0  # what a convolution standing in for the attention costs (no unit owns it)

    @property
    def params_per_head(self) -> int:
        return self.unit_params["heads"]

    @property
    def params_per_neuron(self) -> int:
        return self.unit_params["neurons"]

    @property
    def flops_per_head(self) -> int:
        return self.unit_flops["heads"]

    @property
    def flops_per_neuron(self) -> int:
        return self.unit_flops["neurons"]

    def params(self, heads: int | None = None, neurons: int | None = None, **others: int) -> int:
        """Parameters of the layer keeping these many units of every kind (``params(heads, neurons)``
        while only the built-in kinds are registered)."""
        counts = self._counts(heads, neurons, others)
        return self.fixed_params + sum(self.unit_params[name] * n for name, n in counts.items())

    def flops(self, heads: int | None = None, neurons: int | None = None, **others: int) -> int:
        counts = self._counts(heads, neurons, others)
        return self.fixed_flops + sum(self.unit_flops[name] * n for name, n in counts.items())

    def _counts(self, heads: int | None, neurons: int | None, others: dict[str, int]) -> dict[str, int]:
        counts = {name: n for name, n in (("heads", heads), ("neurons", neurons)) if n is not None}
        counts.update(others)
        if set(counts) != set(self.unit_params):
            raise ValueError(
                f"LayerCost needs a unit count for every kind it costs, {sorted(self.unit_params)}; "
                f"got counts for {sorted(counts)}."
            )
        return counts


@dataclass(frozen=True)
class LayerStats:
    """One layer's kept units, parameters and FLOPs.

    Heads and neurons have their own fields (the report format); ``other_units`` holds the
    non-zero counts of any other registered kind, so it stays empty, and out of ``to_dict``,
    for models with only heads and neurons. ``tokens`` is the tokens the layer sees when the
    model prunes tokens (None, and out of ``to_dict``, when every layer sees them all);
    ``layer_type`` the layer's type in a model where some attention became a convolution
    (``"attention"``, ``"conv1x1"``, ``"conv3x3"``; None, and out of ``to_dict``, otherwise).
    """

    index: int
    heads: int
    neurons: int
    params: int
    flops: int
    other_units: dict[str, int] = field(default_factory=dict, hash=False)
    tokens: int | None = None
    layer_type: str | None = None

    def units(self, kind: str) -> int:
        """The kept count of the kind called ``kind`` (0 for a kind this layer does not have)."""
        if kind in BUILTIN_UNIT_KINDS:
            return getattr(self, kind)
        return self.other_units.get(kind, 0)

    def to_dict(self) -> dict:
        data = asdict(self)
        if not self.other_units:
            del data["other_units"]
        if self.tokens is None:
            del data["tokens"]
        if self.layer_type is None:
            del data["layer_type"]
        return data

    @classmethod
    def from_dict(cls, data: Mapping) -> LayerStats:
        """The inverse of :meth:`to_dict`; every count must be an integer."""
        values = {key: int(value) for key, value in data.items() if key not in ("other_units", "tokens", "layer_type")}
        other = {str(kind): int(count) for kind, count in dict(data.get("other_units") or {}).items()}
        tokens, layer_type = data.get("tokens"), data.get("layer_type")
        return cls(**values, other_units=other, tokens=None if tokens is None else int(tokens),
                   layer_type=None if layer_type is None else str(layer_type))


@dataclass(frozen=True)
class ModelStats:
    """Totals per image; ``tokens`` is what the first encoder layer sees, ``embedding_width`` the residual
    stream's width (0 in statistics saved before it was recorded)."""

    params: int
    flops: int
    tokens: int
    layers: tuple[LayerStats, ...]
    embedding_width: int = 0

    @property
    def heads(self) -> int:
        """Attention heads of all layers."""
        return sum(layer.heads for layer in self.layers)

    @property
    def neurons(self) -> int:
        """MLP neurons of all layers."""
        return sum(layer.neurons for layer in self.layers)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["layers"] = tuple(layer.to_dict() for layer in self.layers)
        return data

    @classmethod
    def from_dict(cls, data: Mapping) -> ModelStats:
        """The inverse of :meth:`to_dict`."""
        return cls(
            params=int(data["params"]),
            flops=int(data["flops"]),
            tokens=int(data["tokens"]),
            layers=tuple(LayerStats.from_dict(layer) for layer in data["layers"]),
            embedding_width=int(data.get("embedding_width", 0)),
        )


def layer_cost(layer: EncoderLayer, tokens: int, shared_bias_rows: int = 0) -> LayerCost:
    """Unit costs of ``layer`` from its module shapes; ``shared_bias_rows`` adds a shared table's column per head.

    The fixed part is every parameter of the layer that no registered kind owns a slice of
    (norms, layer scale, output biases, a convolution standing in for the attention), and the
    FLOPs of such a convolution.
    """
    kinds = UNIT_KINDS.values()
    owned = {id(tensor) for kind in kinds for tensor, _ in kind.parameters(layer)}
    fixed = sum(p.numel() for p in layer.module.parameters() if id(p) not in owned)
    return LayerCost(
        unit_params={kind.name: kind.params_per_unit(layer, shared_bias_rows) for kind in kinds},
        unit_flops={kind.name: kind.flops_per_unit(layer, tokens) for kind in kinds},
        fixed_params=fixed,
        fixed_flops=layer.attention.flops(tokens) if layer.is_convolution else 0,
    )


def _outside_encoder(model: nn.Module, layers: list[EncoderLayer]) -> tuple[list[nn.Module], int]:
    inside = {id(m) for layer in layers for m in layer.module.modules()}
    modules = [m for m in model.modules() if id(m) not in inside]
    return modules, sum(p.numel() for m in modules for p in m.parameters(recurse=False))


def _flops_outside_encoder(model: nn.Module, modules: list[nn.Module]) -> int:
    """The patch embedding, the pooler and classifiers (one vector per image) and the token selectors."""
    flops, patches = 0, num_patches(model)
    path = token_pruning_of(model)
    if path is not None:  # its selectors score the tokens still in the sequence at each stage
        flops += path.selector_flops(num_tokens(model))
        inside = {id(m) for m in path.modules()}
        modules = [m for m in modules if id(m) not in inside]
    for module in modules:
        patch_embeddings = getattr(module, "patch_embeddings", None)
        if patch_embeddings is not None:  # one kernel application per patch
            flops += 2 * patch_embeddings.projection.weight.numel() * patches
        elif isinstance(module, nn.Linear):
            flops += 2 * module.in_features * module.out_features
    return flops


def _costs_linearly(plan: PruningPlan) -> bool:
    """Whether the per-unit costs of the model's current shapes price ``plan`` (no embedding width, no
    kind with ``linear_cost=False`` narrowed)."""
    return plan.embedding is None and all(kind.linear_cost or not plan.units_of(kind.name) for kind in UNIT_KINDS.values())


def model_stats(model: nn.Module, plan: PruningPlan | None = None) -> ModelStats:
    """Total and per-layer parameters and FLOPs per image; with ``plan``, those the plan would leave."""
    family_of(model)  # other architectures (Swin, masked-image heads) would get silently wrong numbers
    if plan is not None:
        plan.validate(model)
        if not _costs_linearly(plan):
            return model_stats(compacted_shapes(model, plan))
    layers = find_encoder_layers(model)
    tokens = num_tokens(model)
    outside, outside_params = _outside_encoder(model, layers)
    shared = find_shared_position_bias(model)
    shared_rows = 0
    if plan is not None and shared is not None:
        # apply_plan gives every layer its own copy of the shared table
        table = getattr(*shared).relative_position_bias_table
        shared_rows, outside_params = table.shape[0], outside_params - table.numel()
    outside_flops = _flops_outside_encoder(model, outside)
    listed = {kind.name for kind in UNIT_KINDS.values() if kind.name not in BUILTIN_UNIT_KINDS
              and is_recorded(kind, [kind.count(layer) for layer in layers], model.config)}
    per_layer = []
    pruned_tokens = token_pruning_of(model) is not None
    hybrid = any(layer.is_convolution for layer in layers)
    for layer, tokens_seen in zip(layers, layer_tokens(model)):
        cost = layer_cost(layer, tokens_seen, shared_rows)
        counts = {kind.name: kind.count(layer) for kind in UNIT_KINDS.values()}
        if plan is not None:
            counts = {name: len(plan.kept(name, layer.index, n)) for name, n in counts.items()}
        other = {name: n for name, n in counts.items() if name in listed and n}
        params, flops = cost.params(**counts), cost.flops(**counts)
        per_layer.append(LayerStats(layer.index, counts["heads"], counts["neurons"], params, flops, other,
                                    tokens_seen if pruned_tokens else None, layer_type_of(layer) if hybrid else None))
    return ModelStats(
        params=outside_params + sum(s.params for s in per_layer),
        flops=outside_flops + sum(s.flops for s in per_layer),
        tokens=tokens,
        layers=tuple(per_layer),
        embedding_width=embedding_width(model),
    )
