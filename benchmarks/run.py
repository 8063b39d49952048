"""Benchmark hf_vitprune: GOHSP against magnitude, Taylor and random structured pruning, and Torch-Pruning as a peer.

Full run on Fashion-MNIST (``apt-get install -y dataset-fashion-mnist``, ``pip install -e ".[bench]"``):
5 methods x 2 sparsities x 3 seeds, then the speed section at real model shapes
(``benchmarks/speed_shapes.py``, about 15 minutes); up to 90 minutes on 2 CPU cores with the dense ViT
cached in ``--cache_dir`` (training it takes another ~28 minutes the first time, on both cores under
torchrun). Run from the repository root::

    python -m benchmarks.run

It writes ``benchmarks/results/fashion_mnist.json``, the plot
``benchmarks/results/fashion_mnist_accuracy.png`` and the table ``BENCHMARKS.md``.

Smoke run on scikit-learn's digits (under 4 minutes, 2 seeds, torch_pruning included, the speed
section on a 2-layer DeiT-Tiny at 32x32; writes under ``outputs/benchmarks-quick``)::

    python -m benchmarks.run --quick

Rebuild the table and the plot from an existing JSON without running anything::

    python -m benchmarks.run --report_only

What is measured (every figure on the full test set, on this machine, in this process):

- test top-1 accuracy of each (method, sparsity, seed); mean and spread over seeds; ``torch_pruning``
  (``benchmarks/torch_pruning_peer.py``) is one more method: Torch-Pruning from the same dense model to
  the same parameter budget, the same epochs, learning rate and distillation;
- the ADMM residual ||W - Z|| / ||W|| at the hard prune (the last one the search logged), per run;
- parameters and FLOPs per image (``hf_vitprune.model_stats``);
- CPU latency at batch 1 and throughput at batch 64, pruned against dense, interleaved, median of
  ``speed_repeats`` (``hf_vitprune.speed.measure_speed``), with ``torch.set_num_threads(speed_threads)``;
  the throughput speedup divided by the FLOPs ratio (dense FLOPs / pruned FLOPs);
- the ranking's share of the whole ``PruningTrainer.train()`` wall time (``ranking_seconds``);
- one ADMM step against one plain step, and peak memory of the ADMM phase against plain
  fine-tuning (see ``benchmarks/measure.py`` for exactly what is compared);
- throughput at batch 64 against the FLOPs ratio at DeiT-Tiny, DeiT-Small and ViT-Base shapes, eager
  and ``torch.compile`` (``benchmarks/speed_shapes.py``).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import platform
import shlex
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForImageClassification, HfArgumentParser, Trainer

import hf_vitprune  # noqa: F401  (registers the pruned classes with the Auto classes)
from hf_vitprune import PruningTrainer, model_stats
from hf_vitprune.fileio import atomic_directory
from hf_vitprune.metrics import make_compute_metrics
from hf_vitprune.speed import hardware_name, measure_speed

from .common import (
    DIGITS_QUICK,
    FASHION_MNIST,
    Settings,
    load_data,
    load_dense,
    pruning_config,
    run_figures,
    train_or_reuse_dense,
    training_arguments,
)
from . import speed_shapes, torch_pruning_peer
from .measure import measure_memory, time_training_steps
from .report import summarise, write_reports

logger = logging.getLogger("benchmarks")


@dataclass
class BenchmarkArguments:
    """Command-line flags; anything left unset takes the preset's value (Fashion-MNIST, or digits with --quick)."""

    quick: bool = field(default=False, metadata={"help": "Smoke run on scikit-learn's digits (under 4 minutes)."})
    report_only: bool = field(
        default=False, metadata={"help": "Only rebuild the Markdown table and the plot from the results JSON."}
    )
    resume: bool = field(
        default=False, metadata={"help": "Keep the runs already in the results JSON (same settings) and do the rest."}
    )
    output_dir: str | None = field(default=None, metadata={"help": "Where the JSON and the plot go."})
    markdown_file: str | None = field(default=None, metadata={"help": "Where the Markdown table goes."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where the dense model is cached."})
    methods: list[str] | None = field(default=None, metadata={"help": "Pruning methods to compare."})
    sparsities: list[float] | None = field(default=None, metadata={"help": "Parameter sparsities, e.g. 0.4 0.6."})
    seeds: list[int] | None = field(default=None, metadata={"help": "Training seeds of every pruning run."})
    dense_epochs: float | None = field(default=None, metadata={"help": "Epochs of the dense model."})
    prune_epochs: float | None = field(default=None, metadata={"help": "Epochs of each pruning run (ADMM + fine-tune)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training split."})
    threads: int | None = field(default=None, metadata={"help": "torch threads for training and evaluation."})
    workers: int | None = field(default=None, metadata={"help": "Pruning runs in parallel (processes)."})
    dense_processes: int | None = field(
        default=None, metadata={"help": "Processes training the dense model together (torchrun, DDP over gloo)."}
    )
    speed_threads: int | None = field(default=None, metadata={"help": "torch threads while timing."})
    speed_repeats: int | None = field(default=None, metadata={"help": "Timed repeats per speed figure (>= 5)."})
    speed_shapes: str | None = field(
        default=None, metadata={"help": "Preset of benchmarks.speed_shapes (full, quick) or none to skip it."}
    )


def resolve_settings(args: BenchmarkArguments) -> Settings:
    values = dict(DIGITS_QUICK if args.quick else FASHION_MNIST)
    for key in ("output_dir", "markdown_file", "cache_dir", "methods", "sparsities", "seeds", "dense_epochs",
                "prune_epochs", "max_train_samples", "threads", "workers", "dense_processes", "speed_threads", "speed_repeats",
                "speed_shapes"):
        value = getattr(args, key)
        if value is not None:
            values[key] = value
    if args.output_dir is not None and args.markdown_file is None and args.quick:
        values["markdown_file"] = str(Path(args.output_dir) / "BENCHMARKS.md")
    settings = Settings(**values)
    if settings.speed_repeats < 5:
        raise SystemExit(f"--speed_repeats {settings.speed_repeats}: the benchmark takes the median of at least 5.")
    return settings


def environment(settings: Settings) -> dict:
    return {
        "hardware": hardware_name("cpu"),
        "cpu_count": os.cpu_count(),
        "torch_threads": settings.threads,
        "workers": settings.workers,
        "dense_processes": settings.dense_processes,
        "speed_threads": settings.speed_threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "load_average_at_start": os.getloadavg(),
    }


def evaluate(model, settings: Settings, dataset, prefix: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        args = training_arguments(settings, tmp, epochs=1, learning_rate=1e-3, seed=0)
        trainer = Trainer(model=model, args=args, compute_metrics=make_compute_metrics())
        metrics = trainer.evaluate(eval_dataset=dataset, metric_key_prefix=prefix)
    return {"accuracy": metrics[f"{prefix}_accuracy"], "top5_accuracy": metrics[f"{prefix}_top5_accuracy"]}


def prune_once(settings: Settings, data, method: str, sparsity: float, seed: int, save_dir: str | Path) -> dict:
    """One PruningTrainer run from the cached dense model, evaluated on the test split; saves the pruned model.

    ``method="torch_pruning"`` is the Torch-Pruning peer (``benchmarks.torch_pruning_peer.prune_once``), which
    returns the same record.
    """
    if method == torch_pruning_peer.NAME:
        return torch_pruning_peer.prune_once(settings, data, sparsity, seed, save_dir)
    model = load_dense(settings)
    config = pruning_config(settings, method, sparsity, seed)
    with tempfile.TemporaryDirectory() as tmp:
        args = training_arguments(settings, tmp, epochs=settings.prune_epochs,
                                  learning_rate=settings.prune_learning_rate, seed=seed)
        trainer = PruningTrainer(model=model, args=args, train_dataset=data["train"],
                                 compute_metrics=make_compute_metrics(), pruning_config=config)
        started = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - started
        ranking = next(e["ranking_seconds"] for e in trainer.state.log_history if "ranking_seconds" in e)
        residuals = [e["admm_residual"] for e in trainer.state.log_history
                     if e.get("phase_admm") == 1.0 and "admm_residual" in e]
        test = trainer.evaluate(eval_dataset=data["test"], metric_key_prefix="test")
        validation = trainer.evaluate(eval_dataset=data["validation"], metric_key_prefix="validation")
    trainer.model.save_pretrained(save_dir)
    stats, dense_stats = model_stats(trainer.model), trainer.dense_stats
    total_steps = trainer.state.max_steps  # one TrainerState across the search and the fine-tuning
    return {
        **run_figures(method, sparsity, seed, test, validation, stats, dense_stats, train_seconds, ranking,
                      finetune_steps=total_steps - trainer.method.search_steps(total_steps)),
        # ||W - Z|| / ||W|| in the last log of the ADMM phase: how far W still was from Z's support when pruned
        "admm_residual_last_logged": residuals[-1] if residuals else None,
    }


def time_pruned(settings: Settings, record: dict, pruned, dense) -> None:
    """Add the measured speed of ``pruned`` against ``dense`` (same process, interleaved) to ``record``."""
    torch.set_num_threads(settings.speed_threads)
    try:
        speed = measure_speed(pruned, dense, batch_size_latency=1, batch_size_throughput=64,
                              repeats=settings.speed_repeats)
    finally:
        torch.set_num_threads(settings.threads)
    record["speed"] = speed
    record["throughput_speedup_over_flops_speedup"] = speed["throughput_speedup"] / record["flops_speedup"]
    record["latency_speedup_over_flops_speedup"] = speed["latency_speedup"] / record["flops_speedup"]


# Worker processes (settings.workers > 1): each loads the data once, then runs pruning jobs.
_WORKER: dict = {}


def _init_worker(settings: dict) -> None:
    transformers.logging.set_verbosity_warning()
    _WORKER["settings"] = Settings(**settings)
    torch.set_num_threads(_WORKER["settings"].threads)
    _WORKER["data"] = load_data(_WORKER["settings"])


def _worker_job(method: str, sparsity: float, seed: int, save_dir: str) -> dict:
    return prune_once(_WORKER["settings"], _WORKER["data"], method, sparsity, seed, save_dir)


def prune_all(settings: Settings, data, jobs: list[tuple[str, float, int]], models_dir: Path, on_done) -> None:
    """Run the pruning jobs, in this process or in ``settings.workers`` worker processes (1 torch thread each)."""
    def save_dir(job):
        method, sparsity, seed = job
        return str(models_dir / f"{method}-{sparsity:g}-{seed}")

    if settings.workers <= 1:
        for job in jobs:
            on_done(prune_once(settings, data, *job, save_dir(job)), save_dir(job))
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(settings.workers, mp_context=context, initializer=_init_worker,
                             initargs=(settings.to_dict(),)) as pool:
        futures = {pool.submit(_worker_job, *job, save_dir(job)): job for job in jobs}
        for future in as_completed(futures):
            on_done(future.result(), save_dir(futures[future]))


def _load_previous(settings: Settings) -> list[dict]:
    path = settings.results_path
    if not path.is_file():
        return []
    previous = json.loads(path.read_text())
    if previous.get("settings") != settings.to_dict():
        logger.warning("Not resuming: %s was written with other settings.", path)
        return []
    return previous.get("runs", [])


def _write(settings: Settings, results: dict) -> None:
    with atomic_directory(settings.results_path.parent) as staging:
        (staging / settings.results_path.name).write_text(json.dumps(results, indent=2) + "\n")


def run(settings: Settings, command: str, resume: bool = False) -> dict:
    started = time.perf_counter()
    torch.set_num_threads(settings.threads)
    results = {"command": command, "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "settings": settings.to_dict(), "environment": environment(settings)}
    data = load_data(settings)
    logger.info("data: %s", {name: len(split) for name, split in data.items()})
    dense_info = train_or_reuse_dense(settings, data)
    dense = load_dense(settings).eval()
    dense_stats = model_stats(dense)
    results["dense"] = {
        "config": settings.model,
        "params": dense_stats.params,
        "flops": dense_stats.flops,
        "training": dense_info,
        "validation": evaluate(dense, settings, data["validation"], "validation"),
        "test": evaluate(dense, settings, data["test"], "test"),
        "split_sizes": {name: len(split) for name, split in data.items()},
    }
    logger.info("dense: %s", {k: results["dense"][k] for k in ("params", "flops", "test")})
    runs = _load_previous(settings) if resume else []
    done = {(r["method"], r["sparsity"], r["seed"]) for r in runs}
    results["runs"] = runs
    jobs = [(method, sparsity, seed) for sparsity in settings.sparsities for method in settings.methods
            for seed in settings.seeds if (method, sparsity, seed) not in done]
    pending = []

    def finished(record: dict, directory: str) -> None:
        logger.info("%s @ %.2f seed %d: test %.4f, train() %.0fs (ranking %.1fs)", record["method"],
                    record["sparsity"], record["seed"], record["test_accuracy"], record["train_seconds"],
                    record["ranking_seconds"])
        pending.append((record, directory))

    with tempfile.TemporaryDirectory() as models_dir:
        prune_all(settings, data, jobs, Path(models_dir), finished)
        # Timing after all training, so that no pruning job of ours competes with the clock.
        for record, directory in pending:
            pruned = AutoModelForImageClassification.from_pretrained(directory)
            time_pruned(settings, record, pruned, dense)
            logger.info("%s @ %.2f seed %d: throughput x%.2f, FLOPs x%.2f", record["method"], record["sparsity"],
                        record["seed"], record["speed"]["throughput_speedup"], record["flops_speedup"])
            runs.append(record)
            _write(settings, results)
    runs.sort(key=lambda r: (r["sparsity"], settings.methods.index(r["method"]), r["seed"]))
    torch.set_num_threads(settings.speed_threads)
    results["training_step"] = time_training_steps(settings, data)
    torch.set_num_threads(settings.threads)
    logger.info("training step: %s", results["training_step"])
    results["memory"] = measure_memory(settings)
    logger.info("memory: ratio %.3f", results["memory"]["ratio"])
    if settings.speed_shapes != "none":
        results["speed_shapes"] = speed_shapes.run(settings.speed_shapes, methods=list(settings.methods),
                                                   output=Path(settings.output_dir) / f"{settings.results_name}_speed_shapes.json",
                                                   log=lambda message: logger.info("%s", message))
    results["summary"] = summarise(results)
    results["total_seconds"] = time.perf_counter() - started
    results["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    _write(settings, results)
    return results


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    transformers.logging.set_verbosity_warning()
    argv = list(sys.argv[1:] if argv is None else argv)
    (args,) = HfArgumentParser(BenchmarkArguments).parse_args_into_dataclasses(args=argv)
    settings = resolve_settings(args)
    if args.report_only:
        if not settings.results_path.is_file():
            raise SystemExit(f"--report_only: {settings.results_path} does not exist; run the benchmark first.")
        results = json.loads(settings.results_path.read_text())
        results["summary"] = summarise(results)
    else:
        command = "python -m benchmarks.run" + "".join(f" {shlex.quote(a)}" for a in argv)
        results = run(settings, command, resume=args.resume)
    write_reports(results, settings)
    written = [settings.plot_path, settings.markdown_file] + ([] if args.report_only else [settings.results_path])
    logger.info("wrote %s", ", ".join(map(str, written)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
