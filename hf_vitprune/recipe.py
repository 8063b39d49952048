"""The end-to-end pruning job behind ``examples/prune_imagenet.py`` and ``hf-vitprune prune``.

Loads a model and data, evaluates the dense model, prunes with :class:`PruningTrainer`,
evaluates and times the pruned model, prints a before/after table, saves the model with its
card and pushes it when ``--push_to_hub`` is set. With no model and no data given it runs the
offline default: a small ViT trained (once, then cached) on scikit-learn's digits.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import IterableDataset
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    HfArgumentParser,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
)

from .config import PruningConfig, config_from_arguments, option_owners, pruning_arguments
from .data import (
    builtin_image_processor,
    check_label,
    check_labels,
    decode_image,
    load_digits_dataset,
    load_fashion_mnist,
    split_name,
    undecoded_images,
)
from .fileio import check_writable, describe_entries, remove_stale_staging
from .methods import DEFAULT_METHOD, METHODS, get_method
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

# The TrainingArguments flags `--help` shows; `--help-all` shows all of them.
COMMON_TRAINING_FLAGS = (
    "output_dir", "num_train_epochs", "max_steps", "per_device_train_batch_size", "per_device_eval_batch_size",
    "gradient_accumulation_steps", "learning_rate", "weight_decay", "warmup_steps", "seed", "bf16", "fp16",
    "use_cpu", "eval_strategy", "save_strategy", "save_steps", "save_total_limit", "logging_steps",
    "resume_from_checkpoint", "report_to", "dataloader_num_workers", "push_to_hub", "hub_model_id", "hub_token",
)
TRAINING_ARGUMENTS_DOCS = "https://huggingface.co/docs/transformers/main_classes/trainer#transformers.TrainingArguments"
IMAGE_MODES = {1: "L", 3: "RGB", 4: "RGBA"}  # the model's num_channels -> the PIL mode images are converted to


class RecipeError(Exception):
    """A user error: printed as one line, ``<prog>: error: <message>``, exit status ``status``."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status


@dataclass
class ModelArguments:
    _argument_group_name = "model"

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Hub id or local directory of a ViT/DeiT/BEiT/DINOv2 image classifier. Empty: the offline "
                          "default, a small ViT trained on scikit-learn's digits and cached in --dense_cache_dir."},
    )
    config_name: str | None = field(
        default=None, metadata={"help": "Config to load the model with, if not the one of --model_name_or_path."}
    )
    image_processor_name: str | None = field(
        default=None,
        metadata={"help": "Image processor (Hub id or directory), if not the one of --model_name_or_path. It is "
                          "saved with the pruned model, so that pipeline() can use it."},
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "Where models, processors and datasets downloaded from the Hub are cached."}
    )
    model_revision: str = field(
        default="main", metadata={"help": "Model revision to load: a branch name, tag or commit id."}
    )
    token: str | None = field(
        default=None,
        metadata={"help": "Hub token to download gated or private models and datasets (default: the token of "
                          "`hf auth login` or HF_TOKEN). Pushing uses --hub_token."},
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Allow models whose code lives on the Hub (runs that code on this machine; read it first)."},
    )
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={"help": "Re-initialise the classification head when its number of classes differs from the "
                          "data's. The dense baseline is then untrained on these labels."},
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "Attention implementation to load the model with (eager, sdpa, ...)."}
    )
    dense_cache_dir: str = field(
        default="outputs/dense-vit-digits", metadata={"help": "Where the offline default's dense ViT is cached."}
    )
    dense_epochs: float = field(default=25, metadata={"help": "Epochs to train the offline default's dense ViT."})


