"""What every part of the benchmark shares: the settings, the data, the dense model, the argument builders."""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForImageClassification, Trainer, TrainingArguments, ViTConfig, ViTForImageClassification

from hf_vitprune import PruningConfig
from hf_vitprune.methods import get_method
from hf_vitprune.fileio import atomic_directory
from hf_vitprune.metrics import make_compute_metrics

DENSE_INFO_FILE = "benchmark_dense.json"


@dataclass
class Settings:
    """Everything that decides the figures; saved in the results JSON so a run can be reproduced."""

    dataset: str  # "fashion_mnist" or "digits"
    model: dict  # ViTConfig keyword arguments of the dense reference
    dense_epochs: float
    dense_learning_rate: float
    prune_epochs: float  # the same epoch budget for every method: ADMM + fine-tuning together
    prune_learning_rate: float
    batch_size: int
    eval_batch_size: int
    calibration_samples: int
    admm_update_steps: int
    logging_steps: int
    methods: list[str]
    sparsities: list[float]
    seeds: list[int]
    threads: int  # torch threads for training and evaluation, per process
    workers: int  # pruning runs in parallel, one process each
    speed_threads: int  # torch threads while timing inference and training steps
    speed_repeats: int
    step_repeats: int
    memory_steps: int
    cache_dir: str
    output_dir: str
    markdown_file: str
    results_name: str
    weight_decay: float = 0.05
    warmup: float = 0.05  # fraction of each phase's steps (TrainingArguments.warmup_steps < 1)
    admm_fraction: float = 0.0  # the ADMM methods' share: the library's default (one shot, docs/methods.md)
    search_fraction: float = 0.5  # the learnt searches' share (ofb, spvit_conv, spvit_tokens)
    admm_rho_final: float | None = None  # the ADMM options' admm_rho_final (None: the library's default)
    distillation_weight: float = 0.5
    max_train_samples: int | None = None
    augment: bool = False  # random flips and shifts of the training images (dense training and pruning runs)
    label_smoothing: float = 0.0  # of the dense model's cross-entropy (TrainingArguments.label_smoothing_factor)
    dense_processes: int = 1  # processes training the dense model together (torchrun, DDP); same global batch
    speed_shapes: str = "full"  # preset of benchmarks.speed_shapes run after the accuracy runs ("none" skips it)
    # The epoch axis: every (method, sparsity, seed) runs once at each of these pruning budgets (None: just
    # [prune_epochs]). ``prune_epochs`` is the budget of one run; benchmarks.run sets it per run.
    epoch_budgets: list[float] | None = None
    benchmark_model: str = "main"  # "main" or "heldout" (HELDOUT_FASHION_MNIST: reports only, never chooses)

    @property
    def epoch_axis(self) -> list[float]:
        """The pruning-epoch budgets every run is repeated at, in order."""
        return [float(e) for e in (self.epoch_budgets or [self.prune_epochs])]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def results_path(self) -> Path:
        return Path(self.output_dir) / f"{self.results_name}.json"

    @property
    def plot_path(self) -> Path:
        return Path(self.output_dir) / f"{self.results_name}_accuracy.png"


def with_defaults(settings: dict, settings_class: type = None) -> dict:
    """A settings dict read from a results JSON, with the fields it predates at their defaults (for comparing
    it with today's settings: a field added since, at its default, changes nothing that was measured)."""
    fields_ = dataclasses.fields(settings_class or Settings)
    defaults = {f.name: f.default for f in fields_ if f.default is not dataclasses.MISSING}
    return {**defaults, **settings}


