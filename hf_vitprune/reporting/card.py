"""The model card of a pruned model, rendered from ``model_cards/pruned_vit.md`` with huggingface_hub.

Everything on the card comes from a :class:`~hf_vitprune.reporting.PruningReport`, so the same
report always gives the same card, and ``hf-vitprune card DIR`` can re-render it from
``pruning_report.json``. The card knows no pruning method: what it says about the method (its
description, its recipe sentences, its citations) is the report's ``method_card``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from importlib import metadata, resources
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..architectures import UNIT_KINDS
from ..fileio import atomic_directory
from .report import REPORT_FILE, PruningReport
from .table import comparison_rows, markdown_rows, metric, metric_rows, percent_removed

TEMPLATE_NAME = "pruned_vit.md"
CARD_FILE = "README.md"
BASE_TAGS = ("pruned", "vision-transformer", "hf_vitprune")

# The trainer distils from the dense model whatever the method, so this citation is the card's own.
DISTILLATION_CITATION = {
    "what": "Knowledge distillation (Hinton et al., 2015, arXiv:1503.02531)",
    "bibtex": """@article{hinton2015distilling,
  title = {Distilling the Knowledge in a Neural Network},
  author = {Hinton, Geoffrey and Vinyals, Oriol and Dean, Jeff},
  journal = {arXiv preprint arXiv:1503.02531},
  year = {2015}
}""",
}
FINETUNE_PHASE = "finetune"


# --------------------------------------------------------------------------- the template


def template_path(name: str = TEMPLATE_NAME) -> Path:
    """Where the card template lives: inside the installed package, the source checkout, or the
    wheel's data files (``share/hf_vitprune/model_cards``); a FileNotFoundError names all three."""
    candidates = [
        Path(str(resources.files("hf_vitprune"))) / "model_cards" / name,
        Path(__file__).resolve().parents[2] / "model_cards" / name,  # editable install / checkout
    ]
    try:
        distribution = metadata.distribution("hf_vitprune")
        for file in distribution.files or ():
            if file.as_posix().endswith(f"share/hf_vitprune/model_cards/{name}"):
                candidates.append(Path(distribution.locate_file(file)).resolve())
    except metadata.PackageNotFoundError:
        pass
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"The model card template {name} was not found (looked in {', '.join(map(str, candidates))}). "
        f"Reinstall hf_vitprune (pip install --force-reinstall hf_vitprune) or pass template_path=."
    )


# --------------------------------------------------------------------------- the sections


def _summary(report: PruningReport) -> str:
    dense, pruned = report.dense_stats, report.pruned_stats
    heads = (pruned.heads, dense.heads)
    neurons = (pruned.neurons, dense.neurons)
    base = (
        f"[{report.base_model}](https://huggingface.co/{report.base_model})"
        if report.base_model
        else "a vision transformer"
    )
    text = (
        f"This model is {base} structurally pruned with `hf_vitprune` (method `{report.method}`): "
        f"{percent_removed(pruned.params, dense.params)} of the parameters and "
        f"{percent_removed(pruned.flops, dense.flops)} of the FLOPs are removed, keeping {heads[0]} of "
        f"{heads[1]} attention heads and {neurons[0]:,} of {neurons[1]:,} MLP neurons. "
        "The pruned heads and neurons are physically removed, so it is a smaller dense model that runs with "
        "the stock PyTorch kernels: no masks and no sparse kernels."
    )
    if _has_type_column(report):
        converted = [layer.index for layer in report.pruned_stats.layers if layer.layer_type not in (None, "attention")]
        text += (f" The attention of layer{'s' if len(converted) > 1 else ''} {', '.join(map(str, converted))} became a "
                 f"convolution over the patch grid (see the layer table).")
    if _has_token_column(report):
        last = report.pruned_stats.layers[-1].tokens
        text += (f" Token pruning shortens the sequence as it goes: the last layer sees {last} of the "
                 f"{report.dense_stats.tokens} tokens, for every image and batch size.")
    pruned_metrics, dense_metrics = report.metrics_pruned or {}, report.metrics_dense or {}
    if "accuracy" in pruned_metrics:
        text += f" Accuracy: {metric(pruned_metrics['accuracy'])}"
        if "accuracy" in dense_metrics:
            text += f" (dense: {metric(dense_metrics['accuracy'])})"
        text += f" on {report.dataset or 'the evaluation set'}."
    return text


def compression_rows(report: PruningReport) -> list[dict]:
    """The card's Compression table: sizes and measured speed, dense against pruned (:mod:`.table`)."""
    return markdown_rows(comparison_rows(report.dense_stats, report.pruned_stats, speed=report.speed))


