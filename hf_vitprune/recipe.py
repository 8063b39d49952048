"""The end-to-end pruning job behind ``examples/prune_imagenet.py`` and ``hf-vitprune prune``.

Loads a model and data, evaluates the dense model, prunes with :class:`PruningTrainer`,
evaluates and times the pruned model, prints a before/after table, saves the model with its
card and pushes it when ``--push_to_hub`` is set. With no model and no data given it runs the
offline default: a small ViT trained (once, then cached) on scikit-learn's digits.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
)

from .config import PruningConfig, config_from_arguments, pruning_arguments
from .methods import DEFAULT_METHOD
from .metrics import make_compute_metrics

logger = logging.getLogger(__name__)

RECIPE_DEFAULTS = {  # TrainingArguments defaults of the recipe; YAML and command line override them
    "num_train_epochs": "20",
    "per_device_train_batch_size": "64",
    "per_device_eval_batch_size": "128",
    "learning_rate": "2e-3",
    "weight_decay": "0.05",
    "warmup_steps": "10",
    "eval_strategy": "no",
    "save_strategy": "no",
    "logging_steps": "20",
    "report_to": "none",
    "seed": "0",
    "target_sparsity": "0.4",
}


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Hub id or local directory of a ViT/DeiT/BEiT/DINOv2 image classifier. Empty: the offline "
                          "default, a small ViT trained on scikit-learn's digits and cached in --dense_cache_dir."},
    )
    dense_cache_dir: str = field(
        default="outputs/dense-vit-digits", metadata={"help": "Where the offline default's dense ViT is cached."}
    )
    dense_epochs: float = field(default=25, metadata={"help": "Epochs to train the offline default's dense ViT."})
    attn_implementation: str | None = field(
        default=None, metadata={"help": "Attention implementation to load the model with (eager, sdpa, ...)."}
    )


@dataclass
class DataArguments:
    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub dataset id, e.g. imagenet-1k (needs network and, for some, a token)."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset's configuration, if any."})
    train_dir: str | None = field(default=None, metadata={"help": "An imagefolder of training images (class/x.png)."})
    validation_dir: str | None = field(default=None, metadata={"help": "An imagefolder of validation images."})
    builtin_dataset: str = field(
        default="digits",
        metadata={"help": "Offline data used when neither --dataset_name nor --train_dir is given: digits or "
                          "fashion_mnist (Debian package dataset-fashion-mnist)."},
    )
    image_column_name: str = field(default="image", metadata={"help": "Column holding the images."})
    label_column_name: str = field(default="label", metadata={"help": "Column holding the integer labels."})
    validation_split_name: str = field(default="validation", metadata={"help": "Split to evaluate on."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set (debugging)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the evaluation set."})


def parse_arguments(argv: list[str] | None = None):
    """(model, data, pruning, training) arguments: recipe defaults < ``--config file.yaml`` < command line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    from_file: list[str] = []
    if "--config" in argv:
        index = argv.index("--config")
        if index + 1 >= len(argv):
            raise SystemExit("--config needs a YAML file path, e.g. --config examples/configs/digits.yaml")
        path = Path(argv[index + 1])
        del argv[index : index + 2]
        if not path.is_file():
            raise SystemExit(f"--config {path}: no such file.")
        import yaml

        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise SystemExit(f"--config {path} must hold a mapping of argument names to values.")
        from_file = _as_argv(values)
    given = from_file + argv
    defaults = dict(RECIPE_DEFAULTS)
    if "--target_flops_reduction" in given:
        del defaults["target_sparsity"]
    if "--output_dir" not in given:  # outputs/vit-digits-<method>
        method = given[given.index("--method") + 1] if "--method" in given[:-1] else DEFAULT_METHOD
        defaults["output_dir"] = f"outputs/vit-digits-{method}"
    defaults = _as_argv(defaults)
    parser = HfArgumentParser((ModelArguments, DataArguments, pruning_arguments(), TrainingArguments))
    model_args, data_args, pruning_args, training_args = parser.parse_args_into_dataclasses(
        args=defaults + from_file + argv)
    try:
        pruning_config = config_from_arguments(pruning_args)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    return model_args, data_args, pruning_config, training_args