# Fashion-MNIST: 28x28 grey images in 7x7 patches (16 tokens + CLS). Chosen on the validation split
# (see BENCHMARKS.md, "How the dense model was chosen"): the best accuracy found within the time budget.
FASHION_MNIST = dict(
    dataset="fashion_mnist",
    model=dict(hidden_size=96, num_hidden_layers=4, num_attention_heads=6, intermediate_size=192,
               image_size=28, patch_size=7, num_channels=1),
    dense_epochs=60,
    dense_learning_rate=2e-3,
    augment=True,
    dense_processes=2,
    prune_epochs=2,
    prune_learning_rate=1e-3,
    batch_size=128,
    eval_batch_size=500,
    calibration_samples=256,
    admm_update_steps=20,
    logging_steps=50,
    # torch_pruning: benchmarks/torch_pruning_peer.py; ofb, ofb_no_pmim, spvit: FLOPS_MATCHED_METHODS below
    methods=["gohsp", "magnitude", "taylor", "random", "torch_pruning", "ofb", "ofb_no_pmim", "spvit"],
    sparsities=[0.4, 0.6],
    seeds=[0, 1, 2],
    threads=1,
    workers=2,
    speed_threads=1,
    speed_repeats=7,
    step_repeats=15,
    memory_steps=20,
    cache_dir="benchmarks/dense/fashion_mnist",  # committed: trained once (its record is benchmark_dense.json)
    output_dir="benchmarks/results",
    markdown_file="BENCHMARKS.md",
    results_name="fashion_mnist",
)

# The held-out benchmark model (issue 27): another depth, width, head count, head width and patch size on the
# same data, pruned with the main model's recipe field for field. It only ever reports: no method option,
# recipe field or target may be chosen or tuned on it, so every field but the ones in HELDOUT_OWN_FIELDS is
# copied from FASHION_MNIST here (tests/test_benchmarks.py fails if a pruning field is set on it). Its dense
# recipe is the main model's, taken as it is (no tuning on this model either); 6 layers, hidden 144, 3 heads
# of 48, MLP 288, 14x14 patches (4 tokens + CLS): 1,035,802 parameters and 10.27 MFLOPs per image against the
# main model's 306,826 and 10.62 (0.97x the FLOPs, hf_vitprune.model_stats).
HELDOUT_OWN_FIELDS = ("model", "dense_epochs", "dense_learning_rate", "cache_dir", "results_name", "speed_shapes",
                      "benchmark_model")
HELDOUT_FASHION_MNIST = dict(
    FASHION_MNIST,
    model=dict(hidden_size=144, num_hidden_layers=6, num_attention_heads=3, intermediate_size=288,
               image_size=28, patch_size=14, num_channels=1),
    dense_epochs=60,
    dense_learning_rate=2e-3,
    cache_dir="benchmarks/dense/heldout_fashion_mnist",
    results_name="heldout_" + FASHION_MNIST["results_name"],  # heldout_fashion_mnist, beside the main results
    speed_shapes="none",  # the speed at real model shapes does not depend on the benchmark model: measured once
    benchmark_model="heldout",
)
assert set(HELDOUT_FASHION_MNIST) - set(FASHION_MNIST) <= set(HELDOUT_OWN_FIELDS)
assert all(HELDOUT_FASHION_MNIST[key] == value for key, value in FASHION_MNIST.items() if key not in HELDOUT_OWN_FIELDS)

HELDOUT_PREFIX = "heldout_"


def heldout_results_name(results_name: str) -> str:
    """The results name of the held-out model's run beside the main model's ``results_name``."""
    return HELDOUT_PREFIX + results_name


# Smoke run on scikit-learn's digits: the quickstart's architecture, few epochs, few repeats.
DIGITS_QUICK = dict(
    FASHION_MNIST,
    dataset="digits",
    model=dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
               image_size=8, patch_size=2, num_channels=1),
    dense_epochs=15,
    dense_learning_rate=3e-3,
    augment=False,
    dense_processes=1,
    prune_epochs=3,
    prune_learning_rate=2e-3,
    batch_size=64,
    eval_batch_size=512,
    calibration_samples=64,
    admm_update_steps=5,  # a smoke test: too few W-steps per update for ADMM to converge (docs/methods.md)
    logging_steps=10,
    seeds=[0, 1],
    workers=1,
    speed_repeats=5,
    step_repeats=5,
    memory_steps=5,
    cache_dir="outputs/benchmark-dense-digits",
    output_dir="outputs/benchmarks-quick",
    markdown_file="outputs/benchmarks-quick/BENCHMARKS.md",
    results_name="digits_quick",
    speed_shapes="quick",
)


