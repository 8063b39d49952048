"""hf_vitprune: structured pruning of Hugging Face vision transformers.

Importing it registers the pruned architectures with transformers' Auto classes.
"""

from .budget import Budget, select_plan
from .config import PruningConfig
from .methods import MethodOptions, PruningMethod, register_method
from .modeling import register_auto_classes
from .plan import PruningPlan
from .stats import LayerStats, ModelStats, model_stats
from .surgery import UnitMasks, add_token_pruning, apply_plan, attach_masks, convert_attention
from .trainer import PruningTrainer

register_auto_classes()

__version__ = "0.1.0"

__all__ = [
    "Budget",
    "LayerStats",
    "MethodOptions",
    "ModelStats",
    "PruningConfig",
    "PruningMethod",
    "PruningPlan",
    "PruningTrainer",
    "UnitMasks",
    "add_token_pruning",
    "apply_plan",
    "convert_attention",
    "attach_masks",
    "model_stats",
    "register_method",
    "select_plan",
]
