"""OFB (Ye et al., CVPR 2024, "Once for Both"): one search for importance and sparsity, over heads,
head dims, MLP width and the embedding width, with a differentiable bi-mask.

Every searched *module* (a layer's heads, head dims or MLP neurons; the model's embedding
width) has

- a learned importance score per unit, ``s`` (its mask is ``sigmoid(s)``), and
- logits ``alpha`` over candidate widths (prefixes of the units ranked by importance); with
  ``p = softmax(alpha)`` the expected prefix mask of the unit ranked ``r`` is ``P(width > r)``.

The forward multiplies each unit by ``w * sigmoid(s) + (1 - w) * M``; ``w`` falls linearly from
``mix_start`` to ``mix_end`` over the warm-up, moving the search from importance to sparsity.
Heads multiply the attention output before o_proj, head dims the outputs of q, k and v, neurons
the MLP activation, and the embedding width every residual LayerNorm (its statistics weighted
by ``M``, its output multiplied; see :mod:`hf_vitprune.embedding`).

Loss terms: per module the adaptive one-hot loss ``H(p) + tan(pi/2 - pi * sigma_hat) / K``
(``sigma_hat`` the variance of ``p`` over its maximum, clamped to [0.02, 0.98]), a FLOPs (or parameter)
constraint ``((cost(E[widths]) - target) / dense)^2`` from
:class:`~hf_vitprune.methods.width_cost.WidthCost`, and an L1 term on ``sigmoid(s)``. The scores
and logits are the method's own parameter groups, with their own learning rates; their
gradients are averaged over processes before each step.

Progressive shrinking: every ``shrink_interval`` steps after the warm-up the logits are averaged
over processes and candidates with probability below ``shrink_threshold / K`` are dropped; a
module left with one candidate is fixed. When a module's widest candidate goes, the units
ranked outside every remaining candidate are removed: their multiplier is zero from then on,
and with ``physical_shrinking`` (the default) the trainer slices them out of the weights and
the optimizer state at once (``pending_compaction``), so the search runs on ever smaller tensors.

At the end each module takes its most likely remaining width; the remaining multipliers are
fused into the weights; then a final exact selection of heads and neurons (search-kept units
first, by importance; never below the grid's narrowest heads and MLP per layer; head dims and the
embedding narrowed or widened a grid step at a time where heads and neurons alone cannot land on it)
brings the model onto the budget, which the expected-width constraint only approaches. PMIM
(:mod:`hf_vitprune.methods.pmim`, on by default) masks a growing share of patches and adds a
reconstruction loss. Departures from the paper (docs/methods.md): the LayerNorm statistics follow
the embedding mask so that the fused, compacted model equals the searched one; by default a head is
ranked by its own score, not by its channels' (``head_score``), and the logits follow the weights'
schedule (``arch_schedule``): both measured on the validation split against the paper's choice.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..architectures import embedding_width, find_encoder_layers
from ..budget import Budget, select_plan, unit_costs
from ..distillation import classification_logits
from ..embedding import gated_layer_norm, residual_layer_norms
from ..plan import PruningPlan
from ..stats import model_stats
from ..surgery import compacted_shapes
from .base import MethodOptions, PruningMethod, SearchContext, average_over_processes, register_method
from .base import option_help as _help  # every option documents itself
from .pmim import PatchMaskReconstruction
from .width_cost import WidthCost

logger = logging.getLogger(__name__)

OFB_CITATION = {
    "what": "OFB (Ye et al., CVPR 2024, arXiv:2403.15835)",
    "bibtex": """@inproceedings{ye2024once,
  title = {Once for Both: Single Stage of Importance and Sparsity Search for Vision Transformer Compression},
  author = {Ye, Hancheng and Yu, Chong and Ye, Peng and Xia, Renqiu and Tang, Yansong and Lu, Jiwen and Chen, Tao and Zhang, Bo},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year = {2024},
  eprint = {2403.15835},
  archivePrefix = {arXiv}
}""",
}

KINDS = ("heads", "head_dims", "neurons", "embedding")
ARCH_SCHEDULES = ("weights", "constant")
HEAD_SCORES = ("own", "channels")
PREFIX = "ofb."
PMIM_PREFIX = "ofb.pmim."
SEARCHED_PREFIX = "ofb.searched."  # the searched widths, kept in fine-tuning checkpoints for the card
DENSE_PREFIX = "ofb.dense."  # the dense widths the candidates come from (the model may be shrunk)




@dataclass
class OFBOptions(MethodOptions):
    """The OFB search: what it searches, its candidate grids, loss weights and schedule."""

    search_fraction: float = field(
        default=0.5, **_help("Share of the training steps spent searching; the rest fine-tunes the compacted model.")
    )
    warmup_fraction: float = field(
        default=0.2, **_help("Share of the search over which the mask mixing weight moves from importance to sparsity.")
    )
    mix_start: float = field(default=0.99, **_help("Mixing weight of the importance mask at the start of the search."))
    mix_end: float = field(default=0.1, **_help("Mixing weight of the importance mask after the warm-up."))
    search_head_dims: bool = field(default=True, **_help("Search each layer's head dim (q/k/v width)."))
    search_embedding: bool = field(default=True, **_help("Search the embedding width (the residual stream)."))
    head_step: int = field(default=2, **_help("Candidate head counts are multiples of this (and all heads); the final "
                                              "selection keeps at least this many heads per layer."))
    min_head_dim_fraction: float = field(
        default=0.25, **_help("Smallest candidate head dim, as a fraction of the dense one (paper: 1/4).")
    )
    min_mlp_fraction: float = field(
        default=0.25, **_help("Smallest candidate MLP width, as a fraction of the dense one (paper: 1/4); the final "
                              "selection keeps at least this many neurons per layer.")
    )
    min_embedding_fraction: float = field(
        default=0.5, **_help("Smallest candidate embedding width, as a fraction of the dense one (paper: 1/2).")
    )
    grid_steps: int = field(
        default=8, **_help("Candidate widths step by 1/grid_steps of the dense width (head dims, MLP; paper: 8).")
    )
    embedding_grid_steps: int = field(default=16, **_help("The same for the embedding width."))
    flops_weight: float = field(default=5.0, **_help("Weight of the squared relative budget constraint."))
    one_hot_weight: float = field(default=0.5, **_help("Weight of the adaptive one-hot loss (mean over modules)."))
    l1_weight: float = field(default=1e-4, **_help("Weight of the L1 term on the importance masks (summed)."))
    score_learning_rate: float = field(default=5e-2, **_help("Learning rate of the importance scores."))
    arch_learning_rate: float = field(default=5e-2, **_help("Learning rate of the architecture logits."))
    head_score: str = field(
        default="own", **_help("A head's importance score: 'own' (one learned score per head) or 'channels' (the "
                               "paper's: one per channel of the head, the head ranked by their mean).")
    )
    arch_schedule: str = field(
        default="weights", **_help("Learning-rate schedule of the architecture logits: 'weights' (the Trainer's "
                                   "lr_scheduler_type, as every other group) or 'constant' (the paper's own optimizer "
                                   "setting: arch_learning_rate throughout the search).")
    )
    initial_score: float = field(default=3.0, **_help("Initial importance score (sigmoid(3) = 0.95: nearly all on)."))
    shrink_interval: int = field(default=10, **_help("Optimizer steps between progressive-shrinking checks."))
    shrink_threshold: float = field(
        default=0.2, **_help("A candidate whose probability is below shrink_threshold / K is dropped (K: active ones).")
    )
    physical_shrinking: bool = field(
        default=True, **_help("When a module's widest candidate is dropped, slice its removed units out of the weights "
                              "and the optimizer state at once (the paper's progressive shrinking); off: keep the "
                              "dense shapes to the end, the removed units held at zero (the same search, slower; "
                              "needed under FSDP/DeepSpeed).")
    )
    pmim: bool = field(
        default=True, **_help("Progressive masked image modelling during the search: reconstruct masked patches.")
    )
    mask_ratio_start: float = field(default=0.05, **_help("Share of patches PMIM masks at the start of the search."))
    mask_ratio_end: float = field(default=0.25, **_help("Share of patches PMIM masks from the end of the warm-up on."))
    pmim_weight: float = field(
        default=1.0, **_help("Weight of the PMIM loss after it is rescaled to the size of the classification loss.")
    )
    decoder_learning_rate: float = field(default=1e-3, **_help("Learning rate of PMIM's decoder and mask token."))

    def __post_init__(self):
        super().__post_init__()
        for name in ("search_fraction",):
            self._check_number(name, low=0, high=1)
        for name in ("warmup_fraction", "mix_end"):
            self._check_number(name, low=0, high=1, low_open=False)
        self._check_number("mix_start", low=0, high=1, high_open=False)
        for name in ("min_head_dim_fraction", "min_mlp_fraction", "min_embedding_fraction"):
            self._check_number(name, low=0, high=1, high_open=False)
        for name in ("head_step", "grid_steps", "embedding_grid_steps", "shrink_interval"):
            self._check_int(name, 1)
        for name in ("flops_weight", "one_hot_weight", "l1_weight"):
            self._check_number(name, low=0, low_open=False)
        for name in ("score_learning_rate", "arch_learning_rate", "shrink_threshold"):
            self._check_number(name, low=0)
        self._check_number("initial_score")
        for name in ("mask_ratio_start", "mask_ratio_end"):
            self._check_number(name, low=0, high=1, low_open=False)
        self._check_number("pmim_weight", low=0, low_open=False)
        self._check_number("decoder_learning_rate", low=0)
        if self.head_score not in HEAD_SCORES:
            raise ValueError(f"OFBOptions.head_score={self.head_score!r}; choose one of {list(HEAD_SCORES)}.")
        if self.arch_schedule not in ARCH_SCHEDULES:
            raise ValueError(f"OFBOptions.arch_schedule={self.arch_schedule!r}; choose one of {list(ARCH_SCHEDULES)}.")
        for name in ("search_head_dims", "search_embedding", "physical_shrinking", "pmim"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"OFBOptions.{name}={getattr(self, name)!r} must be True or False.")


def _grid(size: int, smallest: float, steps: int) -> list[int]:
    """Candidate widths: from ``smallest * size`` to ``size`` in steps of ``size / steps`` (at least 1)."""
    step = max(1, size // steps)
    low = max(1, math.ceil(smallest * size))
    return sorted({*range(low, size + 1, step), size})


@dataclass
class SearchedModule:
    """One searched width: a layer's heads, head dims or neurons, or (``layer`` None) the embedding width.

    ``candidates`` are widths of the dense model; ``size`` is how many units the model has now (fewer than
    the dense count once progressive shrinking has sliced some out); ``channels`` is how many importance scores
    each unit has (a head scored by its channels: the head dim now).
    """

    kind: str
    layer: int | None
    size: int
    candidates: list[int]
    channels: int = 1

    @property
    def key(self) -> str:
        return self.kind if self.layer is None else f"{self.kind}.{self.layer}"


def model_widths(model: nn.Module) -> tuple[list[int], list[int], list[int], int]:
    """(heads, head dim, MLP width) per layer and the embedding width of ``model`` as it is."""
    layers = find_encoder_layers(model)
    return ([layer.num_heads for layer in layers], [layer.head_dim for layer in layers],
            [layer.num_neurons for layer in layers], embedding_width(model))


def searched_modules(model: nn.Module, config, options: OFBOptions, dense_widths: tuple | None = None
                     ) -> list[SearchedModule]:
    """The modules OFB searches on ``model``, in a fixed order (every process derives the same).

    Candidates come from ``dense_widths`` (:func:`model_widths` of the dense model; default: ``model``'s own),
    so a model already shrunk mid-search gets the search it had.
    """
    heads, dims, neurons, width = dense_widths or model_widths(model)
    now = model_widths(model)
    modules = []
    for i in range(len(heads)):
        if config.prune_heads:
            grid = sorted({*range(options.head_step, heads[i] + 1, options.head_step), heads[i]})
            channels = now[1][i] if options.head_score == "channels" else 1
            modules.append(SearchedModule("heads", i, now[0][i], grid, channels))
        if options.search_head_dims:
            grid = _grid(dims[i], options.min_head_dim_fraction, options.grid_steps)
            modules.append(SearchedModule("head_dims", i, now[1][i], grid))
        if config.prune_neurons:
            grid = _grid(neurons[i], options.min_mlp_fraction, options.grid_steps)
            modules.append(SearchedModule("neurons", i, now[2][i], grid))
    if options.search_embedding:
        grid = _grid(width, options.min_embedding_fraction, options.embedding_grid_steps)
        modules.append(SearchedModule("embedding", None, now[3], grid))
    searchable = [m for m in modules if len(m.candidates) > 1]  # one candidate: nothing to choose
    if not searchable:
        raise ValueError(
            f"OFB has nothing to search on this {type(model).__name__}: every enabled width (heads: "
            f"prune_heads={config.prune_heads}, head dims: search_head_dims={options.search_head_dims}, MLP width: "
            f"prune_neurons={config.prune_neurons}, embedding width: search_embedding={options.search_embedding}) has "
            f"a single candidate width. Enable more of them, or lower the minimum fractions (min_head_dim_fraction, "
            f"min_mlp_fraction, min_embedding_fraction) or head_step."
        )
    return searchable


class BiMask(nn.Module):
    """The scores and architecture logits of every searched module, and the multipliers they give."""

    def __init__(self, modules: list[SearchedModule], initial_score: float, device=None):
        super().__init__()
        self.searched = modules
        self.scores = nn.ParameterList(
            [nn.Parameter(torch.full((m.size * m.channels,), float(initial_score), device=device)) for m in modules])
        self.logits = nn.ParameterList(
            [nn.Parameter(torch.zeros(len(m.candidates), device=device)) for m in modules])
        for i, m in enumerate(modules):
            self.register_buffer(f"active_{i}", torch.ones(len(m.candidates), dtype=torch.bool, device=device))
            self.register_buffer(f"candidates_{i}", torch.tensor(m.candidates, dtype=torch.float32, device=device))
            self.register_buffer(f"alive_{i}", torch.ones(m.size, dtype=torch.bool, device=device))

    def active(self, i: int) -> torch.Tensor:
        return getattr(self, f"active_{i}")

    def alive(self, i: int) -> torch.Tensor:
        """Units still in the search: those ranked inside the widest active candidate when it last shrank."""
        return getattr(self, f"alive_{i}")

    def candidates(self, i: int) -> torch.Tensor:
        return getattr(self, f"candidates_{i}")

    def importance(self, i: int) -> torch.Tensor:
        """Each unit's importance mask ``sigmoid(s)``, averaged over its channels still in the search where it has
        several (a head's channels outside its layer's remaining head dims do not count)."""
        channels = self.searched[i].channels
        if channels == 1:
            return torch.sigmoid(self.scores[i])
        live = self._channels_alive(i).to(self.scores[i].dtype)
        return (torch.sigmoid(self.scores[i]).view(-1, channels) * live).sum(dim=1) / live.sum().clamp_min(1)

    def _channels_alive(self, i: int) -> torch.Tensor:
        """Which of each unit's channels are still in the search: those of its layer's head dims still alive."""
        module = self.searched[i]
        for j, other in enumerate(self.searched):
            if other.kind == "head_dims" and other.layer == module.layer:
                return self.alive(j)
        return torch.ones(module.channels, dtype=torch.bool, device=self.alive(i).device)

    def score_alive(self, i: int) -> torch.Tensor:
        """Which of module ``i``'s scores belong to units (and channels) still in the search."""
        alive = self.per_score(i, self.alive(i))
        if self.searched[i].channels > 1:
            alive = alive & self._channels_alive(i).repeat(self.searched[i].size)
        return alive

    def per_score(self, i: int, values: torch.Tensor) -> torch.Tensor:
        """Per-unit ``values`` repeated for each of the unit's scores."""
        return values.repeat_interleave(self.searched[i].channels)

    def score_indices(self, i: int, units: torch.Tensor, channels: torch.Tensor | None = None) -> torch.Tensor:
        """The positions in ``scores[i]`` of ``units`` (and of only ``channels`` of each, where given)."""
        width = self.searched[i].channels
        channels = torch.arange(width, device=units.device) if channels is None else channels.to(units.device)
        return (units[:, None] * width + channels[None, :]).flatten()

    def probabilities(self, i: int) -> torch.Tensor:
        logits = self.logits[i].masked_fill(~self.active(i), float("-inf"))
        return torch.softmax(logits, dim=0)

    def ranks(self, i: int) -> torch.Tensor:
        """Each unit's rank by importance (0: most important), removed units last; ties broken by index,
        identically everywhere."""
        own = self.searched[i].channels == 1  # the raw score: no saturation of sigmoid to break ties
        scores = (self.scores[i] if own else self.importance(i)).detach().masked_fill(~self.alive(i), float("-inf"))
        order = torch.argsort(-scores, stable=True)
        ranks = torch.empty_like(order)
        ranks[order] = torch.arange(len(order), device=order.device)
        return ranks

    def prefix_mask(self, i: int) -> torch.Tensor:
        """``M``: the probability that the unit's rank falls inside the chosen width."""
        inside = (self.candidates(i)[None, :] > self.ranks(i)[:, None].to(torch.float32)).to(torch.float32)
        return inside @ self.probabilities(i)

    def expected_width(self, i: int) -> torch.Tensor:
        return (self.probabilities(i) * self.candidates(i)).sum()

    def chosen_width(self, i: int) -> int:
        """The most likely active candidate (the first of equals)."""
        probabilities = self.probabilities(i).detach()
        return int(self.searched[i].candidates[int(torch.argmax(probabilities))])

    def multipliers(self, mix: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(multiplier, prefix mask) of every module: ``mix * sigmoid(s) + (1 - mix) * M``, zero on removed units."""
        result = []
        for i in range(len(self.searched)):
            prefix = self.prefix_mask(i)
            multiplier = (mix * torch.sigmoid(self.scores[i]) + (1 - mix) * self.per_score(i, prefix))
            multiplier = multiplier * self.per_score(i, self.alive(i))
            result.append((multiplier, prefix))
        return result

    @torch.no_grad()
    def remove_outside(self, i: int) -> bool:
        """Mark the units ranked outside the widest active candidate removed; True if any unit was still alive."""
        widest = int(self.candidates(i)[self.active(i)].max())
        alive = self.alive(i)
        keep = alive & (self.ranks(i) < widest)
        changed = bool((keep != alive).any())
        alive.copy_(keep)
        return changed

    def keep_units(self, i: int, kept: torch.Tensor, channels: torch.Tensor | None = None
                   ) -> tuple[nn.Parameter, nn.Parameter, torch.Tensor]:
        """Slice module ``i`` to the units ``kept`` (and each unit to ``channels``, where given) after the model
        was; returns (old scores, new scores, the positions in the old of the new)."""
        old = self.scores[i]
        index = self.score_indices(i, kept, channels)
        new = nn.Parameter(old.detach()[index].clone())
        self.scores[i] = new
        self.register_buffer(f"alive_{i}", self.alive(i)[kept].clone())
        self.searched[i].size = len(kept)
        if channels is not None:
            self.searched[i].channels = len(channels)
        return old, new, index


def one_hot_loss(probabilities: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """OFB's adaptive one-hot loss: entropy + tan(pi/2 - pi * sigma_hat) / K over the active candidates.

    ``sigma_hat`` (the variance of p over its maximum, 0 at uniform, 1 at one-hot) is clamped to [0.02, 0.98],
    where the tangent is finite. The clamp leaves the tangent no gradient near a uniform distribution; an affine
    squeeze that keeps it was measured worse on the validation split (docs/methods.md): the search then commits
    to its widths before the budget term has moved them.
    """
    p = probabilities[active]
    k = p.numel()
    if k <= 1:
        return probabilities.sum() * 0
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()
    sigma_hat = ((p.square().sum() - 1 / k) / (1 - 1 / k)).clamp(0.02, 0.98)
    return entropy + torch.tan(math.pi / 2 - math.pi * sigma_hat) / k


@register_method
class OFB(PruningMethod):
    name = "ofb"
    options_class = OFBOptions
    phase_name = "search"
    description = (
        "OFB (Once for Both): a one-stage differentiable search of importance and width over attention heads, "
        "head dims, MLP width and the embedding width, with a bi-mask and progressive shrinking."
    )

    def __init__(self, config):
        super().__init__(config)
        self.mask: BiMask | None = None
        self.pmim: PatchMaskReconstruction | None = None
        self.seed = 0
        self.cost: WidthCost | None = None
        self.step = 0
        self.total_steps = 0
        self.target = 0.0
        self.dense_measure = 0.0
        self._hooks = []
        self._current: list | None = None
        self._logs: dict[str, float] = {}
        self._dense_widths: tuple = ()
        self._to_slice: list[int] = []  # modules whose removed units wait for the trainer to slice them out
        self.searched_widths: dict | None = None

    # ------------------------------------------------------------------ the hooks

    def search_steps(self, total_steps: int) -> int:
        return min(max(1, round(total_steps * self.options.search_fraction)), total_steps - 1)

    def setup(self, context: SearchContext) -> None:
        model, budget = context.model, context.budget
        self.seed = context.seed
        self._build(model, context.search_steps)
        dense = model_stats(model)
        self.dense_measure = float(budget.measure(dense))
        self.target = (1 - budget.fraction) * self.dense_measure
        smallest = self._cost_at([min(m.candidates) for m in self.mask.searched])
        if smallest > self.target:
            self._detach()  # leave the model as it was given
            raise ValueError(
                f"{budget.target_name}={budget.fraction:g} asks for at most {self.target:,.0f} {budget.unit_name}, but "
                f"the narrowest model OFB's candidate grid allows has {smallest:,.0f}. Lower the minimum fractions "
                f"(min_head_dim_fraction, min_mlp_fraction, min_embedding_fraction), search more kinds, or ask for a "
                f"smaller reduction."
            )

    def _build(self, model: nn.Module, search_steps: int, dense_widths: tuple | None = None) -> None:
        """The bi-mask, cost model and hooks on ``model``; ``dense_widths`` when it was shrunk (a resumed run)."""
        device = next(model.parameters()).device
        self._dense_widths = dense_widths or model_widths(model)
        modules = searched_modules(model, self.config, self.options, self._dense_widths)
        self.mask = BiMask(modules, self.options.initial_score, device)
        self.cost = WidthCost(model)  # its coefficients are per unit and per channel: the same on a shrunk model
        self.total_steps = search_steps
        self._attach(model)
        if self.options.pmim:
            self.pmim = PatchMaskReconstruction(model, seed=self.seed).to(device)
            self._schedule_pmim()

    def _schedule_pmim(self) -> None:
        warmup = max(1, round(self.options.warmup_fraction * self.total_steps))
        progress = min(1.0, self.step / warmup)
        o = self.options
        self.pmim.step = self.step
        self.pmim.ratio = o.mask_ratio_start + (o.mask_ratio_end - o.mask_ratio_start) * progress

    def _own_parameters(self) -> list[nn.Parameter]:
        return [*self.mask.parameters(), *(self.pmim.parameters() if self.pmim is not None else ())]

    def _attach(self, model: nn.Module) -> None:
        layers = find_encoder_layers(model)
        self._hooks.append(model.register_forward_pre_hook(self._refresh))
        for i, module in enumerate(self.mask.searched):
            if module.kind == "heads":
                layer = layers[module.layer]
                self._hooks.append(layer.attention.o_proj.register_forward_pre_hook(self._head_hook(i, layer)))
            elif module.kind == "head_dims":
                layer = layers[module.layer]
                for name in ("q_proj", "k_proj", "v_proj"):
                    hook = self._head_dim_hook(i, layer)
                    self._hooks.append(getattr(layer.attention, name).register_forward_hook(hook))
            elif module.kind == "neurons":
                self._hooks.append(layers[module.layer].mlp_out.register_forward_pre_hook(self._neuron_hook(i)))
            else:
                for norm in residual_layer_norms(model):
                    self._hooks.append(norm.register_forward_hook(self._embedding_hook(i)))

    def _remove_mask_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def _detach(self) -> None:
        """Remove every hook of the search (the bi-mask's and PMIM's) from the model."""
        self._remove_mask_hooks()
        self._current = None
        if self.pmim is not None:
            self.pmim.remove()
            self.pmim = None

    @property
    def mix(self) -> float:
        warmup = max(1, round(self.options.warmup_fraction * self.total_steps))
        progress = min(1.0, self.step / warmup)
        return self.options.mix_start + (self.options.mix_end - self.options.mix_start) * progress

    def _refresh(self, module, args):
        self._current = self.mask.multipliers(self.mix)
        embedding = [i for i, m in enumerate(self.mask.searched) if m.kind == "embedding"]
        if self.pmim is not None and embedding:
            self.pmim.channel_gate = self.mask.alive(embedding[0])  # the decoder reads removed channels as zeros

    def _multiplier(self, i: int, like: torch.Tensor) -> torch.Tensor:
        return self._current[i][0].to(dtype=like.dtype)

    def _head_hook(self, i: int, layer):
        def hook(module, args):
            hidden = args[0]
            gate = self._multiplier(i, hidden)
            if len(gate) != hidden.shape[-1]:  # one score per head, not per channel
                gate = gate.repeat_interleave(layer.head_dim)
            return (hidden * gate, *args[1:])
        return hook

    def _head_dim_hook(self, i: int, layer):
        def hook(module, args, output):
            return output * self._multiplier(i, output).repeat(layer.num_heads)
        return hook

    def _neuron_hook(self, i: int):
        def hook(module, args):
            return (args[0] * self._multiplier(i, args[0]), *args[1:])
        return hook

    def _embedding_hook(self, i: int):
        def hook(norm, args, output):
            hidden = args[0]
            multiplier, prefix = self._current[i]
            return gated_layer_norm(norm, hidden, multiplier.to(hidden.dtype), weights=prefix.to(hidden.dtype))
        return hook

    def parameter_groups(self) -> list[dict]:
        groups = [
            {"params": list(self.mask.scores), "lr": self.options.score_learning_rate, "weight_decay": 0.0},
            {"params": list(self.mask.logits), "lr": self.options.arch_learning_rate, "weight_decay": 0.0,
             **({"lr_schedule": "constant"} if self.options.arch_schedule == "constant" else {})},
        ]
        if self.pmim is not None:
            groups.append({"params": list(self.pmim.parameters()), "lr": self.options.decoder_learning_rate,
                           "weight_decay": 0.0})
        return groups

    def before_optimizer_step(self, model: nn.Module) -> None:
        average_over_processes(self._own_parameters())

    def _widths(self, values: list) -> tuple[list, list, list, object]:
        """(heads, head dims, neurons per layer, embedding width): ``values`` where searched, else the dense ones."""
        heads, dims, neurons, width = self._dense_widths
        heads, dims, neurons = list(heads), list(dims), list(neurons)  # copies: the dense ones stay
        for module, value in zip(self.mask.searched, values):
            if module.kind == "heads":
                heads[module.layer] = value
            elif module.kind == "head_dims":
                dims[module.layer] = value
            elif module.kind == "neurons":
                neurons[module.layer] = value
            else:
                width = value
        return heads, dims, neurons, width

    def _cost_at(self, values: list):
        return self.cost.measure(self.config.budget.metric, *self._widths(values))

    def loss_terms(self, model, inputs, outputs) -> dict[str, torch.Tensor]:
        mask, options = self.mask, self.options
        expected = [mask.expected_width(i) for i in range(len(mask.searched))]
        cost = self._cost_at(expected)
        constraint = ((cost - self.target) / self.dense_measure).square()
        one_hot = torch.stack([one_hot_loss(mask.probabilities(i), mask.active(i))
                               for i in range(len(mask.searched))]).mean()
        l1 = sum((torch.sigmoid(s) * mask.score_alive(i)).sum() for i, s in enumerate(mask.scores))
        self._logs["ofb_expected_cost_ratio"] = float(cost.detach()) / self.dense_measure
        terms = {
            "ofb_budget": options.flops_weight * constraint,
            "ofb_one_hot": options.one_hot_weight * one_hot,
            "ofb_l1": options.l1_weight * l1,
        }
        reconstruction = self.pmim.loss() if self.pmim is not None else None
        if reconstruction is not None:
            logits = classification_logits(outputs)[0]
            label_loss = nn.functional.cross_entropy(logits.detach().float(), inputs["labels"])
            scale = (label_loss / reconstruction.detach().clamp_min(1e-12)).detach()
            terms["ofb_pmim"] = options.pmim_weight * scale * reconstruction
        return terms

    def on_step_end(self, model, step: int) -> None:
        self.step = step
        if self.pmim is not None:
            self._schedule_pmim()
        warmup = round(self.options.warmup_fraction * self.total_steps)
        if step > warmup and step % self.options.shrink_interval == 0:
            self.shrink()

    @torch.no_grad()
    def shrink(self) -> None:
        """Average the logits over processes, drop candidates below ``shrink_threshold / K``, and remove the units
        outside a module's widest remaining candidate (sliced out by the trainer with ``physical_shrinking``)."""
        mask = self.mask
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        for i in range(len(mask.searched)):
            if distributed:
                torch.distributed.all_reduce(mask.logits[i].data)
                mask.logits[i].data /= torch.distributed.get_world_size()
            active = mask.active(i)
            k = int(active.sum())
            if k <= 1:
                continue
            probabilities = mask.probabilities(i)
            keep = active & (probabilities >= self.options.shrink_threshold / k)
            keep[int(torch.argmax(probabilities))] = True
            active.copy_(keep)
            if mask.remove_outside(i) and self.options.physical_shrinking:
                self._to_slice.append(i)
        self._logs["ofb_active_candidates"] = float(sum(int(mask.active(i).sum()) for i in range(len(mask.searched))))

    def log_values(self) -> dict[str, float]:
        return dict(self._logs)

    def pending_compaction(self) -> PruningPlan | None:
        """The units the last shrink removed, for the trainer to slice out (indices into the model as it is)."""
        if not self._to_slice:
            return None
        kept: dict[str, dict] = {kind: {} for kind in KINDS}
        for i in self._to_slice:
            module = self.mask.searched[i]
            kept[module.kind][module.layer] = torch.nonzero(self.mask.alive(i)).flatten().tolist()
        return PruningPlan(heads=kept["heads"], neurons=kept["neurons"],
                           other_units={"head_dims": kept["head_dims"]} if kept["head_dims"] else {},
                           embedding=kept["embedding"].get(None))

    def after_compaction(self, model, plan, replace_parameters) -> None:
        """Slice the scores (and with the embedding width, PMIM's mask token and decoder inputs) like the model,
        and hook the bi-mask onto the new modules."""
        mask, swaps, removed = self.mask, [], 0
        sliced = {i: torch.nonzero(mask.alive(i)).flatten() for i in self._to_slice}
        dims = {mask.searched[i].layer: kept for i, kept in sliced.items() if mask.searched[i].kind == "head_dims"}
        for i, module in enumerate(mask.searched):
            channels = dims.get(module.layer) if module.kind == "heads" and module.channels > 1 else None
            if i not in sliced and channels is None:
                continue  # a head scored by its channels is sliced with its layer's head dims
            kept = sliced.get(i, torch.arange(module.size, device=mask.alive(i).device))
            removed += module.size - len(kept)
            swaps.append(mask.keep_units(i, kept, channels))
            if module.kind == "embedding" and self.pmim is not None:
                swaps.extend(self.pmim.keep_channels(kept))
        replace_parameters(swaps)
        self._logs["ofb_sliced_units"] = self._logs.get("ofb_sliced_units", 0.0) + removed
        self._to_slice = []
        self._remove_mask_hooks()
        self._attach(model)

    # ------------------------------------------------------------------ the end of the search

    @torch.no_grad()
    def finalize(self, model) -> PruningPlan:
        """Fuse the remaining multipliers into the weights at the chosen widths; exact budget on heads/neurons."""
        mask = self.mask
        self._detach()
        layers = find_encoder_layers(model)
        minimums = self.unit_minimums(model)
        widths = self._feasible_widths(model, {i: mask.chosen_width(i) for i in range(len(mask.searched))}, minimums)
        kept = self._kept_units(widths)
        scales: dict[str, dict] = {kind: {} for kind in KINDS}
        for i, module in enumerate(mask.searched):
            inside = (mask.ranks(i) < widths[i]).to(torch.float32)
            scales[module.kind][module.layer] = (self.mix * torch.sigmoid(mask.scores[i])
                                                 + (1 - self.mix) * mask.per_score(i, inside))
        self.searched_widths = {module.key: widths[i] for i, module in enumerate(mask.searched)}
        for layer_index, scale in scales["heads"].items():
            layer = layers[layer_index]
            o_proj = layer.attention.o_proj
            if len(scale) != o_proj.in_features:  # one score per head, not per channel
                scale = scale.repeat_interleave(layer.head_dim)
            o_proj.weight.mul_(scale.to(o_proj.weight)[None, :])
        for layer_index, scale in scales["head_dims"].items():
            layer = layers[layer_index]
            for name in ("q_proj", "k_proj", "v_proj"):
                linear = getattr(layer.attention, name)
                rows = scale.to(linear.weight).repeat(layer.num_heads)
                linear.weight.mul_(rows[:, None])
                if linear.bias is not None:
                    linear.bias.mul_(rows)
        for layer_index, scale in scales["neurons"].items():
            out = layers[layer_index].mlp_out
            out.weight.mul_(scale.to(out.weight)[None, :])
        for scale in scales["embedding"].values():
            for norm in residual_layer_norms(model):
                if norm.weight is not None:
                    norm.weight.mul_(scale.to(norm.weight))
                if norm.bias is not None:
                    norm.bias.mul_(scale.to(norm.bias))
        plan = self._exact_selection(model, self._narrowing(kept), kept, mask, minimums)
        self.mask = None
        return plan

    def _kept_units(self, widths: dict[int, int]) -> dict[str, dict]:
        """kind -> layer (None: the embedding) -> the units ``widths`` (module -> width) keep, by importance."""
        kept: dict[str, dict] = {kind: {} for kind in KINDS}
        for i, module in enumerate(self.mask.searched):
            kept[module.kind][module.layer] = sorted(torch.nonzero(self.mask.ranks(i) < widths[i]).flatten().tolist())
        return kept

    @staticmethod
    def _narrowing(kept: dict[str, dict]) -> PruningPlan:
        """The head dims and embedding channels of ``kept`` (:meth:`_kept_units`) as a plan."""
        return PruningPlan(other_units={"head_dims": kept["head_dims"]}, embedding=kept["embedding"].get(None))

    def unit_minimums(self, model: nn.Module) -> dict[str, list[int]]:
        """Per layer, the fewest heads and MLP neurons the final selection may keep: the search grid's narrowest
        candidate (``head_step`` heads, ``min_mlp_fraction`` of the dense MLP), and at least the config's
        ``min_heads_per_layer`` / ``min_neurons_per_layer``."""
        floors = {"heads": self.config.min_heads_per_layer, "neurons": self.config.min_neurons_per_layer}
        minimums = {kind: [floor] * len(find_encoder_layers(model)) for kind, floor in floors.items()}
        for module in self.mask.searched:
            if module.kind in minimums:
                minimums[module.kind][module.layer] = max(floors[module.kind], min(module.candidates))
        return minimums

    def _cost_of(self, model: nn.Module, narrowing: PruningPlan, minimums: dict[str, list[int]] | None = None
                 ) -> float:
        """The budget measure of the narrowed model with every head and neuron kept, or with ``minimums``: every
        layer at its fewest heads and neurons."""
        if minimums is None:
            return float(self.config.budget.measure(model_stats(model, narrowing)))
        layers = find_encoder_layers(model)
        heads = {layer.index: list(range(min(m, layer.num_heads))) for layer, m in zip(layers, minimums["heads"])}
        neurons = {layer.index: list(range(min(m, layer.num_neurons))) for layer, m in zip(layers, minimums["neurons"])}
        plan = PruningPlan(heads=heads if self.config.prune_heads else {},
                           neurons=neurons if self.config.prune_neurons else {},
                           allow_empty_attention=True, allow_empty_mlp=True,
                           other_units=narrowing.other_units, embedding=narrowing.embedding)
        return float(self.config.budget.measure(model_stats(model, plan)))

    def _feasible_widths(self, model: nn.Module, widths: dict[int, int], minimums: dict[str, list[int]]
                         ) -> dict[int, int]:
        """``widths`` with head dims and the embedding width moved until the final selection can meet the budget
        exactly, which adjusts only heads and neurons.

        Narrowing: when the searched head dims and embedding width leave too little of the budget for every layer's
        minimum heads and neurons (:meth:`unit_minimums`), the selection would cut them below the search grid (MLPs
        of 1 or 2 neurons were seen at 60%). One module at a time steps down to its next narrower candidate until the
        minimums fit: the step to the likeliest candidate first, among equals the module widest relative to its
        dense width (so that a search sure of its widths narrows them evenly).

        Widening, the mirror: when they leave the model under the budget with every head and neuron kept (an
        embedding of half the dense width at 60% FLOPs left 33% of them, not 40%), the selection cannot spend the
        rest. One module at a time steps up to its next wider candidate whose units the search still has, likeliest
        first, among equals the module narrowest relative to its dense width, as long as the minimums still fit.
        """
        mask, widths = self.mask, dict(widths)

        def steps(wider: bool) -> list[tuple]:
            """(likelihood, preference, -i, i, width) of every module's next candidate in one direction."""
            found = []
            for i, module in enumerate(mask.searched):
                if module.kind not in ("head_dims", "embedding"):
                    continue
                alive = int(mask.alive(i).sum())  # shrinking removed the units past the widest active candidate
                beyond = [c for c, width in enumerate(module.candidates)
                          if (widths[i] < width <= alive if wider else width < widths[i])]
                if beyond:
                    step = (min if wider else max)(beyond, key=lambda c: module.candidates[c])  # the next one
                    relative = widths[i] / max(module.candidates)
                    found.append((float(mask.probabilities(i).detach()[step]), -relative if wider else relative,
                                  -i, i, module.candidates[step]))
            return sorted(found, reverse=True)

        def cost(candidate: dict[int, int], minimums=None) -> float:
            return self._cost_of(model, self._narrowing(self._kept_units(candidate)), minimums)

        while cost(widths, minimums) > self.target:
            narrower = steps(wider=False)
            if not narrower:
                break  # cannot happen when the grid's narrowest model fits (setup checks it)
            *_, i, width = narrower[0]
            widths[i] = width
        while cost(widths) < self.target:
            wider = [(i, width) for *_, i, width in steps(wider=True)
                     if cost({**widths, i: width}, minimums) <= self.target]
            if not wider:
                break
            i, width = wider[0]
            widths[i] = width
        return widths

    def _exact_selection(self, model, narrowing: PruningPlan, kept: dict, mask: BiMask,
                         minimums: dict[str, list[int]]) -> PruningPlan:
        """Heads and neurons chosen to meet the budget on the narrowed model, keeping the searched widths where
        the budget allows.

        ``select_plan`` ranks units by score per unit of cost, so a unit's score here is its cost times
        ``2 + sigmoid(s)`` if the search kept it (or it was not searched) and ``sigmoid(s)`` if not: every
        kept unit ranks before every dropped one whatever it costs, and within each group the importance
        decides which units are added or removed to land on the budget.
        """
        budget = self.config.budget
        narrowed = compacted_shapes(model, narrowing)
        current = float(budget.measure(model_stats(narrowed)))
        fraction = 1 - self.target / current
        if fraction <= 0:
            logger.warning("OFB: the searched head dims and embedding width alone remove more than the budget "
                           "(%.1f%% of the dense %s left); heads and MLP neurons are all kept.",
                           100 * current / self.dense_measure, budget.unit_name)
            return PruningPlan(other_units=narrowing.other_units, embedding=narrowing.embedding)
        target = Budget(budget.metric, fraction)
        costs = unit_costs(narrowed, target)
        score_of = {(m.kind, m.layer): i for i, m in enumerate(mask.searched)}
        scores = {"heads": [], "neurons": []}
        for layer in find_encoder_layers(model):
            for kind, size in (("heads", layer.num_heads), ("neurons", layer.num_neurons)):
                cost = float(costs[kind][layer.index])
                i = score_of.get((kind, layer.index))
                if i is None:  # not searched: kept whole, like the units the search kept
                    scores[kind].append(torch.full((size,), 3.0 * cost, dtype=torch.float64))
                    continue
                score = mask.importance(i).detach().double().cpu()
                score[kept[kind][layer.index]] += 2.0
                scores[kind].append(score * cost)
        arguments = self.config.selection_arguments()
        for key in ("target_sparsity", "target_flops_reduction"):
            arguments.pop(key)
        arguments.update(min_heads_per_layer=minimums["heads"], min_neurons_per_layer=minimums["neurons"])
        selected = select_plan(narrowed, scores["heads"], scores["neurons"], budget=target, **arguments)
        return PruningPlan(heads=selected.heads, neurons=selected.neurons,
                           allow_empty_attention=selected.allow_empty_attention,
                           allow_empty_mlp=selected.allow_empty_mlp,
                           other_units=narrowing.other_units, embedding=narrowing.embedding)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.mask is None:  # fine-tuning: only what the card says about the search
            return {f"{SEARCHED_PREFIX}{key}": torch.tensor(width, dtype=torch.int64)
                    for key, width in (self.searched_widths or {}).items()}
        tensors = {f"{PREFIX}{k}": v.detach().clone() for k, v in self.mask.state_dict().items()}
        if self.pmim is not None:
            tensors.update({f"{PMIM_PREFIX}{k}": v.detach().clone() for k, v in self.pmim.state_dict().items()})
        tensors[f"{PREFIX}seed"] = torch.tensor(self.seed, dtype=torch.int64)
        tensors[f"{PREFIX}step"] = torch.tensor(self.step, dtype=torch.int64)
        tensors[f"{PREFIX}total_steps"] = torch.tensor(self.total_steps, dtype=torch.int64)
        tensors[f"{PREFIX}target"] = torch.tensor(self.target, dtype=torch.float64)
        tensors[f"{PREFIX}dense_measure"] = torch.tensor(self.dense_measure, dtype=torch.float64)
        heads, dims, neurons, width = self._dense_widths
        for name, values in (("heads", heads), ("head_dims", dims), ("neurons", neurons), ("embedding", [width])):
            tensors[f"{DENSE_PREFIX}{name}"] = torch.tensor(values, dtype=torch.int64)
        return tensors

    def load_state_dict(self, state: dict[str, torch.Tensor], model) -> None:
        searched = {k[len(SEARCHED_PREFIX):]: int(v) for k, v in state.items() if k.startswith(SEARCHED_PREFIX)}
        if searched:  # a fine-tuning checkpoint: the search is over
            self.searched_widths = searched
            return
        pmim = {k[len(PMIM_PREFIX):]: v for k, v in state.items() if k.startswith(PMIM_PREFIX)}
        own = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX) and not k.startswith(PMIM_PREFIX)}
        if not own:
            return
        self.seed = int(own.pop("seed", torch.tensor(0)))
        self.step = int(own.pop("step"))
        dense_key = DENSE_PREFIX[len(PREFIX):]
        dense = {k[len(dense_key):]: own.pop(k).tolist() for k in list(own) if k.startswith(dense_key)}
        widths = (dense["heads"], dense["head_dims"], dense["neurons"], dense["embedding"][0]) if dense else None
        self._build(model, int(own.pop("total_steps")), widths)
        self.target = float(own.pop("target"))
        self.dense_measure = float(own.pop("dense_measure"))
        device = next(model.parameters()).device
        self.mask.load_state_dict({k: v.to(device) for k, v in own.items()})
        if self.pmim is not None:
            self.pmim.load_state_dict({k: v.to(device) for k, v in pmim.items()})

    # ------------------------------------------------------------------ the card

    def card_recipe(self) -> list[str]:
        o = self.options
        searched = ["heads" if self.config.prune_heads else None, "head dims" if o.search_head_dims else None,
                    "MLP width" if self.config.prune_neurons else None,
                    "embedding width" if o.search_embedding else None]
        lines = [
            f"Schedule: an OFB search over {', '.join(s for s in searched if s)} for the first {o.search_fraction:.0%} "
            f"of the optimizer steps (mask mixing weight {o.mix_start} -> {o.mix_end} over the first "
            f"{o.warmup_fraction:.0%} of the search, candidates below {o.shrink_threshold}/K dropped every "
            f"{o.shrink_interval} steps after it), then the remaining multipliers fused into the weights, an exact "
            f"selection of heads and neurons onto the budget, physical compaction, and fine-tuning of the compacted "
            f"model for the remaining steps.",
            f"Loss: classification + {o.flops_weight} x squared relative budget gap + {o.one_hot_weight} x adaptive "
            f"one-hot loss + {o.l1_weight} x L1 of the importance masks"
            + (f" + {o.pmim_weight} x PMIM reconstruction of masked patches ({o.mask_ratio_start:.0%} -> "
               f"{o.mask_ratio_end:.0%} of the patches over the warm-up), rescaled to the classification loss."
               if o.pmim else "."),
        ]
        if self.searched_widths:
            lines.append("Searched widths: " + ", ".join(f"{k} {v}" for k, v in self.searched_widths.items()) + ".")
        return lines

    def citations(self) -> list[dict[str, str]]:
        return [OFB_CITATION]