class InMemoryImages(torch.utils.data.Dataset):
    """A split held as two tensors; items are ``{"pixel_values", "labels"}`` dicts, like the datasets' rows.

    Reading rows one by one from an Arrow-backed ``datasets.Dataset`` costs about a quarter of a
    millisecond per image, a noticeable share of a small model's training step; indexing tensors does not.
    """

    def __init__(self, pixel_values: torch.Tensor, labels: torch.Tensor, names: list[str], augment: bool = False):
        self.pixel_values, self.labels, self.names = pixel_values, labels, list(names)
        self.augment = augment  # random horizontal flip and shift by up to 2 pixels, per image

    @classmethod
    def from_dataset(cls, dataset) -> InMemoryImages:
        rows = dataset[:]
        return cls(rows["pixel_values"].contiguous(), rows["labels"].long(), dataset.features["labels"].names)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index):
        pixels = self.pixel_values[index]
        if self.augment and isinstance(index, int):
            pixels = _augment(pixels)
        return {"pixel_values": pixels, "labels": self.labels[index]}

    def head(self, count: int) -> InMemoryImages:
        return InMemoryImages(self.pixel_values[:count], self.labels[:count], self.names, self.augment)


def _augment(image: torch.Tensor, shift: int = 2) -> torch.Tensor:
    """Random horizontal flip and random translation by up to ``shift`` pixels (background -1 fills the gap)."""
    if torch.rand(()) < 0.5:
        image = image.flip(-1)
    padded = torch.nn.functional.pad(image, (shift, shift, shift, shift), value=-1.0)
    top, left = torch.randint(0, 2 * shift + 1, (2,)).tolist()
    return padded[..., top : top + image.shape[-2], left : left + image.shape[-1]]


def load_data(settings: Settings) -> dict[str, InMemoryImages]:
    """train/validation/test (validation carved from the training images, test held out), in memory."""
    from hf_vitprune.data import load_digits_dataset, load_fashion_mnist

    if settings.dataset == "fashion_mnist":
        data = load_fashion_mnist()
    elif settings.dataset == "digits":
        data = load_digits_dataset(seed=0)
    else:
        raise ValueError(f"Unknown benchmark dataset {settings.dataset!r}; choose fashion_mnist or digits.")
    splits = {name: InMemoryImages.from_dataset(split) for name, split in data.items()}
    splits["train"].augment = settings.augment
    if settings.max_train_samples is not None:
        splits["train"] = splits["train"].head(settings.max_train_samples)
    return splits


def training_arguments(settings: Settings, output_dir: str | Path, *, epochs: float, learning_rate: float, seed: int,
                       **overrides) -> TrainingArguments:
    values = dict(num_train_epochs=epochs, per_device_train_batch_size=settings.batch_size,
                  per_device_eval_batch_size=settings.eval_batch_size, learning_rate=learning_rate,
                  weight_decay=settings.weight_decay, warmup_steps=settings.warmup, lr_scheduler_type="cosine",
                  eval_strategy="no", save_strategy="no", logging_steps=settings.logging_steps, report_to=[],
                  disable_tqdm=True, use_cpu=True, seed=seed, dataloader_num_workers=0)
    values.update(overrides)
    return TrainingArguments(str(output_dir), **values)


# Benchmark methods whose budget is FLOPs, not parameters: name -> (registered method, its method_options).
# OFB's and SPViT's native budget is FLOPs, so each of their rows keeps the FLOPs of FLOPS_REFERENCE's runs at
# the row's sparsity (their mean FLOPs ratio; the reference's budget is exact, so the ratio is the same for
# every seed) and is compared with the parameter-matched methods at equal inference cost.
FLOPS_MATCHED_METHODS = {"ofb": ("ofb", {}), "ofb_no_pmim": ("ofb", {"pmim": False}), "spvit": ("spvit_conv", {})}
FLOPS_REFERENCE = "gohsp"


def parameter_matched(methods: list[str]) -> list[str]:
    """The methods pruned to a parameter sparsity (the ones ``benchmarks.speed_shapes`` can plan alone)."""
    return [method for method in methods if method not in FLOPS_MATCHED_METHODS]


def method_options(settings: Settings, library_method: str, seed: int) -> dict:
    """The benchmark's shared method options that ``library_method`` (a registered method) has.

    The search phase's share of the epochs (``admm_fraction`` for the ADMM methods, ``search_fraction`` for
    the learnt searches), the Z/U update interval, ``admm_rho_final`` when set, and the seed of the random
    baseline's scores; a method without one of these options does not get it.
    """
    options = dict(admm_update_steps=settings.admm_update_steps, admm_fraction=settings.admm_fraction,
                   search_fraction=settings.search_fraction, random_seed=seed)
    if settings.admm_rho_final is not None:
        options["admm_rho_final"] = settings.admm_rho_final
    known = {f.name for f in dataclasses.fields(get_method(library_method).options_class)}
    return {key: value for key, value in options.items() if key in known}


