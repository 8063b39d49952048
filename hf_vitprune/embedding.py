"""The embedding width: one set of residual-stream channels for the whole model.

Narrowing the residual stream touches every module that reads or writes it: the patch
embedding's output channels, the CLS/distillation/mask/register tokens and the position
embeddings, every LayerNorm, the input columns of q/k/v, of the MLP input projections and of
the classifiers/pooler, the output rows of o_proj and of the MLP output projection, and the
layer scales. Unlike the per-layer unit kinds (``architectures.UNIT_KINDS``) it is one width for
the model, so it lives here; ``PruningPlan.embedding`` names the kept channels.

A LayerNorm over fewer channels computes its statistics over those channels only, so the
compacted model is *not* the dense model with channels zeroed. Its exact masked counterpart
is :class:`EmbeddingGate`: LayerNorm statistics weighted by the channel gate and the
LayerNorm's output multiplied by it. Everything in these families reads the residual stream
through a LayerNorm, so with a 0/1 gate the gated dense model gives the compacted model's
logits; a fractional gate (OFB's soft masks) interpolates smoothly between the two.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .architectures import ATTENTION_PROJECTIONS, embedding_width, embeddings_module, find_encoder_layers, sliced_linear

# tensors of the embeddings module whose last dimension is the residual stream
EMBEDDING_TENSORS = ("cls_token", "distillation_token", "register_tokens", "mask_token", "position_embeddings")


def residual_layer_norms(model: nn.Module) -> list[nn.LayerNorm]:
    """Every LayerNorm over the residual stream (in the layers, after the encoder, in a pooler)."""
    width = embedding_width(model)
    return [m for m in model.modules() if isinstance(m, nn.LayerNorm) and tuple(m.normalized_shape) == (width,)]


def _slice_last(tensor: torch.Tensor, index: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor.detach().index_select(-1, index.to(tensor.device)).clone(),
                        requires_grad=tensor.requires_grad)


def compact_embedding(model: nn.Module, channels: Sequence[int]) -> None:
    """Keep only the residual-stream ``channels`` (indices into the current width), slicing weights in place.

    The config is not touched here: ``modeling.convert_to_pruned`` records the new ``hidden_size``.
    """
    width = embedding_width(model)
    index = torch.as_tensor(sorted(channels), dtype=torch.long)
    if len(index) == 0:
        raise ValueError("The embedding width cannot be pruned to zero channels; keep at least one.")
    if int(index.max()) >= width or int(index.min()) < 0:
        raise ValueError(f"Embedding channels {sorted(channels)} are out of range for width {width} (0..{width - 1}).")
    if len(index) == width:
        return
    norms = residual_layer_norms(model)  # before the projection narrows: they are found by width
    embeddings = embeddings_module(model)
    projection = embeddings.patch_embeddings.projection
    new = nn.Conv2d(projection.in_channels, len(index), projection.kernel_size, projection.stride,
                    projection.padding, bias=projection.bias is not None, device="meta")
    new.weight = _slice_rows(projection.weight, index)
    if projection.bias is not None:
        new.bias = _slice_rows(projection.bias, index)
    embeddings.patch_embeddings.projection = new
    for name in EMBEDDING_TENSORS:
        tensor = getattr(embeddings, name, None)
        if isinstance(tensor, nn.Parameter):
            setattr(embeddings, name, _slice_last(tensor, index))
    for norm in norms:
        norm.weight = _slice_last(norm.weight, index) if norm.weight is not None else None
        if norm.bias is not None:
            norm.bias = _slice_last(norm.bias, index)
        norm.normalized_shape = (len(index),)
    layers = find_encoder_layers(model)
    inside = set()
    for layer in layers:
        inside.update(id(m) for m in layer.module.modules())
        attention = layer.attention
        for name in ATTENTION_PROJECTIONS[:3]:
            if hasattr(attention, name):
                setattr(attention, name, sliced_linear(getattr(attention, name), None, index))
        attention.o_proj = sliced_linear(attention.o_proj, index, None)
        for name in layer.mlp_in_names:
            setattr(layer.mlp, name, sliced_linear(getattr(layer.mlp, name), None, index))
        setattr(layer.mlp, layer.mlp_out_name, sliced_linear(layer.mlp_out, index, None))
        for owner, attribute in _layer_scales(layer.module):
            setattr(owner, attribute, _slice_last(getattr(owner, attribute), index))
    for parent in list(model.modules()):
        if id(parent) in inside:
            continue
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and id(child) not in inside:
                columns = _head_columns(child, width, index)
                if columns is not None:
                    setattr(parent, name, sliced_linear(child, None, columns))


def _slice_rows(tensor: torch.Tensor, index: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor.detach().index_select(0, index.to(tensor.device)).clone(),
                        requires_grad=tensor.requires_grad)


def _layer_scales(layer: nn.Module) -> list[tuple[nn.Module, str]]:
    """(owner, attribute) of the layer's per-channel scales: DINOv2 ``layer_scale*.lambda1``, BEiT ``lambda_*``."""
    found = []
    for name in ("layer_scale1", "layer_scale2"):
        owner = getattr(layer, name, None)
        if isinstance(getattr(owner, "lambda1", None), nn.Parameter):
            found.append((owner, "lambda1"))
    for name in ("lambda_1", "lambda_2"):
        if isinstance(getattr(layer, name, None), nn.Parameter):
            found.append((layer, name))
    return found


def _head_columns(linear: nn.Linear, width: int, index: torch.Tensor) -> torch.Tensor | None:
    """The input columns a pooler/classifier keeps: ``index``, or ``index`` in each of k stacked copies
    (DINOv2 reads CLS and mean patch token side by side)."""
    if linear.in_features % width:
        return None
    copies = linear.in_features // width
    return torch.cat([index + copy * width for copy in range(copies)])


def gated_layer_norm(norm: nn.LayerNorm, hidden: torch.Tensor, gate: torch.Tensor,
                     weights: torch.Tensor | None = None) -> torch.Tensor:
    """``norm`` with its statistics over the channels weighted by ``weights`` (default: ``gate``), its output
    multiplied by ``gate``.

    With 0/1 weights this is the LayerNorm of the kept channels (zeros elsewhere, where the gate
    is 0 too): what the compacted LayerNorm computes, times ``gate``.
    """
    weights = gate if weights is None else weights
    weights = weights / weights.sum()
    mean = (hidden * weights).sum(-1, keepdim=True)
    variance = ((hidden - mean).square() * weights).sum(-1, keepdim=True)
    normed = (hidden - mean) * torch.rsqrt(variance + norm.eps)
    if norm.weight is not None:
        normed = normed * norm.weight
    if norm.bias is not None:
        normed = normed + norm.bias
    return normed * gate


class EmbeddingGate:
    """Gates the residual-stream channels of ``model`` without changing any shape (see the module docstring).

    ``gate`` is one tensor of length :func:`embedding_width`; set it (0/1 or fractional) and every
    residual LayerNorm computes :func:`gated_layer_norm`. ``remove()`` detaches the hooks.
    """

    def __init__(self, model: nn.Module):
        self.gate = torch.ones(embedding_width(model))
        self._handles = [norm.register_forward_hook(self._hook) for norm in residual_layer_norms(model)]

    def _hook(self, norm: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        hidden = args[0]
        gate = self.gate.to(device=hidden.device, dtype=hidden.dtype)
        return gated_layer_norm(norm, hidden, gate)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
