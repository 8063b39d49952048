"""Parameters and FLOPs of a model as a polynomial in its widths, for searches that price expected widths.

OFB's FLOPs constraint needs the cost of a model whose every width (heads, head dim and MLP
width per layer, embedding width) is an *expected* value, differentiable in the architecture
logits. :class:`WidthCost` reads the coefficients off the dense model once: per layer, one
head costs ``d * (4 D + qkv biases) + bias-table rows`` parameters and ``2 N 4 D d + 4 N^2 d``
FLOPs, one MLP neuron ``D * (inputs + 1) + input biases`` parameters and ``2 N (inputs + 1) D``
FLOPs, and what no unit owns (LayerNorms, output biases, layer scales, patch embedding,
tokens, classifier inputs) is linear in ``D``. At integer widths it equals
``model_stats(model, plan)`` exactly (a BEiT table shared by all layers counted per layer, as a
plan's compaction leaves it); ``tests/test_ofb.py`` checks that.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..architectures import embedding_width, find_encoder_layers, find_shared_position_bias, layer_tokens
from ..plan import PruningPlan
from ..stats import model_stats


@dataclass(frozen=True)
class LayerCoefficients:
    tokens: int
    mlp_inputs: int  # fc1, or gate and up
    qkv_biases: int
    mlp_input_biases: int
    table_rows: int  # relative position bias rows per head (BEiT), 0 elsewhere
    fixed_per_channel: float  # parameters no unit owns, per embedding channel


class WidthCost:
    """``params(...)`` / ``flops(...)`` of the model at given (possibly fractional) widths."""

    def __init__(self, model: nn.Module):
        layers = find_encoder_layers(model)
        width = embedding_width(model)
        shared = find_shared_position_bias(model)
        shared_rows = getattr(*shared).relative_position_bias_table.shape[0] if shared is not None else 0
        self.layers = []
        for layer, tokens in zip(layers, layer_tokens(model)):
            attention = layer.attention
            projections = [getattr(attention, n) for n in ("q_proj", "k_proj", "v_proj") if hasattr(attention, n)]
            bias = layer.position_bias
            rows = bias.relative_position_bias_table.shape[0] if bias is not None else shared_rows
            owned = {id(linear.weight) for linear in (*projections, attention.o_proj, *layer.mlp_in, layer.mlp_out)}
            owned |= {id(linear.bias) for linear in (*projections, *layer.mlp_in) if linear.bias is not None}
            if bias is not None:
                owned.add(id(bias.relative_position_bias_table))
            fixed = sum(p.numel() for p in layer.module.parameters() if id(p) not in owned)
            self.layers.append(LayerCoefficients(
                tokens=tokens,
                mlp_inputs=len(layer.mlp_in),
                qkv_biases=sum(p.bias is not None for p in projections),
                mlp_input_biases=sum(p.bias is not None for p in layer.mlp_in),
                table_rows=rows,
                fixed_per_channel=fixed / width,
            ))
        # outside the encoder: linear in D; measured at two widths on meta-device copies
        full, half = (self._outside(model, channels) for channels in (width, max(1, width // 2)))
        self.outside_params_slope = (full[0] - half[0]) / (width - max(1, width // 2)) if width > 1 else 0.0
        self.outside_flops_slope = (full[1] - half[1]) / (width - max(1, width // 2)) if width > 1 else 0.0
        self.outside_params_base = full[0] - self.outside_params_slope * width
        self.outside_flops_base = full[1] - self.outside_flops_slope * width

    @staticmethod
    def _outside(model: nn.Module, channels: int) -> tuple[int, int]:
        """(params, FLOPs) outside the encoder layers with the embedding width cut to ``channels`` (through a
        plan even at full width, so that a shared bias table is moved into the layers as compaction does)."""
        stats = model_stats(model, PruningPlan(embedding=list(range(channels))))
        params = stats.params - sum(layer.params for layer in stats.layers)
        flops = stats.flops - sum(layer.flops for layer in stats.layers)
        return params, flops

    def params(self, heads: Sequence, head_dims: Sequence, neurons: Sequence, width) -> torch.Tensor | float:
        total = self.outside_params_base + self.outside_params_slope * width
        for c, h, d, f in zip(self.layers, heads, head_dims, neurons):
            total = total + c.fixed_per_channel * width
            total = total + h * (d * (4 * width + c.qkv_biases) + c.table_rows)
            total = total + f * (c.mlp_inputs * width + c.mlp_input_biases + width)
        return total

    def flops(self, heads: Sequence, head_dims: Sequence, neurons: Sequence, width) -> torch.Tensor | float:
        total = self.outside_flops_base + self.outside_flops_slope * width
        for c, h, d, f in zip(self.layers, heads, head_dims, neurons):
            n = c.tokens
            total = total + h * d * (2 * n * 4 * width + 4 * n * n)
            total = total + f * 2 * n * (c.mlp_inputs + 1) * width
        return total

    def measure(self, metric: str, heads, head_dims, neurons, width):
        """``params`` or ``flops`` (a :class:`~hf_vitprune.budget.Budget`'s metric)."""
        return (self.flops if metric == "flops" else self.params)(heads, head_dims, neurons, width)
