"""Benchmark hf_vitprune: GOHSP against magnitude, Taylor and random structured pruning, Torch-Pruning as a peer,
and OFB and SPViT (attention turned into convolutions) at the FLOPs of the GOHSP runs.

Full run on Fashion-MNIST (``apt-get install -y dataset-fashion-mnist``, ``pip install -e ".[bench]"``):
8 methods x 2 sparsities x 3 seeds at each pruning-epoch budget, then the speed section at real model shapes
(``benchmarks/speed_shapes.py``, about an hour: batch 1 and 64, eager, compile and ONNX Runtime); the 5
parameter-matched methods take up to 90 minutes on 2 CPU cores with the dense ViT cached in ``--cache_dir``
(training it takes another ~28 minutes the first time, on both cores under torchrun). Run from the repository root::

    python -m benchmarks.run

It writes ``benchmarks/results/fashion_mnist.json``, the plot
``benchmarks/results/fashion_mnist_accuracy.png`` and the table ``BENCHMARKS.md``.

``ofb``, ``ofb_no_pmim`` (OFB with PMIM off) and ``spvit`` (``spvit_conv``) are pruned to a FLOPs budget: each
keeps the sparsity label of the gohsp row it is matched to and removes the share of FLOPs the gohsp runs at
that sparsity removed (``benchmarks.common.FLOPS_MATCHED_METHODS``), so they run after gohsp's runs. To add
them to results that already hold the other methods' runs, training only the missing runs and keeping every section already
measured (``--speed_shapes none`` also makes sure that the speed-at-shapes section is not measured again)::

    python -m benchmarks.run --resume --speed_shapes none

The epoch axis (issue 22): ``--prune_epochs`` takes a list, and every method (the Torch-Pruning peer, which
fine-tunes for the whole budget, included), sparsity and seed runs once at each budget; the FLOPs-matched rows
take the FLOPs of the gohsp runs at the same budget. Each run records its ``prune_epochs``; runs recorded
before the axis count as the settings' ``prune_epochs``. ``--resume`` keeps the runs already present for each
budget, so adding a budget to existing results trains only the new runs::

    python -m benchmarks.run --resume --prune_epochs 2 8

The held-out model (issue 27): ``--model heldout`` runs the same benchmark on
``benchmarks.common.HELDOUT_FASHION_MNIST``, another architecture whose pruning recipe is the main preset's,
copied field by field. The held-out model only ever reports: no method option, recipe field or target may be
chosen or tuned on its figures. It trains and caches its own dense model (the main model's dense recipe, as
it is) and writes ``benchmarks/results/heldout_fashion_mnist.json``; the page (BENCHMARKS.md) always shows the
two models side by side, and a target read from the runs counts as met only where both models meet it::

    python -m benchmarks.run --model heldout --prune_epochs 2 8

Smoke run on scikit-learn's digits (under 4 minutes, 2 seeds, torch_pruning included, the speed
section on a 2-layer DeiT-Tiny at 32x32; writes under ``outputs/benchmarks-quick``)::

    python -m benchmarks.run --quick

Rebuild the page and the plots from the existing JSONs (the main model's and, when run, the held-out
model's) without running anything::

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
- the ranking's share of the whole ``PruningTrainer.train()`` wall time (``ranking_seconds``; none for OFB,
  which learns its importance scores in the search);
- one ADMM step against one plain step, and peak memory of the ADMM phase against plain
  fine-tuning (see ``benchmarks/measure.py`` for exactly what is compared);
- throughput at batch 64 against the FLOPs ratio at DeiT-Tiny, DeiT-Small and ViT-Base shapes, eager
  and ``torch.compile`` (``benchmarks/speed_shapes.py``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal, NamedTuple

import torch
import transformers
from transformers import AutoModelForImageClassification, HfArgumentParser, Trainer

import hf_vitprune  # noqa: F401  (registers the pruned classes with the Auto classes)
from hf_vitprune import PruningTrainer, model_stats
from hf_vitprune.architectures import find_encoder_layers
from hf_vitprune.convolution import layer_type_of
from hf_vitprune.fileio import atomic_directory
from hf_vitprune.metrics import make_compute_metrics
from hf_vitprune.speed import hardware_name, measure_speed

from .common import (
    DIGITS_QUICK,
    FASHION_MNIST,
    FLOPS_MATCHED_METHODS,
    HELDOUT_FASHION_MNIST,
    FLOPS_REFERENCE,
    Settings,
    flops_target,
    load_data,
    load_dense,
    parameter_matched,
    pruning_config,
    run_figures,
    train_or_reuse_dense,
    training_arguments,
    with_defaults,
)
from . import speed_shapes, torch_pruning_peer
from .measure import measure_memory, time_training_steps
from .report import summarise, write_reports

logger = logging.getLogger("benchmarks")


@dataclass
class BenchmarkArguments:
    """Command-line flags; anything left unset takes the preset's value (Fashion-MNIST, or digits with --quick)."""

    quick: bool = field(default=False, metadata={"help": "Smoke run on scikit-learn's digits (under 4 minutes)."})
    model: Literal["main", "heldout"] = field(
        default="main",
        metadata={"help": "The benchmark model: main (FASHION_MNIST) or heldout (HELDOUT_FASHION_MNIST: another "
                          "architecture with the main model's pruning recipe; it only reports, nothing is chosen on it)."},
    )
    report_only: bool = field(
        default=False, metadata={"help": "Only rebuild the Markdown table and the plot from the results JSON."}
    )
    resume: bool = field(
        default=False,
        metadata={"help": "Keep what the results JSON already holds (same settings; --methods and --speed_shapes "
                          "may differ): its runs, the training-step, memory and speed-at-shapes sections; do the rest."},
    )
    output_dir: str | None = field(default=None, metadata={"help": "Where the JSON and the plot go."})
    markdown_file: str | None = field(default=None, metadata={"help": "Where the Markdown table goes."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where the dense model is cached."})
    methods: list[str] | None = field(default=None, metadata={"help": "Pruning methods to compare."})
    sparsities: list[float] | None = field(default=None, metadata={"help": "Parameter sparsities, e.g. 0.4 0.6."})
    seeds: list[int] | None = field(default=None, metadata={"help": "Training seeds of every pruning run."})
    dense_epochs: float | None = field(default=None, metadata={"help": "Epochs of the dense model."})
    prune_epochs: list[float] | None = field(
        default=None,
        metadata={"help": "Epoch budgets of the pruning runs (search + fine-tuning together), e.g. 2 8: every method, "
                          "sparsity and seed runs at each (the epoch axis); default the preset's single budget."},
    )
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


def preset(args: BenchmarkArguments) -> dict:
    """The settings preset of ``--quick`` / ``--model``."""
    if args.model == "heldout":
        if args.quick:
            raise SystemExit("--model heldout is a Fashion-MNIST model; --quick runs the digits smoke test on the "
                             "quickstart's model only.")
        return HELDOUT_FASHION_MNIST
    return DIGITS_QUICK if args.quick else FASHION_MNIST


def resolve_settings(args: BenchmarkArguments) -> Settings:
    values = dict(preset(args))
    for key in ("output_dir", "markdown_file", "cache_dir", "methods", "sparsities", "seeds", "dense_epochs",
                "max_train_samples", "threads", "workers", "dense_processes", "speed_threads", "speed_repeats",
                "speed_shapes"):
        value = getattr(args, key)
        if value is not None:
            values[key] = value
    if args.prune_epochs:
        if len(set(args.prune_epochs)) != len(args.prune_epochs) or min(args.prune_epochs) <= 0:
            raise SystemExit(f"--prune_epochs {args.prune_epochs}: give distinct positive epoch budgets.")
        values["prune_epochs"] = args.prune_epochs[0]
        values["epoch_budgets"] = list(args.prune_epochs) if len(args.prune_epochs) > 1 else None
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
        # what each method did by default when these runs were made (the report flags runs made with other defaults)
        "method_defaults": method_defaults(),
    }


def method_defaults() -> dict:
    """Every registered method's default options, as JSON."""
    from hf_vitprune.methods import METHODS

    return {name: json.loads(json.dumps(cls.options_class().to_dict())) for name, cls in sorted(METHODS.items())}


def evaluate(model, settings: Settings, dataset, prefix: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        args = training_arguments(settings, tmp, epochs=1, learning_rate=1e-3, seed=0)
        trainer = Trainer(model=model, args=args, compute_metrics=make_compute_metrics())
        metrics = trainer.evaluate(eval_dataset=dataset, metric_key_prefix=prefix)
    return {"accuracy": metrics[f"{prefix}_accuracy"], "top5_accuracy": metrics[f"{prefix}_top5_accuracy"]}


class Job(NamedTuple):
    """One pruning run; ``target_flops_reduction`` is set for the FLOPs-matched methods only; ``epochs`` is its
    pruning budget (None: ``settings.prune_epochs``)."""

    method: str
    sparsity: float
    seed: int
    target_flops_reduction: float | None = None
    epochs: float | None = None


def run_epochs(run: dict, settings: dict) -> float:
    """The pruning epochs of a run record; records written before the epoch axis ran at ``settings["prune_epochs"]``."""
    return float(run.get("prune_epochs", settings["prune_epochs"]))


def run_key(run: dict, settings: dict) -> tuple:
    """What identifies a run in the results: (epochs, method, sparsity, seed)."""
    return (run_epochs(run, settings), run["method"], run["sparsity"], run["seed"])


def prune_once(settings: Settings, data, method: str, sparsity: float, seed: int, save_dir: str | Path,
               target_flops_reduction: float | None = None) -> dict:
    """One PruningTrainer run from the cached dense model, evaluated on the test split; saves the pruned model.

    ``method="torch_pruning"`` is the Torch-Pruning peer (``benchmarks.torch_pruning_peer.prune_once``), which
    returns the same record. A FLOPs-matched method (``ofb``, ``ofb_no_pmim``, ``spvit``) prunes to
    ``target_flops_reduction`` and keeps ``sparsity`` as the label of the row it is matched to; its record
    says so.
    """
    if method == torch_pruning_peer.NAME:
        return torch_pruning_peer.prune_once(settings, data, sparsity, seed, save_dir)
    model = load_dense(settings)
    config = pruning_config(settings, method, sparsity, seed, target_flops_reduction)
    with tempfile.TemporaryDirectory() as tmp:
        args = training_arguments(settings, tmp, epochs=settings.prune_epochs,
                                  learning_rate=settings.prune_learning_rate, seed=seed)
        trainer = PruningTrainer(model=model, args=args, train_dataset=data["train"],
                                 compute_metrics=make_compute_metrics(), pruning_config=config)
        started = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - started
        # None for OFB, which has no ranking pass: it learns its importance scores in the search
        ranking = next((e["ranking_seconds"] for e in trainer.state.log_history if "ranking_seconds" in e), None)
        residuals = [e["admm_residual"] for e in trainer.state.log_history
                     if e.get("phase_admm") == 1.0 and "admm_residual" in e]
        test = trainer.evaluate(eval_dataset=data["test"], metric_key_prefix="test")
        validation = trainer.evaluate(eval_dataset=data["validation"], metric_key_prefix="validation")
    trainer.model.save_pretrained(save_dir)
    stats, dense_stats = model_stats(trainer.model), trainer.dense_stats
    total_steps = trainer.state.max_steps  # one TrainerState across the search and the fine-tuning
    search_steps = trainer.method.search_steps(total_steps)
    method_logs = trainer.method.log_values()
    record = {
        **run_figures(method, sparsity, seed, test, validation, stats, dense_stats, train_seconds, ranking,
                      finetune_steps=total_steps - search_steps),
        "search_steps": search_steps,  # the ADMM (or OFB / SPViT search) phase's optimizer steps
        # ||W - Z|| / ||W|| in the last log of the ADMM phase: how far W still was from Z's support when pruned
        "admm_residual_last_logged": residuals[-1] if residuals else None,
        # ADMM's mid-search removal (admm_remove_after): the largest share of ||W|| cut at once, and the units cut
        **{key: method_logs.get(key) for key in ("admm_residual_at_removal", "admm_removed_units")},
    }
    if target_flops_reduction is not None:
        layers = find_encoder_layers(trainer.model)
        record.update(target_flops_reduction=target_flops_reduction, flops_matched_to=FLOPS_REFERENCE,
                      head_dims_per_layer=[layer.head_dim for layer in layers],
                      layer_types=[layer_type_of(layer) for layer in layers])
    return record


def speed_between(settings: Settings, model, reference) -> dict:
    """``measure_speed`` of ``model`` against ``reference`` (same process, interleaved) at batch 1 and 64, with
    the timing threads."""
    torch.set_num_threads(settings.speed_threads)
    try:
        return measure_speed(model, reference, batch_size_latency=1, batch_size_throughput=64,
                             repeats=settings.speed_repeats)
    finally:
        torch.set_num_threads(settings.threads)


def time_pruned(settings: Settings, record: dict, pruned, dense) -> None:
    """Add the measured speed of ``pruned`` against ``dense`` (same process, interleaved) to ``record``."""
    speed = speed_between(settings, pruned, dense)
    record["speed"] = speed
    record["throughput_speedup_over_flops_speedup"] = speed["throughput_speedup"] / record["flops_speedup"]
    record["latency_speedup_over_flops_speedup"] = speed["latency_speedup"] / record["flops_speedup"]


# Worker processes (settings.workers > 1): each loads the data once, then runs pruning jobs.
WORKER: dict = {}


def init_worker(settings: dict, settings_class: type = Settings) -> None:
    """A pruning worker's start (this benchmark's or benchmarks.tokens'): quiet transformers, its threads, and
    the settings and data, loaded once, in ``WORKER``."""
    transformers.logging.set_verbosity_warning()
    WORKER["settings"] = settings_class(**settings)
    torch.set_num_threads(WORKER["settings"].threads)
    WORKER["data"] = load_data(WORKER["settings"])


def _prune_job(settings: Settings, data, job: Job, save_dir: str) -> dict:
    if job.epochs is not None:
        settings = dataclasses.replace(settings, prune_epochs=job.epochs)
    record = prune_once(settings, data, job.method, job.sparsity, job.seed, save_dir,
                        target_flops_reduction=job.target_flops_reduction)
    record["prune_epochs"] = float(settings.prune_epochs)
    return record


def _worker_job(job: Job, save_dir: str) -> dict:
    return _prune_job(WORKER["settings"], WORKER["data"], job, save_dir)


def prune_all(settings: Settings, data, jobs: list[tuple], models_dir: Path, on_done) -> None:
    """Run the pruning jobs (``Job`` or its first three fields), in this process or in ``settings.workers``
    worker processes (1 torch thread each)."""
    jobs = [Job(*job) for job in jobs]
    if not jobs:
        return

    def save_dir(job: Job) -> str:
        epochs = settings.prune_epochs if job.epochs is None else job.epochs
        return str(models_dir / f"{job.method}-{job.sparsity:g}-{job.seed}-{epochs:g}ep")

    if settings.workers <= 1:
        for job in jobs:
            on_done(_prune_job(settings, data, job, save_dir(job)), save_dir(job))
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(settings.workers, mp_context=context, initializer=init_worker,
                             initargs=(settings.to_dict(),)) as pool:
        futures = {pool.submit(_worker_job, job, save_dir(job)): job for job in jobs}
        for future in as_completed(futures):
            on_done(future.result(), save_dir(futures[future]))


# Settings that --resume lets change: which methods run and at which epoch budgets (every run record names
# its method and its epochs, and each kept run must be of a listed method and budget) and the speed-at-shapes
# preset (its section is measured apart from the runs). Every other field changes the figures of the kept
# runs, so it must be the same.
RESUMABLE_SETTINGS = ("methods", "speed_shapes", "prune_epochs", "epoch_budgets")


def _identity(settings: dict) -> dict:
    """The settings that must match to resume; a field an older JSON lacks counts as its default."""
    return {key: value for key, value in with_defaults(settings).items() if key not in RESUMABLE_SETTINGS}


def _load_previous(settings: Settings) -> dict | None:
    """The results JSON to resume from, or None when there is none or it was written with other settings."""
    path = settings.results_path
    if not path.is_file():
        return None
    previous = json.loads(path.read_text())
    old, new = _identity(previous.get("settings", {})), _identity(settings.to_dict())
    if old != new:
        changed = sorted(key for key in old.keys() | new.keys() if old.get(key) != new.get(key))
        logger.warning("Not resuming: %s was written with other settings (%s).", path, ", ".join(changed))
        return None
    unlisted = sorted({r["method"] for r in previous.get("runs", [])} - set(settings.methods))
    if unlisted:
        raise SystemExit(f"--resume: {path} holds runs of {', '.join(unlisted)}, which --methods does not list; "
                         f"list them to keep their runs, or drop --resume to start afresh.")
    for run in previous.get("runs", []):  # runs from before the epoch axis: the budget their settings name
        run["prune_epochs"] = run_epochs(run, previous["settings"])
    budgets = sorted({run["prune_epochs"] for run in previous.get("runs", [])} - set(settings.epoch_axis))
    if budgets:
        raise SystemExit(f"--resume: {path} holds runs at {', '.join(f'{e:g}' for e in budgets)} pruning epochs, which "
                         f"--prune_epochs does not list; list them to keep their runs, or drop --resume to start afresh.")
    return previous


def _kept_sections(previous: dict, settings: Settings) -> dict:
    """The sections measured after the runs that --resume keeps rather than measures again.

    The training-step and memory figures depend only on settings that resuming keeps the same (they time
    gohsp's ADMM step), so they are kept whenever present. The speed-at-shapes section is kept when
    ``--speed_shapes none`` skips it, or when it was measured with the same preset and methods.
    """
    kept = {key: previous[key] for key in ("training_step", "memory") if previous.get(key)}
    speed = previous.get("speed_shapes")
    if speed and (settings.speed_shapes == "none" or (
            speed["preset"] == settings.speed_shapes
            and speed["settings"]["methods"] == parameter_matched(settings.methods))):
        kept["speed_shapes"] = speed
    return kept


def _invocations(previous: dict) -> list[dict]:
    """Every command that wrote ``previous``, oldest first, with its wall time (None if it did not finish)."""
    if "invocations" in previous:
        return previous["invocations"]
    return [{"command": previous["command"], "started": previous["started"], "finished": previous.get("finished"),
             "seconds": previous.get("total_seconds")}]


def open_results(settings: Settings, command: str, previous: dict | None) -> tuple[dict, list[dict]]:
    """A new results record for ``command``, continuing ``previous`` (a resumed run): the record, and the
    earlier invocations whose commands the report names and whose time it adds up."""
    results = {"command": command, "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "settings": settings.to_dict(), "environment": environment(settings)}
    earlier = _invocations(previous) if previous else []
    if earlier:
        results["invocations"] = earlier + [{"command": command, "started": results["started"], "finished": None,
                                             "seconds": None}]  # filled in by close_results
    return results, earlier


def close_results(results: dict, earlier: list[dict], started: float) -> None:
    """Stamp the end of this invocation and the total time over every invocation."""
    seconds = time.perf_counter() - started
    results["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if earlier:
        results["invocations"][-1].update(finished=results["finished"], seconds=seconds)
    results["total_seconds"] = sum(i["seconds"] or 0 for i in earlier) + seconds


def results_of(args, settings: Settings, argv: list[str], module: str, run_benchmark, summarise_results) -> dict:
    """The results an entry point reports: rebuilt from the JSON (``--report_only``) or measured now."""
    if args.report_only:
        if not settings.results_path.is_file():
            raise SystemExit(f"--report_only: {settings.results_path} does not exist; run the benchmark first.")
        results = json.loads(settings.results_path.read_text())
        results["summary"] = summarise_results(results)
        return results
    command = f"python -m {module}" + "".join(f" {shlex.quote(a)}" for a in argv)
    return run_benchmark(settings, command, resume=args.resume)


def _write(settings: Settings, results: dict) -> None:
    with atomic_directory(settings.results_path.parent) as staging:
        (staging / settings.results_path.name).write_text(json.dumps(results, indent=2) + "\n")


def _flops_matched_jobs(jobs: list[Job], runs: list[dict]) -> list[Job]:
    """The FLOPs-matched jobs with their budgets: the FLOPs of the reference's runs at each job's sparsity and
    epoch budget."""
    return [job._replace(target_flops_reduction=flops_target(
        [r for r in runs if r["prune_epochs"] == job.epochs], job.sparsity)) for job in jobs]


def untimed_models_dir(settings: Settings) -> Path:
    """Where trained runs wait to be timed, beside the results (ignored by git), kept across invocations."""
    return Path(settings.output_dir) / "untimed" / settings.results_name


def jobs_of(settings: Settings, done: set[tuple]) -> list[Job]:
    """Every (epochs, method, sparsity, seed) not in ``done`` (keys as :func:`run_key` makes them), in run order."""
    return [Job(method, sparsity, seed, epochs=epochs) for epochs in settings.epoch_axis
            for sparsity in settings.sparsities for method in settings.methods for seed in settings.seeds
            if (epochs, method, sparsity, seed) not in done]


def run(settings: Settings, command: str, resume: bool = False) -> dict:
    """Train and time every pruning run not already kept, then the sections measured after them."""
    started = time.perf_counter()
    torch.set_num_threads(settings.threads)
    previous = _load_previous(settings) if resume else None
    results, earlier = open_results(settings, command, previous)
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
    runs = list(previous["runs"]) if previous else []
    # runs trained by an earlier invocation that stopped before timing them: their models are kept on disk
    untimed = [entry for entry in (previous or {}).get("untimed", []) if Path(entry["directory"]).is_dir()]
    done = {run_key(r, results["settings"]) for r in runs + [entry["record"] for entry in untimed]}
    results["runs"], results["untimed"] = runs, untimed
    results.update(_kept_sections(previous, settings) if previous else {})  # in every intermediate write too
    jobs = jobs_of(settings, done)
    matched = [job for job in jobs if job.method in FLOPS_MATCHED_METHODS]
    if matched and FLOPS_REFERENCE not in settings.methods:
        _flops_matched_jobs(matched, runs + [entry["record"] for entry in untimed])  # a missing reference fails here

    def finished(record: dict, directory: str) -> None:
        ranking = record["ranking_seconds"]
        logger.info("%s @ %.2f, %g epochs, seed %d: test %.4f, FLOPs ratio %.4f, train() %.0fs (%s)",
                    record["method"], record["sparsity"], record["prune_epochs"], record["seed"],
                    record["test_accuracy"], record["flops_ratio"],
                    record["train_seconds"], "no ranking pass" if ranking is None else f"ranking {ranking:.1f}s")
        untimed.append({"record": record, "directory": directory})
        _write(settings, results)  # every trained run is kept at once: an interrupted budget loses no training

    # One epoch budget at a time: its runs are trained (each written as it ends, with its model kept on disk),
    # then timed, so that no pruning job of ours competes with the clock; --resume times what is left untimed.
    models_dir = untimed_models_dir(settings)
    for epochs in settings.epoch_axis:
        at = [job for job in jobs if job.epochs == epochs]
        prune_all(settings, data, [job for job in at if job.method not in FLOPS_MATCHED_METHODS], models_dir,
                  finished)
        # The FLOPs-matched runs need the reference's FLOPs: kept by --resume or trained just above.
        trained = runs + [entry["record"] for entry in untimed]
        prune_all(settings, data, _flops_matched_jobs([job for job in at if job.method in FLOPS_MATCHED_METHODS],
                                                      trained), models_dir, finished)
        for entry in [entry for entry in untimed if run_epochs(entry["record"], results["settings"]) == epochs]:
            record = entry["record"]
            pruned = AutoModelForImageClassification.from_pretrained(entry["directory"])
            time_pruned(settings, record, pruned, dense)
            logger.info("%s @ %.2f, %g epochs, seed %d: throughput x%.2f, FLOPs x%.2f", record["method"],
                        record["sparsity"], record["prune_epochs"], record["seed"],
                        record["speed"]["throughput_speedup"], record["flops_speedup"])
            untimed.remove(entry)
            runs.append(record)
            _write(settings, results)
            shutil.rmtree(entry["directory"], ignore_errors=True)
    results.pop("untimed")
    runs.sort(key=lambda r: (r["prune_epochs"], r["sparsity"], settings.methods.index(r["method"]), r["seed"]))
    _measure_sections(settings, data, results)
    results["summary"] = summarise(results)
    close_results(results, earlier, started)
    _write(settings, results)
    return results


def _measure_sections(settings: Settings, data, results: dict) -> None:
    """The training-step, memory and speed-at-shapes sections, each unless --resume kept it already."""
    if "training_step" not in results:
        torch.set_num_threads(settings.speed_threads)
        results["training_step"] = time_training_steps(settings, data)
        torch.set_num_threads(settings.threads)
    logger.info("training step: %s", results["training_step"])
    if "memory" not in results:
        results["memory"] = measure_memory(settings)
    logger.info("memory: ratio %.3f", results["memory"]["ratio"])
    if settings.speed_shapes != "none" and "speed_shapes" not in results:
        # parameter-matched plans only: OFB's widths come out of its search during training, which the
        # untrained random-weight plans of speed_shapes do not run
        results["speed_shapes"] = speed_shapes.run(settings.speed_shapes, methods=parameter_matched(settings.methods),
                                                   output=Path(settings.output_dir) / f"{settings.results_name}_speed_shapes.json",
                                                   log=lambda message: logger.info("%s", message))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    transformers.logging.set_verbosity_warning()
    argv = list(sys.argv[1:] if argv is None else argv)
    (args,) = HfArgumentParser(BenchmarkArguments).parse_args_into_dataclasses(args=argv)
    settings = resolve_settings(args)
    results = results_of(args, settings, argv, "benchmarks.run", run, summarise)
    write_reports(results, settings)
    written = [settings.plot_path, settings.markdown_file] + ([] if args.report_only else [settings.results_path])
    logger.info("wrote %s", ", ".join(map(str, written)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
