"""How gohsp's accuracy drop at 40% sparsity shrinks with the pruning run's epoch budget.

The full benchmark gives every pruning run 2 epochs; where gohsp at 40% misses "within 0.3 points
of dense", this curve shows what more epochs buy. It reuses the benchmark's cached dense model,
data, recipe and runner (``benchmarks.run.prune_once``), only ``prune_epochs`` changes, and writes
``benchmarks/results/fashion_mnist_epochs.json``, which ``python -m benchmarks.run --report_only``
renders into BENCHMARKS.md. Run from the repository root after the full benchmark::

    python -m benchmarks.epochs_curve --epochs 4 8 --seeds 0 1

(about 15 minutes on 2 CPU cores: one run per process, two at a time).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import HfArgumentParser

from hf_vitprune.fileio import atomic_directory

from .common import FASHION_MNIST, Settings, load_data
from .run import prune_once

logger = logging.getLogger("benchmarks")
RESULTS_NAME = "fashion_mnist_epochs.json"


@dataclass
class CurveArguments:
    epochs: list[float] = field(default_factory=lambda: [4.0, 8.0], metadata={"help": "Pruning epochs to run."})
    seeds: list[int] = field(default_factory=lambda: [0, 1], metadata={"help": "Seeds of every point."})
    method: str = field(default="gohsp", metadata={"help": "The method whose curve is drawn."})
    sparsity: float = field(default=0.4, metadata={"help": "Parameter sparsity of every run."})
    workers: int = field(default=2, metadata={"help": "Runs in parallel (processes, one torch thread each)."})


def _one(settings: dict, method: str, sparsity: float, seed: int) -> dict:
    transformers.logging.set_verbosity_warning()
    settings = Settings(**settings)
    torch.set_num_threads(settings.threads)
    data = load_data(settings)
    with tempfile.TemporaryDirectory() as save_dir:
        record = prune_once(settings, data, method, sparsity, seed, save_dir)
    record["prune_epochs"] = settings.prune_epochs
    return record


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    (args,) = HfArgumentParser(CurveArguments).parse_args_into_dataclasses(args=argv if argv is not None else sys.argv[1:])
    base = Settings(**FASHION_MNIST)
    if not (Path(base.cache_dir) / "config.json").is_file():
        raise SystemExit(f"No cached dense model in {base.cache_dir}: run `python -m benchmarks.run` first.")
    jobs = [(dataclasses.replace(base, prune_epochs=epochs).to_dict(), args.method, args.sparsity, seed)
            for epochs in args.epochs for seed in args.seeds]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.workers, mp_context=context) as pool:
        records = list(pool.map(_one, *zip(*jobs)))
    for record in records:
        logger.info("%s @ %.2f, %g epochs, seed %d: test %.4f", record["method"], record["sparsity"],
                    record["prune_epochs"], record["seed"], record["test_accuracy"])
    path = Path(base.output_dir) / RESULTS_NAME
    with atomic_directory(path.parent) as staging:
        (staging / path.name).write_text(json.dumps({"method": args.method, "sparsity": args.sparsity,
                                                     "runs": records}, indent=2) + "\n")
    logger.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