@dataclass
class DataArguments:
    _argument_group_name = "data"

    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub dataset id, e.g. imagenet-1k (needs network and, for some, a token)."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset's configuration, if any."})
    train_dir: str | None = field(
        default=None, metadata={"help": "An imagefolder of training images: DIR/<class name>/<image>."}
    )
    validation_dir: str | None = field(default=None, metadata={"help": "An imagefolder of validation images."})
    builtin_dataset: str = field(
        default="digits",
        metadata={"help": "Offline data used when neither --dataset_name nor --train_dir is given: digits or "
                          "fashion_mnist (Debian package dataset-fashion-mnist)."},
    )
    image_column_name: str = field(default="image", metadata={"help": "Column holding the images."})
    label_column_name: str = field(
        default="label", metadata={"help": "Column holding the labels (class labels, integers or strings)."}
    )
    validation_split_name: str = field(default="validation", metadata={"help": "Split to evaluate on."})
    train_val_split: float = field(
        default=0.15,
        metadata={"help": "Fraction of the training split held out for evaluation when the data has no "
                          "--validation_split_name split, in (0, 1)."},
    )
    streaming: bool = field(
        default=False,
        metadata={"help": "Stream --dataset_name or --train_dir/--validation_dir (a datasets IterableDataset) instead "
                          "of loading them into memory, for ImageNet-size data. Needs --max_steps (a stream has no "
                          "length) and a validation split; calibration takes the first images of the stream."},
    )
    shuffle_buffer_size: int = field(
        default=10000,
        metadata={"help": "With --streaming: the training stream is shuffled within a buffer of this many examples "
                          "(reshuffled each epoch). --train_sampling_strategy sequential keeps the stream's order (an "
                          "imagefolder's is class by class: for comparing runs, not for training)."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set (debugging)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the evaluation set."})


@dataclass
class RunArguments:
    _argument_group_name = "run"

    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start over in an --output_dir that holds files or checkpoints (its checkpoint folders "
                          "are removed). Without it, a run resumes from the last checkpoint there, or refuses."},
    )


class _TrainingArguments(TrainingArguments):
    """TrainingArguments in their own `--help` group."""

    _argument_group_name = "training (TrainingArguments)"


# --------------------------------------------------------------------------- arguments


def recipe_defaults(given: list[str] = ()) -> dict:
    """The defaults of the command line ``given``: ``RECIPE_DEFAULTS`` and those that depend on ``given``.

    They are the parser's defaults, so that ``--help`` shows what runs. ``--save_steps N`` alone saves every
    N steps, as it does in transformers (whose default save strategy is ``steps``; the recipe's is ``no``).
    """
    defaults = dict(RECIPE_DEFAULTS)
    flags = {token.split("=", 1)[0] for token in given if token.startswith("--")}
    if "--target_flops_reduction" in flags or "--target_latency_reduction" in flags:
        del defaults["target_sparsity"]
    if "--save_steps" in flags and "--save_strategy" not in flags:
        defaults["save_strategy"] = "steps"
    defaults["output_dir"] = f"outputs/vit-digits-{_method_in(list(given)) or DEFAULT_METHOD}"
    if not _accelerator_present():  # pinned memory only helps copies to an accelerator; torch warns without one
        defaults["dataloader_pin_memory"] = "false"
    return defaults


def build_parser(prog: str | None = None, full: bool = True, method: str | None = None,
                 given: list[str] = ()) -> HfArgumentParser:
    """The recipe's parser, with the recipe's defaults for the command line ``given``; with ``full=False`` its
    help lists only ``COMMON_TRAINING_FLAGS`` of TrainingArguments and the options of ``method`` (the default
    method when None), not every method's."""
    pruning = pruning_arguments(method)
    shown = method or DEFAULT_METHOD
    pruning._argument_group_name = (
        "pruning (PruningConfig and every method's options)" if full
        else f"pruning (PruningConfig and the options of --method {shown})")
    epilog = (f"Every other TrainingArguments field is a flag too ({len(dataclasses.fields(TrainingArguments))} "
              f"in all), and so is every option of the other methods ({', '.join(sorted(set(METHODS) - {shown}))}: "
              f"--method NAME --help lists one's): see --help-all or {TRAINING_ARGUMENTS_DOCS}. "
              f"--config FILE.yaml supplies any of these arguments from a file.")
    parser = HfArgumentParser((ModelArguments, DataArguments, RunArguments, pruning, _TrainingArguments), prog=prog,
                              usage="%(prog)s [options]", epilog=None if full else epilog,
                              description="Prune an image classifier end to end: evaluate it, prune it with "
                                          "PruningTrainer, fine-tune, time it, save it with its card.")
    parser.set_defaults(**recipe_defaults(given))
    for action in parser._actions:  # the recipe's meaning of these two
        if action.dest == "save_strategy":
            action.help = "When to save checkpoints: no, steps, epoch or best (steps when --save_steps is given)."
        elif action.dest == "save_steps":
            action.help = "Save a checkpoint every N optimizer steps (a float in (0, 1): a share of the steps)."
    if not full:
        training = {f.name for f in dataclasses.fields(TrainingArguments)}
        own = {f.name for f in dataclasses.fields(get_method(shown).options_class)}
        others = {name for name in option_owners() if name not in own}
        for action in parser._actions:
            if (action.dest in training and action.dest not in COMMON_TRAINING_FLAGS) or action.dest in others:
                action.help = argparse.SUPPRESS
    return parser


def _method_in(argv: list[str]) -> str | None:
    """The value of ``--method`` on a command line, if given (a bad one is left to the parser to report)."""
    for index, arg in enumerate(argv):
        if arg == "--method" and index + 1 < len(argv):
            name = argv[index + 1]
        elif arg.startswith("--method="):
            name = arg.split("=", 1)[1]
        else:
            continue
        return name if name in METHODS else None
    return None


def parse_arguments(argv: list[str] | None = None, prog: str | None = None):
    """(model, data, run, pruning config, training) arguments: recipe defaults < ``--config file.yaml`` < command line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv or "--help-all" in argv:
        print(build_parser(prog, full="--help-all" in argv, method=_method_in(argv), given=argv).format_help())
        raise SystemExit(0)
    from_file: list[str] = []
    if "--config" in argv:
        index = argv.index("--config")
        if index + 1 >= len(argv):
            raise RecipeError("--config needs a YAML file path, e.g. --config examples/configs/digits.yaml", 2)
        path = Path(argv[index + 1])
        del argv[index : index + 2]
        if not path.is_file():
            raise RecipeError(f"--config {path}: no such file.", 2)
        import yaml

        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise RecipeError(f"--config {path} is not valid YAML: {' '.join(str(error).split())}", 2) from None
        if not isinstance(values, dict):
            raise RecipeError(f"--config {path} must hold a mapping of argument names to values.", 2)
        from_file = _as_argv(values)
    given = from_file + argv
    parser = build_parser(prog, method=_method_in(given), given=given)
    *parsed, unknown = parser.parse_args_into_dataclasses(args=given, return_remaining_strings=True)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (see --help, or --help-all for every "
                     f"TrainingArguments flag)")
    model_args, data_args, run_args, pruning_args, training_args = parsed
    training_args = _plain_training_arguments(training_args)
    try:
        pruning_config = config_from_arguments(pruning_args)
    except ValueError as error:
        raise RecipeError(str(error), 2) from None
    _check_unused_flags(given, training_args)
    if not 0 < data_args.train_val_split < 1:
        raise RecipeError(f"--train_val_split {data_args.train_val_split}: must be in (0, 1), e.g. 0.15.", 2)
    _check_streaming(data_args, training_args)
    return model_args, data_args, run_args, pruning_config, training_args


def _check_streaming(data_args: DataArguments, training_args: TrainingArguments) -> None:
    if not data_args.streaming:
        return
    if training_args.max_steps <= 0:
        raise RecipeError("--streaming needs --max_steps N: a stream has no length, so the run's optimizer steps "
                          "cannot be counted from --num_train_epochs. Pass --max_steps (e.g. epochs x images / "
                          "(batch size x processes)).", 2)
    if not (data_args.dataset_name or data_args.train_dir):
        raise RecipeError("--streaming streams --dataset_name or --train_dir; the built-in data sets are small and "
                          "always in memory. Drop --streaming, or pass --dataset_name / --train_dir.", 2)
    if data_args.shuffle_buffer_size < 1:
        raise RecipeError(f"--shuffle_buffer_size {data_args.shuffle_buffer_size}: must be at least 1 (use "
                          f"--train_sampling_strategy sequential for no shuffling).", 2)


def _plain_training_arguments(args: TrainingArguments) -> TrainingArguments:
    """The parsed ``_TrainingArguments`` as an ordinary ``TrainingArguments`` (same values)."""
    plain = TrainingArguments.__new__(TrainingArguments)
    plain.__dict__.update(args.__dict__)
    return plain


def _accelerator_present() -> bool:
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


def _check_unused_flags(given: list[str], training_args: TrainingArguments) -> None:
    """TrainingArguments' do_train/do_eval/do_predict mean nothing to the recipe, which always trains and evaluates."""
    for name in ("do_train", "do_eval", "do_predict"):
        if any(token == f"--{name}" or token.startswith(f"--{name}=") for token in given):
            value = getattr(training_args, name)
            if name == "do_predict" and value:
                raise RecipeError("--do_predict is not supported by the pruning recipe; evaluate the saved model on "
                                  "your test split with Trainer.predict or `hf-vitprune report`.", 2)
            if name != "do_predict" and not value:
                raise RecipeError(f"--{name} false is not supported: the recipe always prunes (trains) and evaluates "
                                  f"the dense and the pruned model; drop the flag.", 2)


def _as_argv(values: dict) -> list[str]:
    argv = []
    for key, value in values.items():
        argv.append(f"--{key}")
        if isinstance(value, dict):  # a YAML mapping (layer_types): the JSON the command line takes
            argv.append(json.dumps(value))
        elif isinstance(value, (list, tuple)):
            argv.extend(str(v) for v in value)
        elif value is not None:
            argv.append(str(value).lower() if isinstance(value, bool) else str(value))
    return argv


# --------------------------------------------------------------------------- output directory and Hub


def resolve_checkpoint(training_args: TrainingArguments, run_args: RunArguments, method: str) -> str | None:
    """The checkpoint to resume from (``--resume_from_checkpoint``, or the last complete one in ``--output_dir``),
    or None; picked by :func:`hf_vitprune.state.resume_checkpoint`, as ``PruningTrainer.train`` picks it.

    Like transformers' run_image_classification: an ``--output_dir`` holding checkpoints resumes from the
    last one, a non-empty one without checkpoints is refused, unless ``--overwrite_output_dir``. Checkpoints
    whose save was killed are skipped; an ``--output_dir`` holding only those (and nothing else) starts over.
    """
    from .state import FINETUNE, checkpoints_newest_first, resume_checkpoint

    output_dir = Path(training_args.output_dir)
    search_phase = get_method(method).phase_name
    phases = (FINETUNE, search_phase)
    folders = " or ".join(str(output_dir / phase) for phase in phases)
    value = training_args.resume_from_checkpoint
    if value is not None and value.strip().lower() not in ("", "false", "no"):
        newest = value.strip().lower() in ("true", "yes", "last")
        if not newest and not Path(value).is_dir():
            raise RecipeError(f"--resume_from_checkpoint {value}: no such directory. Pass a checkpoint-N directory "
                              f"(under {folders}), or true for the last one in --output_dir.")
        try:
            checkpoint = resume_checkpoint(True if newest else value, output_dir, search_phase, required=False,
                                           narrate=_narrate)
        except (OSError, ValueError) as error:
            raise RecipeError(f"--resume_from_checkpoint {value}: {_as_flags(str(error))}") from None
        if checkpoint is None:
            raise RecipeError(f"--resume_from_checkpoint {value}: no checkpoint found under {folders} (or only "
                              f"incomplete ones); run without it to start, or pass a checkpoint-N directory.")
        return checkpoint
    if not output_dir.is_dir():
        return None
    if run_args.overwrite_output_dir:
        for phase in phases:
            if (output_dir / phase).is_dir():
                logger.warning("--overwrite_output_dir: removing the checkpoints of an earlier run in %s",
                               output_dir / phase)
                shutil.rmtree(output_dir / phase)
        return None
    checkpoint = resume_checkpoint(True, output_dir, search_phase, required=False, narrate=_narrate)
    if checkpoint is not None:
        logger.info("Checkpoint detected, resuming training from %s. Pass --overwrite_output_dir true to start over "
                    "instead.", checkpoint)
        return checkpoint
    interrupted = [path for phase in phases for path in checkpoints_newest_first(output_dir / phase)]
    others = [entry for entry in output_dir.iterdir() if entry.name not in phases]
    if interrupted and not others:
        logger.warning("No complete checkpoint in %s (every save was interrupted): starting from the beginning.",
                       output_dir)
        return None
    if any(output_dir.iterdir()):
        raise RecipeError(f"--output_dir {output_dir} already exists and is not empty (it holds "
                          f"{describe_entries(output_dir)}, and no checkpoint to resume). Pass --overwrite_output_dir "
                          f"true to write over it, or choose another --output_dir.")
    return None


def _narrate(message: str, *args, level: int = logging.INFO) -> None:
    logger.log(level, message, *args)


def _as_flags(message: str) -> str:
    """A PruningTrainer message with its Python spellings as the command line's flags."""
    for python, flag in (("resume_from_checkpoint=True", "--resume_from_checkpoint true"),
                         ("resume_from_checkpoint=None", "no --resume_from_checkpoint"),
                         ("a new output_dir", "a new --output_dir")):
        message = message.replace(python, flag)
    return " ".join(message.split())


def check_hub_access(training_args: TrainingArguments) -> None:
    """With ``--push_to_hub``, fail before any work if there is no token or the Hub is switched off."""
    if not training_args.push_to_hub:
        return
    from huggingface_hub import get_token

    if _hub_offline():
        raise RecipeError("--push_to_hub needs the Hub, but HF_HUB_OFFLINE is set: unset it, or drop --push_to_hub.")
    if not (training_args.hub_token or get_token()):
        raise RecipeError("--push_to_hub needs a Hub token with write access: pass --hub_token, set HF_TOKEN, or run "
                          "`hf auth login` first.")


def check_processes(training_args: TrainingArguments) -> None:
    """``--fsdp`` shards over processes: in one process transformers fails deep in Trainer; say how to launch."""
    if training_args.fsdp and training_args.world_size < 2:
        raise RecipeError("--fsdp shards the model over several processes, and this run is one process. Launch it "
                          "with several, e.g. accelerate launch --config_file examples/accelerate_configs/fsdp.yaml "
                          "-m hf_vitprune.cli prune ..., or drop --fsdp.")


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _is_connection_error(error: BaseException) -> bool:
    if isinstance(error, ConnectionError):
        return True
    import importlib

    for module in ("httpx2", "httpx"):  # huggingface_hub's HTTP client (httpx2 in newer releases)
        try:
            transport_error = importlib.import_module(module).TransportError
        except (ImportError, AttributeError):
            continue
        if isinstance(error, transport_error):
            return True
    return False


def _hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


# --------------------------------------------------------------------------- data


@dataclass
class Data:
    """What the job trains and evaluates on, and how a user's image becomes ``pixel_values``."""

    train: object
    evaluation: object
    labels: list[str]
    processor: object
    config: object = None  # the pretrained model's config (None for the offline default)
    config_labels: int | None = None  # its number of classes before the data's labels were set


def load_data(data_args: DataArguments, model_args: ModelArguments, seed: int = 0,
              training_order: str | None = None) -> Data:
    """Train and eval sets, label names and image processor; image datasets get the model's processor and
    torch augmentation (per image, seeded by seed, epoch and index, so a resumed run sees the same crops).

    With ``data_args.streaming`` the splits stay streams (``datasets.IterableDataset``); the training
    stream is shuffled within a buffer unless ``training_order`` (``--train_sampling_strategy``) is
    ``sequential``."""
    if data_args.dataset_name or data_args.train_dir:
        if model_args.model_name_or_path is None:
            raise RecipeError("--dataset_name/--train_dir need --model_name_or_path (the model to prune).", 2)
        config = _load_config(model_args)  # before the data: a model that is not there fails at once
        raw = _load_raw(data_args, model_args)
        train, evaluation = raw["train"], _eval_split(raw, data_args)
        for split, dataset in (("train", train), ("evaluation", evaluation)):
            _check_columns(dataset, data_args, split)
        labels, encode = _labels(train, evaluation, data_args.label_column_name)
        config_labels = config.num_labels
        _check_label_count(model_args, config, labels)
        processor = _load_processor(model_args)
        mode = IMAGE_MODES.get(int(getattr(config, "num_channels", 3)))
        if mode is None:
            raise RecipeError(f"{model_args.model_name_or_path} takes {config.num_channels}-channel images; the recipe "
                              f"feeds 1 (greyscale), 3 (RGB) or 4 (RGBA) channels.")
        train = _limit(train, data_args.max_train_samples)
        evaluation = _limit(evaluation, data_args.max_eval_samples)
        if data_args.streaming:
            train = _shuffled_stream(train, data_args, training_order, seed)
        columns = data_args.image_column_name, data_args.label_column_name
        wrapper = StreamedImageClassificationData if data_args.streaming else ImageClassificationData
        train = wrapper(train, processor, *columns, mode=mode, encode=encode, augment=True, seed=seed,
                        num_labels=len(labels))
        evaluation = wrapper(evaluation, processor, *columns, mode=mode, encode=encode, num_labels=len(labels))
        return Data(train, evaluation, labels, processor, config, config_labels)

    loaders = {"digits": load_digits_dataset, "fashion_mnist": load_fashion_mnist}
    if data_args.builtin_dataset not in loaders:
        raise RecipeError(f"--builtin_dataset {data_args.builtin_dataset!r}: choose {' or '.join(loaders)}.", 2)
    try:
        splits = loaders[data_args.builtin_dataset](channels=3)  # RGB, as pipeline() and the Hub widget give it
    except FileNotFoundError as error:
        raise RecipeError(_first_line(error)) from None
    labels = splits["train"].features["labels"].names
    processor = builtin_image_processor(splits["train"])
    return Data(_limit(splits["train"], data_args.max_train_samples),
                _limit(splits["validation"], data_args.max_eval_samples), labels, processor)


def _load_raw(data_args: DataArguments, model_args: ModelArguments):
    from datasets import load_dataset

    if data_args.dataset_name:
        name = data_args.dataset_name
        try:
            return load_dataset(name, data_args.dataset_config_name, cache_dir=model_args.cache_dir,
                                token=model_args.token, streaming=data_args.streaming)
        except Exception as error:  # datasets raises ConnectionError, DatasetNotFoundError, ValueError, httpx errors
            if not (_is_connection_error(error) or isinstance(error, (OSError, ValueError))):
                raise
            raise RecipeError(
                f"could not load --dataset_name {name} ({type(error).__name__}: {_first_line(error)}). Without "
                f"network, pass --train_dir DIR (an imagefolder, DIR/<class>/<image>), or set HF_HUB_OFFLINE=1 "
                f"to use a copy already in the datasets cache."
            ) from None
    files = {"train": data_args.train_dir}
    if data_args.validation_dir:
        files["validation"] = data_args.validation_dir
    for split, directory in files.items():
        flag = f"--{split}_dir"
        if not Path(directory).is_dir():
            raise RecipeError(f"{flag} {directory}: not a directory. Expected an imagefolder: {directory}/<class "
                              f"name>/<image>.png (or .jpg, ...), one sub-directory per class.")
        if not _has_images(Path(directory)):
            raise RecipeError(f"{flag} {directory} holds no images. Expected an imagefolder: {directory}/<class "
                              f"name>/<image>.png (or .jpg, ...), one sub-directory per class.")
    try:
        return load_dataset("imagefolder", data_files={split: f"{d}/**" for split, d in files.items()},
                            cache_dir=model_args.cache_dir, streaming=data_args.streaming)
    except (ValueError, OSError) as error:
        raise RecipeError(f"could not read the imagefolder {', '.join(files.values())}: {_first_line(error)}") from None


def _has_images(directory: Path) -> bool:
    from PIL import Image

    extensions = {extension.lower() for extension in Image.registered_extensions()}
    return any(path.is_file() and path.suffix.lower() in extensions for path in directory.rglob("*"))


def _eval_split(raw, data_args: DataArguments):
    if data_args.validation_split_name in raw:
        return raw[data_args.validation_split_name]
    if data_args.streaming:
        flag = "--validation_dir" if data_args.train_dir else "--validation_split_name"
        raise RecipeError(f"--streaming needs a validation split: the data has none named "
                          f"{data_args.validation_split_name!r} (its splits: {', '.join(raw)}), and a stream cannot be "
                          f"split by --train_val_split. Pass {flag}, or drop --streaming.", 2)
    from datasets import ClassLabel

    label = data_args.label_column_name
    stratify = label if isinstance(raw["train"].features.get(label), ClassLabel) else None
    split = raw["train"].train_test_split(test_size=data_args.train_val_split, seed=0, stratify_by_column=stratify)
    raw["train"] = split["train"]
    return split["test"]


def _shuffled_stream(train, data_args: DataArguments, training_order: str | None, seed: int):
    """The training stream in the order training reads it: ``datasets``' buffered shuffle, or as stored."""
    if training_order == "sequential":
        return train
    return train.shuffle(seed=seed, buffer_size=data_args.shuffle_buffer_size)


def _check_columns(dataset, data_args: DataArguments, split: str) -> None:
    columns = dataset.column_names
    if columns is None:  # a stream whose features are not declared: the first example's
        columns = list(next(iter(dataset), {}))
    for flag, name in (("--image_column_name", data_args.image_column_name),
                       ("--label_column_name", data_args.label_column_name)):
        if name not in columns:
            raise RecipeError(f"{flag} {name!r} is not a column of the {split} split; its columns are "
                              f"{', '.join(columns)}. Pass {flag} with one of them.", 2)


def _labels(train, evaluation, column: str):
    """(label names, encode) where ``encode`` maps a raw label to its id (None: the raw label is the id)."""
    from datasets import ClassLabel, Value

    feature = (train.features or {}).get(column)
    if isinstance(feature, ClassLabel):
        return list(feature.names), None
    if isinstance(train, IterableDataset):
        raise RecipeError(f"--streaming needs the label column {column!r} to be a datasets ClassLabel (an "
                          f"imagefolder's or ImageNet's is): a stream cannot be read through first to collect the "
                          f"class names. Drop --streaming, or cast the column to ClassLabel.", 2)
    if isinstance(feature, Value) and (feature.dtype.startswith("int") or feature.dtype.startswith("uint")):
        values = set(train[column]) | set(evaluation[column])
        if min(values) < 0:
            raise RecipeError(f"--label_column_name {column!r} holds negative labels ({min(values)}); labels must be "
                              f"class ids 0..N-1 or class names.")
        return [str(i) for i in range(max(values) + 1)], None
    if isinstance(feature, Value) and feature.dtype in ("string", "large_string"):
        names = sorted(set(train[column]) | set(evaluation[column]))
        ids = {name: i for i, name in enumerate(names)}
        return names, ids.__getitem__
    raise RecipeError(f"--label_column_name {column!r} holds {feature!r}; the recipe needs class labels, integer "
                      f"class ids or class-name strings.")


def _pretrained_kwargs(model_args: ModelArguments) -> dict:
    return {"cache_dir": model_args.cache_dir, "revision": model_args.model_revision, "token": model_args.token,
            "trust_remote_code": model_args.trust_remote_code}


def _load_config(model_args: ModelArguments):
    name = model_args.config_name or model_args.model_name_or_path
    flag = "--config_name" if model_args.config_name else "--model_name_or_path"
    try:
        _check_model_source(flag, name)
        return AutoConfig.from_pretrained(name, **_pretrained_kwargs(model_args))
    except (OSError, ValueError) as error:
        raise RecipeError(f"could not load the model config of {flag} {name}: {_source_problem(flag, name, error)}") \
            from None


def _check_model_source(flag: str, name: str) -> None:
    """A name that is no local path and cannot be a Hub id is a path that does not exist: say so, not what
    the Hub client says about repo ids."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if Path(name).exists():
        return
    try:
        validate_repo_id(name)
    except HFValidationError:
        what = "an image processor from" if flag == "--image_processor_name" else "the model config of"
        raise RecipeError(f"could not load {what} {flag} {name}: no such directory ({name} does not exist). Pass "
                          f"the directory of a saved model (save_pretrained output), or a Hub model id such as "
                          f"google/vit-base-patch16-224.") from None


def _source_problem(flag: str, name: str, error: BaseException) -> str:
    """Why ``name`` did not load: its error, or for a Hub id that is not a local directory, that it is neither."""
    if Path(name).exists():
        return _first_line(error)
    reason = ("HF_HUB_OFFLINE is set and it is not in the Hub cache" if _hub_offline()
              else _first_line(error))
    return (f"{name} is neither a local directory nor reachable on the Hub ({reason}). Pass the directory of a saved "
            f"model with {flag}, or a Hub id with the network on and HF_HUB_OFFLINE unset.")


def _check_label_count(model_args: ModelArguments, config, labels: list[str]) -> None:
    if config.num_labels == len(labels) or model_args.ignore_mismatched_sizes:
        return
    name = model_args.model_name_or_path
    fix = (f"Pass --ignore_mismatched_sizes true to train a new {len(labels)}-class head (the dense baseline is then "
           f"untrained on these labels), or prune a model fine-tuned on these labels.")
    if len(labels) > config.num_labels:
        raise RecipeError(f"the data has {len(labels)} labels, but {name} classifies {config.num_labels} classes: label "
                          f"ids {config.num_labels}..{len(labels) - 1} do not fit its head. {fix}")
    raise RecipeError(f"{name} classifies {config.num_labels} classes but the data has {len(labels)} labels. {fix}")


def _load_processor(model_args: ModelArguments):
    name = model_args.image_processor_name or model_args.model_name_or_path
    flag = "--image_processor_name" if model_args.image_processor_name else "--model_name_or_path"
    try:
        _check_model_source(flag, name)
        return AutoImageProcessor.from_pretrained(name, **_pretrained_kwargs(model_args))
    except (OSError, ValueError) as error:
        raise RecipeError(f"could not load an image processor from {name} ({_source_problem(flag, name, error)}); pass "
                          f"--image_processor_name with a directory or Hub id that has a preprocessor_config.json.") \
            from None


def _limit(dataset, count: int | None):
    if count is None:
        return dataset
    if isinstance(dataset, IterableDataset):  # a stream: its first ``count`` examples
        return dataset.take(count)
    return dataset.select(range(min(count, len(dataset))))


class _ImageExamples:
    """What the recipe does to one image example: the model's processor, then for training a random crop and
    flip drawn from a generator seeded by (seed, epoch, index), not the global RNG, so that a resumed run
    augments exactly as the interrupted one (the data loader prefetches ahead of checkpoints)."""

    def __init__(self, dataset, processor, image_column: str, label_column: str, mode: str = "RGB", encode=None,
                 augment: bool = False, seed: int = 0, num_labels: int | None = None):
        self.split = split_name(dataset, "training" if augment else "evaluation")
        self.num_labels = num_labels  # labels are checked against it: up front in memory, as read for a stream
        if num_labels is not None and encode is None and not isinstance(dataset, IterableDataset):
            try:
                check_labels(dataset, label_column, num_labels, self.split)
            except ValueError as error:
                raise RecipeError(str(error)) from None
        self._token_per_repo_id = getattr(dataset, "_token_per_repo_id", None)  # what datasets decodes Hub files with
        dataset, self._image_feature = undecoded_images(dataset, image_column)  # decoded in _example, naming the file
        self.dataset, self.processor, self.mode, self.encode = dataset, processor, mode, encode
        self.image_column, self.label_column = image_column, label_column
        self.augment, self.seed, self.epoch = augment, seed, 0

    @property
    def info(self):  # the card's dataset name
        return self.dataset.info

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _example(self, example: dict, index: int) -> dict:
        image = example[self.image_column]
        if self._image_feature is not None:
            image = decode_image(self._image_feature, image, index, self.split, self._token_per_repo_id)
        if image.mode != self.mode:
            image = image.convert(self.mode)
        pixels = self.processor(image, return_tensors="pt")["pixel_values"][0]
        if self.augment:
            generator = torch.Generator().manual_seed((self.seed << 40) + (self.epoch << 24) + int(index))
            pixels = _augment(pixels[None], generator)[0]
        label = example[self.label_column]
        label = self.encode(label) if self.encode is not None else label
        if self.num_labels is not None:
            check_label(int(label), self.num_labels, index, self.split)
        return {"pixel_values": pixels, "labels": torch.tensor(label, dtype=torch.long)}


class ImageClassificationData(_ImageExamples, torch.utils.data.Dataset):
    """An in-memory image dataset as ``{"pixel_values", "labels"}`` examples (augmented per index)."""

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return self._example(self.dataset[int(index)], index)


class StreamedImageClassificationData(_ImageExamples, torch.utils.data.IterableDataset):
    """A streamed image dataset (``datasets.IterableDataset``) as ``{"pixel_values", "labels"}`` examples.

    An example's index is its position in the epoch's stream, so the augmentation of the n-th image
    read is the one the in-memory dataset gives its n-th image. ``set_epoch`` (called by the data
    loader each epoch) also reshuffles a shuffled stream. In data-loader workers, ``datasets`` gives
    each worker its own shards of the stream.
    """

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __iter__(self):
        for index, example in enumerate(self.dataset):
            yield self._example(example, index)


class AugmentationEpochCallback(TrainerCallback):
    """Tells the training set which epoch of the current phase begins (counted from steps, so resuming agrees)."""

    def __init__(self, dataset: ImageClassificationData):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, train_dataloader=None, **kwargs):
        if train_dataloader is None:
            return
        per_epoch = max(math.ceil(len(train_dataloader) / args.gradient_accumulation_steps), 1)
        phase_offset = state.max_steps - args.max_steps if args.max_steps > 0 else 0
        self.dataset.set_epoch(max(state.global_step - phase_offset, 0) // per_epoch)


def _augment(pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random horizontal flip and a random crop of up to 1/8 padding, per image."""
    size = pixels.shape[-1]
    pad = max(size // 8, 1)
    padded = torch.nn.functional.pad(pixels, (pad, pad, pad, pad), mode="reflect")
    out = torch.empty_like(pixels)
    for i in range(pixels.shape[0]):
        top, left = torch.randint(0, 2 * pad + 1, (2,), generator=generator).tolist()
        crop = padded[i, :, top : top + size, left : left + size]
        out[i] = crop.flip(-1) if torch.rand((), generator=generator) < 0.5 else crop
    return out


# --------------------------------------------------------------------------- models


def small_vit_for_digits(labels: list[str]) -> ViTForImageClassification:
    """The offline default's architecture: 4 layers, 4 heads of 16, MLP 128, on 8x8 grey images given as RGB (2x2
    patches): pipeline() converts every image to RGB, so the pruned model must take 3 channels."""
    config = ViTConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                       image_size=8, patch_size=2, num_channels=3, num_labels=len(labels),
                       id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)})
    return ViTForImageClassification(config)


