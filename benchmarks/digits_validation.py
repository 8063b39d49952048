"""Validation accuracy and ADMM residual on scikit-learn's digits, for choosing options quickly.

Each variant prunes the quick benchmark's cached dense ViT (``python -m benchmarks.run --quick``
trains it once) to 40% and 60% parameter sparsity with seeds 0 and 1, and prints the mean
validation accuracy per sparsity and the largest residual ||W - Z|| / ||W|| at the hard prune::

    python -m benchmarks.digits_validation --epochs 12 \\
        '{"method": "gohsp"}' '{"method": "gohsp", "norm_exponent": 1.0}' '{"method": "taylor"}'

A variant is a JSON object: ``method`` plus options of that method (others are dropped).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile

import torch

from hf_vitprune import PruningConfig, PruningTrainer
from hf_vitprune.methods import get_method
from hf_vitprune.metrics import make_compute_metrics

from .common import DIGITS_QUICK, Settings, load_data, load_dense, train_or_reuse_dense, training_arguments


def prune(settings: Settings, data, method: str, sparsity: float, seed: int, epochs: float, options: dict):
    known = {f.name for f in dataclasses.fields(get_method(method).options_class)}
    config = PruningConfig(method=method, target_sparsity=sparsity, calibration_samples=settings.calibration_samples,
                           distillation_weight=settings.distillation_weight,
                           method_options={k: v for k, v in options.items() if k in known})
    with tempfile.TemporaryDirectory() as tmp:
        args = training_arguments(settings, tmp, epochs=epochs, learning_rate=settings.prune_learning_rate, seed=seed)
        trainer = PruningTrainer(model=load_dense(settings), args=args, train_dataset=data["train"],
                                 compute_metrics=make_compute_metrics(), pruning_config=config)
        trainer.train()
        accuracy = trainer.evaluate(eval_dataset=data["validation"], metric_key_prefix="validation")
    return accuracy["validation_accuracy"], getattr(trainer.method, "final_residual", None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="+", help='JSON objects, e.g. \'{"method": "gohsp"}\'')
    parser.add_argument("--epochs", type=float, default=12, help="epochs of each pruning run (search + fine-tuning)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    settings = Settings(**DIGITS_QUICK)
    data = load_data(settings)
    train_or_reuse_dense(settings, data)
    for text in args.variants:
        options = json.loads(text)
        method = options.pop("method")
        runs = [(s, *prune(settings, data, method, s, seed, args.epochs, options)) for s in (0.4, 0.6) for seed in (0, 1)]
        means = {s: sum(a for t, a, _ in runs if t == s) / 2 for s in (0.4, 0.6)}
        residuals = [r for _, _, r in runs if r is not None]
        worst = f"{max(residuals):.4f}" if residuals else "n/a"
        print(f"{method} {options}: validation 40% {means[0.4]:.4f}, 60% {means[0.6]:.4f}; "
              f"largest residual at the hard prune {worst}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