def _as_argv(values: dict) -> list[str]:
    argv = []
    for key, value in values.items():
        argv.append(f"--{key}")
        if isinstance(value, (list, tuple)):
            argv.extend(str(v) for v in value)
        elif value is not None:
            argv.append(str(value).lower() if isinstance(value, bool) else str(value))
    return argv


# --------------------------------------------------------------------------- data


def load_data(data_args: DataArguments, model_name_or_path: str | None):
    """(train, eval, label names); image datasets get the model's processor and torch augmentation."""
    from datasets import load_dataset

    if data_args.dataset_name or data_args.train_dir:
        if data_args.dataset_name:
            raw = load_dataset(data_args.dataset_name, data_args.dataset_config_name)
        else:
            files = {"train": data_args.train_dir}
            if data_args.validation_dir:
                files["validation"] = data_args.validation_dir
            raw = load_dataset("imagefolder", data_files=_imagefolder_files(files))
        if model_name_or_path is None:
            raise SystemExit("--dataset_name/--train_dir need --model_name_or_path (the model to prune).")
        train, evaluation = raw["train"], _eval_split(raw, data_args)
        labels = train.features[data_args.label_column_name].names
        processor = AutoImageProcessor.from_pretrained(model_name_or_path)
        train = _limit(train, data_args.max_train_samples)
        evaluation = _limit(evaluation, data_args.max_eval_samples)
        train.set_transform(_image_transform(processor, data_args, augment=True))
        evaluation.set_transform(_image_transform(processor, data_args, augment=False))
        return train, evaluation, labels
    from .data import load_digits_dataset, load_fashion_mnist

    loaders = {"digits": load_digits_dataset, "fashion_mnist": load_fashion_mnist}
    if data_args.builtin_dataset not in loaders:
        raise SystemExit(f"--builtin_dataset {data_args.builtin_dataset!r}: choose {' or '.join(loaders)}.")
    splits = loaders[data_args.builtin_dataset]()
    labels = splits["train"].features["labels"].names
    return (_limit(splits["train"], data_args.max_train_samples),
            _limit(splits["validation"], data_args.max_eval_samples), labels)


def _imagefolder_files(files: dict[str, str]) -> dict[str, str]:
    """Glob patterns per split; class names come from the sub-directory names (imagefolder convention)."""
    for split, directory in files.items():
        if not Path(directory).is_dir():
            raise SystemExit(f"--{split}_dir {directory}: not a directory (expected class sub-directories of images).")
    return {split: f"{directory}/**" for split, directory in files.items()}


def _eval_split(raw, data_args: DataArguments):
    if data_args.validation_split_name in raw:
        return raw[data_args.validation_split_name]
    split = raw["train"].train_test_split(test_size=0.15, seed=0, stratify_by_column=data_args.label_column_name)
    raw["train"] = split["train"]
    return split["test"]


def _limit(dataset, count: int | None):
    return dataset if count is None else dataset.select(range(min(count, len(dataset))))


def _image_transform(processor, data_args: DataArguments, augment: bool):
    """The model's own preprocessing, plus random crops and flips in torch for training."""

    def transform(batch):
        images = [image.convert("RGB") for image in batch[data_args.image_column_name]]
        pixels = processor(images, return_tensors="pt")["pixel_values"]
        if augment:
            pixels = _augment(pixels)
        return {"pixel_values": pixels, "labels": torch.as_tensor(batch[data_args.label_column_name])}

    return transform


def _augment(pixels: torch.Tensor) -> torch.Tensor:
    """Random horizontal flip and a random crop of up to 1/8 padding, per image."""
    size = pixels.shape[-1]
    pad = max(size // 8, 1)
    padded = torch.nn.functional.pad(pixels, (pad, pad, pad, pad), mode="reflect")
    out = torch.empty_like(pixels)
    for i in range(pixels.shape[0]):
        top, left = torch.randint(0, 2 * pad + 1, (2,)).tolist()
        crop = padded[i, :, top : top + size, left : left + size]
        out[i] = crop.flip(-1) if torch.rand(()) < 0.5 else crop
    return out


# --------------------------------------------------------------------------- models


def small_vit_for_digits(labels: list[str]) -> ViTForImageClassification:
    """The offline default's architecture: 4 layers, 4 heads of 16, MLP 128, on 8x8 grey images (2x2 patches)."""
    config = ViTConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                       image_size=8, patch_size=2, num_channels=1, num_labels=len(labels),
                       id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)})
    return ViTForImageClassification(config)


