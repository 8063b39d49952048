"""PMIM, OFB's progressive masked image modelling: reconstruct masked patches while the search narrows the model.

During OFB's search a growing share of each training image's patches (``mask_ratio_start`` to
``mask_ratio_end`` over the warm-up) is replaced by a learned mask token right after the patch
embedding; a light decoder (a 1x1 convolution to ``patch_size**2 * channels`` values per token,
then a pixel shuffle) reconstructs the per-patch normalised pixels from the last encoder layer's
patch tokens, and the L1 error on the masked patches is the loss. The loss is re-weighted each
step to the size of the classification loss, so it neither swamps nor vanishes beside it.

The module owns the mask token and the decoder (trained in the method's parameter group) and
works through hooks on the model, so the model itself is unchanged; it does nothing in eval mode.
"""

from __future__ import annotations

import torch
from torch import nn

from ..architectures import embedding_width, embeddings_module, find_encoder_layers


class PatchMaskReconstruction(nn.Module):
    """Masks patches of the images the model trains on and reconstructs them; see the module docstring."""

    def __init__(self, model: nn.Module, seed: int = 0):
        super().__init__()
        patches = embeddings_module(model).patch_embeddings
        projection = patches.projection
        self.patch = int(projection.kernel_size[0])
        self.channels = int(projection.in_channels)
        width = embedding_width(model)
        self.mask_token = nn.Parameter(torch.zeros(width))
        self.decoder = nn.Conv2d(width, self.patch * self.patch * self.channels, kernel_size=1)
        self.shuffle = nn.PixelShuffle(self.patch)
        self.seed = seed
        self.ratio = 0.0
        self.step = 0
        self.channel_gate: torch.Tensor | None = None  # embedding channels the decoder reads (OFB's removed ones: 0)
        self._pixels: torch.Tensor | None = None
        self._masked: torch.Tensor | None = None
        self._hidden: torch.Tensor | None = None
        self._handles = [
            model.register_forward_pre_hook(self._remember_pixels, with_kwargs=True),
            patches.register_forward_hook(self._mask_patches),
            find_encoder_layers(model)[-1].module.register_forward_hook(self._remember_hidden),
        ]
        self._model = [model]  # not a submodule: the model is not ours to save

    def keep_channels(self, kept: torch.Tensor) -> list[tuple[nn.Parameter, nn.Parameter, torch.Tensor]]:
        """Narrow the mask token and the decoder's inputs to the embedding channels ``kept``, as the model was;
        returns (old, new, flat positions in old) for the optimizer."""
        swaps = []
        for owner, name, dim in ((self, "mask_token", 0), (self.decoder, "weight", 1)):
            old = getattr(owner, name)
            positions = torch.arange(old.numel()).reshape(old.shape).index_select(dim, kept.cpu())
            new = nn.Parameter(old.detach().index_select(dim, kept.to(old.device)).clone())
            setattr(owner, name, new)
            swaps.append((old, new, positions))
        self.decoder.in_channels = len(kept)
        self.channel_gate = None
        return swaps

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _active(self) -> bool:
        return self._model[0].training and self.ratio > 0

    def _remember_pixels(self, module, args, kwargs):
        pixels = kwargs.get("pixel_values", args[0] if args else None)
        self._pixels = pixels if self._active() else None
        self._masked = self._hidden = None

    def _mask_patches(self, module, args, output: torch.Tensor) -> torch.Tensor:
        if self._pixels is None:
            return output
        batch, count, _ = output.shape
        # a fixed draw per (seed, step, process): a resumed run masks the same patches
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.step * 1009 + rank)
        chosen = max(1, round(self.ratio * count))
        order = torch.rand(batch, count, generator=generator).argsort(dim=1)[:, :chosen]
        masked = torch.zeros(batch, count, dtype=torch.bool)
        masked[torch.arange(batch)[:, None], order] = True
        masked = masked.to(output.device)
        self._masked = masked
        token = self.mask_token.to(output.dtype)
        return torch.where(masked[..., None], token, output)

    def _remember_hidden(self, module, args, output):
        if self._masked is not None:
            self._hidden = output[0] if isinstance(output, tuple) else output

    def loss(self) -> torch.Tensor | None:
        """The L1 reconstruction error of the masked patches of the last forward (None if nothing was masked)."""
        if self._masked is None or self._hidden is None or self._pixels is None:
            return None
        pixels, masked = self._pixels, self._masked
        batch, channels, height, width = pixels.shape
        rows, cols = height // self.patch, width // self.patch
        tokens = self._hidden[:, -rows * cols:, :]  # patch tokens come last in every family
        if self.channel_gate is not None:
            tokens = tokens * self.channel_gate.to(tokens.dtype)
        grid = tokens.transpose(1, 2).reshape(batch, -1, rows, cols)
        reconstruction = self.shuffle(self.decoder(grid.to(self.decoder.weight.dtype)))
        target = pixels[:, :, : rows * self.patch, : cols * self.patch].to(reconstruction.dtype)
        # per-patch normalised pixels: (batch, patches, patch*patch*channels)
        def patchify(images):
            images = images.reshape(batch, channels, rows, self.patch, cols, self.patch)
            return images.permute(0, 2, 4, 3, 5, 1).reshape(batch, rows * cols, -1)
        target, reconstruction = patchify(target), patchify(reconstruction)
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
        error = (reconstruction - target).abs().mean(-1)
        return (error * masked).sum() / masked.sum().clamp_min(1)
