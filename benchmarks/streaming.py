"""The recipe's ``--streaming`` on Fashion-MNIST written as an imagefolder: what it saves, and that it prunes alike.

A slice of Fashion-MNIST (``--train_images`` training and ``--validation_images`` validation images of
``hf_vitprune.data.load_fashion_mnist``) is written as two imagefolders under ``--work_dir`` and reused on
later runs. Both are sharded, ``train/shard-<k>/<class>/<i>.png`` with ``--shard_images`` (64, one
batch) images a shard: an imagefolder is read path by path, so a plain ``<class>/<i>.png`` folder
read in its stored order gives one class at a time, and both runs below must read the stored order. A small
ViT for 28x28 grey images (hidden 64, 4 layers, 4 heads, MLP 128, 4x4 patches) is first fine-tuned densely
for ``--dense_epochs`` on the same training images in memory, so that the pruned accuracy means something
(cached in the work dir too). Then ``examples/prune_imagenet.py`` prunes it to ``--target_sparsity`` twice,
as subprocesses, each with a fresh ``--cache_dir``, reading the images in their stored order
(``--train_sampling_strategy sequential``) for ``--max_steps`` steps:

- ``in_memory``: the imagefolders loaded (``datasets`` first writes its Arrow cache: for local files, their
  paths and labels, not the pixels);
- ``streaming``: the same folders with ``--streaming true`` (a ``datasets.IterableDataset``, decoded as read).

Measured per run: wall time, wall time until the first logged training step (``--logging_first_step``: data
loading, the dense evaluation and the method's ranking pass come before it), bytes written under its
``--cache_dir``, the child's peak RSS (``getrusage`` in a small wrapper process), the recipe's eval accuracy
(``eval_results.json``); and whether the two runs' ``pruning_plan.json`` are identical (and their weights'
largest difference). Both runs read the PNGs after the writer or an earlier run did, so the page cache is
warm for both; the machine may be shared, so the load averages around each run are saved too.

With the defaults, about 4 minutes on 2 idle CPU cores once the dense model is cached, plus about 4.5 minutes
for its fine-tuning the first time (measured under a load average of about 3; the whole script took 14 minutes
then)::

    apt-get update && apt-get install -y dataset-fashion-mnist   # /usr/share/datasets/fashion-mnist
    python -m benchmarks.streaming

It prints a table and writes ``benchmarks/results/fashion_mnist_streaming.json``.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers
from transformers import (HfArgumentParser, Trainer, TrainingArguments, ViTConfig, ViTForImageClassification,
                          ViTImageProcessor)

from hf_vitprune.data import (FASHION_MNIST_DIR, imagefolder_class_name, load_fashion_mnist,
                              write_imagefolder)
from hf_vitprune.fileio import atomic_directory
from hf_vitprune.metrics import make_compute_metrics

logger = logging.getLogger("benchmarks.streaming")

ROOT = Path(__file__).resolve().parent.parent
RECIPE = "examples/prune_imagenet.py"
MODES = ("in_memory", "streaming")
FOLDERS_INFO_FILE = "imagefolders.json"  # written last: marks a complete pair of imagefolders
DENSE_INFO_FILE = "streaming_dense.json"  # written last: marks a complete dense model
# 28x28 grey images in 4x4 patches (49 patches + CLS): the recipe's default architecture at Fashion-MNIST's size.
MODEL = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, image_size=28,
             patch_size=4, num_channels=1)


@dataclass
class StreamingBenchmarkArguments:
    """Command-line flags; every one is saved in the results JSON."""

    train_images: int = field(default=12000, metadata={"help": "Training images written to the train imagefolder."})
    validation_images: int = field(default=2000,
                                   metadata={"help": "Validation images written (the recipe evaluates on them)."})
    shard_images: int = field(
        default=64,
        metadata={"help": "Training images per shard directory (train/shard-<k>/<class>/<i>.png), so that the stored "
                          "order mixes the classes; 0 writes a plain imagefolder, read class by class."})
    work_dir: str = field(default="outputs/streaming-bench", metadata={"help": "Imagefolders, dense model, runs."})
    data_dir: str = field(default=str(FASHION_MNIST_DIR), metadata={"help": "Fashion-MNIST's IDX files."})
    dense_epochs: float = field(default=5, metadata={"help": "Dense fine-tuning epochs before pruning (0: untrained)."})
    dense_learning_rate: float = field(default=2e-3, metadata={"help": "AdamW learning rate of the dense fine-tuning."})
    dense_batch_size: int = field(default=128, metadata={"help": "Batch of the dense fine-tuning."})
    max_steps: int = field(default=600, metadata={"help": "--max_steps of each pruning run (ADMM + fine-tuning)."})
    batch_size: int = field(default=64, metadata={"help": "--per_device_train_batch_size of each pruning run."})
    eval_batch_size: int = field(default=500, metadata={"help": "--per_device_eval_batch_size of each pruning run."})
    learning_rate: float = field(default=1e-3, metadata={"help": "--learning_rate of each pruning run."})
    target_sparsity: float = field(default=0.4, metadata={"help": "--target_sparsity of each pruning run."})
    logging_steps: int = field(default=50, metadata={"help": "--logging_steps of each pruning run."})
    seed: int = field(default=0, metadata={"help": "Seed of the dense model and of both pruning runs."})
    output_dir: str = field(default="benchmarks/results", metadata={"help": "Where the JSON goes."})
    results_name: str = field(default="fashion_mnist_streaming", metadata={"help": "The JSON's name, without .json."})

    @property
    def results_path(self) -> Path:
        return Path(self.output_dir) / f"{self.results_name}.json"


# --------------------------------------------------------------------------- the data and the dense model


def write_folders(splits, train_images: int, validation_images: int, work_dir: Path, shard_images: int = 64) -> dict:
    """Train and validation imagefolders of the splits' first images, written once (atomically) and then reused.

    An imagefolder is read path by path, so a plain one (``<class>/<i>.png``) streams class by class: read in that
    order (``--train_sampling_strategy sequential``, which both runs need to see the same batches), every batch
    would hold one class and the pruned model learns nothing. With ``shard_images`` > 0 the training images go in
    shards of that many, ``train/shard-<k>/<class>/<i>.png`` (the imagefolder still takes the class from the
    parent directory), so the stored order mixes the classes within every shard, as a sharded data set's does.
    The validation folder is sharded alike: ``datasets`` names the classes only when every image of both splits
    lies equally deep. The directory is named by the counts and the shard size, so other values write another
    pair rather than a mix.
    Returns ``{"train": dir, "validation": dir, "reused": bool, "seconds": s}``.
    """
    layout = f"shards{shard_images}" if shard_images > 0 else "by-class"
    root = Path(work_dir) / f"fashion-mnist-imagefolder-{train_images}-{validation_images}-{layout}"
    info_path = root / FOLDERS_INFO_FILE
    started = time.perf_counter()
    reused = info_path.is_file()
    if not reused:
        if root.exists():  # an interrupted writer without its atomic rename cannot leave this; a stray copy can
            shutil.rmtree(root)
        counts = {"train": train_images, "validation": validation_images}
        for name, count in counts.items():
            if count > len(splits[name]):
                raise SystemExit(f"--{name}_images {count}: the {name} split has {len(splits[name])} images.")
        with atomic_directory(root) as staging:
            for name, count in counts.items():
                _write_split(splits[name].select(range(count)), staging / name, shard_images)
            (staging / FOLDERS_INFO_FILE).write_text(json.dumps({**counts, "shard_images": shard_images}) + "\n")
    return {"train": root / "train", "validation": root / "validation", "reused": reused,
            "seconds": time.perf_counter() - started}


def _write_split(split, directory: Path, shard_images: int) -> None:
    """One split as an imagefolder, plain or in shards of ``shard_images`` (fixed-width numbers: path order)."""
    if shard_images <= 0:
        write_imagefolder(split, directory)
        return
    starts = range(0, len(split), shard_images)
    width = max(5, len(str(len(starts) - 1)))
    for shard, first in enumerate(starts):
        write_imagefolder(split.select(range(first, min(first + shard_images, len(split)))),
                          directory / f"shard-{shard:0{width}d}")


def imagefolder_labels(folders: dict) -> list[str]:
    """The class names in the order the recipe numbers them: the imagefolders' own, read as the recipe reads both
    splits (streamed, so nothing is cached); a layout from which ``datasets`` infers no labels fails here."""
    from datasets import load_dataset

    files = {split: f"{folders[split]}/**" for split in ("train", "validation")}
    stream = load_dataset("imagefolder", data_files=files, streaming=True)["train"]
    if "label" not in (stream.features or {}):
        raise SystemExit(f"datasets infers no class labels from {folders['train']} and {folders['validation']}: "
                         f"every image must lie as deep as the others, in a directory named by its class.")
    return list(stream.features["label"].names)


class _Relabelled(torch.utils.data.Dataset):
    """A built-in split's first images, as tensors, with labels renumbered to the imagefolder's order (sorted names).

    Read into tensors once: indexing the Arrow-backed split costs about 2 ms an image, more than a training step's
    share of an image."""

    def __init__(self, split, count: int, new_id: list[int]):
        columns = split.with_format("torch").select(range(count))[:]
        self.pixels = columns["pixel_values"]
        self.labels = torch.tensor(new_id)[columns["labels"]]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"pixel_values": self.pixels[index], "labels": self.labels[index]}


def dense_identity(args: StreamingBenchmarkArguments) -> dict:
    """What the cached dense model was trained with; another value retrains it."""
    keys = ("train_images", "validation_images", "dense_epochs", "dense_learning_rate", "dense_batch_size", "seed")
    return {"model": MODEL, **{key: getattr(args, key) for key in keys}}


def train_or_reuse_dense(args: StreamingBenchmarkArguments, splits, labels: list[str], work_dir: Path) -> dict:
    """Fine-tune the seeded ViT densely on the in-memory training slice (or reuse it); save it with its processor.

    The processor (28x28, mean and std 0.5) turns a PNG into the built-in split's pixels exactly, so the recipe
    sees what this training saw. Returns the record (model dir, validation accuracy, seconds, reused).
    """
    model_dir = Path(work_dir) / "dense-vit"
    info_path = model_dir / DENSE_INFO_FILE
    identity = dense_identity(args)
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        if info["identity"] == identity:
            return {**info, "model_dir": str(model_dir), "reused": True}
        shutil.rmtree(model_dir)
    builtin = list(splits["train"].features["labels"].names)
    new_id = [labels.index(imagefolder_class_name(name)) for name in builtin]
    train = _Relabelled(splits["train"], args.train_images, new_id)
    validation = _Relabelled(splits["validation"], args.validation_images, new_id)
    torch.manual_seed(args.seed)
    config = ViTConfig(**MODEL, num_labels=len(labels), id2label=dict(enumerate(labels)),
                       label2id={name: i for i, name in enumerate(labels)})
    model = ViTForImageClassification(config)
    started = time.perf_counter()
    accuracy = None
    with tempfile.TemporaryDirectory() as tmp:
        training = TrainingArguments(tmp, num_train_epochs=args.dense_epochs, learning_rate=args.dense_learning_rate,
                                     per_device_train_batch_size=args.dense_batch_size, per_device_eval_batch_size=500,
                                     weight_decay=0.05, warmup_steps=0.05, lr_scheduler_type="cosine", seed=args.seed,
                                     save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                                     logging_steps=50)
        trainer = Trainer(model=model, args=training, train_dataset=train, compute_metrics=make_compute_metrics())
        if args.dense_epochs > 0:
            trainer.train()
        accuracy = trainer.evaluate(eval_dataset=validation)["eval_accuracy"]
    info = {"identity": identity, "validation_accuracy": accuracy, "train_seconds": time.perf_counter() - started}
    with atomic_directory(model_dir) as staging:
        model.save_pretrained(staging)
        ViTImageProcessor(size={"height": 28, "width": 28}, image_mean=[0.5], image_std=[0.5]).save_pretrained(staging)
        (staging / DENSE_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return {**info, "model_dir": str(model_dir), "reused": False}


# --------------------------------------------------------------------------- one recipe run


def recipe_command(args: StreamingBenchmarkArguments, mode: str, folders: dict, model_dir: str, output_dir: Path,
                   cache_dir: Path) -> list[str]:
    """The recipe's command line for ``mode``; the two modes differ only in ``--streaming`` and their directories."""
    command = [sys.executable, RECIPE, "--model_name_or_path", str(model_dir), "--train_dir", str(folders["train"]),
               "--validation_dir", str(folders["validation"]), "--output_dir", str(output_dir),
               "--cache_dir", str(cache_dir), "--max_steps", str(args.max_steps),
               "--per_device_train_batch_size", str(args.batch_size),
               "--per_device_eval_batch_size", str(args.eval_batch_size), "--learning_rate", str(args.learning_rate),
               "--target_sparsity", str(args.target_sparsity), "--seed", str(args.seed),
               "--logging_steps", str(args.logging_steps), "--logging_first_step", "true",
               "--train_sampling_strategy", "sequential", "--save_strategy", "no",
               "--use_cpu", "true", "--disable_tqdm", "true"]
    if mode == "streaming":
        command += ["--streaming", "true"]
    return command


