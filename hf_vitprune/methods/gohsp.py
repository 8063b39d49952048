"""GOHSP (Yin et al., AAAI 2023): graph-ranked heads as ADMM's soft guideline.

Heads are ranked once by the stationary distribution of a Markov chain over head correlations
(:func:`hf_vitprune.importance.score_graph`); at every Z-step a head's score is that importance
``** importance_alpha`` times its normalised group norm of W + U, and MLP neurons are scored by
their group norm (the plain Euclidean projection).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..importance import EDGE_STATISTICS, ImportanceOptions, UnitScores, check_edge_statistic, score_graph
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
        default=1.0, **_help("Weight of the graph importance in the head score: importance**alpha * normalised norm.")
    )

    def __post_init__(self):
        super().__post_init__()
        check_edge_statistic(self.edge_statistic, f"{type(self).__name__}.edge_statistic")
        self._check_number("damping", low=0, high=1)
        self._check_number("ranking_tolerance", low=0)
        self._check_int("ranking_max_iterations", 1)
        self._check_number("importance_alpha", low=0, low_open=False)

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

    def rank(self, context: SearchContext) -> UnitScores:
        return score_graph(context.model, context.calibration_batches(), options=self.options.importance_options())

    def projection_scores(self, head_norms, neuron_norms):
        return combine_scores(self.importance.heads, head_norms, self.options.importance_alpha), neuron_norms

    def ranking_sentence(self) -> str:
        options = self.options
        return (f"{super().ranking_sentence()}; head graph with edge statistic `{options.edge_statistic}`, "
                f"damping {options.damping}, importance exponent {options.importance_alpha}")

    def citations(self) -> list[dict[str, str]]:
        return [GOHSP_CITATION, *super().citations()]


__all__ = ["EDGE_STATISTICS", "GOHSP", "GOHSPOptions"]
