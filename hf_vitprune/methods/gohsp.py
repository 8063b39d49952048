"""GOHSP (Yin et al., AAAI 2023): a graph ranking of heads on a loss-calibrated currency, as the soft
guideline of an ADMM search over heads and MLP neurons.

The ranking, computed once on the dense model from the calibration images:

- every head and MLP neuron gets a *currency*, the estimated loss increase its removal causes, on
  one scale for heads and neurons of every layer (``currency``): group Fisher (default,
  ``(sum w * dL/dw)^2`` averaged over single images, or micro-batches of ``currency_batch_size``), first-order
  Taylor (``|sum w * dL/dw|``) or output energy (what the unit writes into the residual stream,
  which assumes every layer's output matters equally to the loss: measured here, it disagreed with
  loss sensitivity by up to 4x between layers and gave extreme plans). The paper prunes neurons too
  but ranks only heads; the currency is this project's choice (docs/methods.md);
- a *directed* Markov chain over head correlations
  (:func:`hf_vitprune.importance.graph.stationary_importance`), personalised by the heads'
  currency (``teleport="currency"``: the walker restarts at a head in proportion to its loss
  sensitivity and walks from a head to the heads of the layer below that it reads), gives every
  head its stationary mass. A layer's total mass does not depend on the edges (see the graph
  module), so the mass is taken relative to the layer's mean and raised to ``importance_alpha``:
  a head's score is ``currency * (pi / mean of its layer's pi) ** alpha``, and heads of all layers
  are then ranked together with the neurons on that one scale.

At every Z-step a unit's score is that importance times ``(its group norm of W + U / the largest
of its layer) ** norm_exponent``, so units that ADMM has driven towards zero lose their place.
Heads and neurons are compared directly (no per-kind rescaling: they share the currency's scale).
Departures from the paper, which leaves these open: the currency, the direction and the
personalisation of the chain, and the combination (see docs/methods.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..importance import (
    EDGE_STATISTICS,
    ImportanceOptions,
    UnitScores,
    check_edge_statistic,
    empty_calibration_error,
    score_fisher,
    score_taylor,
)
from ..importance.energy import OutputEnergy
from ..importance.graph import collect_calibration_statistics, stationary_importance
from .admm import ADMMOptions, ADMMSearch, _help, combine_scores
from .base import SearchContext, register_method

CURRENCIES = ("fisher", "taylor", "energy")
TELEPORTS = ("currency", "uniform")
CURRENCY_NAMES = {"fisher": "group Fisher (loss sensitivity)", "taylor": "first-order Taylor (loss sensitivity)",
                  "energy": "output energy"}

GOHSP_CITATION = {
    "what": "GOHSP (Yin et al., AAAI 2023, arXiv:2301.05345)",
    "bibtex": """@inproceedings{yin2023gohsp,
  title = {{GOHSP}: A Unified Framework of Graph and Optimization-Based Heterogeneous Structured Pruning for Vision Transformer},
  author = {Yin, Miao and Uzkent, Burak and Shen, Yilin and Jin, Hongxia and Yuan, Bo},
  booktitle = {Proceedings of the AAAI Conference on Artificial Intelligence},
  year = {2023},
  eprint = {2301.05345},
  archivePrefix = {arXiv}
}""",
}


@dataclass
class GOHSPOptions(ADMMOptions):
    """The head graph and how its importance guides the ADMM projection, beside the ADMM schedule."""

    edge_statistic: str = field(
        default="output",
        **_help("Graph edge weight between heads of consecutive layers: 'output' (|corr| of their contributions "
                "to the residual stream) or 'attention' (|corr| of their attention maps)."),
    )
    damping: float = field(default=0.85, **_help("Markov-chain damping (PageRank style); 1 - damping teleports."))
    ranking_tolerance: float = field(default=1e-8, **_help("Power-iteration tolerance for the stationary distribution."))
    ranking_max_iterations: int = field(default=1000, **_help("Power-iteration limit; not converging is an error."))
    importance_alpha: float = field(
        default=1.0,
        **_help("Exponent of a head's graph importance (relative to its layer's mean) in its score; 0 ignores the graph."),
    )
    currency: str = field(
        default="fisher",
        **_help("A unit's loss cost, one scale for all layers: 'fisher', 'taylor' or 'energy'."),
    )
    currency_batch_size: int = field(
        default=1,
        **_help("Images per gradient of the currency; 1 is the same on any number of processes."),
    )
    teleport: str = field(
        default="currency",
        **_help("Where the head chain restarts: 'currency' (by each head's currency) or 'uniform'."),
    )
    norm_exponent: float = field(
        default=0.5,
        **_help("Exponent of the normalised squared group norm of W + U in every score at a projection: 0.5 is the "
                "unsquared norm ratio, 0 ignores the weights."),
    )

    def __post_init__(self):
        super().__post_init__()
        check_edge_statistic(self.edge_statistic, f"{type(self).__name__}.edge_statistic")
        self._check_number("damping", low=0, high=1)
        self._check_number("ranking_tolerance", low=0)
        self._check_int("ranking_max_iterations", 1)
        self._check_number("importance_alpha", low=0, low_open=False)
        self._check_number("norm_exponent", low=0, low_open=False)
        for name, allowed in (("currency", CURRENCIES), ("teleport", TELEPORTS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{type(self).__name__}.{name}={getattr(self, name)!r} is unknown; use one of "
                                 f"{', '.join(map(repr, allowed))}.")
        self._check_int("currency_batch_size", 1)

    def importance_options(self) -> ImportanceOptions:
        return ImportanceOptions(damping=self.damping, tolerance=self.ranking_tolerance,
                                 max_iterations=self.ranking_max_iterations, edge_statistic=self.edge_statistic)


@register_method
class GOHSP(ADMMSearch):
    """Loss-calibrated currency x graph head importance, x group norm at every ADMM projection."""

    name = "gohsp"
    options_class = GOHSPOptions
    description = ("GOHSP: heads and MLP neurons ranked by their loss sensitivity, heads weighted by a graph-based "
                   "(Markov chain) importance, then structured pruning in one shot or by ADMM (Yin et al., AAAI 2023)")

    rescale_kinds = False  # heads and neurons share the currency's scale

    def rank(self, context: SearchContext) -> UnitScores:
        options = self.options
        graph, energy = collect_calibration_statistics(context.model, context.calibration_batches(),
                                                       options.edge_statistic)
        graph.all_reduce()
        energy.all_reduce()
        if graph.num_images == 0:
            raise empty_calibration_error(self.name)
        currency = self.unit_currency(context, energy)
        teleport = currency.heads if options.teleport == "currency" else None
        chain = stationary_importance(graph, options.damping, options.ranking_tolerance,
                                      options.ranking_max_iterations, teleport=teleport)
        heads = [c * relative_to_layer_mean(pi).pow(options.importance_alpha)
                 for c, pi in zip(currency.heads, chain)]
        return UnitScores(heads=heads, neurons=currency.neurons)

    def unit_currency(self, context: SearchContext, energy: OutputEnergy) -> UnitScores:
        """Every unit's estimated loss increase on removal, in ``options.currency`` (same on every process)."""
        options = self.options
        if options.currency == "energy":
            return UnitScores(heads=energy.head_energy(), neurons=energy.neuron_energy(context.model))
        score = score_fisher if options.currency == "fisher" else score_taylor
        return score(context.model, context.calibration_batches(),
                     options=ImportanceOptions(micro_batch_size=options.currency_batch_size))

    def projection_scores(self, head_norms, neuron_norms):
        # importance * (norm / layer max) ** e  ==  combine_scores(importance, norm ** e), as x ** e is increasing
        exponent = self.options.norm_exponent
        return (combine_scores(self.importance.heads, [n.double().pow(exponent) for n in head_norms]),
                combine_scores(self.importance.neurons, [n.double().pow(exponent) for n in neuron_norms]))

    def ranking_sentence(self) -> str:
        options = self.options
        return (f"{super().ranking_sentence()}; heads and MLP neurons by {CURRENCY_NAMES[options.currency]}, heads "
                f"weighted by a directed head graph (edge statistic `{options.edge_statistic}`, damping "
                f"{options.damping}, teleport by {options.teleport}, importance exponent {options.importance_alpha}), "
                f"norm exponent {options.norm_exponent}")

    def citations(self) -> list[dict[str, str]]:
        return [GOHSP_CITATION, *super().citations()]


def relative_to_layer_mean(scores: torch.Tensor) -> torch.Tensor:
    """``scores / scores.mean()`` (1 where the layer's mean is 0): redistributes within a layer only."""
    mean = scores.mean() if scores.numel() else scores.new_zeros(())
    return scores / mean if mean > 0 else torch.ones_like(scores)


__all__ = ["CURRENCIES", "EDGE_STATISTICS", "GOHSP", "GOHSPOptions", "TELEPORTS", "relative_to_layer_mean"]