def is_training_log(line: str) -> bool:
    """A Trainer log line of a training step (the printer callback's dict, with a loss)."""
    line = line.strip()
    return line.startswith("{") and "'loss'" in line


# Runs the recipe and writes its peak RSS (KiB) to argv[1]. A child started straight from this process would report
# at least this process's own peak (Linux carries the exec'ing process's high-water mark over into the child's
# ru_maxrss), which the in-memory Fashion-MNIST and torch make large; this small interpreter has little to carry.
_RSS_WRAPPER = ("import resource, subprocess, sys\n"
                "status = subprocess.call(sys.argv[2:])\n"
                "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))\n"
                "sys.exit(status)\n")


def run_child(command: list[str], env: dict, log_path: Path) -> dict:
    """Run ``command``, copying its output to ``log_path``; its wall time, time to the first training log, peak RSS."""
    started = time.perf_counter()
    first_step = None
    with tempfile.TemporaryDirectory() as tmp, open(log_path, "w") as log:
        rss_file = Path(tmp) / "maxrss"
        process = subprocess.Popen([sys.executable, "-c", _RSS_WRAPPER, str(rss_file), *command], cwd=ROOT, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in process.stdout:
            if first_step is None and is_training_log(line):
                first_step = time.perf_counter() - started
            log.write(line)
        status = process.wait()
        seconds = time.perf_counter() - started
        peak_kib = int(rss_file.read_text()) if rss_file.is_file() else None
    if status != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"{shlex.join(command)} failed (exit {status}); the end of {log_path}:\n{tail}")
    return {"wall_seconds": seconds, "first_step_seconds": first_step, "peak_rss_bytes": peak_kib * 1024}


