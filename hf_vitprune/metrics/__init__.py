"""Metrics shipped as local ``evaluate`` modules, loaded by path so that no Hub access is needed."""

from pathlib import Path

import numpy as np

TOP_K_ACCURACY = str(Path(__file__).parent / "top_k_accuracy")


def load_top_k_accuracy():
    import evaluate

    return evaluate.load(TOP_K_ACCURACY)


def make_compute_metrics():
    """A Trainer ``compute_metrics`` giving top-1 and top-5 accuracy (DeiT's two-head output handled).

    ``top5_accuracy`` is reported only for tasks with more than 5 classes: with 5 or fewer it is always 1.
    """
    metric = load_top_k_accuracy()

    def compute_metrics(prediction) -> dict[str, float]:
        logits = prediction.predictions
        if isinstance(logits, tuple):  # DeiT with teacher: (logits, cls_logits, distillation_logits)
            logits = logits[0]
        result = metric.compute(predictions=np.asarray(logits), references=np.asarray(prediction.label_ids))
        metrics = {"accuracy": result["top1"]}
        if "top5" in result:
            metrics["top5_accuracy"] = result["top5"]
        return metrics

    return compute_metrics
