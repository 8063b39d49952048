"""Taylor and group-Fisher importance: how much the loss would change if a unit were removed.

Removing a group of weights W_g (setting them to zero) changes the loss by
``L(W - W_g) - L(W) ~= -sum_{w in g} w * dL/dw``; the score of a group is the magnitude of that
estimate. Choices (documented because the papers leave them open):

- **Per batch, then averaged.** For every calibration batch b the group score is
  ``|sum_{w in g} w * g_b(w)|`` with g_b the gradient of that batch's (mean) loss; the scores are
  averaged over all batches of all processes. Taking the absolute value per batch (as Molchanov
  et al. 2019 do with their squared variant) keeps the signal of a trained model, whose
  full-data gradient is close to zero.
- **Eval mode.** Dropout (and drop-path) are switched off so that the scores are deterministic
  and do not depend on the process or the batch order; every module's ``training`` flag is
  restored afterwards.
- **No side effects on training state.** Gradients come from ``torch.autograd.grad`` for the
  group parameters only, so ``.grad`` of every parameter is left exactly as it was (nothing is
  zeroed or accumulated, and no optimizer is involved); parameters that were frozen get
  ``requires_grad`` temporarily and have it restored.
- **Groups** are those of :mod:`.magnitude`: heads with q/k/v rows and biases, o_proj columns and
  their relative-position-bias column (BEiT); neurons with the input-projection rows and biases
  and the output-projection column.
- **Fisher.** :func:`score_fisher` squares the per-batch sum instead of taking its absolute
  value: the empirical-Fisher (second-order) estimate of the loss increase.
- **Micro-batches.** ``ImportanceOptions.micro_batch_size`` cuts every calibration batch into
  pieces before the gradient, so that the per-piece terms keep their signal even when the whole
  calibration set comes as one batch.
- **Loss.** ``model(**batch).loss``: the batch must carry ``labels`` and the model must compute a
  loss from them (a ``*ForImageClassification`` model, not a bare backbone).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ..architectures import find_encoder_layers
from . import (
    ImportanceOptions,
    UnitScores,
    all_reduce_sum,
    batch_inputs,
    empty_calibration_error,
    missing_batches_error,
    model_device,
)
from .magnitude import head_group_parameters, head_group_sum, neuron_group_parameters, neuron_group_sum


def _loss_of(outputs: Any, model: nn.Module, criterion: str = "taylor", labels: torch.Tensor | None = None
             ) -> torch.Tensor:
    """The model's own loss; for a classifier that computes none (DeiT with its distillation head), the
    cross-entropy of the logits it returns (DeiT's: the mean of both heads) against integer ``labels``."""
    loss = getattr(outputs, "loss", None)
    if loss is None and isinstance(outputs, Mapping):
        loss = outputs.get("loss")
    logits = getattr(outputs, "logits", None)
    if loss is None and isinstance(logits, torch.Tensor) and labels is not None and not labels.is_floating_point() \
            and logits.dim() == 2 and labels.shape == logits.shape[:1]:
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
    if not isinstance(loss, torch.Tensor):
        raise ValueError(
            f"The {criterion!r} criterion needs a loss, but {type(model).__name__}(**batch) returned none. Use a model "
            "with a classification head (e.g. ViTForImageClassification) and batches that carry 'labels'."
        )
    if loss.numel() != 1:
        raise ValueError(f"The {criterion!r} criterion needs a scalar loss; the model returned shape {tuple(loss.shape)}.")
    return loss.reshape(())


def _micro_batches(inputs: dict[str, Any], size: int | None) -> Iterator[dict[str, Any]]:
    """``inputs`` cut into pieces of at most ``size`` images along the batch dimension (whole when None)."""
    count = inputs["labels"].shape[0]
    if size is None or size >= count:
        yield inputs
        return
    for start in range(0, count, size):
        yield {key: value[start:start + size] if isinstance(value, torch.Tensor) and value.dim() > 0
               and value.shape[0] == count else value for key, value in inputs.items()}


def first_order_sums(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]] | None,
    reduce: Callable[[torch.Tensor], torch.Tensor],
    *,
    options: ImportanceOptions | None = None,
    criterion: str = "taylor",
) -> UnitScores:
    """``mean over (micro-)batches b of reduce(sum_{w in group} w * dL_b/dw)`` for every head and neuron.

    The loop :func:`score_taylor` (``reduce=abs``) and :func:`score_fisher` (``reduce=square``)
    share; ``options.micro_batch_size`` cuts every batch into pieces first (a per-piece gradient
    keeps the signal a whole-set gradient of a trained model averages away). Under
    torch.distributed (with ``options.all_reduce``) sums and counts are summed over processes.
    """
    options = options or ImportanceOptions()
    if batches is None:
        raise missing_batches_error(criterion)
    layers = find_encoder_layers(model)
    parameters: list[nn.Parameter] = []
    seen: set[int] = set()
    for layer in layers:
        for parameter, _ in (*head_group_parameters(layer), *neuron_group_parameters(layer)):
            if id(parameter) not in seen:
                seen.add(id(parameter))
                parameters.append(parameter)

    head_sums = [torch.zeros(layer.num_heads, dtype=torch.float64) for layer in layers]
    neuron_sums = [torch.zeros(layer.num_neurons, dtype=torch.float64) for layer in layers]
    num_batches = 0
    device = model_device(model)
    modes = [(module, module.training) for module in model.modules()]
    requires_grad = [(parameter, parameter.requires_grad) for parameter in parameters]
    try:
        model.eval()
        for parameter in parameters:
            parameter.requires_grad_(True)
        for batch in batches:
            inputs = batch_inputs(batch, device)
            if inputs.get("labels") is None:
                raise ValueError(
                    f"The {criterion!r} criterion needs labels: every calibration batch must have a 'labels' entry "
                    f"(this one has keys {sorted(inputs)}). Rename the label column to 'labels' or choose a label-free "
                    "criterion ('graph', 'magnitude' or 'random')."
                )
            for piece in _micro_batches(inputs, options.micro_batch_size):
                with torch.enable_grad():
                    loss = _loss_of(model(**piece), model, criterion, piece["labels"])
                    gradients = torch.autograd.grad(loss, parameters, allow_unused=True)
                gradient_of = {id(p): g for p, g in zip(parameters, gradients)}

                def first_order(parameter: nn.Parameter) -> torch.Tensor:
                    gradient = gradient_of[id(parameter)]
                    if gradient is None:  # the parameter does not influence the loss
                        return torch.zeros(parameter.shape, dtype=torch.float64, device=parameter.device)
                    return parameter.detach().to(torch.float64) * gradient.to(torch.float64)

                for index, layer in enumerate(layers):
                    head_sums[index] += reduce(head_group_sum(layer, first_order))
                    neuron_sums[index] += reduce(neuron_group_sum(layer, first_order))
                num_batches += 1
                del gradients, gradient_of, loss
    finally:
        for parameter, flag in requires_grad:
            parameter.requires_grad_(flag)
        for module, training in modes:
            module.training = training

    if options.all_reduce:
        sizes = [t.numel() for t in (*head_sums, *neuron_sums)]
        flat = torch.cat([*head_sums, *neuron_sums, torch.tensor([float(num_batches)], dtype=torch.float64)])
        flat = all_reduce_sum(flat)
        parts = list(flat[:-1].split(sizes))
        head_sums, neuron_sums = parts[: len(layers)], parts[len(layers) :]
        num_batches = int(round(flat[-1].item()))
    if num_batches == 0:
        raise empty_calibration_error(criterion)
    return UnitScores(
        heads=[s / num_batches for s in head_sums],
        neurons=[s / num_batches for s in neuron_sums],
    )