def directory_size(path: Path) -> dict:
    """Bytes and files under ``path`` (0 and 0 when it was never created)."""
    files = [p for p in Path(path).rglob("*") if p.is_file() and not p.is_symlink()] if Path(path).exists() else []
    return {"bytes": sum(p.stat().st_size for p in files), "files": len(files)}


def run_mode(args: StreamingBenchmarkArguments, mode: str, folders: dict, model_dir: str, work_dir: Path) -> dict:
    """One recipe run in fresh output and cache directories; its measurements and its outputs' paths."""
    runs = Path(work_dir) / "runs"
    output_dir, cache_dir = runs / mode, runs / f"{mode}-datasets-cache"
    for directory in (output_dir, cache_dir):
        shutil.rmtree(directory, ignore_errors=True)
    runs.mkdir(parents=True, exist_ok=True)
    command = recipe_command(args, mode, folders, model_dir, output_dir, cache_dir)
    # Anything datasets writes goes under the run's cache dir, so the size measured there is all of it.
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(cache_dir),
               PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    logger.info("%s: %s", mode, shlex.join(command))
    load_before = os.getloadavg()  # the machine may be shared: the load says how far to trust the wall times
    figures = run_child(command, env, runs / f"{mode}.log")
    evaluation = json.loads((output_dir / "eval_results.json").read_text())
    dense = json.loads((output_dir / "dense_results.json").read_text())
    return {
        "mode": mode,
        "command": shlex.join([Path(command[0]).name, *command[1:]]),
        **figures,
        "cache": directory_size(cache_dir),
        "eval_accuracy": evaluation["eval_accuracy"],
        "dense_eval_accuracy": _accuracy(dense),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "output_dir": str(output_dir),
        "cache_dir": str(cache_dir),
        "log": str(runs / f"{mode}.log"),
    }


