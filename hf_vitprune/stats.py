"""Parameters and forward FLOPs of a (dense, masked or pruned) vision transformer.

FLOPs are 2 x multiply-adds of the matrix products of one image's forward pass: the patch
embedding convolution, every linear layer and the two attention matmuls (QK^T and AV).
Element-wise work (norms, softmax, activations, biases) is not counted, as in
``torch.utils.flop_counter``. Layers outside the encoder (pooler, classifiers) act on one
pooled vector per image.

Encoder layers are costed per unit (head, neuron), so the same numbers predict what a
``PruningPlan`` will leave, which is how budgets are hit exactly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from .architectures import EncoderLayer, family_of, find_encoder_layers, find_shared_position_bias, num_tokens
from .plan import PruningPlan


@dataclass(frozen=True)
class LayerCost:
    """What one head / one MLP neuron of a layer costs, and what the layer costs regardless."""

    params_per_head: int
    params_per_neuron: int
    fixed_params: int
    flops_per_head: int
    flops_per_neuron: int

    def params(self, heads: int, neurons: int) -> int:
        return self.fixed_params + heads * self.params_per_head + neurons * self.params_per_neuron

    def flops(self, heads: int, neurons: int) -> int:
        return heads * self.flops_per_head + neurons * self.flops_per_neuron


@dataclass(frozen=True)
class LayerStats:
    index: int
    heads: int
    neurons: int
    params: int
    flops: int


@dataclass(frozen=True)
class ModelStats:
    params: int
    flops: int
    tokens: int
    layers: tuple[LayerStats, ...]

    def to_dict(self) -> dict:
        return asdict(self)


def _numel(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def layer_cost(layer: EncoderLayer, tokens: int, shared_bias_rows: int = 0) -> LayerCost:
    """Unit costs of ``layer`` from its module shapes; ``shared_bias_rows`` adds a shared table's column per head."""
    attention, head_dim = layer.attention, layer.head_dim
    o_proj = attention.o_proj
    width = o_proj.out_features
    per_head = o_proj.out_features * head_dim
    for name in ("q_proj", "k_proj", "v_proj"):
        proj = getattr(attention, name, None)
        bias = proj is not None and proj.bias is not None
        in_features = proj.in_features if proj is not None else width
        per_head += head_dim * in_features + (head_dim if bias else 0)
    bias_module = layer.position_bias
    bias_rows = bias_module.relative_position_bias_table.shape[0] if bias_module is not None else shared_bias_rows
    per_head += bias_rows
    per_neuron = sum(p.in_features + (1 if p.bias is not None else 0) for p in layer.mlp_in) + layer.mlp_out.out_features
    units = {*layer.mlp_in, layer.mlp_out, *(getattr(attention, n, None) for n in ("q_proj", "k_proj", "v_proj"))}
    fixed = o_proj.bias.numel() if o_proj.bias is not None else 0
    fixed += layer.mlp_out.bias.numel() if layer.mlp_out.bias is not None else 0
    counted = {id(p) for m in units if m is not None for p in m.parameters()} | {id(p) for p in o_proj.parameters()}
    if bias_module is not None:
        counted |= {id(p) for p in bias_module.parameters()}
    fixed += sum(p.numel() for p in layer.module.parameters() if id(p) not in counted)
    flops_per_head = 2 * tokens * 4 * width * head_dim + 2 * 2 * tokens * tokens * head_dim
    flops_per_neuron = 2 * tokens * (len(layer.mlp_in) + 1) * width
    return LayerCost(per_head, per_neuron, fixed, flops_per_head, flops_per_neuron)


def _outside_encoder(model: nn.Module, layers: list[EncoderLayer]) -> tuple[list[nn.Module], int]:
    inside = {id(m) for layer in layers for m in layer.module.modules()}
    modules = [m for m in model.modules() if id(m) not in inside]
    return modules, sum(p.numel() for m in modules for p in m.parameters(recurse=False))


def _flops_outside_encoder(modules: list[nn.Module]) -> int:
    flops = 0
    for module in modules:
        patch_embeddings = getattr(module, "patch_embeddings", None)
        if patch_embeddings is not None:  # one kernel application per patch
            flops += 2 * patch_embeddings.projection.weight.numel() * patch_embeddings.num_patches
        elif isinstance(module, nn.Linear):
            flops += 2 * module.in_features * module.out_features
    return flops


def model_stats(model: nn.Module, plan: PruningPlan | None = None) -> ModelStats:
    """Total and per-layer parameters and FLOPs per image; with ``plan``, those the plan would leave."""
    family_of(model)  # other architectures (Swin, masked-image heads) would get silently wrong numbers
    if plan is not None:
        plan.validate(model)
    layers = find_encoder_layers(model)
    tokens = num_tokens(model)
    outside, outside_params = _outside_encoder(model, layers)
    shared = find_shared_position_bias(model)
    shared_rows = 0
    if plan is not None and shared is not None:
        # apply_plan gives every layer its own copy of the shared table
        table = getattr(*shared).relative_position_bias_table
        shared_rows, outside_params = table.shape[0], outside_params - table.numel()
    outside_flops = _flops_outside_encoder(outside)
    per_layer = []
    for layer in layers:
        cost = layer_cost(layer, tokens, shared_rows)
        heads, neurons = layer.num_heads, layer.num_neurons
        if plan is not None:
            heads = len(plan.kept_heads(layer.index, heads))
            neurons = len(plan.kept_neurons(layer.index, neurons))
        per_layer.append(LayerStats(layer.index, heads, neurons, cost.params(heads, neurons), cost.flops(heads, neurons)))
    return ModelStats(
        params=outside_params + sum(s.params for s in per_layer),
        flops=outside_flops + sum(s.flops for s in per_layer),
        tokens=tokens,
        layers=tuple(per_layer),
    )
