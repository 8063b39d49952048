"""The baselines GOHSP has to beat: the same ADMM search, only the importance differs.

- ``magnitude``: every projection keeps the units with the largest group norm of W + U (plain
  ADMM, Zhang et al. 2018).
- ``taylor``: first-order Taylor importance (Molchanov et al. 2019) ``** importance_alpha`` times
  the normalised group norm, for heads and neurons.
- ``random``: fixed random scores, so the kept set is random however training moves W.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..importance import ImportanceOptions, UnitScores, score_magnitude, score_random, score_taylor
from .admm import ADMMOptions, ADMMSearch, _help, combine_scores
from .base import SearchContext, register_method

TAYLOR_CITATION = {
    "what": "Taylor importance (Molchanov et al., CVPR 2019)",
    "bibtex": """@inproceedings{molchanov2019importance,
  title = {Importance Estimation for Neural Network Pruning},
  author = {Molchanov, Pavlo and Mallya, Arun and Tyree, Stephen and Frosio, Iuri and Kautz, Jan},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year = {2019}
}""",
}


@register_method
class Magnitude(ADMMSearch):
    """Plain ADMM: the Euclidean projection keeps the largest group norms."""

    name = "magnitude"
    description = "magnitude-based ADMM: units ranked by the group norm of their weights (Zhang et al., 2018)"

    def rank(self, context: SearchContext) -> UnitScores:
        return score_magnitude(context.model, None)

    def projection_scores(self, head_norms, neuron_norms):
        return head_norms, neuron_norms


@dataclass
class TaylorOptions(ADMMOptions):
    importance_alpha: float = field(
        default=1.0, **_help("Weight of the Taylor importance in the score: importance**alpha * normalised norm.")
    )

    def __post_init__(self):
        super().__post_init__()
        self._check_number("importance_alpha", low=0, low_open=False)


@register_method
class Taylor(ADMMSearch):
    """Taylor importance x group norm at every projection, for heads and neurons."""

    name = "taylor"
    options_class = TaylorOptions
    description = "first-order Taylor importance of heads and neurons, combined with ADMM"

    def rank(self, context: SearchContext) -> UnitScores:
        return score_taylor(context.model, context.calibration_batches(), options=ImportanceOptions())

    def projection_scores(self, head_norms, neuron_norms):
        alpha = self.options.importance_alpha
        return (combine_scores(self.importance.heads, head_norms, alpha),
                combine_scores(self.importance.neurons, neuron_norms, alpha))

    def citations(self) -> list[dict[str, str]]:
        return [TAYLOR_CITATION, *super().citations()]


@dataclass
class RandomOptions(ADMMOptions):
    random_seed: int = field(default=0, **_help("Seed of the random baseline's scores (identical on every process)."))

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.random_seed, bool) or not isinstance(self.random_seed, int):
            raise ValueError(f"RandomOptions.random_seed={self.random_seed!r} must be an integer.")


@register_method
class Random(ADMMSearch):
    """Fixed random scores: the chance baseline every other method has to beat."""

    name = "random"
    options_class = RandomOptions
    description = "random unit selection (a baseline), with the same ADMM schedule"

    def rank(self, context: SearchContext) -> UnitScores:
        return score_random(context.model, None, options=ImportanceOptions(seed=self.options.random_seed))

    def projection_scores(self, head_norms, neuron_norms):
        return self.importance.heads, self.importance.neurons
