"""PruningReport: everything a model card says about a pruned model, saved as pruning_report.json.

The card is rendered from this file alone (``hf-vitprune card DIR`` re-renders it), so the
report holds the measured numbers themselves: parameters and FLOPs per layer before and after,
accuracy before and after, measured speed and the machine it was measured on, the recipe, what
the method says about itself (``method_card``) and the library versions. It never holds credentials.
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

from ..config import PruningConfig
from ..fileio import atomic_directory, read_json_object, reject_unknown_fields
from ..plan import PruningPlan
from ..stats import ModelStats, model_stats

REPORT_FILE = "pruning_report.json"
# "final", or a checkpoint of a training phase: "<phase>-checkpoint" ("finetune", or the method's search phase)
STAGE_PATTERN = re.compile(r"final|(?P<phase>[a-z][a-z0-9_]*)-checkpoint")
# Trainer log keys that describe the evaluation run, not the model
_NOT_METRICS = ("loss", "runtime", "samples_per_second", "steps_per_second", "model_preparation_time", "epoch")
# TrainingArguments that describe the schedule (never tokens or paths)
TRAINING_KEYS = (
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
    return ModelStats.from_dict(data)


def _stats_dict(value: Any, name: str) -> dict:
    if isinstance(value, ModelStats):
        return value.to_dict()
    if isinstance(value, dict):
        try:
            return stats_from_dict(value).to_dict()  # validates and normalises (tuples -> lists on save)
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"PruningReport.{name} is not a ModelStats dict ({error!r}).") from None
    raise ValueError(f"PruningReport.{name} must be a ModelStats or its to_dict(), got {type(value).__name__}.")


def _method_card(value: Any) -> dict:
    """A validated copy of a method card: ``description`` (str), ``recipe`` (list of str), ``citations``, and
    optionally ``details`` (a dict of JSON facts the method measured, e.g. token pruning's latency table) and
    ``units`` (what the method removes, where the config's head and neuron settings do not say it)."""
    fix = "build it with hf_vitprune.methods.method_card(config), or leave it out to have it built"
    required = {"description", "recipe", "citations"}
    if not isinstance(value, dict) or not required <= set(value) <= required | {"details", "units"}:
        keys = sorted(value) if isinstance(value, dict) else type(value).__name__
        raise ValueError(
            f"PruningReport.method_card must be a dict with description, recipe and citations, and optionally "
            f"details and units (got {keys}); {fix}."
        )
    details = value.get("details")
    if details is not None and not isinstance(details, dict):
        raise ValueError(f"PruningReport.method_card['details'] must be a dict; {fix}.")
    description, recipe, citations = value["description"], value["recipe"], value["citations"]
    if not isinstance(description, str) or not description.strip():
        raise ValueError(f"PruningReport.method_card['description'] must be a non-empty string; {fix}.")
    if not isinstance(recipe, (list, tuple)) or not all(isinstance(line, str) for line in recipe):
        raise ValueError(f"PruningReport.method_card['recipe'] must be a list of sentences (str); {fix}.")
    if not isinstance(citations, (list, tuple)) or not all(
        isinstance(entry, dict) and set(entry) == {"what", "bibtex"} and all(isinstance(v, str) for v in entry.values())
        for entry in citations
    ):
        raise ValueError(
            f"PruningReport.method_card['citations'] must be a list of {{'what': str, 'bibtex': str}}; {fix}."
        )
    card = {"description": description, "recipe": list(recipe), "citations": [dict(entry) for entry in citations]}
    if details is not None:
        card["details"] = json.loads(json.dumps(details))  # a copy, and proof that it is JSON
    units = value.get("units")
    if units is not None:
        if not isinstance(units, str) or not units.strip():
            raise ValueError(f"PruningReport.method_card['units'] must be a non-empty string; {fix}.")
        card["units"] = units
    return card


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


def training_summary(args) -> dict:
    """The schedule-describing ``TrainingArguments`` (:data:`TRAINING_KEYS`) as JSON values, for ``training=``.

    Of ``max_steps`` and ``num_train_epochs`` only the one that set the length is kept (:func:`governing_schedule`).
    """
    values = {key: getattr(args, key) for key in TRAINING_KEYS if hasattr(args, key)}
    return governing_schedule({key: (value.value if hasattr(value, "value") else value) for key, value in values.items()})


def governing_schedule(training: dict) -> dict:
    """``training`` without the length setting that did not govern: Trainer ignores ``num_train_epochs``
    when ``max_steps > 0``, and ``max_steps`` (-1) otherwise."""
    if "max_steps" not in training:
        return dict(training)
    ignored = "num_train_epochs" if isinstance(training["max_steps"], int) and training["max_steps"] > 0 else "max_steps"
    return {key: value for key, value in training.items() if key != ignored}


# top-k accuracies that need more than k classes to mean anything: "top5_accuracy", "top_5_accuracy"
_TOP_K_METRIC = re.compile(r"top_?(?P<k>\d+)_accuracy")


def informative_metrics(metrics: dict[str, float] | None, num_labels: int | None) -> dict[str, float] | None:
    """``metrics`` without top-k accuracies where k >= ``num_labels`` (always 1: every label is in the top k)."""
    if metrics is None or not num_labels:
        return metrics
    return {
        name: value for name, value in metrics.items()
        if not ((match := _TOP_K_METRIC.fullmatch(name)) and int(match.group("k")) >= num_labels)
    }


def dataset_name(dataset) -> str | None:
    """The Hub id or builder name a ``datasets.Dataset`` records about itself, if any (for ``dataset=``)."""
    info = getattr(dataset, "info", None)
    for name in ("dataset_name", "builder_name"):
        value = getattr(info, name, None)
        if value:
            return str(value)
    return None


_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")
# a snapshot in the Hub cache: <cache>/models--<org>--<name>/snapshots/<revision>
_CACHE_SNAPSHOT = re.compile(r"models--(?P<repo>[\w.-]+?(--[\w.-]+)?)")


def hub_model_id(name: str | None) -> str | None:
    """The Hub model id that ``name`` (a model's ``name_or_path``) stands for, or None.

    ``name`` itself when it reads as a Hub id (``org/name`` or ``name``) and is not a local path; the
    repository's id when it is a snapshot folder of the Hub cache (``.../models--org--name/snapshots/<sha>``,
    what ``snapshot_download`` returns); None for any other local path. What a local folder's own
    files say is not used: transformers 5 saves no ``_name_or_path`` or ``_commit_hash`` in
    ``config.json``, and an older ``_name_or_path`` or a README's ``base_model`` names the model
    it was trained *from*, not the model it is.
    """
    if not name:
        return None
    parts = Path(name).parts
    match = _CACHE_SNAPSHOT.fullmatch(parts[-3]) if len(parts) >= 3 and parts[-2] == "snapshots" else None
    if match:
        repo = match.group("repo").replace("--", "/")
        return repo if _HUB_ID.fullmatch(repo) and ".." not in repo else None
    if os.path.exists(name) or name.startswith((".", "/", "~")):
        return None
    return name if _HUB_ID.fullmatch(name) and "--" not in name and ".." not in name else None


def model_mismatch(report: PruningReport, stats: ModelStats, num_labels: int | None = None) -> str | None:
    """What in ``report`` contradicts the model it sits beside (``stats`` of that model, its ``num_labels``), or
    None: a report copied from another run would otherwise put that run's method and widths on this model's card."""
    recorded = report.pruned_stats.layers
    if len(recorded) != len(stats.layers):
        return f"the report describes {len(recorded)} encoder layers, the model has {len(stats.layers)}"
    # the kind of model: token-pruned or not (a structural method may run on a token-pruned model; its report says so)
    token_model = any(layer.tokens is not None for layer in stats.layers)
    token_report = any(layer.tokens is not None for layer in recorded)
    if token_model and not token_report:
        return (f"the model has a token path (token_pruning in config.json), but the report's {report.method!r} run "
                f"recorded a model without one")
    if token_report and not token_model:
        return (f"the report's {report.method!r} run recorded a token-pruned model, but the model has no token path "
                f"(no token_pruning in config.json)")
    for old, new in zip(recorded, stats.layers):
        for what, before, after in (("attention heads", old.heads, new.heads), ("MLP neurons", old.neurons, new.neurons),
                                    ("tokens", old.tokens, new.tokens), ("layer type", old.layer_type, new.layer_type),
                                    ("other units", old.other_units, new.other_units)):
            if before != after:
                return f"layer {new.index}: the report records {before} {what}, the model has {after}"
    if report.num_labels is not None and num_labels is not None and report.num_labels != num_labels:
        return f"the report records {report.num_labels} classes, the model classifies {num_labels}"
    return None


@dataclass
class PruningReport:
    """The facts about one pruning run, in JSON-ready form; see :meth:`from_models`.

    ``PruningTrainer.run_record()`` builds it after (or during) training. ``method_card`` is the
    method's own account (``hf_vitprune.methods.method_card``: description, recipe sentences,
    citations); reports saved without it get it from their ``pruning_config`` on load.
    """

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
    method_card: dict | None = None
    stage: str = "final"
    num_labels: int | None = None
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
        if self.num_labels is not None and (isinstance(self.num_labels, bool) or not isinstance(self.num_labels, int)
                                            or self.num_labels < 1):
            raise ValueError(f"PruningReport.num_labels={self.num_labels!r} must be a positive integer or None.")
        self.metrics_dense = informative_metrics(_metrics(self.metrics_dense, "metrics_dense"), self.num_labels)
        self.metrics_pruned = informative_metrics(_metrics(self.metrics_pruned, "metrics_pruned"), self.num_labels)
        if self.training is not None and isinstance(self.training, dict):
            self.training = governing_schedule(self.training)
        if not isinstance(self.stage, str) or not STAGE_PATTERN.fullmatch(self.stage):
            raise ValueError(
                f"PruningReport.stage={self.stage!r} is unknown; use 'final' or '<phase>-checkpoint' with a "
                f"lowercase phase name, e.g. 'finetune-checkpoint'."
            )
        if self.method_card is None:
            from ..methods import method_card  # here, not at the top: reporting must not depend on the methods' imports

            self.method_card = method_card(self.config)
        self.method_card = _method_card(self.method_card)
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
        if "ForImageClassification" in fields["architecture"]:
            fields.setdefault("num_labels", getattr(pruned.config, "num_labels", None))
        return cls(
            method=config["method"],
            pruning_config=config,
            dense=dense,
            pruned=model_stats(pruned),
            plan=plan,
            base_model=hub_model_id(base_model),
            **fields,
        )

    # ------------------------------------------------------------------ derived numbers

    @property
    def dense_stats(self) -> ModelStats:
        return stats_from_dict(self.dense)

    @property
    def pruned_stats(self) -> ModelStats:
        return stats_from_dict(self.pruned)

    @property
    def config(self) -> PruningConfig:
        """``pruning_config`` as a :class:`~hf_vitprune.PruningConfig`."""
        return PruningConfig.from_dict(dict(self.pruning_config))

    @property
    def checkpoint_phase(self) -> str | None:
        """The training phase a checkpoint report was saved in (``"finetune"``, a search phase), else None."""
        return STAGE_PATTERN.fullmatch(self.stage).group("phase")

    @property
    def is_classifier(self) -> bool:
        return self.architecture is None or "ForImageClassification" in self.architecture

    @property
    def display_name(self) -> str:
        """The model's name: ``model_name``, else ``<base>-<method>-<percent>`` from the budget."""
        if self.model_name:
            return self.model_name
        base = self.base_model.split("/")[-1] if self.base_model else "vit"
        return f"{base}-{self.method}-{round(100 * self.config.budget.fraction)}"

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
        return cls.from_dict(read_json_object(path, "Re-save it with PruningReport.save_pretrained."))

