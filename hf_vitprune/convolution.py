"""Attention layers turned into convolutions over the patch grid (SPViT, He et al., TPAMI 2024).

A layer's self-attention can be replaced by a convolution built from the attention's own value and
output projections (the *weight sharing* of SPViT): with ``H`` heads of ``d`` channels, a ``H x 9``
matrix ``p`` (a softmax over the heads for each of the 9 taps of a 3x3 kernel) mixes the heads'
value rows into each tap, ``W_t = sum_h p[h, t] Wv_h`` (``d x D``), and their output columns into the
projection back, ``Wo = sum_t sum_h p[h, t] Wo_h`` (``D x d``). A 3x3 convolution uses the nine taps,
a 1x1 convolution the centre one (tap 4, with ``sum_h p[h, 4] Wo_h``); a BatchNorm and a ReLU sit
between the convolution and the output projection. Taps are numbered ``t = 3 * row + column`` of
the kernel. The class, distillation and register tokens bypass the convolution: the layer gives them
back its input, so the residual adds their normalised value, as in the paper's code.

:class:`ConvMixer` is the converted layer (real ``nn.Conv2d``/``BatchNorm2d``/``Linear`` modules, in
place of a layer's ``attention``); :func:`shared_conv_weights` builds its weights from an attention
block and the mixing; :data:`CONFIG_KEY` is the per-layer record (``per_layer_config``) of each layer's
type, from which the ``Pruned*`` classes rebuild a hybrid model (:func:`attach_layer_types`).

Imports only torch and ``.architectures``: this file is copied next to saved models for
``trust_remote_code=True`` loading.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .architectures import EncoderLayer, embeddings_module, find_encoder_layers, num_patches, num_tokens

CONFIG_KEY = "layer_type"  # the per_layer_config attribute recording each layer's type
ATTENTION = "attention"
KERNEL_SIZES = {"conv1x1": 1, "conv3x3": 3}  # the convolution layer types and their kernel sizes
LAYER_TYPES = (ATTENTION, *KERNEL_SIZES)
CENTRE_TAP = 4


def check_layer_type(value: object, where: str) -> str:
    """``value`` if it names a layer type, else a ValueError naming ``where`` and the types there are."""
    if value not in LAYER_TYPES:
        raise ValueError(f"{where}: layer type {value!r} does not exist; the layer types are {', '.join(LAYER_TYPES)}.")
    return value


class ConvMixer(nn.Module):
    """Stands in for a layer's attention: a k x k convolution over the patch grid, BatchNorm, ReLU, projection.

    Takes and returns what the attention block does (``(hidden_states, None)``); the first ``special``
    tokens (class, distillation, registers) are returned unchanged. ``head_dim`` is the convolution's
    width (the head-dim kind counts it), and the layer has no heads.
    """

    is_convolution = True

    def __init__(self, width: int, channels: int, kernel_size: int, grid: tuple[int, int], special: int):
        super().__init__()
        if kernel_size not in KERNEL_SIZES.values():
            raise ValueError(f"ConvMixer: kernel_size={kernel_size!r} must be one of {sorted(KERNEL_SIZES.values())}.")
        self.conv = nn.Conv2d(width, channels, kernel_size, padding=kernel_size // 2, bias=True)
        self.norm = nn.BatchNorm2d(channels)
        self.o_proj = nn.Linear(channels, width, bias=True)
        self.grid = tuple(int(n) for n in grid)
        self.special = int(special)

    @property
    def layer_type(self) -> str:
        return f"conv{self.kernel_size}x{self.kernel_size}"

    @property
    def kernel_size(self) -> int:
        return int(self.conv.kernel_size[0])

    @property
    def head_dim(self) -> int:
        return int(self.conv.out_channels)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, None]:
        grid = patch_grid_of(hidden_states.shape[1] - self.special, self.grid)
        return conv_mix(hidden_states, self.special, grid, self.conv.weight, self.conv.bias, self.norm,
                        self.o_proj.weight, self.o_proj.bias), None

    def flops(self, tokens: int) -> int:
        """Matrix-product FLOPs for a sequence of ``tokens`` (the convolution over the patches, the projection)."""
        patches = tokens - self.special
        return 2 * patches * self.conv.weight.numel() + 2 * patches * self.o_proj.weight.numel()


def conv_mix(hidden: torch.Tensor, special: int, grid: tuple[int, int], kernel: torch.Tensor, bias: torch.Tensor,
             norm: nn.Module, projection: torch.Tensor, projection_bias: torch.Tensor) -> torch.Tensor:
    """A convolution layer's output: the patch tokens as a ``grid`` image through the ``kernel`` (same padding),
    ``norm`` and a ReLU, projected back; the first ``special`` tokens returned as they came. The converted layer
    and the search's convolution paths both compute it."""
    patches = hidden[:, special:]
    images = patches.transpose(1, 2).reshape(patches.shape[0], patches.shape[2], *grid)
    features = torch.relu(norm(F.conv2d(images, kernel, bias, padding=kernel.shape[-1] // 2)))
    return torch.cat([hidden[:, :special], F.linear(features.flatten(2).transpose(1, 2), projection, projection_bias)],
                     dim=1)


def patch_grid_of(patches: int, grid: tuple[int, int]) -> tuple[int, int]:
    """The (rows, columns) of ``patches`` patch tokens: the configured ``grid``, or a square one."""
    if patches == grid[0] * grid[1]:
        return grid
    side = math.isqrt(patches)
    if side * side != patches:
        raise ValueError(
            f"A convolution layer got {patches} patch tokens, which is neither its {grid[0]}x{grid[1]} patch grid "
            f"nor a square one; run the model at the image size it was pruned at."
        )
    return side, side


def is_convolution(layer: EncoderLayer) -> bool:
    return bool(getattr(layer.attention, "is_convolution", False))


def layer_type_of(layer: EncoderLayer) -> str:
    return layer.attention.layer_type if is_convolution(layer) else ATTENTION


def layer_types(model: nn.Module) -> list[str]:
    """Each encoder layer's type, in order."""
    return [layer_type_of(layer) for layer in find_encoder_layers(model)]


def patch_grid(model: nn.Module) -> tuple[int, int]:
    """(rows, columns) of the model's patch grid, or a ValueError when its tokens are not a grid."""
    for module in model.modules():
        if callable(getattr(module, "tokens_per_layer", None)):
            raise ValueError(
                f"{type(model).__name__} prunes tokens, so its later layers do not see a patch grid that a convolution "
                f"could run over. Turn attention into convolutions first, then add token pruning."
            )
    embeddings = embeddings_module(model).patch_embeddings
    patch = getattr(embeddings, "patch_size", None)
    size = getattr(model, "hf_vitprune_input_size", None) or getattr(embeddings, "image_size", None)
    if patch is None or size is None:
        raise ValueError(f"{type(model).__name__} does not say its patch grid (patch_size, image_size); it has no "
                         f"grid for a convolution.")
    patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
    size = (size, size) if isinstance(size, int) else tuple(size)
    grid = (size[0] // patch[0], size[1] // patch[1])
    if grid[0] * grid[1] != num_patches(model):
        raise ValueError(f"{type(model).__name__} has {num_patches(model)} patches, not a {grid[0]}x{grid[1]} grid.")
    return grid


def shared_conv_weights(attention: nn.Module, mixing: torch.Tensor, kernel_size: int
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(conv weight ``(d, D, k, k)``, conv bias ``(d,)``, projection weight ``(D, d)``, projection bias ``(D,)``)
    of the ``k x k`` convolution that shares ``attention``'s value and output projections, heads mixed by
    ``mixing`` (``H x 9``, each column summing to one). Differentiable in all of them."""
    heads = mixing.shape[0]
    value, out = attention.v_proj, attention.o_proj
    channels = value.weight.shape[0] // heads
    taps = list(range(9)) if kernel_size == 3 else [CENTRE_TAP]
    used = mixing[:, taps]  # (H, taps)
    per_head = value.weight.reshape(heads, channels, -1)  # (H, d, D)
    kernel = torch.einsum("ht,hcD->tcD", used, per_head)  # (taps, d, D)
    kernel = kernel.permute(1, 2, 0).reshape(channels, -1, kernel_size, kernel_size)
    if value.bias is not None:
        bias = torch.einsum("ht,hc->c", used, value.bias.reshape(heads, channels))
    else:
        bias = kernel.new_zeros(channels)
    projection = torch.einsum("h,Dhc->Dc", used.sum(1), out.weight.reshape(out.weight.shape[0], heads, channels))
    return kernel, bias, projection, out.bias


def build_conv_mixer(model: nn.Module, layer: EncoderLayer, layer_type: str, mixing: torch.Tensor | None = None,
                     norm: nn.BatchNorm2d | None = None) -> ConvMixer:
    """A :class:`ConvMixer` of ``layer_type`` for ``layer``: with ``mixing``, its weights shared from the layer's
    attention (and ``norm``'s state copied); without, its shapes only (weights to be loaded)."""
    kernel_size = KERNEL_SIZES[layer_type]
    attention = layer.attention
    width = attention.o_proj.out_features
    channels = layer.head_dim
    grid, special = patch_grid(model), num_tokens(model) - num_patches(model)
    parameter = next(attention.parameters())
    with torch.device(parameter.device):
        mixer = ConvMixer(width, channels, kernel_size, grid, special).to(parameter.dtype)
    if mixing is not None:
        with torch.no_grad():
            kernel, bias, projection, out_bias = shared_conv_weights(attention, mixing, kernel_size)
            mixer.conv.weight.copy_(kernel)
            mixer.conv.bias.copy_(bias)
            mixer.o_proj.weight.copy_(projection)
            mixer.o_proj.bias.copy_(out_bias)
            if norm is not None:
                mixer.norm.load_state_dict(norm.state_dict())
    return mixer


def convert_layer(model: nn.Module, layer: EncoderLayer, layer_type: str, mixing: torch.Tensor | None = None,
                  norm: nn.BatchNorm2d | None = None) -> None:
    """Replace ``layer``'s attention by a convolution of ``layer_type`` (nothing for ``"attention"``)."""
    if check_layer_type(layer_type, f"layer {layer.index}") == ATTENTION:
        return
    mixer = build_conv_mixer(model, layer, layer_type, mixing, norm)
    mixer.train(layer.attention.training)
    layer.module.attention = mixer
    layer.attention = mixer


def attach_layer_types(model: nn.Module, types: Sequence[str]) -> None:
    """Give a model built at its dense widths the recorded layer types (weights to be loaded afterwards)."""
    layers = find_encoder_layers(model)
    for layer, layer_type in zip(layers, types):
        if check_layer_type(layer_type, f"config.per_layer_config[{layer.index}].{CONFIG_KEY}") != ATTENTION:
            layer.module.attention = build_conv_mixer(model, layer, layer_type)

