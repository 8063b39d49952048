"""How gohsp's accuracy drop at 40% sparsity shrinks with the pruning run's epoch budget.

The full benchmark gives every pruning run 2 epochs; where gohsp at 40% misses "within 0.3 points
of dense", this curve shows what more epochs buy. It reuses the benchmark's cached dense model,
data, recipe and runner (``benchmarks.run.prune_all``), only ``prune_epochs`` changes, and writes
``benchmarks/results/fashion_mnist_epochs.json``, which ``python -m benchmarks.run --report_only``
renders into BENCHMARKS.md. Run from the repository root after the full benchmark::

    python -m benchmarks.epochs_curve --epochs 4 8 --seeds 0 1

(about 15 minutes on 2 CPU cores: one run per process, two at a time).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import HfArgumentParser

from hf_vitprune.fileio import atomic_directory

from .common import FASHION_MNIST, Settings, load_data
from .run import prune_all

logger = logging.getLogger("benchmarks")
RESULTS_NAME = "fashion_mnist_epochs.json"


@dataclass
class CurveArguments:
    epochs: list[float] = field(default_factory=lambda: [4.0, 8.0], metadata={"help": "Pruning epochs to run."})
    seeds: list[int] = field(default_factory=lambda: [0, 1], metadata={"help": "Seeds of every point."})
    method: str = field(default="gohsp", metadata={"help": "The method whose curve is drawn."})
    sparsity: float = field(default=0.4, metadata={"help": "Parameter sparsity of every run."})
    workers: int = field(default=2, metadata={"help": "Runs in parallel (processes, one torch thread each)."})


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    transformers.logging.set_verbosity_warning()
    (args,) = HfArgumentParser(CurveArguments).parse_args_into_dataclasses(args=argv if argv is not None else sys.argv[1:])
    base = Settings(**FASHION_MNIST)
    if not (Path(base.cache_dir) / "config.json").is_file():
        raise SystemExit(f"No cached dense model in {base.cache_dir}: run `python -m benchmarks.run` first.")
    torch.set_num_threads(base.threads)
    data = load_data(base) if args.workers <= 1 else None  # workers load their own
    records = []
    for epochs in args.epochs:  # the benchmark's own runner, its workers loading the data once each
        settings = dataclasses.replace(base, prune_epochs=epochs, workers=args.workers)
        jobs = [(args.method, args.sparsity, seed) for seed in args.seeds]

        def finished(record: dict, directory: str, epochs=epochs) -> None:
            record["prune_epochs"] = epochs
            logger.info("%s @ %.2f, %g epochs, seed %d: test %.4f", record["method"], record["sparsity"], epochs,
                        record["seed"], record["test_accuracy"])
            records.append(record)

        with tempfile.TemporaryDirectory() as models_dir:
            prune_all(settings, data, jobs, Path(models_dir), finished)
    path = Path(base.output_dir) / RESULTS_NAME
    with atomic_directory(path.parent) as staging:
        (staging / path.name).write_text(json.dumps({"method": args.method, "sparsity": args.sparsity,
                                                     "runs": records}, indent=2) + "\n")
    logger.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
