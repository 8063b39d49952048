"""Benchmark token pruning (``spvit_tokens``) alone and stacked on gohsp, on a token-rich variant of the benchmark model.

The main benchmark's ViT sees 17 tokens (7x7 patches of 28x28 images), too few for dropping tokens to
matter; this one is the same model (hidden 96, 4 layers, 6 heads, MLP 192) in 4x4 patches: 49 patches +
CLS = 50 tokens. Rows, each over the preset's seeds, every run 2 epochs like the main benchmark's, with
its learning rate, batch and distillation:

- ``tokens35``, ``tokens50``: ``PruningConfig(method="spvit_tokens", target_flops_reduction=0.35 / 0.5)``
  on the dense model;
- ``gohsp40``: ``PruningConfig(method="gohsp", target_sparsity=0.4)`` with the main benchmark's gohsp
  options (``benchmarks.common.pruning_config``);
- ``gohsp40+tokens``: the compacted gohsp40 model of the same seed (``from_pretrained``), pruned again by
  ``spvit_tokens`` to ``stack_flops_reduction`` (0.35) fewer FLOPs than that model, distilling from it.

Full run on Fashion-MNIST (``apt-get install -y dataset-fashion-mnist``, ``pip install -e ".[bench]"``);
the dense model is trained once (20 epochs, torchrun on 2 processes) and cached in
``outputs/benchmark-dense-fashion-mnist-tokens``, the pruned models are kept in
``outputs/benchmark-tokens-models`` (the stacked runs and ``--resume`` need the gohsp40 ones). Estimated
at about 2 h 10 min on 2 CPU cores from scratch (~50 min for the dense model, ~80 min for the 12 pruning
runs, two at a time, and their timing), from the main benchmark's timings and training steps of both
models measured one after the other. The dense model gets 20 epochs, not the 17-token model's 60: a step
costs about 2.9x as much, so 60 epochs would take about 2.6 h on their own::

    python -m benchmarks.tokens

It writes ``benchmarks/results/fashion_mnist_tokens.json`` and ``BENCHMARKS_TOKENS.md``. Smoke run on
scikit-learn's digits (8x8 images in 2x2 patches: 16 patches + CLS, the digits ViT of
``python -m benchmarks.run --quick``, whose cached dense model it shares; one seed; about 30 s with that
model cached; writes under ``outputs/benchmarks-tokens-quick``)::

    python -m benchmarks.tokens --quick

Rebuild the page from the JSON, or continue an interrupted run keeping its finished (timed) runs::

    python -m benchmarks.tokens --report_only
    python -m benchmarks.tokens --resume

What is measured per run: test and validation accuracy, parameters, FLOPs (``hf_vitprune.model_stats``,
the selectors included) and their ratio to the dense model's, the tokens every encoder layer sees, the
stages' keep ratios, latency at batch 1 and throughput at batch 64 against the dense model, interleaved in
one ``hf_vitprune.speed.measure_speed`` call (as in the main benchmark, after all training), throughput
speedup / FLOPs speedup; for ``gohsp40+tokens`` also its speed against its own gohsp40 model, side by side
in one more ``measure_speed`` call.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import sys
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import NamedTuple

import torch
import transformers
from transformers import AutoModelForImageClassification, HfArgumentParser

from hf_vitprune import PruningConfig, PruningTrainer, model_stats
from hf_vitprune.architectures import num_patches, num_tokens
from hf_vitprune.metrics import make_compute_metrics
from hf_vitprune.tokens import token_pruning_of

from .common import (
    DIGITS_QUICK,
    FASHION_MNIST,
    Settings,
    load_data,
    load_dense,
    method_options,
    pruning_config,
    run_figures,
    train_or_reuse_dense,
    training_arguments,
    with_defaults,
)
from .run import (
    WORKER,
    _write,
    close_results,
    evaluate,
    init_worker,
    open_results,
    results_of,
    speed_between,
    time_pruned,
)
from .tokens_report import summarise, write_markdown

logger = logging.getLogger("benchmarks.tokens")

TOKEN_METHOD = "spvit_tokens"
STRUCTURAL_METHOD = "gohsp"


@dataclass
class TokenSettings(Settings):
    """The main benchmark's settings plus the token rows' budgets and where the pruned models are kept.

    ``methods`` and ``sparsities`` are derived (the row names, the gohsp sparsity), so the JSON names
    what ran; the dense model is trained from the plain :class:`Settings` part (:meth:`dense_settings`).
    """

    token_reductions: list[float] = field(default_factory=lambda: [0.35, 0.5])  # FLOPs, of the dense model's
    gohsp_sparsity: float = 0.4  # parameters, of the dense model's
    stack_flops_reduction: float = 0.35  # FLOPs, of the gohsp model's that it stacks on
    models_dir: str = "outputs/benchmark-tokens-models"

    def dense_settings(self) -> Settings:
        """The plain settings (what ``benchmarks.train_dense`` reads back under torchrun)."""
        return Settings(**{f.name: getattr(self, f.name) for f in fields(Settings)})


def token_row(reduction: float) -> str:
    return f"tokens{round(100 * reduction)}"


def gohsp_row(sparsity: float) -> str:
    return f"{STRUCTURAL_METHOD}{round(100 * sparsity)}"


def stack_row(sparsity: float) -> str:
    return f"{gohsp_row(sparsity)}+tokens"


def row_names(settings: TokenSettings) -> list[str]:
    """The rows in table order."""
    return ([token_row(r) for r in settings.token_reductions]
            + [gohsp_row(settings.gohsp_sparsity), stack_row(settings.gohsp_sparsity)])


# The token-rich variant of the Fashion-MNIST benchmark model: the same widths and recipe, 4x4 patches (50 tokens).
# Dense epochs: 20, not 60 (a step costs about 2.9x the 17-token model's; see the module docstring).
TOKENS_FASHION_MNIST = dict(
    FASHION_MNIST,
    model=dict(FASHION_MNIST["model"], patch_size=4),
    dense_epochs=20,
    speed_shapes="none",
    cache_dir="outputs/benchmark-dense-fashion-mnist-tokens",
    output_dir="benchmarks/results",
    markdown_file="BENCHMARKS_TOKENS.md",
    results_name="fashion_mnist_tokens",
    models_dir="outputs/benchmark-tokens-models",
)

# Smoke run: the digits ViT of `benchmarks.run --quick` (8x8 images, 2x2 patches: 16 patches + CLS), whose
# cached dense model it shares, one seed.
TOKENS_DIGITS_QUICK = dict(
    DIGITS_QUICK,
    seeds=[0],
    speed_shapes="none",
    output_dir="outputs/benchmarks-tokens-quick",
    markdown_file="outputs/benchmarks-tokens-quick/BENCHMARKS_TOKENS.md",
    results_name="digits_tokens_quick",
    models_dir="outputs/benchmarks-tokens-quick/models",
)


@dataclass
class TokenBenchmarkArguments:
    """Command-line flags; anything left unset takes the preset's value (Fashion-MNIST, or digits with --quick)."""

    quick: bool = field(default=False, metadata={"help": "Smoke run on scikit-learn's digits (a few minutes)."})
    report_only: bool = field(default=False, metadata={"help": "Only rebuild the Markdown page from the results JSON."})
    resume: bool = field(
        default=False,
        metadata={"help": "Keep the finished (timed) runs of the results JSON (same settings) and do the rest; the "
                          "stacked runs need their gohsp models in --models_dir."},
    )
    output_dir: str | None = field(default=None, metadata={"help": "Where the JSON goes."})
    markdown_file: str | None = field(default=None, metadata={"help": "Where the Markdown page goes."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where the dense model is cached."})
    models_dir: str | None = field(default=None, metadata={"help": "Where the pruned models are kept."})
    seeds: list[int] | None = field(default=None, metadata={"help": "Training seeds of every pruning run."})
    token_reductions: list[float] | None = field(
        default=None, metadata={"help": "FLOPs reductions of the token-only rows, e.g. 0.35 0.5."})
    stack_flops_reduction: float | None = field(
        default=None, metadata={"help": "FLOPs reduction of the stacked row, relative to its gohsp model."})
    dense_epochs: float | None = field(default=None, metadata={"help": "Epochs of the dense model."})
    prune_epochs: float | None = field(default=None, metadata={"help": "Epochs of each pruning run."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training split."})
    threads: int | None = field(default=None, metadata={"help": "torch threads for training and evaluation."})
    workers: int | None = field(default=None, metadata={"help": "Pruning runs in parallel (processes)."})
    dense_processes: int | None = field(
        default=None, metadata={"help": "Processes training the dense model together (torchrun, DDP over gloo)."})
    speed_threads: int | None = field(default=None, metadata={"help": "torch threads while timing."})
    speed_repeats: int | None = field(default=None, metadata={"help": "Timed repeats per speed figure (>= 5)."})


def resolve_settings(args: TokenBenchmarkArguments) -> TokenSettings:
    values = dict(TOKENS_DIGITS_QUICK if args.quick else TOKENS_FASHION_MNIST)
    for key in ("output_dir", "markdown_file", "cache_dir", "models_dir", "seeds", "token_reductions",
                "stack_flops_reduction", "dense_epochs", "prune_epochs", "max_train_samples", "threads", "workers",
                "dense_processes", "speed_threads", "speed_repeats"):
        value = getattr(args, key)
        if value is not None:
            values[key] = value
    if args.output_dir is not None and args.quick:  # the quick run's page and models go with its JSON
        if args.markdown_file is None:
            values["markdown_file"] = str(Path(args.output_dir) / "BENCHMARKS_TOKENS.md")
        if args.models_dir is None:
            values["models_dir"] = str(Path(args.output_dir) / "models")
    values["methods"] = []  # derived below: the row names
    settings = TokenSettings(**values)
    settings.methods, settings.sparsities = row_names(settings), [settings.gohsp_sparsity]
    if settings.speed_repeats < 5:
        raise SystemExit(f"--speed_repeats {settings.speed_repeats}: the benchmark takes the median of at least 5.")
    for reduction in [*settings.token_reductions, settings.stack_flops_reduction]:
        if not 0 < reduction < 1:
            raise SystemExit(f"A FLOPs reduction of {reduction}: choose one between 0 and 1.")
    return settings


# --------------------------------------------------------------------------- one run


class Job(NamedTuple):
    """One pruning run: ``kind`` is "tokens" (from the dense model), "gohsp" or "stack" (from the gohsp model)."""

    row: str
    kind: str
    seed: int
    target_flops_reduction: float | None = None  # of the FLOPs of the model the run starts from


def jobs_of(settings: TokenSettings) -> list[Job]:
    """Every run, gohsp first (the stacked runs wait for theirs), then the token rows, then the stacked ones."""
    gohsp = [Job(gohsp_row(settings.gohsp_sparsity), "gohsp", seed) for seed in settings.seeds]
    tokens = [Job(token_row(r), "tokens", seed, r) for r in settings.token_reductions for seed in settings.seeds]
    stacked = [Job(stack_row(settings.gohsp_sparsity), "stack", seed, settings.stack_flops_reduction)
               for seed in settings.seeds]
    return gohsp + tokens + stacked


def model_dir(settings: TokenSettings, row: str, seed: int) -> Path:
    return Path(settings.models_dir) / f"{row.replace('+', '_plus_')}-seed{seed}"


def base_dir(settings: TokenSettings, seed: int) -> Path:
    """The saved gohsp model that the stacked run of ``seed`` starts from."""
    return model_dir(settings, gohsp_row(settings.gohsp_sparsity), seed)


def token_config(settings: Settings, reduction: float, seed: int) -> PruningConfig:
    """spvit_tokens at ``reduction`` fewer FLOPs than the model it is given; the main benchmark's search share,
    calibration images and distillation weight."""
    return PruningConfig(method=TOKEN_METHOD, target_flops_reduction=reduction,
                         calibration_samples=settings.calibration_samples,
                         distillation_weight=settings.distillation_weight,
                         method_options=method_options(settings, TOKEN_METHOD, seed))


def tokens_per_layer(model, stats) -> list[int]:
    """The tokens every encoder layer sees (all of them in a model without a token path)."""
    return [num_tokens(model) if layer.tokens is None else layer.tokens for layer in stats.layers]


def prune_once(settings: TokenSettings, data, job: Job) -> dict:
    """Train one row's run, evaluate it on the test and validation splits, save the model; its record (untimed)."""
    dense_stats = model_stats(load_dense(settings))
    if job.kind == "stack":
        source = base_dir(settings, job.seed)
        model = AutoModelForImageClassification.from_pretrained(source)
    else:
        model = load_dense(settings)
    start_stats = model_stats(model)
    if job.kind == "gohsp":
        config = pruning_config(settings, STRUCTURAL_METHOD, settings.gohsp_sparsity, job.seed)
    else:
        config = token_config(settings, job.target_flops_reduction, job.seed)
    with tempfile.TemporaryDirectory() as tmp:
        args = training_arguments(settings, tmp, epochs=settings.prune_epochs,
                                  learning_rate=settings.prune_learning_rate, seed=job.seed)
        trainer = PruningTrainer(model=model, args=args, train_dataset=data["train"],
                                 compute_metrics=make_compute_metrics(), pruning_config=config)
        started = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - started
        ranking = next((e["ranking_seconds"] for e in trainer.state.log_history if "ranking_seconds" in e), None)
        residuals = [e["admm_residual"] for e in trainer.state.log_history
                     if e.get("phase_admm") == 1.0 and "admm_residual" in e]
        kept = {}  # each stage's sampled kept share in the last log of the selection
        for entry in trainer.state.log_history:
            kept.update({key: value for key, value in entry.items() if key.startswith("token_kept")})
        test = trainer.evaluate(eval_dataset=data["test"], metric_key_prefix="test")
        validation = trainer.evaluate(eval_dataset=data["validation"], metric_key_prefix="validation")
    save = model_dir(settings, job.row, job.seed)
    trainer.model.save_pretrained(save)
    pruned = trainer.model
    stats = model_stats(pruned)
    total_steps = trainer.state.max_steps
    sparsity = 0.0 if job.kind == "tokens" else settings.gohsp_sparsity
    record = {
        **run_figures(job.row, sparsity, job.seed, test, validation, stats, dense_stats, train_seconds, ranking,
                      finetune_steps=total_steps - trainer.method.search_steps(total_steps)),
        "row": job.row,
        "kind": job.kind,
        "pruning_method": config.method,
        "target_flops_reduction": job.target_flops_reduction,
        "tokens_per_layer": tokens_per_layer(pruned, stats),
        "flops_per_layer": [layer.flops for layer in stats.layers],
        "admm_residual_last_logged": residuals[-1] if residuals else None,
        "model_dir": str(save),
    }
    path = token_pruning_of(pruned)
    if path is not None:
        patches = num_patches(pruned)
        record["token_stages"] = {"depths": list(path.stages.depths), "keep_ratios": list(path.stages.keep_ratios),
                                  "keep_counts": path.stages.keep_counts(patches), "patches": patches,
                                  "selector_width": path.stages.selector_width,
                                  "sampled_kept_share_last_logged": kept}
    if job.kind == "stack":
        record["base"] = {"row": gohsp_row(settings.gohsp_sparsity), "model_dir": str(source),
                          "params": start_stats.params, "flops": start_stats.flops}
        record["flops_ratio_vs_base"] = stats.flops / start_stats.flops
        record["flops_speedup_vs_base"] = start_stats.flops / stats.flops
    return record


def time_record(settings: TokenSettings, record: dict, dense) -> None:
    """The run's speed against the dense model (as the main benchmark times it) and, for a stacked run, against its
    own gohsp model, side by side in one more ``measure_speed`` call."""
    pruned = AutoModelForImageClassification.from_pretrained(record["model_dir"]).eval()
    time_pruned(settings, record, pruned, dense)
    speed = record["speed"]  # images per second of the pruned model at batch 1 (from its latency) and at batch 64
    record["images_per_second"] = {"batch_1": 1000 / speed["pruned"]["latency_ms"], "batch_64": speed["pruned"]["throughput"]}
    if record["kind"] == "stack":
        base = AutoModelForImageClassification.from_pretrained(record["base"]["model_dir"]).eval()
        speed = speed_between(settings, pruned, base)
        record["speed_vs_base"] = speed
        record["throughput_ratio_vs_base"] = speed["throughput_speedup"]
        record["throughput_efficiency_vs_base"] = speed["throughput_speedup"] / record["flops_speedup_vs_base"]


# --------------------------------------------------------------------------- all runs




def _worker_job(job: Job) -> dict:
    return prune_once(WORKER["settings"], WORKER["data"], job)


def train_all(settings: TokenSettings, data, jobs: list[Job], ready_bases: set[int], on_done) -> None:
    """Train ``jobs``, in this process or in ``settings.workers`` processes; a stacked job starts once the gohsp
    model of its seed is saved (``ready_bases``: the seeds whose gohsp model already is)."""
    gohsp_seeds = {job.seed for job in jobs if job.kind == "gohsp"}
    for job in jobs:
        if job.kind == "stack" and job.seed not in gohsp_seeds | ready_bases:
            raise AssertionError(f"no gohsp model for the stacked run of seed {job.seed}")
    if settings.workers <= 1:
        for job in jobs:
            on_done(job, prune_once(settings, data, job))
        return
    waiting = [job for job in jobs if job.kind == "stack" and job.seed not in ready_bases]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(settings.workers, mp_context=context, initializer=init_worker,
                             initargs=(settings.to_dict(), TokenSettings)) as pool:
        futures = {pool.submit(_worker_job, job): job for job in jobs if job not in waiting}
        while futures:
            done, _ = wait(futures, return_when=FIRST_COMPLETED)
            for future in done:
                job = futures.pop(future)
                on_done(job, future.result())
                if job.kind == "gohsp":
                    for stacked in [w for w in waiting if w.seed == job.seed]:
                        waiting.remove(stacked)
                        futures[pool.submit(_worker_job, stacked)] = stacked


def _load_previous(settings: TokenSettings) -> dict | None:
    """The results JSON to resume from, or None when there is none or it was written with other settings."""
    path = settings.results_path
    if not path.is_file():
        return None
    previous = json.loads(path.read_text())
    old, new = with_defaults(previous.get("settings", {}), TokenSettings), settings.to_dict()
    if old != new:
        changed = sorted(key for key in old.keys() | new.keys() if old.get(key) != new.get(key))
        logger.warning("Not resuming: %s was written with other settings (%s).", path, ", ".join(changed))
        return None
    return previous


def _kept_runs(settings: TokenSettings, previous: dict) -> list[dict]:
    """The finished runs to keep; a stacked run goes with its gohsp run, whose model must still be on disk."""
    runs = list(previous.get("runs", []))
    gohsp = {r["seed"] for r in runs if r["kind"] == "gohsp"}
    kept = [r for r in runs if r["kind"] != "stack" or r["seed"] in gohsp]
    for seed in gohsp:
        stacked_done = any(r["kind"] == "stack" and r["seed"] == seed for r in kept)
        if not stacked_done and not (base_dir(settings, seed) / "config.json").is_file():
            raise SystemExit(
                f"--resume: the gohsp run of seed {seed} is kept but its model ({base_dir(settings, seed)}) is gone, "
                f"and the stacked run of that seed starts from it. Restore it, pass the --models_dir it is in, or "
                f"drop --resume."
            )
    return kept


def run(settings: TokenSettings, command: str, resume: bool = False) -> dict:
    started = time.perf_counter()
    torch.set_num_threads(settings.threads)
    previous = _load_previous(settings) if resume else None
    results, earlier = open_results(settings, command, previous)
    data = load_data(settings)
    logger.info("data: %s", {name: len(split) for name, split in data.items()})
    dense_info = train_or_reuse_dense(settings.dense_settings(), data)
    dense = load_dense(settings).eval()
    dense_stats = model_stats(dense)
    results["dense"] = {
        "config": settings.model,
        "params": dense_stats.params,
        "flops": dense_stats.flops,
        "tokens": num_tokens(dense),
        "patches": num_patches(dense),
        "training": dense_info,
        "validation": evaluate(dense, settings, data["validation"], "validation"),
        "test": evaluate(dense, settings, data["test"], "test"),
        "split_sizes": {name: len(split) for name, split in data.items()},
    }
    logger.info("dense: %s", {k: results["dense"][k] for k in ("params", "flops", "tokens", "test")})
    runs = _kept_runs(settings, previous) if previous else []
    results["runs"] = runs
    done = {(r["row"], r["seed"]) for r in runs}
    jobs = [job for job in jobs_of(settings) if (job.row, job.seed) not in done]
    ready = {r["seed"] for r in runs if r["kind"] == "gohsp"}

    def finished(job: Job, record: dict) -> None:
        logger.info("%s seed %d: test %.4f, FLOPs ratio %.4f, tokens per layer %s, train() %.0fs", record["row"],
                    record["seed"], record["test_accuracy"], record["flops_ratio"], record["tokens_per_layer"],
                    record["train_seconds"])
        runs.append(record)  # saved untimed at once: an interrupted benchmark keeps it (--resume times it)
        _write(settings, results)

    Path(settings.models_dir).mkdir(parents=True, exist_ok=True)
    train_all(settings, data, jobs, ready, finished)
    # Timing after all training, so that no pruning job of ours competes with the clock; gohsp before the stacks.
    order = {"gohsp": 0, "tokens": 1, "stack": 2}
    untimed = [r for r in runs if "speed" not in r]
    for record in sorted(untimed, key=lambda r: (order[r["kind"]], r["row"], r["seed"])):
        time_record(settings, record, dense)
        logger.info("%s seed %d: throughput x%.2f, FLOPs x%.2f%s", record["row"], record["seed"],
                    record["speed"]["throughput_speedup"], record["flops_speedup"],
                    f", against its gohsp model x{record['throughput_ratio_vs_base']:.2f}"
                    if record["kind"] == "stack" else "")
        _write(settings, results)
    rows = row_names(settings)
    runs.sort(key=lambda r: (rows.index(r["row"]), r["seed"]))
    results["summary"] = summarise(results)
    close_results(results, earlier, started)
    _write(settings, results)
    return results


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    transformers.logging.set_verbosity_warning()
    argv = list(sys.argv[1:] if argv is None else argv)
    (args,) = HfArgumentParser(TokenBenchmarkArguments).parse_args_into_dataclasses(args=argv)
    settings = resolve_settings(args)
    results = results_of(args, settings, argv, "benchmarks.tokens", run, summarise)
    write_markdown(results, Path(settings.markdown_file))
    logger.info("wrote %s", ", ".join(map(str, [settings.markdown_file] + ([] if args.report_only
                                                                           else [settings.results_path]))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