def pruning_config(settings: Settings, method: str, sparsity: float, seed: int,
                   target_flops_reduction: float | None = None) -> PruningConfig:
    """The benchmark's recipe for ``method``; the seed reaches the methods that draw at random.

    A FLOPs-matched method (:data:`FLOPS_MATCHED_METHODS`) runs its registered method (OFB, SPViT) with
    ``target_flops_reduction`` instead of the parameter ``sparsity``, searching for ``search_fraction`` of the
    epochs.
    """
    flops_matched = method in FLOPS_MATCHED_METHODS
    if flops_matched and target_flops_reduction is None:
        raise ValueError(f"{method} is pruned to the FLOPs of the {FLOPS_REFERENCE} runs: pass their "
                         f"target_flops_reduction (benchmarks.common.flops_target).")
    if not flops_matched and target_flops_reduction is not None:
        raise ValueError(f"{method} is pruned to the parameter sparsity; only {', '.join(FLOPS_MATCHED_METHODS)} "
                         f"take a target_flops_reduction.")
    library_method, own_options = FLOPS_MATCHED_METHODS.get(method, (method, {}))
    options = method_options(settings, library_method, seed)
    options.update(own_options)
    budget = (dict(target_flops_reduction=target_flops_reduction) if flops_matched
              else dict(target_sparsity=sparsity))
    return PruningConfig(method=library_method, **budget, calibration_samples=settings.calibration_samples,
                         distillation_weight=settings.distillation_weight, method_options=options)


def flops_target(runs: list[dict], sparsity: float) -> float:
    """``target_flops_reduction`` of a FLOPs-matched row: 1 - the mean FLOPs ratio of the reference's runs."""
    ratios = [r["flops_ratio"] for r in runs
              if r["method"] == FLOPS_REFERENCE and abs(r["sparsity"] - sparsity) < 1e-9]
    if not ratios:
        raise SystemExit(
            f"The FLOPs-matched methods ({', '.join(FLOPS_MATCHED_METHODS)}) take the FLOPs of the {FLOPS_REFERENCE} "
            f"runs at sparsity {sparsity:g}, and the results hold none: include {FLOPS_REFERENCE} in --methods (it "
            f"runs first), or run it before and pass --resume."
        )
    return 1 - statistics.fmean(ratios)


def run_figures(method: str, sparsity: float, seed: int, test: dict, validation: dict, stats, dense_stats,
                train_seconds: float, ranking_seconds: float | None, finetune_steps: int) -> dict:
    """The figures every pruning run of the benchmark records, whichever tool pruned it.

    ``ranking_seconds`` is None for a method with no ranking pass of its own (OFB learns its importance
    scores during the search).
    """
    return {
        "method": method,
        "sparsity": sparsity,
        "seed": seed,
        "test_accuracy": test["test_accuracy"],
        "test_top5_accuracy": test["test_top5_accuracy"],
        "validation_accuracy": validation["validation_accuracy"],
        "params": stats.params,
        "flops": stats.flops,
        "params_ratio": stats.params / dense_stats.params,
        "flops_ratio": stats.flops / dense_stats.flops,
        "achieved_sparsity": 1 - stats.params / dense_stats.params,
        "flops_speedup": dense_stats.flops / stats.flops,
        "heads_per_layer": [layer.heads for layer in stats.layers],
        "neurons_per_layer": [layer.neurons for layer in stats.layers],
        "embedding_width": stats.embedding_width,
        "train_seconds": train_seconds,
        "ranking_seconds": ranking_seconds,
        "ranking_share": None if ranking_seconds is None else ranking_seconds / train_seconds,
        "finetune_steps": finetune_steps,
    }


def dense_identity(settings: Settings) -> dict:
    """What the cached dense model must have been trained with to be reused."""
    keys = ("dataset", "model", "dense_epochs", "dense_learning_rate", "batch_size", "weight_decay", "warmup",
            "max_train_samples", "augment", "label_smoothing")
    return {key: getattr(settings, key) for key in keys}