def score_taylor(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]] | None,
    *,
    options: ImportanceOptions | None = None,
) -> UnitScores:
    """First-order Taylor scores ``mean over batches of |sum_{w in group} w * dL_b/dw|`` for every head and neuron.

    ``batches`` yields dicts with ``pixel_values`` and ``labels``. Under torch.distributed (with
    ``options.all_reduce``) the per-batch sums and the batch count are summed over all processes, so
    every rank returns the same scores. Pass the unwrapped model (not a DDP wrapper): the criterion
    runs its own backward passes. See the module docstring for the choices made.
    """
    return first_order_sums(model, batches, torch.abs, options=options, criterion="taylor")


def score_fisher(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]] | None,
    *,
    options: ImportanceOptions | None = None,
) -> UnitScores:
    """Group Fisher scores ``mean over batches of (sum_{w in group} w * dL_b/dw)^2`` for every head and neuron.

    The empirical-Fisher estimate of the loss increase when a group is removed (Liu et al., "Group
    Fisher Pruning", ICML 2021): second order, so a group whose first-order terms change sign
    between batches still counts. Set ``options.micro_batch_size`` for a finer estimate (per image
    with 1). Same conventions as :func:`score_taylor`.
    """
    return first_order_sums(model, batches, torch.square, options=options, criterion="fisher")