def evaluation_rows(report: PruningReport) -> list[dict]:
    """The card's Evaluation table: each metric, dense and pruned, and the change (:mod:`.table`)."""
    return [
        {"name": row.name, "dense": row.dense, "pruned": row.pruned, "change": row.ratio}
        for row in metric_rows(report.metrics_dense, report.metrics_pruned)
    ]


def _speed_note(report: PruningReport) -> str:
    speed = report.speed
    if not speed:
        return (
            "Speed was not measured for this save. Measure latency and throughput on your own machine with "
            "`hf-vitprune report <model directory>`."
        )
    count = speed.get("torch_threads")
    threads = f", {count} torch thread{'s' if count != 1 else ''}" if count else ""
    warmup = f"{speed['warmup']} warm-up run{'s' if speed['warmup'] != 1 else ''}"
    return (
        f"Latency and throughput measured on {speed['hardware']} ({speed['device']}{threads}, {speed['dtype']}) in one "
        f"process, pruned and dense runs interleaved: the median of {speed['repeats']} runs after {warmup}, latency "
        f"at batch size {speed['batch_size_latency']}, throughput at batch size {speed['batch_size_throughput']}. "
        "Speed-ups depend on the hardware; re-measure with "
        "`hf-vitprune report <model directory>`."
    )


def _metrics_note(report: PruningReport) -> str:
    where = report.dataset or "the evaluation set"
    parts = (("config", report.dataset_config), ("split", report.dataset_split))
    details = ", ".join(f"{label} `{value}`" for label, value in parts if value)
    return f"Evaluated on {where}" + (f" ({details})" if details else "") + "."


def _other_columns(report: PruningReport) -> list[str]:
    """Unit kinds besides heads and neurons that some pruned layer lists (head dims after OFB)."""
    return sorted({kind for layer in report.pruned_stats.layers for kind in layer.other_units})


def _kind_label(kind: str) -> str:
    label = UNIT_KINDS[kind].label if kind in UNIT_KINDS else kind.replace("_", " ")
    return label[:1].upper() + label[1:]


def _has_token_column(report: PruningReport) -> bool:
    """Whether the pruned model sees fewer tokens in some layer (token pruning): the table shows them."""
    return any(layer.tokens is not None for layer in report.pruned_stats.layers)


def _has_type_column(report: PruningReport) -> bool:
    """Whether some layer's attention became a convolution (SPViT): the table shows each layer's type."""
    return any(layer.layer_type not in (None, "attention") for layer in report.pruned_stats.layers)


def _layer_rows(report: PruningReport) -> list[dict]:
    dense_tokens = report.dense_stats.tokens
    return [
        {
            "index": after.index,
            "layer_type": after.layer_type or "attention",
            "tokens": f"{after.tokens if after.tokens is not None else dense_tokens} / "
                      f"{before.tokens if before.tokens is not None else dense_tokens}",
            "heads": f"{after.heads} / {before.heads}",
            "neurons": f"{after.neurons:,} / {before.neurons:,}",
            "other": [f"{after.units(kind):,}" for kind in _other_columns(report)],
            "params": f"{after.params:,} / {before.params:,}",
            "flops": f"{after.flops:,} / {before.flops:,}",
        }
        for after, before in zip(report.pruned_stats.layers, report.dense_stats.layers)
    ]


def _recipe(report: PruningReport) -> list[str]:
    """Generic lines from the config's common fields, with the method's own sentences where they belong."""
    config, card = report.config, report.method_card
    dense, pruned = report.dense_stats, report.pruned_stats
    lines = [f"Method: `{report.method}` — {card['description'].rstrip('.')}."]
    budget = config.budget
    lines.append(
        f"Budget: `{budget.target_name}={budget.fraction}` (remove {budget.fraction:.1%} of the {budget.unit_name}); "
        f"achieved: {percent_removed(pruned.params, dense.params)} of the parameters and "
        f"{percent_removed(pruned.flops, dense.flops)} of the FLOPs removed."
    )
    lines.append(f"Pruned units: {card.get('units') or _units(config)}.")
    lines.extend(card["recipe"])  # the method's ranking and schedule
    if config.distillation_weight > 0:
        token = " (through the distillation token where the model has one)" if config.use_distillation_token else ""
        lines.append(
            f"Distillation: from the frozen dense model during fine-tuning, weight {config.distillation_weight}, "
            f"temperature {config.distillation_temperature}{token}."
        )
    else:
        lines.append("Distillation: none (labels only).")
    training = report.training or {}
    if training:
        lines.append("Training arguments: " + ", ".join(f"`{key}={training[key]}`" for key in sorted(training)) + ".")
    return lines