def load_or_train_dense(model_args: ModelArguments, data: Data, training_args: TrainingArguments):
    """The dense model to prune: from the Hub/a directory, or the cached offline default (trained once)."""
    kwargs = {"attn_implementation": model_args.attn_implementation} if model_args.attn_implementation else {}
    labels = data.labels
    if model_args.model_name_or_path:
        config = data.config if data.config is not None else _load_config(model_args)
        if data.config is None:  # the built-in data: the model must take its images as they are
            _check_builtin_fit(model_args, config, data)
        _check_label_count(model_args, config, labels)
        old_labels = config.num_labels if data.config_labels is None else data.config_labels
        config.num_labels = len(labels)
        config.id2label, config.label2id = dict(enumerate(labels)), {name: i for i, name in enumerate(labels)}
        try:
            model = AutoModelForImageClassification.from_pretrained(
                model_args.model_name_or_path, config=config, ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
                **_pretrained_kwargs(model_args), **kwargs)
        except (OSError, ValueError) as error:
            raise RecipeError(f"could not load --model_name_or_path {model_args.model_name_or_path}: "
                              f"{_first_line(error)}") from None
        if old_labels != len(labels):
            logger.warning(
                "The %d-class classification head of %s was re-initialised for the %d labels of the data "
                "(--ignore_mismatched_sizes): the dense baseline is untrained on these labels, so its accuracy is "
                "chance level and the before/after comparison measures fine-tuning as much as pruning.",
                old_labels, model_args.model_name_or_path, len(labels))
        return model
    cache = Path(model_args.dense_cache_dir)
    if (cache / "config.json").is_file():
        logger.info("Reusing the dense model cached in %s", cache)
        model = AutoModelForImageClassification.from_pretrained(cache, **kwargs)
        channels = data.train.features["pixel_values"].shape[0]
        if getattr(model.config, "num_channels", 3) != channels:  # cached by a version that fed 1-channel digits
            raise RecipeError(f"the dense model cached in {cache} takes {model.config.num_channels}-channel images, "
                              f"but the built-in data are {channels}-channel (RGB, so that pipeline() can use the "
                              f"pruned model). Delete {cache} to train it again, or pass --dense_cache_dir with a new "
                              f"directory.")
        return model
    torch.manual_seed(training_args.seed)
    model = small_vit_for_digits(labels)
    args = TrainingArguments(str(cache / "trainer"), num_train_epochs=model_args.dense_epochs,
                             per_device_train_batch_size=training_args.per_device_train_batch_size,
                             learning_rate=training_args.learning_rate, weight_decay=training_args.weight_decay,
                             warmup_steps=training_args.warmup_steps, save_strategy="no", report_to=[],
                             logging_steps=training_args.logging_steps, seed=training_args.seed,
                             use_cpu=training_args.use_cpu, disable_tqdm=training_args.disable_tqdm,
                             dataloader_pin_memory=training_args.dataloader_pin_memory)
    Trainer(model=model, args=args, train_dataset=data.train).train()
    model.save_pretrained(cache)
    data.processor.save_pretrained(cache)
    return model