def _accuracy(metrics: dict) -> float | None:
    return next((value for key, value in metrics.items() if key.endswith("accuracy") and "top5" not in key), None)


def compare_runs(first: Path, second: Path) -> dict:
    """Whether two recipe outputs hold the same pruning plan, and how far apart their weights are."""
    from safetensors.torch import load_file

    plans = [json.loads((Path(d) / "pruning_plan.json").read_text()) for d in (first, second)]
    weights = [load_file(Path(d) / "model.safetensors") for d in (first, second)]
    same_keys = weights[0].keys() == weights[1].keys()
    difference = None
    if same_keys and all(weights[0][k].shape == weights[1][k].shape for k in weights[0]):
        difference = max((weights[0][k].float() - weights[1][k].float()).abs().max().item() for k in weights[0])
    return {"plans_identical": plans[0] == plans[1], "max_weight_difference": difference}


# --------------------------------------------------------------------------- the table and the JSON


def table_rows(results: dict) -> list[list[str]]:
    """The printed table: a header, then one row per run."""
    plans = "yes" if results["comparison"]["plans_identical"] else "no"
    rows = [["run", "wall time (s)", "to first step (s)", "datasets cache written", "peak RSS (MiB)",
             "eval accuracy", "same pruning plan"]]
    for run in results["runs"]:
        first = run["first_step_seconds"]
        rows.append([run["mode"], f"{run['wall_seconds']:.1f}", "-" if first is None else f"{first:.1f}",
                     f"{_size(run['cache']['bytes'])} ({run['cache']['files']} files)",
                     f"{run['peak_rss_bytes'] / 2**20:.0f}", f"{100 * run['eval_accuracy']:.2f}%", plans])
    return rows


