"""GOHSP's graph-based head ranking: the stationary distribution of a Markov chain over all heads.

The paper (Yin et al., AAAI 2023) states only that heads are nodes, that correlations between
heads of consecutive layers are the edges, and that importance is the chain's converged state.
The construction implemented here and its choices:

1. **Statistics** (:func:`collect_head_statistics`). Calibration images run through the model in
   eval mode under ``no_grad``. For every image and every pair (head i of layer l, head j of layer
   l+1) the edge weight is the *absolute Pearson correlation* of the two heads' signals:

   - ``"output"`` (default): the head's contribution to the residual stream, i.e. its context
     slice times its o_proj columns (``context_h @ W_o[:, h]^T``, shape tokens x hidden, the
     o_proj bias excluded, measured before any layer scale/dropout), flattened over tokens and
     channels. This is what the next layer actually reads, and it is comparable across layers
     because every head writes into the same residual space.
   - ``"attention"``: the head's attention map ``softmax(q k^T * scale)`` (tokens x tokens,
     flattened), recomputed from the q_proj/k_proj outputs. Additive terms inside the softmax
     (BEiT's relative position bias, attention masks) are *not* included.

   A head whose signal is constant on an image (e.g. zeroed o_proj columns or a masked head) has
   no defined correlation; it is given correlation 0 (no edge) for that image. Correlations are
   computed in float32 (at least) and summed in float64. Only *sums* and the image count are
   kept, so statistics from several processes (or chunks of a calibration set) add up exactly:
   :meth:`HeadGraphStatistics.all_reduce`, :meth:`~HeadGraphStatistics.reduce`,
   :meth:`~HeadGraphStatistics.merge`.

2. **Chain** (:func:`transition_matrix`). A *directed* chain: from a head of layer l+1 the walker
   moves to the heads of layer l it reads from, in proportion to the mean edge weights
   (normalised over that one layer), so a head's stationary mass is what the heads downstream of
   it pass back: a head that feeds heads that matter, several layers down, ranks high. With
   damping d the chain is ``G = d * P + (1 - d) / n`` (PageRank); heads of the first layer and
   heads without edges teleport uniformly. It is irreducible and aperiodic for d < 1, so its
   stationary distribution exists, is unique, and power iteration converges to it at rate d.
   Why directed: on the symmetric graph (the first construction here) the stationary
   distribution is each head's normalised weighted degree, a one-hop statistic (measured: 0.998
   correlation with plain degree), and heads at the first and last layer, with neighbours on one
   side, lost half their mass for no reason. The paper's wording ("the converged state of the
   Markov chain on the graph of head correlations") allows either; the directed reading is the
   one where the graph carries information that one layer's statistics do not.

3. **Importance** (:func:`stationary_importance`). Power iteration ``pi <- pi G`` from the uniform
   distribution until the L1 change is below ``tolerance``; :class:`ConvergenceError` if that does
   not happen within ``max_iterations``. ``pi`` sums to 1 over all heads of all layers.
   What the chain can and cannot say: every head of layer l+1 (with edges) sends all of its walk
   mass to layer l, so a layer's *total* stationary mass is ``d * mass(l+1) + teleport mass(l)``,
   whatever the edge weights (provable by summing ``pi G`` over a layer). The edges only
   *redistribute* mass among the heads of a layer; how much each layer keeps must come from a
   currency that is comparable across layers. GOHSP (:mod:`hf_vitprune.methods.gohsp`) therefore
   multiplies a loss-calibrated score of each head (Taylor, Fisher or output energy) by the head's
   stationary mass relative to its layer's mean, and personalises the teleport with the same
   scores, so that a head ranks high when the heads that read it matter for the loss.

The ``"graph"`` criterion (:func:`score_graph`) scores heads by this importance and MLP neurons
by group L2 magnitude (the graph covers heads only).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..architectures import EncoderLayer, find_encoder_layers
from . import (
    ImportanceOptions,
    UnitScores,
    all_reduce_sum,
    batch_inputs,
    check_edge_statistic,
    empty_calibration_error,
    missing_batches_error,
    model_device,
)
from .energy import OutputEnergy, head_energy_of
from .magnitude import neuron_magnitude

LABEL_KEYS = ("labels", "label")


class ConvergenceError(RuntimeError):
    """Power iteration did not reach the requested tolerance."""


@dataclass
class HeadGraphStatistics:
    """Summed edge weights between the heads of consecutive layers, and the number of images summed.

    ``edge_sums[l]`` is a float64 CPU tensor of shape ``(num_heads[l], num_heads[l + 1])`` holding
    the sum over images of |corr(head i of layer l, head j of layer l+1)|. Sums (not means) so that
    the statistics of disjoint calibration shards add up to those of the whole set.
    """

    num_heads: list[int]
    edge_sums: list[torch.Tensor]
    num_images: int = 0
    edge_statistic: str = "output"

    def __post_init__(self):
        check_edge_statistic(self.edge_statistic)
        self.num_heads = [int(h) for h in self.num_heads]
        if len(self.edge_sums) != max(len(self.num_heads) - 1, 0):
            raise ValueError(
                f"HeadGraphStatistics has {len(self.num_heads)} layers but {len(self.edge_sums)} edge matrices; "
                "give one (H_l, H_l+1) matrix per pair of consecutive layers."
            )
        self.edge_sums = [torch.as_tensor(e, dtype=torch.float64).cpu() for e in self.edge_sums]
        for index, edges in enumerate(self.edge_sums):
            expected = (self.num_heads[index], self.num_heads[index + 1])
            if tuple(edges.shape) != expected:
                raise ValueError(
                    f"HeadGraphStatistics.edge_sums[{index}] has shape {tuple(edges.shape)}, expected {expected}."
                )

    @classmethod
    def empty(cls, num_heads: list[int], edge_statistic: str = "output") -> HeadGraphStatistics:
        """Zero statistics for layers with ``num_heads`` heads (what an empty calibration shard gives)."""
        edges = [torch.zeros(a, b, dtype=torch.float64) for a, b in zip(num_heads[:-1], num_heads[1:])]
        return cls(list(num_heads), edges, 0, edge_statistic)

    def mean_edges(self) -> list[torch.Tensor]:
        """Edge weights averaged over the images: the weights of the graph."""
        if self.num_images <= 0:
            raise ValueError(
                "HeadGraphStatistics hold no image; collect statistics on a non-empty calibration set first."
            )
        return [edges / self.num_images for edges in self.edge_sums]

    def merge(self, other: HeadGraphStatistics) -> HeadGraphStatistics:
        """The statistics of both calibration sets together (a new object)."""
        if self.num_heads != other.num_heads or self.edge_statistic != other.edge_statistic:
            raise ValueError(
                f"Cannot merge statistics of different graphs: heads {self.num_heads} ({self.edge_statistic!r}) vs "
                f"{other.num_heads} ({other.edge_statistic!r}). Collect both on the same model with the same statistic."
            )
        return HeadGraphStatistics(
            list(self.num_heads),
            [a + b for a, b in zip(self.edge_sums, other.edge_sums)],
            self.num_images + other.num_images,
            self.edge_statistic,
        )

    def reduce(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> HeadGraphStatistics:
        """Sum the statistics across processes with ``reduce_sum`` and keep the result (in place).

        ``reduce_sum`` receives one flat float64 CPU tensor (all edge sums, then the image count) and
        returns the elementwise sum over processes, on any device; for example
        ``lambda t: accelerator.reduce(t.to(accelerator.device), "sum")``.
        """
        sizes = [edges.numel() for edges in self.edge_sums]
        count = torch.tensor([float(self.num_images)], dtype=torch.float64)
        flat = torch.cat([*(edges.reshape(-1) for edges in self.edge_sums), count])
        summed = reduce_sum(flat).detach().to(device="cpu", dtype=torch.float64).reshape(-1)
        if summed.numel() != flat.numel():
            raise ValueError(
                f"reduce_sum returned {summed.numel()} values for {flat.numel()}; it must sum elementwise."
            )
        parts = summed[:-1].split(sizes)
        self.edge_sums = [part.reshape(edges.shape).clone() for part, edges in zip(parts, self.edge_sums)]
        self.num_images = int(round(summed[-1].item()))
        return self

    def all_reduce(self, group: Any = None) -> HeadGraphStatistics:
        """Sum over all torch.distributed processes (in place); a no-op when torch.distributed is not initialised.

        Works with gloo (CPU) and NCCL (through the current CUDA device).
        """
        return self.reduce(lambda flat: all_reduce_sum(flat, group))


# --------------------------------------------------------------------------- collecting statistics


def _standardise(signal: torch.Tensor) -> torch.Tensor:
    """Centre and L2-normalise the last dimension, so that a dot product is a Pearson correlation.

    A (numerically) constant signal becomes all zeros, i.e. correlation 0 with everything. The
    threshold is relative to the signal's own norm and well above float rounding of the mean.
    """
    signal = signal.to(torch.promote_types(signal.dtype, torch.float32))
    scale = signal.norm(dim=-1, keepdim=True)
    centred = signal - signal.mean(dim=-1, keepdim=True)
    norm = centred.norm(dim=-1, keepdim=True)
    constant = norm <= 100 * torch.finfo(signal.dtype).eps * scale
    return torch.where(constant, torch.zeros_like(centred), centred / norm.clamp_min(torch.finfo(signal.dtype).tiny))


def _head_contributions(layer: EncoderLayer, context: torch.Tensor) -> torch.Tensor:
    """Per-head residual contributions (batch, heads, tokens, hidden) from o_proj's input (batch, tokens, heads*d_h)."""
    heads, head_dim = layer.num_heads, layer.head_dim
    weight = layer.attention.o_proj.weight  # (hidden, heads * head_dim)
    batch, tokens = context.shape[0], context.shape[1]
    context = context.reshape(batch, tokens, heads, head_dim)
    weight = weight.reshape(weight.shape[0], heads, head_dim).to(context.dtype)
    return torch.einsum("bnhk,dhk->bhnd", context, weight)


