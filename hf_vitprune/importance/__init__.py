"""Unit-importance criteria: one callable per method, each returning a score per head and per MLP neuron.

Every criterion has the same signature (Torch-Pruning style: "just a callable returning a score
per group")::

    criterion(model, batches, *, options=None) -> UnitScores

- ``model``: a supported (dense or pruned) vision transformer, *unwrapped* (not DDP/FSDP: the
  data-driven criteria run their own forward/backward passes).
- ``batches``: an iterable of dicts such as ``{"pixel_values": Tensor, "labels": Tensor}`` (a
  DataLoader works), or ``None`` for the criteria that need no data (see :data:`REQUIRES_DATA`).
  Under ``torch.distributed`` every process passes its own shard; the statistics are summed over
  all processes before any decision, so every rank returns the same scores.
- ``options``: an :class:`ImportanceOptions` (defaults when ``None``).

Scores are float64 CPU tensors; a higher score means a more important unit (kept first).
Criteria are registered in :data:`CRITERIA`; :func:`get_criterion` looks one up by name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

EDGE_STATISTICS = ("output", "attention")


@dataclass
class ImportanceOptions:
    """Settings shared by the importance criteria (each criterion reads the fields it needs)."""

    damping: float = field(
        default=0.85,
        metadata={
            "help": "graph: PageRank damping d in [0, 1]; with probability 1-d the chain teleports uniformly to "
            "any head, which makes it ergodic so the stationary distribution exists and is unique."
        },
    )
    tolerance: float = field(
        default=1e-8,
        metadata={"help": "graph: power iteration stops when the L1 change of the distribution is below this."},
    )
    max_iterations: int = field(
        default=1000,
        metadata={"help": "graph: power-iteration steps allowed before a ConvergenceError is raised."},
    )
    edge_statistic: str = field(
        default="output",
        metadata={
            "help": "graph: what the correlation between heads of consecutive layers is measured on: 'output' "
            "(each head's contribution to the residual stream, its context times its o_proj columns) or "
            "'attention' (the heads' attention maps softmax(q k^T * scale), without BEiT's relative bias)."
        },
    )
    seed: int = field(
        default=0,
        metadata={"help": "random: seed of the torch.Generator that draws the scores (same on every process)."},
    )
    micro_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "taylor/fisher: cut every calibration batch into pieces of at most this many images, one "
            "gradient each (None: one gradient per batch as given)."
        },
    )
    all_reduce: bool = field(
        default=True,
        metadata={
            "help": "graph/taylor: sum the calibration statistics over all torch.distributed processes (when "
            "initialised) before scoring, so that every rank derives the same scores."
        },
    )

    def __post_init__(self):
        if isinstance(self.damping, bool) or not isinstance(self.damping, (int, float)) or not 0 <= self.damping <= 1:
            raise ValueError(
                f"ImportanceOptions.damping={self.damping!r} is invalid: it is a probability; use a value in [0, 1] "
                "(0.85 is the usual PageRank choice)."
            )
        if isinstance(self.tolerance, bool) or not isinstance(self.tolerance, (int, float)) or not self.tolerance > 0:
            raise ValueError(
                f"ImportanceOptions.tolerance={self.tolerance!r} is invalid: use a positive number such as 1e-8."
            )
        if isinstance(self.max_iterations, bool) or not isinstance(self.max_iterations, int) or self.max_iterations < 1:
            raise ValueError(
                f"ImportanceOptions.max_iterations={self.max_iterations!r} is invalid: use a positive integer such "
                "as 1000."
            )
        check_edge_statistic(self.edge_statistic, "ImportanceOptions.edge_statistic")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"ImportanceOptions.seed={self.seed!r} is invalid: use an integer.")
        size = self.micro_batch_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(
                f"ImportanceOptions.micro_batch_size={size!r} is invalid: use a positive integer such as 8, or None."
            )


def check_edge_statistic(value: object, name: str = "edge_statistic") -> str:
    """Return ``value`` if it names a known head-graph edge statistic, else raise a ValueError listing them."""
    if value not in EDGE_STATISTICS:
        raise ValueError(
            f"{name}={value!r} is not a known edge statistic; use one of {', '.join(map(repr, EDGE_STATISTICS))} "
            "('output': correlation of the heads' residual-stream contributions, 'attention': of their attention maps)."
        )
    return value  # type: ignore[return-value]


@dataclass
class UnitScores:
    """Importance of every attention head and MLP neuron; one 1-D tensor per encoder layer.

    ``heads[l]`` has shape ``(num_heads_l,)`` and ``neurons[l]`` shape ``(num_neurons_l,)``.
    Higher means more important. Scores of different criteria are not on a common scale.
    """

    heads: list[torch.Tensor]
    neurons: list[torch.Tensor]

    def __post_init__(self):
        if len(self.heads) != len(self.neurons):
            raise ValueError(
                f"UnitScores has {len(self.heads)} layers of head scores but {len(self.neurons)} of neuron scores; "
                "give one tensor of each per encoder layer."
            )
        for name, tensors in (("heads", self.heads), ("neurons", self.neurons)):
            for index, scores in enumerate(tensors):
                if not isinstance(scores, torch.Tensor) or scores.dim() != 1:
                    raise ValueError(f"UnitScores.{name}[{index}] must be a 1-D tensor, got {scores!r}.")

    @property
    def num_layers(self) -> int:
        return len(self.heads)

    def validate(self, model: nn.Module) -> None:
        """Raise ValueError unless there is exactly one score per head and per neuron of ``model``."""
        from ..architectures import find_encoder_layers

        layers = find_encoder_layers(model)
        if len(layers) != self.num_layers:
            raise ValueError(f"UnitScores cover {self.num_layers} layers but the model has {len(layers)}.")
        for layer in layers:
            heads, neurons = self.heads[layer.index], self.neurons[layer.index]
            if heads.numel() != layer.num_heads or neurons.numel() != layer.num_neurons:
                raise ValueError(
                    f"UnitScores for layer {layer.index} have {heads.numel()} heads and {neurons.numel()} neurons, "
                    f"but the model's layer has {layer.num_heads} and {layer.num_neurons}; score the model you prune."
                )


Criterion = Callable[..., UnitScores]


# --------------------------------------------------------------------------- helpers shared by the criteria


def model_device(model: nn.Module) -> torch.device:
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def batch_inputs(batch: Any, device: torch.device, *, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """The keyword arguments of one calibration batch, tensors moved to ``device``, keys in ``drop`` removed."""
    if not isinstance(batch, Mapping):
        raise ValueError(
            f"Calibration batches must be dicts of model inputs such as {{'pixel_values': tensor, 'labels': tensor}}, "
            f"got {type(batch).__name__}. Use a DataLoader whose collate_fn returns a dict."
        )
    return {
        key: value.to(device) if isinstance(value, torch.Tensor) else value
        for key, value in batch.items()
        if key not in drop
    }


def distributed_world_size(group: Any = None) -> int:
    """Number of torch.distributed processes (1 when torch.distributed is not initialised)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group)
    return 1