def load_dense(settings: Settings):
    """The cached dense reference, freshly loaded (each pruning run compacts its own copy in place)."""
    return AutoModelForImageClassification.from_pretrained(settings.cache_dir)


def train_or_reuse_dense(settings: Settings, data) -> dict:
    """Train the dense ViT once (evaluating on the validation split every epoch) or reuse the cache.

    Returns the training record (validation curve, seconds); a cache trained with other settings is
    an error rather than a silent reuse. With ``dense_processes > 1`` the training runs under
    ``torchrun`` (DDP over gloo, one torch thread per process, the same global batch).
    """
    cache = Path(settings.cache_dir)
    info_path = cache / DENSE_INFO_FILE
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        if info["identity"] != dense_identity(settings):
            raise SystemExit(
                f"The dense model cached in {cache} was trained with other settings ({info['identity']}); "
                f"delete the directory or pass another --cache_dir."
            )
        info["reused_from_cache"] = True
        return info
    if settings.dense_processes > 1:
        _train_dense_distributed(settings)
        return json.loads(info_path.read_text())
    return train_dense(settings, data)


def train_dense(settings: Settings, data, *, seed: int = 0, use_cpu: bool = True) -> dict | None:
    """Train the dense reference and write it with its record to the cache (the main process writes).

    Under ``torchrun`` every process runs this; the Trainer shards the batches (DDP), so each process
    takes ``batch_size / world size`` images per step. Returns the record on the main process.
    ``benchmarks.sizing`` calls it too, with other seeds or on a GPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if settings.batch_size % world_size:
        raise SystemExit(f"batch_size {settings.batch_size} does not split over {world_size} processes; "
                         f"choose a multiple of the process count.")
    labels = data["train"].names
    torch.manual_seed(seed)
    config = ViTConfig(**settings.model, num_labels=len(labels), id2label=dict(enumerate(labels)),
                       label2id={name: i for i, name in enumerate(labels)})
    model = ViTForImageClassification(config)
    cache = Path(settings.cache_dir)
    args = training_arguments(settings, cache / "trainer", epochs=settings.dense_epochs,
                              learning_rate=settings.dense_learning_rate, seed=seed, eval_strategy="epoch",
                              label_smoothing_factor=settings.label_smoothing, use_cpu=use_cpu,
                              per_device_train_batch_size=settings.batch_size // world_size,
                              ddp_find_unused_parameters=False)
    trainer = Trainer(model=model, args=args, train_dataset=data["train"], eval_dataset=data["validation"],
                      compute_metrics=make_compute_metrics())
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    if not trainer.is_world_process_zero():
        return None
    curve = [{"epoch": e["epoch"], "validation_accuracy": e["eval_accuracy"]}
             for e in trainer.state.log_history if "eval_accuracy" in e]
    model.save_pretrained(cache)
    info = {"identity": dense_identity(settings), "train_seconds": seconds, "processes": world_size,
            "validation_curve": curve, "reused_from_cache": False}
    with atomic_directory(cache) as staging:  # the record marks the cache complete: written last, atomically
        (staging / DENSE_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return info


def _train_dense_distributed(settings: Settings) -> None:
    """``torchrun --standalone --nproc_per_node dense_processes -m benchmarks.train_dense settings.json``."""
    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as tmp:
        settings_file = Path(tmp) / "settings.json"
        settings_file.write_text(json.dumps(settings.to_dict()))
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={settings.dense_processes}", "-m", "benchmarks.train_dense", str(settings_file)]
        result = subprocess.run(command, cwd=root)  # `-m` puts the repository root on each worker's path
    if result.returncode != 0:
        raise SystemExit(f"Training the dense model under torchrun failed (exit {result.returncode}); see the log "
                         f"above, or pass --dense_processes 1 to train in this process.")


def batch_of(dataset, size: int) -> dict[str, torch.Tensor]:
    """The first ``size`` examples as one batch dict of tensors."""
    return dataset[: min(size, len(dataset))]


def peak_rss_bytes() -> int:
    """VmHWM of this process (peak resident set since start or the last :func:`reset_peak_rss`)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM line; peak memory is measured on Linux only.")


def current_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmRSS line; peak memory is measured on Linux only.")


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")
