"""Validation accuracy of option variants on the main benchmark model: where the defaults are chosen.

Each variant prunes the cached dense model of a preset (``fashion_mnist``: the main benchmark
model, trained once by ``python -m benchmarks.run``; ``digits``: the quick one, seconds a run) at
every sparsity and seed and prints the mean *validation* accuracy per sparsity, the largest ADMM
residual at the hard prune (and at a mid-search removal) and the seconds per run; the figures are
saved as JSON. The held-out model is not a choice here: nothing is tuned on it (docs/methods.md)::

    python -m benchmarks.validation --preset fashion_mnist --sparsities 0.4 0.6 --seeds 0 \\
        '{"method": "gohsp"}' '{"method": "gohsp", "currency": "energy"}' '{"method": "taylor"}'

A variant is a JSON object: ``method`` (or ``torch_pruning``, the peer) plus options of that method; ``epochs`` in it overrides
``--epochs`` for that variant. Runs go ``--workers`` at a time, one process and one torch thread each.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from hf_vitprune import PruningConfig, PruningTrainer
from hf_vitprune.fileio import atomic_directory
from hf_vitprune.methods import get_method
from hf_vitprune.metrics import make_compute_metrics

from . import torch_pruning_peer
from .common import DIGITS_QUICK, FASHION_MNIST, Settings, load_data, load_dense, train_or_reuse_dense, training_arguments

PRESETS = {"fashion_mnist": FASHION_MNIST, "digits": DIGITS_QUICK}


def prune(settings: Settings, data, method: str, sparsity: float, seed: int, epochs: float, options: dict) -> dict:
    """One pruning run from the cached dense model; its validation accuracy and residuals."""
    known = {f.name for f in dataclasses.fields(get_method(method).options_class)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise SystemExit(f"Method {method!r} has no option(s) {unknown}.")
    config = PruningConfig(method=method, target_sparsity=sparsity, calibration_samples=settings.calibration_samples,
                           distillation_weight=settings.distillation_weight, method_options=options)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        args = training_arguments(settings, tmp, epochs=epochs, learning_rate=settings.prune_learning_rate, seed=seed)
        trainer = PruningTrainer(model=load_dense(settings), args=args, train_dataset=data["train"],
                                 compute_metrics=make_compute_metrics(), pruning_config=config)
        trainer.train()
        accuracy = trainer.evaluate(eval_dataset=data["validation"], metric_key_prefix="validation")
    logs = trainer.method.log_values()
    return {"sparsity": sparsity, "seed": seed, "validation_accuracy": accuracy["validation_accuracy"],
            "residual": logs.get("admm_residual_at_hard_prune"), "removal_residual": logs.get("admm_residual_at_removal"),
            "seconds": time.perf_counter() - started}


def peer(settings: Settings, data, sparsity: float, seed: int, epochs: float) -> dict:
    """The Torch-Pruning peer's run (``benchmarks.torch_pruning_peer``) at the same epochs; its validation accuracy."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        record = torch_pruning_peer.prune_once(dataclasses.replace(settings, prune_epochs=epochs), data, sparsity,
                                               seed, tmp)
    return {"sparsity": sparsity, "seed": seed, "validation_accuracy": record["validation_accuracy"],
            "residual": None, "removal_residual": None, "seconds": time.perf_counter() - started}


def _worker(settings_dict: dict, method: str, sparsity: float, seed: int, epochs: float, options: dict) -> dict:
    torch.set_num_threads(1)
    settings = Settings(**settings_dict)
    if method == torch_pruning_peer.NAME:
        return peer(settings, load_data(settings), sparsity, seed, epochs)
    return prune(settings, load_data(settings), method, sparsity, seed, epochs, options)


def summary(method: str, options: dict, runs: list[dict]) -> str:
    parts = []
    for sparsity in sorted({run["sparsity"] for run in runs}):
        accuracies = [run["validation_accuracy"] for run in runs if run["sparsity"] == sparsity]
        parts.append(f"{sparsity:.0%}: {100 * statistics.mean(accuracies):.2f}")
    residuals = [r for run in runs for r in (run["residual"], run["removal_residual"]) if r is not None]
    worst = f"{max(residuals):.3f}" if residuals else "n/a"
    seconds = statistics.mean(run["seconds"] for run in runs)
    return f"{method} {json.dumps(options)}: validation {', '.join(parts)}; largest residual {worst}; {seconds:.0f} s/run"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="+", help='JSON objects, e.g. \'{"method": "gohsp"}\'')
    parser.add_argument("--preset", choices=sorted(PRESETS), default="fashion_mnist")
    parser.add_argument("--cache_dir", help="the dense model's cache (default: the preset's)")
    parser.add_argument("--epochs", type=float, help="epochs of each pruning run (default: the preset's prune_epochs)")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.4, 0.6])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--workers", type=int, default=2, help="runs in parallel, one process each")
    parser.add_argument("--output", default="outputs/validation.json", help="JSON file the runs are appended to")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    preset = dict(PRESETS[args.preset], **({"cache_dir": args.cache_dir} if args.cache_dir else {}))
    settings = Settings(**preset)
    train_or_reuse_dense(settings, load_data(settings))
    output = Path(args.output)
    record = json.loads(output.read_text()) if output.is_file() else []
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        for text in args.variants:
            options = json.loads(text)
            method = options.pop("method")
            epochs = float(options.pop("epochs", args.epochs or settings.prune_epochs))
            futures = [pool.submit(_worker, settings.to_dict(), method, s, seed, epochs, options)
                       for s in args.sparsities for seed in args.seeds]
            runs = [future.result() for future in futures]
            print(summary(method, dict(options, epochs=epochs), runs), flush=True)
            record.append({"preset": args.preset, "method": method, "options": options, "epochs": epochs, "runs": runs})
            with atomic_directory(output.parent) as staging:
                (staging / output.name).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
