"""Top-1 and top-5 accuracy as a local ``evaluate`` module (``evaluate.load("accuracy")`` needs the Hub)."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Fraction of examples whose label is the arg-max (top-1) or among the 5 highest logits (top-5)."
_KWARGS = """
Args:
    predictions: logits of shape (n, num_classes).
    references: integer labels of shape (n,).
Returns:
    top1: top-1 accuracy; top5: top-5 accuracy, only when there are more than 5 classes (with 5 or
    fewer, every label is among the 5 highest logits and top-5 accuracy says nothing).
"""
TOP_K = 5


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class TopKAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float32")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references):
        logits = np.asarray(predictions, dtype=np.float32)
        labels = np.asarray(references)
        top = np.argsort(-logits, axis=1)[:, :TOP_K]
        result = {"top1": float((top[:, 0] == labels).mean())}
        if logits.shape[1] > TOP_K:
            result[f"top{TOP_K}"] = float((top == labels[:, None]).any(axis=1).mean())
        return result
