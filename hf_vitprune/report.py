"""PruningReport: everything a model card says about a pruned model, saved as pruning_report.json.

The card is rendered from this file alone (``hf-vitprune card DIR`` re-renders it), so the
report holds the measured numbers themselves: parameters and FLOPs per layer before and after,
accuracy before and after, measured speed and the machine it was measured on, the recipe and the
library versions. It never holds credentials.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from torch import nn

from .config import PruningConfig
from .fileio import atomic_directory, reject_unknown_fields
from .plan import PruningPlan
from .stats import LayerStats, ModelStats, model_stats

REPORT_FILE = "pruning_report.json"
STAGES = ("final", "admm-checkpoint", "finetune-checkpoint")
# Trainer log keys that describe the evaluation run, not the model
_NOT_METRICS = ("loss", "runtime", "samples_per_second", "steps_per_second", "model_preparation_time", "epoch")
# TrainingArguments that describe the schedule (never tokens or paths)
_TRAINING_KEYS = (
    "num_train_epochs",
    "max_steps",
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "weight_decay",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "world_size",
    "seed",
)


def library_versions() -> dict[str, str]:
    """Versions of the libraries a reader needs to reproduce or load the model."""
    versions = {"python": platform.python_version()}
    for package in ("hf_vitprune", "torch", "transformers", "accelerate", "huggingface_hub", "safetensors"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def stats_from_dict(data: dict) -> ModelStats:
    """The inverse of ``ModelStats.to_dict``."""
    return ModelStats(
        params=int(data["params"]),
        flops=int(data["flops"]),
        tokens=int(data["tokens"]),
        layers=tuple(LayerStats(**{k: int(v) for k, v in layer.items()}) for layer in data["layers"]),
    )


def _stats_dict(value: Any, name: str) -> dict:
    if isinstance(value, ModelStats):
        return value.to_dict()
    if isinstance(value, dict):
        try:
            return stats_from_dict(value).to_dict()  # validates and normalises (tuples -> lists on save)
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"PruningReport.{name} is not a ModelStats dict ({error!r}).") from None
    raise ValueError(f"PruningReport.{name} must be a ModelStats or its to_dict(), got {type(value).__name__}.")


def _metrics(value: Any, name: str) -> dict[str, float] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"PruningReport.{name} must map metric name -> number, e.g. {{'accuracy': 0.93}}.")
    result = {}
    for key, number in value.items():
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
            raise ValueError(f"PruningReport.{name}[{key!r}]={number!r} must be a finite number.")
        result[str(key)] = float(number)
    return dict(sorted(result.items()))


def metrics_from_logs(log_history: list[dict], prefix: str = "eval_") -> dict[str, float] | None:
    """The model metrics of the last evaluation in a Trainer's ``state.log_history`` (prefix stripped)."""
    for entry in reversed(log_history):
        found = {
            key[len(prefix):]: value
            for key, value in entry.items()
            if key.startswith(prefix)
            and key[len(prefix):] not in _NOT_METRICS
            and isinstance(value, (int, float))
            and not isinstance(value, bool)
        }
        if found:
            return found
    return None


def hub_model_id(name: str | None) -> str | None:
    """``name`` if it reads as a Hub model id (``org/name`` or ``name``) and is not a local path; else None."""
    if not name or os.path.exists(name) or name.startswith((".", "/", "~")):
        return None
    return name if re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) and "--" not in name and ".." not in name else None


