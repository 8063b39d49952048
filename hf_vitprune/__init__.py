"""hf_vitprune: structured pruning of Hugging Face vision transformers.

Importing it registers the pruned architectures with transformers' Auto classes.
"""

from .modeling import register_auto_classes
from .plan import PruningPlan
from .stats import LayerStats, ModelStats, model_stats
from .surgery import UnitMasks, apply_plan, attach_masks

register_auto_classes()

__version__ = "0.1.0"

__all__ = ["LayerStats", "ModelStats", "PruningPlan", "UnitMasks", "apply_plan", "attach_masks", "model_stats"]