def all_reduce_sum(flat: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Sum a 1-D float64 tensor over all torch.distributed processes; returns a CPU tensor.

    A no-op without an initialised process group (or with one process). NCCL reduces only CUDA
    tensors, so under NCCL the tensor travels through the current CUDA device; gloo and the other
    backends reduce it on the CPU.
    """
    if distributed_world_size(group) == 1:
        return flat
    backend = str(dist.get_backend(group)).lower()
    device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")
    buffer = flat.detach().to(device=device, dtype=torch.float64).clone()
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
    return buffer.cpu()


def empty_calibration_error(criterion: str) -> ValueError:
    return ValueError(
        f"The calibration set is empty: `batches` yielded no batch (on any process), and the {criterion!r} criterion "
        "needs data. Pass an iterable (e.g. a DataLoader) that yields at least one dict with 'pixel_values'"
        + (" and 'labels'." if criterion == "taylor" else ".")
    )


def missing_batches_error(criterion: str) -> ValueError:
    return ValueError(
        f"The {criterion!r} criterion needs calibration data but `batches` is None. Pass an iterable of dicts such "
        "as {'pixel_values': ..., 'labels': ...}, or choose a data-free criterion ('magnitude' or 'random')."
    )


# --------------------------------------------------------------------------- registry

from .graph import (  # noqa: E402
    ConvergenceError,
    HeadGraphStatistics,
    adjacency_matrix,
    collect_head_statistics,
    score_graph,
    stationary_importance,
    transition_matrix,
)
from .magnitude import head_magnitude, neuron_magnitude, score_magnitude  # noqa: E402
from .random import score_random  # noqa: E402
from .taylor import score_fisher, score_taylor  # noqa: E402

CRITERIA: dict[str, Criterion] = {
    "graph": score_graph,
    "magnitude": score_magnitude,
    "taylor": score_taylor,
    "fisher": score_fisher,
    "random": score_random,
}
"""Criterion name -> callable ``(model, batches, *, options=None) -> UnitScores``. Register new ones here.

Pruning methods (:mod:`hf_vitprune.methods`) call these scores; the names are the criteria's, not the methods'."""

REQUIRES_DATA: frozenset[str] = frozenset({"graph", "taylor", "fisher"})
"""The criteria that need calibration ``batches`` (the others accept ``None``)."""


def get_criterion(name: str) -> Criterion:
    """The criterion registered as ``name``, or a ValueError listing the registered names."""
    try:
        return CRITERIA[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"Unknown importance criterion {name!r}; choose one of {', '.join(map(repr, sorted(CRITERIA)))} "
            "(or register a new one in hf_vitprune.importance.CRITERIA)."
        ) from None


__all__ = [
    "CRITERIA",
    "EDGE_STATISTICS",
    "REQUIRES_DATA",
    "ConvergenceError",
    "Criterion",
    "HeadGraphStatistics",
    "ImportanceOptions",
    "UnitScores",
    "adjacency_matrix",
    "collect_head_statistics",
    "get_criterion",
    "head_magnitude",
    "neuron_magnitude",
    "score_fisher",
    "score_graph",
    "score_magnitude",
    "score_random",
    "score_taylor",
    "stationary_importance",
    "transition_matrix",
]