def _check_builtin_fit(model_args: ModelArguments, config, data: Data) -> None:
    channels, height, width = data.train.features["pixel_values"].shape
    size = getattr(config, "image_size", None)
    size = (size, size) if isinstance(size, int) else tuple(size or ())
    if getattr(config, "num_channels", 3) != channels or size != (height, width):
        raise RecipeError(
            f"{model_args.model_name_or_path} takes {getattr(config, 'num_channels', 3)}x{size} images, but the built-in "
            f"data are {channels}x{(height, width)}: pass --train_dir or --dataset_name with images for it.")


# --------------------------------------------------------------------------- the job


def run(model_args, data_args, pruning_config: PruningConfig, training_args: TrainingArguments,
        run_args: RunArguments | None = None) -> dict:
    """Prune end to end; returns the before/after figures it printed (the card records the same)."""
    from .trainer import PruningTrainer

    run_args = run_args or RunArguments()
    try:  # before any work: a read-only --output_dir; staging left by a killed save goes (docs/failures.md)
        check_writable(training_args.output_dir, "--output_dir")
        remove_stale_staging(training_args.output_dir)
    except OSError as error:
        raise RecipeError(str(error)) from None
    checkpoint = resolve_checkpoint(training_args, run_args, pruning_config.method)
    check_hub_access(training_args)
    check_processes(training_args)
    for flag in ("--model_name_or_path", "--config_name", "--image_processor_name"):  # before the data loads
        name = getattr(model_args, flag[2:])
        if name:
            _check_model_source(flag, name)
    data = load_data(data_args, model_args, seed=training_args.seed,
                     training_order=training_args.train_sampling_strategy)
    dense = load_or_train_dense(model_args, data, training_args)
    try:
        trainer = PruningTrainer(model=dense, args=training_args, train_dataset=data.train,
                                 eval_dataset=data.evaluation, processing_class=data.processor,
                                 compute_metrics=make_compute_metrics(), pruning_config=pruning_config)
        if isinstance(data.train, ImageClassificationData):
            trainer.add_callback(AugmentationEpochCallback(data.train))
        dense_metrics = trainer.evaluate_dense()
        output = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.measure_speed()
        record = trainer.run_record()
        if trainer.is_world_process_zero():
            print(format_table(record))
        trainer.save_model(training_args.output_dir)  # with --push_to_hub, Trainer.save_model also pushes
    except Exception as error:
        if training_args.push_to_hub and _is_connection_error(error):
            raise RecipeError(f"could not reach the Hugging Face Hub at {_hub_endpoint()} ({type(error).__name__}: "
                              f"{_first_line(error)}). Check the network and HF_ENDPOINT, or drop --push_to_hub.") \
                from None
        if isinstance(error, ValueError):  # what the run cannot do as asked: a budget out of reach, another config
            raise RecipeError(_as_flags(str(error))) from None
        raise
    metrics = dict(output.metrics)
    eval_metrics = {key: value for key, value in metrics.items() if key.startswith("eval_")}
    train_metrics = {key: value for key, value in metrics.items() if key not in eval_metrics}
    if not data_args.streaming:  # a stream's length is not known
        train_metrics["train_samples"] = len(data.train)
        eval_metrics["eval_samples"] = len(data.evaluation)
    trainer.log_metrics("train", train_metrics)
    trainer.save_metrics("train", train_metrics)
    trainer.log_metrics("eval", eval_metrics)
    trainer.save_metrics("eval", eval_metrics)
    trainer.save_metrics("dense", dense_metrics)
    trainer.save_state()
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


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run the recipe; returns the exit status (0 done, 1 failed, 2 bad arguments). ``prog`` names it in messages."""
    prog = prog or Path(sys.argv[0]).name or "prune_imagenet.py"
    try:
        model_args, data_args, run_args, pruning_config, training_args = parse_arguments(argv, prog)
        logging.basicConfig(level=logging.INFO if training_args.should_log else logging.WARNING)
        run(model_args, data_args, pruning_config, training_args, run_args)
    except SystemExit as exit_:  # argparse: --help (0) or a usage error (2, message already printed)
        return exit_.code if isinstance(exit_.code, int) else 2
    except RecipeError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return error.status
    return 0