def _attention_maps(layer: EncoderLayer, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Per-head attention maps (batch, heads, tokens * tokens) from q_proj/k_proj outputs (batch, tokens, heads*d_h)."""
    heads, head_dim = layer.num_heads, layer.head_dim
    batch, tokens = query.shape[0], query.shape[1]
    scale = getattr(layer.attention, "scaling", None) or head_dim**-0.5
    query = query.reshape(batch, tokens, heads, head_dim).transpose(1, 2).float()
    key = key.reshape(batch, tokens, heads, head_dim).transpose(1, 2).float()
    maps = torch.softmax(query @ key.transpose(-1, -2) * scale, dim=-1)
    return maps.reshape(batch, heads, -1)


class _Recorder:
    """Forward hooks that turn each layer's head signals into edge sums, and every unit's output into
    its output energy, as the forward pass goes."""

    def __init__(self, layers: list[EncoderLayer], edge_statistic: str):
        self.layers = layers
        self.edge_statistic = edge_statistic
        self.stats = HeadGraphStatistics.empty([layer.num_heads for layer in layers], edge_statistic)
        self.energy = OutputEnergy.empty([layer.num_heads for layer in layers], [layer.num_neurons for layer in layers])
        self.previous: dict[int, torch.Tensor] = {}
        self.seen: list[int] = []
        self.batch_size: int | None = None
        self.pending: dict[tuple[int, str], torch.Tensor] = {}
        self.handles: list[Any] = []

    def attach(self) -> None:
        for layer in self.layers:
            attention = layer.attention
            self.handles.append(attention.o_proj.register_forward_pre_hook(self._on_context(layer)))
            self.handles.append(layer.mlp_out.register_forward_pre_hook(self._on_activation(layer.index)))
            if self.edge_statistic == "attention":
                for name in ("q_proj", "k_proj"):
                    projection = getattr(attention, name, None)
                    if projection is not None:  # an AttentionRemoved block has neither
                        self.handles.append(projection.register_forward_hook(self._keep(layer.index, name)))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.previous.clear()
        self.pending.clear()

    def _keep(self, index: int, name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            self.pending[(index, name)] = output.detach()

        return hook

    def _on_activation(self, index: int):
        def hook(module: nn.Module, args: tuple) -> None:
            activation = args[0].detach().float()  # (batch, tokens, F)
            moments = activation.pow(2).mean(1).sum(0)
            self.energy.activation_sums[index] += moments.to(device="cpu", dtype=torch.float64)

        return hook

    def _on_context(self, layer: EncoderLayer):
        def hook(module: nn.Module, args: tuple) -> None:
            context = args[0].detach()
            contributions = _head_contributions(layer, context)
            energy = head_energy_of(contributions, layer.attention_scale).sum(0)
            self.energy.head_sums[layer.index] += energy.to(device="cpu", dtype=torch.float64)
            if self.edge_statistic == "output":
                signal = contributions.reshape(contributions.shape[0], contributions.shape[1], -1)
            elif layer.num_heads == 0:
                signal = context.new_zeros(context.shape[0], 0, 1)
            else:
                query = self.pending.pop((layer.index, "q_proj"))
                key = self.pending.pop((layer.index, "k_proj"))
                signal = _attention_maps(layer, query, key)
            self._record(layer.index, _standardise(signal))

        return hook

    def _record(self, index: int, signal: torch.Tensor) -> None:
        if index in self.seen:
            raise RuntimeError(
                f"Encoder layer {index} ran twice in one forward pass; graph statistics need each layer once per image."
            )
        self.seen.append(index)
        if index > 0:
            previous = self.previous.pop(index - 1, None)
            if previous is None:
                raise RuntimeError(f"Encoder layer {index} ran before layer {index - 1}; layers must run in order.")
            correlation = torch.bmm(previous, signal.transpose(1, 2)).abs()  # (batch, H_{l-1}, H_l)
            self.stats.edge_sums[index - 1] += correlation.sum(0).to(device="cpu", dtype=torch.float64)
        if index < len(self.layers) - 1:
            self.previous[index] = signal
        if self.batch_size is None:
            self.batch_size = signal.shape[0]

    def finish_batch(self) -> None:
        if self.seen != list(range(len(self.layers))):
            raise RuntimeError(
                f"Only encoder layers {self.seen} of {len(self.layers)} ran during the forward pass; graph statistics "
                "need every layer to see every image."
            )
        self.stats.num_images += int(self.batch_size or 0)
        self.energy.num_images += int(self.batch_size or 0)
        self.seen, self.batch_size = [], None
        self.previous.clear()
        self.pending.clear()


def collect_calibration_statistics(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    edge_statistic: str = "output",
) -> tuple[HeadGraphStatistics, OutputEnergy]:
    """Run ``batches`` through ``model`` once: the head graph's edge sums and every unit's output energy.

    The model runs in eval mode (no dropout) under ``no_grad``; every module's training flag is
    restored and every hook removed afterwards, even on error. Label entries of the batches
    (``labels``/``label``) are not passed to the model. An empty ``batches`` gives statistics with
    ``num_images == 0`` (so that an empty shard on one process still takes part in an all-reduce).
    Both results hold this process's sums only: call their ``all_reduce()`` to sum over processes.
    """
    check_edge_statistic(edge_statistic)
    layers = find_encoder_layers(model)
    device = model_device(model)
    recorder = _Recorder(layers, edge_statistic)
    modes = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        recorder.attach()
        with torch.no_grad():
            for batch in batches:
                model(**batch_inputs(batch, device, drop=LABEL_KEYS))
                recorder.finish_batch()
    finally:
        recorder.detach()
        for module, training in modes:
            module.training = training
    return recorder.stats, recorder.energy


def collect_head_statistics(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    edge_statistic: str = "output",
) -> HeadGraphStatistics:
    """The head graph's edge sums of :func:`collect_calibration_statistics` (this process only)."""
    return collect_calibration_statistics(model, batches, edge_statistic)[0]


# --------------------------------------------------------------------------- the Markov chain


def adjacency_matrix(stats: HeadGraphStatistics) -> torch.Tensor:
    """Directed (n, n) float64 matrix over all n heads, layer-major order: ``A[j, i]`` is the mean edge
    weight from head j of layer l+1 to head i of layer l (the head it reads from); 0 elsewhere."""
    offsets = [0]
    for heads in stats.num_heads:
        offsets.append(offsets[-1] + heads)
    adjacency = torch.zeros(offsets[-1], offsets[-1], dtype=torch.float64)
    for index, edges in enumerate(stats.mean_edges()):
        producers = slice(offsets[index], offsets[index + 1])
        consumers = slice(offsets[index + 1], offsets[index + 2])
        adjacency[consumers, producers] = edges.T
    return adjacency


def teleport_distribution(stats: HeadGraphStatistics, teleport=None) -> torch.Tensor:
    """The chain's teleport distribution over all heads: uniform, or ``teleport`` (one non-negative tensor per
    layer, e.g. each head's loss sensitivity) normalised to sum to 1 (uniform again when it sums to 0)."""
    n = sum(stats.num_heads)
    if teleport is None:
        return torch.full((n,), 1.0 / n, dtype=torch.float64) if n else torch.zeros(0, dtype=torch.float64)
    parts = [torch.as_tensor(t, dtype=torch.float64).detach().cpu().reshape(-1) for t in teleport]
    sizes = [part.numel() for part in parts]
    if sizes != list(stats.num_heads):
        raise ValueError(f"teleport has {sizes} values per layer but the graph has {stats.num_heads} heads per layer; "
                         f"give one non-negative weight per head.")
    weights = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
    if not torch.isfinite(weights).all() or (weights < 0).any():
        raise ValueError("teleport weights must be finite and non-negative (a head's share of the teleport mass).")
    total = weights.sum()
    return weights / total if total > 0 else torch.full((n,), 1.0 / n, dtype=torch.float64)


def transition_matrix(stats: HeadGraphStatistics, damping: float = 0.85, teleport=None) -> torch.Tensor:
    """Row-stochastic (n, n) float64 matrix of the chain over all heads.

    From a head of layer l+1 the walker steps, with probability ``damping``, to a head of layer l,
    in proportion to their edge weights (the per-source normalisation spans one layer), and
    teleports otherwise: ``G = d * P + (1 - d) * 1 t^T`` with ``t`` the teleport distribution
    (uniform, or personalised: :func:`teleport_distribution`). Heads of the first layer, and heads
    without any edge, teleport always. The teleport is added after the normalisation, so it never
    mixes with the per-layer shares.
    """
    if isinstance(damping, bool) or not 0 <= damping <= 1:
        raise ValueError(f"damping={damping!r} is invalid: use a probability in [0, 1] such as 0.85.")
    adjacency = adjacency_matrix(stats)
    n = adjacency.shape[0]
    if n == 0:
        return adjacency
    degree = adjacency.sum(1, keepdim=True)
    jump = teleport_distribution(stats, teleport).unsqueeze(0).expand(n, n)
    walk = adjacency / degree.clamp_min(torch.finfo(torch.float64).tiny)
    return torch.where(degree > 0, damping * walk + (1.0 - damping) * jump, jump)


def stationary_importance(
    stats: HeadGraphStatistics,
    damping: float = 0.85,
    tolerance: float = 1e-8,
    max_iterations: int = 1000,
    teleport=None,
) -> list[torch.Tensor]:
    """Stationary distribution of the head chain, split per layer (float64 tensors summing to 1 overall).

    Power iteration ``pi <- pi G`` from the uniform distribution; stops when ``||pi_new - pi||_1 <
    tolerance`` and raises :class:`ConvergenceError` after ``max_iterations`` steps without that.
    ``teleport`` (one non-negative tensor per layer) personalises the chain: the walker restarts at
    a head in proportion to it, so a head's mass is its own weight plus what the heads that read it
    pass back (PageRank's personalisation vector).
    """
    if not tolerance > 0:
        raise ValueError(f"tolerance={tolerance!r} is invalid: use a positive number such as 1e-8.")
    if max_iterations < 1:
        raise ValueError(f"max_iterations={max_iterations!r} is invalid: use a positive integer such as 1000.")
    chain = transition_matrix(stats, damping, teleport)
    n = chain.shape[0]
    if n == 0:
        return [torch.zeros(0, dtype=torch.float64) for _ in stats.num_heads]
    pi = torch.full((n,), 1.0 / n, dtype=torch.float64)
    change = float("inf")
    for _ in range(max_iterations):
        updated = pi @ chain
        updated = updated / updated.sum()  # guard against drift of the total mass
        change = (updated - pi).abs().sum().item()
        pi = updated
        if change < tolerance:
            return [part.clone() for part in pi.split(stats.num_heads)]
    raise ConvergenceError(
        f"The head-importance power iteration did not converge: L1 change {change:.3g} after {max_iterations} "
        f"iterations (tolerance {tolerance:g}, damping {damping:g}). Use damping < 1 (0.85 is usual; with damping 1 "
        "the layered graph is periodic), or raise max_iterations / tolerance."
    )


def score_graph(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]] | None,
    *,
    options: ImportanceOptions | None = None,
) -> UnitScores:
    """Graph importance (GOHSP's ranking): graph stationary probability for heads, group L2 magnitude for MLP neurons.

    ``batches`` (dicts with ``pixel_values``) are this process's calibration shard; with
    ``options.all_reduce`` the statistics are summed over all torch.distributed processes before
    ranking, so every rank returns the same scores. Raises ValueError when the whole calibration set
    (over all processes) is empty.
    """
    options = options or ImportanceOptions()
    if batches is None:
        raise missing_batches_error("graph")
    stats = collect_head_statistics(model, batches, options.edge_statistic)
    if options.all_reduce:
        stats.all_reduce()
    if stats.num_images == 0:
        raise empty_calibration_error("graph")
    heads = stationary_importance(stats, options.damping, options.tolerance, options.max_iterations)
    return UnitScores(heads=heads, neurons=neuron_magnitude(model))
