"""GOHSP (Yin et al., AAAI 2023): a graph ranking of heads and data-driven unit importance as the
soft guideline of an ADMM search over heads and MLP neurons.

The ranking, computed once on the dense model from one calibration pass
(:func:`hf_vitprune.importance.graph.collect_calibration_statistics`):

- every head and MLP neuron gets its *output energy*, the mean squared norm of what it writes
  into the residual stream (:mod:`hf_vitprune.importance.energy`): an estimate of the loss
  increase its removal causes, on one scale for heads and neurons of every layer. This is the
  paper's "soft guideline" extended to neurons, which the paper prunes too but does not rank;
- within each layer a head's energy is weighted by its stationary probability in the *directed*
  Markov chain over head correlations (:func:`hf_vitprune.importance.graph.stationary_importance`),
  relative to the layer's mean and raised to ``importance_alpha``: heads that feed heads that
  matter downstream keep more.

At every Z-step a unit's score is that importance times ``(its group norm of W + U / the largest
of its layer) ** norm_exponent``, so units that ADMM has driven towards zero lose their place.
Heads and neurons are compared directly (no per-kind rescaling: they share the energy scale).
Departures from the paper, which leaves these open: the energy scale, the direction of the
chain and the combination (see docs/methods.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..importance import EDGE_STATISTICS, ImportanceOptions, UnitScores, check_edge_statistic, empty_calibration_error
from ..importance.graph import collect_calibration_statistics, stationary_importance
from .admm import ADMMOptions, ADMMSearch, _help, combine_scores
from .base import SearchContext, register_method

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

    def importance_options(self) -> ImportanceOptions:
        return ImportanceOptions(damping=self.damping, tolerance=self.ranking_tolerance,
                                 max_iterations=self.ranking_max_iterations, edge_statistic=self.edge_statistic)


@register_method
class GOHSP(ADMMSearch):
    """Graph head importance x group norm at every ADMM projection; neurons by group norm."""

    name = "gohsp"
    options_class = GOHSPOptions
    description = ("GOHSP: attention heads ranked by a graph-based (Markov chain) importance, then ADMM-based "
                   "structured pruning of heads and MLP neurons (Yin et al., AAAI 2023)")

    rescale_kinds = False  # heads and neurons share the output-energy scale

    def rank(self, context: SearchContext) -> UnitScores:
        options = self.options
        graph, energy = collect_calibration_statistics(context.model, context.calibration_batches(),
                                                       options.edge_statistic)
        graph.all_reduce()
        energy.all_reduce()
        if graph.num_images == 0:
            raise empty_calibration_error(self.name)
        chain = stationary_importance(graph, options.damping, options.ranking_tolerance,
                                      options.ranking_max_iterations)
        heads = [e * relative_to_layer_mean(pi).pow(options.importance_alpha)
                 for e, pi in zip(energy.head_energy(), chain)]
        return UnitScores(heads=heads, neurons=energy.neuron_energy(context.model))

    def projection_scores(self, head_norms, neuron_norms):
        # importance * (norm / layer max) ** e  ==  combine_scores(importance, norm ** e), as x ** e is increasing
        exponent = self.options.norm_exponent
        return (combine_scores(self.importance.heads, [n.double().pow(exponent) for n in head_norms]),
                combine_scores(self.importance.neurons, [n.double().pow(exponent) for n in neuron_norms]))

    def ranking_sentence(self) -> str:
        options = self.options
        return (f"{super().ranking_sentence()}; heads and MLP neurons by output energy, heads weighted by a directed "
                f"head graph with edge statistic `{options.edge_statistic}`, damping {options.damping}, importance "
                f"exponent {options.importance_alpha}, norm exponent {options.norm_exponent}")

    def citations(self) -> list[dict[str, str]]:
        return [GOHSP_CITATION, *super().citations()]


def relative_to_layer_mean(scores: torch.Tensor) -> torch.Tensor:
    """``scores / scores.mean()`` (1 where the layer's mean is 0): redistributes within a layer only."""
    mean = scores.mean() if scores.numel() else scores.new_zeros(())
    return scores / mean if mean > 0 else torch.ones_like(scores)


__all__ = ["EDGE_STATISTICS", "GOHSP", "GOHSPOptions", "relative_to_layer_mean"]
