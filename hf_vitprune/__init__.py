"""hf_vitprune: structured pruning of Hugging Face vision transformers.

Importing it registers the pruned architectures with transformers' Auto classes.
"""

from .admm import ADMMState, combine_scores
from .budget import select_plan
from .config import PruningConfig
from .modeling import register_auto_classes
from .plan import PruningPlan
from .stats import LayerStats, ModelStats, model_stats
from .surgery import UnitMasks, apply_plan, attach_masks
from .trainer import PruningTrainer

register_auto_classes()

__version__ = "0.1.0"

__all__ = [
    "ADMMState",
    "LayerStats",
    "ModelStats",
    "PruningConfig",
    "PruningPlan",
    "PruningTrainer",
    "UnitMasks",
    "apply_plan",
    "attach_masks",
    "combine_scores",
    "model_stats",
    "select_plan",
]