@dataclass
class PruningReport:
    """The facts about one pruning run, in JSON-ready form; see :meth:`from_models` and :meth:`from_trainer`."""

    method: str
    pruning_config: dict
    dense: dict
    pruned: dict
    base_model: str | None = None
    model_name: str | None = None
    repo_id: str | None = None
    architecture: str | None = None
    dataset: str | None = None
    dataset_config: str | None = None
    dataset_split: str | None = None
    license: str | None = None
    plan: dict | None = None
    metrics_dense: dict[str, float] | None = None
    metrics_pruned: dict[str, float] | None = None
    speed: dict | None = None
    training: dict | None = None
    stage: str = "final"
    versions: dict[str, str] = field(default_factory=library_versions)
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).replace(microsecond=0).isoformat())

    def __post_init__(self):
        self.pruning_config = PruningConfig.from_dict(dict(self.pruning_config)).to_dict()  # validated
        if self.method != self.pruning_config["method"]:
            raise ValueError(
                f"PruningReport.method={self.method!r} disagrees with pruning_config's method "
                f"{self.pruning_config['method']!r}."
            )
        self.dense = _stats_dict(self.dense, "dense")
        self.pruned = _stats_dict(self.pruned, "pruned")
        if len(self.dense["layers"]) != len(self.pruned["layers"]):
            raise ValueError(
                f"PruningReport: the dense stats have {len(self.dense['layers'])} layers, the pruned ones "
                f"{len(self.pruned['layers'])}; they must describe the same model."
            )
        if isinstance(self.plan, PruningPlan):
            self.plan = self.plan.to_dict()
        elif self.plan is not None:
            self.plan = PruningPlan.from_dict(dict(self.plan)).to_dict()
        self.metrics_dense = _metrics(self.metrics_dense, "metrics_dense")
        self.metrics_pruned = _metrics(self.metrics_pruned, "metrics_pruned")
        if self.stage not in STAGES:
            raise ValueError(f"PruningReport.stage={self.stage!r} is unknown; choose one of {', '.join(STAGES)}.")
        for name in ("speed", "training", "versions"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, dict):
                raise ValueError(f"PruningReport.{name} must be a dict or None, got {type(value).__name__}.")

    # ------------------------------------------------------------------ builders

    @classmethod
    def from_models(
        cls,
        dense: nn.Module | ModelStats | dict,
        pruned: nn.Module,
        *,
        pruning_config: PruningConfig | dict,
        plan: PruningPlan | dict | None = None,
        base_model: str | None = None,
        **fields: Any,
    ) -> PruningReport:
        """A report comparing ``dense`` (the model, or its stats) with the compacted ``pruned`` model.

        ``base_model`` defaults to the dense model's ``name_or_path`` (kept only if it is a Hub id);
        ``fields`` sets the other fields (dataset, metrics_dense, metrics_pruned, speed, ...).
        """
        config = pruning_config.to_dict() if isinstance(pruning_config, PruningConfig) else dict(pruning_config)
        if isinstance(dense, nn.Module):
            base_model = base_model or getattr(dense.config, "name_or_path", None)
            dense = model_stats(dense)
        if base_model is None:
            base_model = getattr(pruned.config, "name_or_path", None)
        architectures = getattr(pruned.config, "architectures", None) or [type(pruned).__name__]
        fields.setdefault("architecture", architectures[0])
        return cls(
            method=config["method"],
            pruning_config=config,
            dense=dense,
            pruned=model_stats(pruned),
            plan=plan,
            base_model=hub_model_id(base_model),
            **fields,
        )

    @classmethod
    def from_trainer(cls, trainer, *, stage: str = "final", **fields: Any) -> PruningReport:
        """The report of a :class:`~hf_vitprune.PruningTrainer` after (or during) ``train()``.

        Reads ``trainer.model`` (compacted after training), ``trainer.dense_stats``, ``trainer.plan``,
        ``trainer.pruning_config``, the schedule from ``trainer.args`` and the pruned metrics from the
        last evaluation in ``trainer.state.log_history`` (and the dense metrics from ``trainer.dense_metrics``
        where the trainer recorded them). ``fields`` overrides any of them, e.g.
        ``metrics_dense=``, ``dataset=``, ``speed=measure_speed(...)``, ``base_model=``.
        """
        model = trainer.accelerator.unwrap_model(trainer.model)
        args = trainer.args
        if "base_model" not in fields:
            candidates = (getattr(trainer, "base_model_name", None),
                          getattr(getattr(trainer.teacher, "config", None), "name_or_path", None),
                          getattr(model.config, "name_or_path", None))
            fields["base_model"] = next((c for c in candidates if c), None)
        if "metrics_pruned" not in fields:
            fields["metrics_pruned"] = metrics_from_logs(trainer.state.log_history)
        fields.setdefault("metrics_dense", getattr(trainer, "dense_metrics", None))
        if "dataset" not in fields:
            evaluated = trainer.eval_dataset if trainer.eval_dataset is not None else trainer.train_dataset
            fields["dataset"] = _dataset_name(evaluated)
        if "model_name" not in fields:
            hub_id = getattr(args, "hub_model_id", None)
            fields["model_name"] = hub_id.split("/")[-1] if hub_id else Path(args.output_dir).name
        fields.setdefault("repo_id", getattr(args, "hub_model_id", None))
        if "training" not in fields:
            training = {key: getattr(args, key) for key in _TRAINING_KEYS if hasattr(args, key)}
            fields["training"] = {k: (v.value if hasattr(v, "value") else v) for k, v in training.items()}
        return cls.from_models(
            trainer.dense_stats, model, pruning_config=trainer.pruning_config, plan=trainer.plan, stage=stage, **fields
        )

    # ------------------------------------------------------------------ derived numbers

    @property
    def dense_stats(self) -> ModelStats:
        return stats_from_dict(self.dense)

    @property
    def pruned_stats(self) -> ModelStats:
        return stats_from_dict(self.pruned)

    @property
    def is_classifier(self) -> bool:
        return self.architecture is None or "ForImageClassification" in self.architecture

    @property
    def display_name(self) -> str:
        """The model's name: ``model_name``, else ``<base>-<method>-<percent>`` from the budget."""
        if self.model_name:
            return self.model_name
        config = self.pruning_config
        budget = config["target_sparsity"]
        if budget is None:
            budget = config["target_flops_reduction"]
        base = self.base_model.split("/")[-1] if self.base_model else "vit"
        return f"{base}-{self.method}-{round(100 * budget)}"

    # ------------------------------------------------------------------ serialisation

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # tuples -> lists, as a reload gives them

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False) + "\n"

    @classmethod
    def from_dict(cls, data: dict) -> PruningReport:
        reject_unknown_fields(cls, data)
        return cls(**data)

    @classmethod
    def from_json_string(cls, text: str) -> PruningReport:
        return cls.from_dict(json.loads(text))

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write ``pruning_report.json`` into ``save_directory`` (atomically)."""
        with atomic_directory(save_directory) as staging:
            (staging / REPORT_FILE).write_text(self.to_json_string(), encoding="utf-8")
        return Path(save_directory) / REPORT_FILE

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> PruningReport:
        """Read ``pruning_report.json`` from a model directory (or the file itself)."""
        path = Path(directory)
        path = path / REPORT_FILE if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(
                f"No {REPORT_FILE} at {path}. PruningTrainer.save_model() writes it; or build one with "
                f"PruningReport.from_models(dense, pruned, pruning_config=...) and call save_pretrained(dir)."
            )
        try:
            return cls.from_json_string(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{path} is not valid JSON ({error}); re-save it with PruningReport.save_pretrained."
            ) from None


def _dataset_name(dataset) -> str | None:
    """The Hub id or builder name a ``datasets.Dataset`` records about itself, if any."""
    info = getattr(dataset, "info", None)
    for name in ("dataset_name", "builder_name"):
        value = getattr(info, name, None)
        if value:
            return str(value)
    return None