def _size(count: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows[1:]])


def git_commit() -> dict:
    """The commit the figures were measured at, and whether the tree had uncommitted changes."""
    def git(*command: str) -> str:
        return subprocess.run(["git", *command], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain"))}


def write_json(path: Path, data: dict) -> None:
    """Write through a temporary file in the same directory and rename it: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", suffix=".partial",
                                     delete=False) as handle:
        handle.write(json.dumps(data, indent=2) + "\n")
    os.replace(handle.name, path)


def run(args: StreamingBenchmarkArguments, command: str) -> dict:
    started = time.perf_counter()
    work_dir = Path(args.work_dir)
    results = {
        "command": command,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git": git_commit(),
        "settings": {**asdict(args), "model": MODEL},
        "environment": {"cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                        "transformers": transformers.__version__, "platform": platform.platform(),
                        "load_average_at_start": os.getloadavg()},
    }
    import datasets

    results["environment"]["datasets"] = datasets.__version__
    splits = load_fashion_mnist(args.data_dir)
    folders = write_folders(splits, args.train_images, args.validation_images, work_dir, args.shard_images)
    results["imagefolders"] = {"train": str(folders["train"]), "validation": str(folders["validation"]),
                               "reused": folders["reused"], "seconds": folders["seconds"],
                               "bytes": directory_size(folders["train"].parent)["bytes"]}
    logger.info("imagefolders: %s", results["imagefolders"])
    labels = imagefolder_labels(folders)
    dense = train_or_reuse_dense(args, splits, labels, work_dir)
    results["dense"] = dense
    logger.info("dense model: %s", dense)
    results["runs"] = [run_mode(args, mode, folders, dense["model_dir"], work_dir) for mode in MODES]
    results["comparison"] = compare_runs(*(r["output_dir"] for r in results["runs"]))
    results["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    results["total_seconds"] = time.perf_counter() - started
    return results


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    transformers.logging.set_verbosity_warning()
    argv = list(sys.argv[1:] if argv is None else argv)
    (args,) = HfArgumentParser(StreamingBenchmarkArguments).parse_args_into_dataclasses(args=argv)
    if not Path(args.data_dir).is_dir():
        raise SystemExit(f"No Fashion-MNIST in {args.data_dir}: apt-get install -y dataset-fashion-mnist, or pass "
                         f"--data_dir.")
    results = run(args, "python -m benchmarks.streaming" + "".join(f" {shlex.quote(a)}" for a in argv))
    write_json(args.results_path, results)
    print(markdown_table(table_rows(results)))
    print(f"pruning plans identical: {results['comparison']['plans_identical']}; largest weight difference: "
          f"{results['comparison']['max_weight_difference']}; wrote {args.results_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
