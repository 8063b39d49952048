"""Pruning methods: one module each, registered by name (``PruningConfig(method=...)``).

Add a method by subclassing :class:`PruningMethod` (with a :class:`MethodOptions` dataclass for
its options) and decorating it with :func:`register_method`; see ``docs/architecture.md``.
"""

from .base import (
    METHODS,
    MethodOptions,
    PruningMethod,
    SearchContext,
    get_method,
    register_method,
    unregister_method,
)
from .admm import ADMMOptions, ADMMSearch, ADMMState, balance_kinds, combine_scores  # noqa: E402
from .baselines import Magnitude, Random, RandomOptions, Taylor, TaylorOptions  # noqa: E402
from .gohsp import GOHSP, GOHSPOptions  # noqa: E402
from .ofb import OFB, OFBOptions  # noqa: E402
from .spvit_tokens import SPViTTokens, TokenPruningOptions  # noqa: E402
from .spvit_conv import ConvSearchOptions, SPViTConv  # noqa: E402

DEFAULT_METHOD = GOHSP.name  # what PruningConfig() prunes with


def method_card(config) -> dict:
    """What the model card says about ``config``'s method: description, recipe sentences, citations."""
    return get_method(config.method)(config).card_info()


__all__ = [
    "ADMMOptions",
    "ADMMSearch",
    "ADMMState",
    "ConvSearchOptions",
    "DEFAULT_METHOD",
    "GOHSP",
    "GOHSPOptions",
    "METHODS",
    "OFB",
    "OFBOptions",
    "Magnitude",
    "MethodOptions",
    "PruningMethod",
    "Random",
    "RandomOptions",
    "SPViTConv",
    "SPViTTokens",
    "SearchContext",
    "Taylor",
    "TaylorOptions",
    "TokenPruningOptions",
    "balance_kinds",
    "combine_scores",
    "get_method",
    "method_card",
    "register_method",
    "unregister_method",
]
