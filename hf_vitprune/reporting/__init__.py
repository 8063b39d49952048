"""Reporting on a pruning run: the run record, the model card, the dense-vs-pruned table and the Hub upload.

The trainer produces a :class:`PruningReport` (``PruningTrainer.run_record()``); the card, the
``hf-vitprune`` command line and the recipe's printout render from it, and the comparison table
they all show is built once, in :mod:`.table`.
"""

from .card import (
    CARD_FILE,
    DISTILLATION_CITATION,
    card_data,
    eval_results,
    render_model_card,
    rerender_model_card,
    template_path,
    write_model_card,
)
from .hub import HUB_FILE_PATTERNS, hub_files, push_model_directory
from .report import (
    REPORT_FILE,
    PruningReport,
    dataset_name,
    governing_schedule,
    hub_model_id,
    informative_metrics,
    library_versions,
    metrics_from_logs,
    model_mismatch,
    stats_from_dict,
    training_summary,
)
from .table import Row, comparison_rows, latency_ratio, markdown_rows, text_table

__all__ = [
    "CARD_FILE",
    "DISTILLATION_CITATION",
    "HUB_FILE_PATTERNS",
    "REPORT_FILE",
    "PruningReport",
    "Row",
    "card_data",
    "comparison_rows",
    "dataset_name",
    "eval_results",
    "governing_schedule",
    "hub_files",
    "hub_model_id",
    "informative_metrics",
    "latency_ratio",
    "library_versions",
    "markdown_rows",
    "metrics_from_logs",
    "model_mismatch",
    "push_model_directory",
    "render_model_card",
    "rerender_model_card",
    "stats_from_dict",
    "template_path",
    "text_table",
    "training_summary",
    "write_model_card",
]