def _units(config) -> str:
    """What the config's head and neuron settings prune (methods whose units differ say so in their card)."""
    units = []
    if config.prune_heads:
        units.append(
            f"attention heads (at least {config.min_heads_per_layer} per layer, "
            f"in multiples of {config.round_heads_to})"
        )
    if config.prune_neurons:
        units.append(
            f"MLP neurons (at least {config.min_neurons_per_layer} per layer, "
            f"in multiples of {config.round_neurons_to})"
        )
    return " and ".join(units)


def _citations(report: PruningReport) -> list[dict]:
    citations = list(report.method_card["citations"])
    if report.config.distillation_weight > 0:
        citations.append(DISTILLATION_CITATION)
    return citations


def stage_note(report: PruningReport) -> str | None:
    """The warning a checkpoint's card opens with; None for a final model."""
    phase = report.checkpoint_phase
    if phase is None:
        return None
    if phase == FINETUNE_PHASE:
        return "Training checkpoint during fine-tuning of the compacted model; the final model may differ."
    return (
        f"Training checkpoint during the `{phase}` search phase: the weights are not pruned yet; the tables "
        "describe the model as saved."
    )


# --------------------------------------------------------------------------- the card


def eval_results(report: PruningReport) -> list[EvalResult] | None:
    """The pruned model's metrics as huggingface_hub ``EvalResult``s (the card's ``model-index``)."""
    if not report.metrics_pruned:
        return None
    task = "image-classification" if report.is_classifier else "image-feature-extraction"
    return [
        EvalResult(
            task_type=task,
            dataset_type=report.dataset or "custom",
            dataset_name=report.dataset or "custom evaluation set",
            dataset_config=report.dataset_config,
            dataset_split=report.dataset_split,
            metric_type=name,
            metric_value=value,
        )
        for name, value in sorted(report.metrics_pruned.items())
    ]


def card_data(report: PruningReport) -> ModelCardData:
    """The card's YAML metadata."""
    return ModelCardData(
        base_model=report.base_model,
        library_name="hf_vitprune",
        pipeline_tag="image-classification" if report.is_classifier else "image-feature-extraction",
        tags=[*BASE_TAGS, report.method],
        datasets=[report.dataset] if report.dataset else None,
        metrics=sorted(report.metrics_pruned) if report.metrics_pruned else None,
        license=report.license,
        model_name=report.display_name,
        eval_results=eval_results(report),
    )


def render_model_card(report: PruningReport, template: str | os.PathLike | None = None) -> ModelCard:
    """The model card for ``report``; deterministic (the same report gives the same text)."""
    path = Path(template) if template is not None else template_path()
    repo_id = report.repo_id or f"<your-username>/{report.display_name}"
    card = ModelCard.from_template(
        card_data(report),
        template_path=str(path),
        title=report.display_name,
        stage_note=stage_note(report),
        summary=_summary(report),
        compression_rows=compression_rows(report),
        speed_note=_speed_note(report),
        metric_rows=evaluation_rows(report),
        metrics_note=_metrics_note(report),
        layer_rows=_layer_rows(report),
        other_columns=[_kind_label(kind) for kind in _other_columns(report)],
        token_column=_has_token_column(report),
        type_column=_has_type_column(report),
        tokens=report.pruned_stats.tokens,
        recipe=_recipe(report),
        pruning_config_json=json.dumps(report.pruning_config, indent=2, sort_keys=True),
        auto_class="AutoModelForImageClassification" if report.is_classifier else "AutoModel",
        repo_id=repo_id,
        versions=sorted(report.versions.items()),
        created=report.created,
        citations=_citations(report),
    )
    return card


def write_model_card(
    directory: str | os.PathLike, report: PruningReport, template: str | os.PathLike | None = None
) -> ModelCard:
    """Write ``README.md`` (the card) and ``pruning_report.json`` into ``directory`` in one atomic step."""
    card = render_model_card(report, template)
    with atomic_directory(directory) as staging:
        (staging / CARD_FILE).write_text(str(card), encoding="utf-8")
        (staging / REPORT_FILE).write_text(report.to_json_string(), encoding="utf-8")
    return card


def rerender_model_card(directory: str | os.PathLike, **changes) -> ModelCard:
    """Re-render ``README.md`` of a model directory from its ``pruning_report.json``.

    ``changes`` replace report fields first (e.g. ``repo_id="me/model"``, ``license="apache-2.0"``) and
    are saved with it; None values are ignored.
    """
    report = PruningReport.from_pretrained(directory)
    changes = {key: value for key, value in changes.items() if value is not None}
    if changes:
        report = dataclasses.replace(report, **changes)  # re-validated by __post_init__
    return write_model_card(directory, report)