def load_or_train_dense(model_args: ModelArguments, train, evaluation, labels, training_args: TrainingArguments):
    """The dense model to prune: from the Hub/a directory, or the cached offline default (trained once)."""
    kwargs = {"attn_implementation": model_args.attn_implementation} if model_args.attn_implementation else {}
    if model_args.model_name_or_path:
        return AutoModelForImageClassification.from_pretrained(
            model_args.model_name_or_path, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)}, ignore_mismatched_sizes=True, **kwargs)
    cache = Path(model_args.dense_cache_dir)
    if (cache / "config.json").is_file():
        logger.info("Reusing the dense model cached in %s", cache)
        return AutoModelForImageClassification.from_pretrained(cache, **kwargs)
    torch.manual_seed(training_args.seed)
    model = small_vit_for_digits(labels)
    args = TrainingArguments(str(cache / "trainer"), num_train_epochs=model_args.dense_epochs,
                             per_device_train_batch_size=training_args.per_device_train_batch_size,
                             learning_rate=training_args.learning_rate, weight_decay=training_args.weight_decay,
                             warmup_steps=training_args.warmup_steps, save_strategy="no", report_to=[],
                             logging_steps=training_args.logging_steps, seed=training_args.seed,
                             use_cpu=training_args.use_cpu, disable_tqdm=training_args.disable_tqdm)
    Trainer(model=model, args=args, train_dataset=train).train()
    model.save_pretrained(cache)
    return model


# --------------------------------------------------------------------------- the job


def run(model_args, data_args, pruning_config: PruningConfig, training_args: TrainingArguments) -> dict:
    """Prune end to end; returns the before/after figures it printed (the card records the same)."""
    from .trainer import PruningTrainer

    images = bool(data_args.dataset_name or data_args.train_dir)
    if images:  # the transform needs the raw image and label columns
        training_args.remove_unused_columns = False
    train, evaluation, labels = load_data(data_args, model_args.model_name_or_path)
    dense = load_or_train_dense(model_args, train, evaluation, labels, training_args)
    trainer = PruningTrainer(model=dense, args=training_args, train_dataset=train, eval_dataset=evaluation,
                             compute_metrics=make_compute_metrics(), pruning_config=pruning_config)
    trainer.evaluate_dense()
    trainer.train()
    trainer.measure_speed()
    record = trainer.run_record()
    if trainer.is_world_process_zero():
        print(format_table(record))
    trainer.save_model(training_args.output_dir)  # with --push_to_hub, Trainer.save_model also pushes
    return {
        "dense_accuracy": record.metrics_dense["accuracy"],
        "pruned_accuracy": record.metrics_pruned["accuracy"],
        "dense_params": record.dense_stats.params,
        "pruned_params": record.pruned_stats.params,
        "dense_flops": record.dense_stats.flops,
        "pruned_flops": record.pruned_stats.flops,
        "speed": record.speed,
    }


def format_table(report) -> str:
    """The before/after table the quickstart prints: the card's comparison rows (metrics first), as plain text.

    ``report`` is the run record the card is written from (``PruningTrainer.run_record()``), so the
    printed numbers are the card's.
    """
    from .reporting.table import comparison_rows, text_table

    rows = comparison_rows(report.dense_stats, report.pruned_stats, metrics_dense=report.metrics_dense,
                           metrics_pruned=report.metrics_pruned, speed=report.speed)
    lines = [text_table(rows)]
    speed = report.speed or {}
    if speed:
        threads = speed.get("torch_threads")
        lines.append(f"(timed on {speed.get('hardware')}, {threads} torch thread{'s' if threads != 1 else ''}, "
                     f"median of {speed.get('repeats')} interleaved repeats)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    model_args, data_args, pruning_config, training_args = parse_arguments(argv)
    logging.basicConfig(level=logging.INFO if training_args.should_log else logging.WARNING)
    run(model_args, data_args, pruning_config, training_args)
    return 0
