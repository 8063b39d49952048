"""The model card of a pruned model, rendered from ``model_cards/pruned_vit.md`` with huggingface_hub.

Everything on the card comes from a :class:`~hf_vitprune.report.PruningReport`, so the same report
always gives the same card, and ``hf-vitprune card DIR`` can re-render it from
``pruning_report.json``. :func:`push_model_directory` uploads exactly the files a pruned model
needs on the Hub.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from importlib import metadata, resources
from pathlib import Path

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData

from .fileio import atomic_directory
from .report import REPORT_FILE, PruningReport

TEMPLATE_NAME = "pruned_vit.md"
CARD_FILE = "README.md"
BASE_TAGS = ("pruned", "vision-transformer", "hf_vitprune")

METHOD_DESCRIPTIONS = {
    "gohsp": "GOHSP: attention heads ranked by a graph-based (Markov chain) importance, then ADMM-based "
    "structured pruning of heads and MLP neurons (Yin et al., AAAI 2023)",
    "magnitude": "magnitude-based ADMM: units ranked by the group norm of their weights (Zhang et al., 2018)",
    "taylor": "first-order Taylor importance of heads and neurons, combined with ADMM",
    "random": "random unit selection (a baseline), with the same ADMM schedule",
}

CITATIONS = {
    "gohsp": (
        "GOHSP (Yin et al., AAAI 2023, arXiv:2301.05345)",
        """@inproceedings{yin2023gohsp,
  title = {{GOHSP}: A Unified Framework of Graph and Optimization-Based Heterogeneous Structured Pruning for Vision Transformer},
  author = {Yin, Miao and Uzkent, Burak and Shen, Yilin and Jin, Hongxia and Yuan, Bo},
  booktitle = {Proceedings of the AAAI Conference on Artificial Intelligence},
  year = {2023},
  eprint = {2301.05345},
  archivePrefix = {arXiv}
}""",
    ),
    "admm": (
        "ADMM pruning (Zhang et al., ECCV 2018, arXiv:1804.03294)",
        """@inproceedings{zhang2018systematic,
  title = {A Systematic {DNN} Weight Pruning Framework using Alternating Direction Method of Multipliers},
  author = {Zhang, Tianyun and Ye, Shaokai and Zhang, Kaiqi and Tang, Jian and Wen, Wujie and Fardad, Makan and Wang, Yanzhi},
  booktitle = {Proceedings of the European Conference on Computer Vision (ECCV)},
  year = {2018},
  eprint = {1804.03294},
  archivePrefix = {arXiv}
}""",
    ),
    "taylor": (
        "Taylor importance (Molchanov et al., CVPR 2019)",
        """@inproceedings{molchanov2019importance,
  title = {Importance Estimation for Neural Network Pruning},
  author = {Molchanov, Pavlo and Mallya, Arun and Tyree, Stephen and Frosio, Iuri and Kautz, Jan},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year = {2019}
}""",
    ),
    "distillation": (
        "Knowledge distillation (Hinton et al., 2015, arXiv:1503.02531)",
        """@article{hinton2015distilling,
  title = {Distilling the Knowledge in a Neural Network},
  author = {Hinton, Geoffrey and Vinyals, Oriol and Dean, Jeff},
  journal = {arXiv preprint arXiv:1503.02531},
  year = {2015}
}""",
    ),
}

# Top-level files of a saved pruned model that belong on the Hub (checkpoints, optimizer states and
# training arguments stay local).
HUB_FILE_PATTERNS = (
    r"config\.json",
    r"(model|pytorch_model)(-\d+-of-\d+)?\.safetensors",
    r"model\.safetensors\.index\.json",
    r"[A-Za-z_][A-Za-z0-9_]*\.py",  # the remote-code files save_pretrained copies (modeling.py, ...)
    r"pruning_(config|plan|report)\.json",
    r"preprocessor_config\.json",
    r"README\.md",
)


# --------------------------------------------------------------------------- the template


def template_path(name: str = TEMPLATE_NAME) -> Path:
    """Where the card template lives: inside the installed package, the source checkout, or the
    wheel's data files (``share/hf_vitprune/model_cards``); a FileNotFoundError names all three."""
    candidates = [
        Path(str(resources.files("hf_vitprune"))) / "model_cards" / name,
        Path(__file__).resolve().parent.parent / "model_cards" / name,  # editable install / checkout
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


# --------------------------------------------------------------------------- formatting


def _count(value: int) -> str:
    return f"{value:,}"


def _fraction(part: float, whole: float) -> str:
    return f"{part / whole:.3f}×" if whole else "n/a"


def _size_ratio(pruned: float, dense: float) -> str:
    if not dense:
        return "n/a"
    return f"{pruned / dense:.3f}× ({(pruned / dense - 1) * 100:+.1f}%)"


def _percent_removed(pruned: float, dense: float) -> str:
    return f"{(1 - pruned / dense) * 100:.1f}%" if dense else "n/a"


def _metric(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def _summary(report: PruningReport) -> str:
    dense, pruned = report.dense_stats, report.pruned_stats
    heads = (sum(layer.heads for layer in pruned.layers), sum(layer.heads for layer in dense.layers))
    neurons = (sum(layer.neurons for layer in pruned.layers), sum(layer.neurons for layer in dense.layers))
    base = (
        f"[{report.base_model}](https://huggingface.co/{report.base_model})"
        if report.base_model
        else "a vision transformer"
    )
    text = (
        f"This model is {base} structurally pruned with `hf_vitprune` (method `{report.method}`): "
        f"{_percent_removed(pruned.params, dense.params)} of the parameters and "
        f"{_percent_removed(pruned.flops, dense.flops)} of the FLOPs are removed, keeping {heads[0]} of "
        f"{heads[1]} attention heads and {neurons[0]:,} of {neurons[1]:,} MLP neurons. "
        "The pruned heads and neurons are physically removed, so it is a smaller dense model that runs with "
        "the stock PyTorch kernels: no masks and no sparse kernels."
    )
    pruned_metrics, dense_metrics = report.metrics_pruned or {}, report.metrics_dense or {}
    if "accuracy" in pruned_metrics:
        text += f" Accuracy: {_metric(pruned_metrics['accuracy'])}"
        if "accuracy" in dense_metrics:
            text += f" (dense: {_metric(dense_metrics['accuracy'])})"
        text += f" on {report.dataset or 'the evaluation set'}."
    return text


def _compression_rows(report: PruningReport) -> list[dict]:
    dense, pruned = report.dense_stats, report.pruned_stats
    heads = (sum(layer.heads for layer in pruned.layers), sum(layer.heads for layer in dense.layers))
    neurons = (sum(layer.neurons for layer in pruned.layers), sum(layer.neurons for layer in dense.layers))
    rows = [
        {"name": "Parameters", "dense": _count(dense.params), "pruned": _count(pruned.params),
         "ratio": _size_ratio(pruned.params, dense.params)},
        {"name": "FLOPs per image", "dense": _count(dense.flops), "pruned": _count(pruned.flops),
         "ratio": _size_ratio(pruned.flops, dense.flops)},
        {"name": "Attention heads", "dense": _count(heads[1]), "pruned": _count(heads[0]),
         "ratio": _fraction(heads[0], heads[1])},
        {"name": "MLP neurons", "dense": _count(neurons[1]), "pruned": _count(neurons[0]),
         "ratio": _fraction(neurons[0], neurons[1])},
    ]
    speed = report.speed
    if speed:
        latency = (speed["pruned"]["latency_ms"], (speed.get("dense") or {}).get("latency_ms"))
        throughput = (speed["pruned"]["throughput"], (speed.get("dense") or {}).get("throughput"))
        rows.append({
            "name": f"Latency, batch {speed['batch_size_latency']} (ms)",
            "dense": "—" if latency[1] is None else f"{latency[1]:.3f}",
            "pruned": f"{latency[0]:.3f}",
            "ratio": "—"
            if latency[1] is None
            else f"{latency[0] / latency[1]:.3f}× ({latency[1] / latency[0]:.2f}× faster)",
        })
        rows.append({
            "name": f"Throughput, batch {speed['batch_size_throughput']} (images/s)",
            "dense": "—" if throughput[1] is None else f"{throughput[1]:.1f}",
            "pruned": f"{throughput[0]:.1f}",
            "ratio": "—" if throughput[1] is None else f"{throughput[0] / throughput[1]:.3f}×",
        })
    return rows


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


def _metric_rows(report: PruningReport) -> list[dict]:
    pruned, dense = report.metrics_pruned or {}, report.metrics_dense or {}
    rows = []
    for name in sorted(set(pruned) | set(dense)):
        before, after = dense.get(name), pruned.get(name)
        change = "—" if before is None or after is None else f"{after - before:+.4f}"
        rows.append({"name": name, "dense": _metric(before), "pruned": _metric(after), "change": change})
    return rows


def _metrics_note(report: PruningReport) -> str:
    where = report.dataset or "the evaluation set"
    parts = (("config", report.dataset_config), ("split", report.dataset_split))
    details = ", ".join(f"{label} `{value}`" for label, value in parts if value)
    return f"Evaluated on {where}" + (f" ({details})" if details else "") + "."


def _layer_rows(report: PruningReport) -> list[dict]:
    return [
        {
            "index": after.index,
            "heads": f"{after.heads} / {before.heads}",
            "neurons": f"{after.neurons:,} / {before.neurons:,}",
            "params": f"{after.params:,} / {before.params:,}",
            "flops": f"{after.flops:,} / {before.flops:,}",
        }
        for after, before in zip(report.pruned_stats.layers, report.dense_stats.layers)
    ]


def _recipe(report: PruningReport) -> list[str]:
    config = report.pruning_config
    dense, pruned = report.dense_stats, report.pruned_stats
    lines = [f"Method: `{report.method}` — {METHOD_DESCRIPTIONS.get(report.method, report.method)}."]
    if config["target_sparsity"] is not None:
        sparsity = config["target_sparsity"]
        budget = f"`target_sparsity={sparsity}` (remove {sparsity:.1%} of the parameters)"
    else:
        budget = (
            f"`target_flops_reduction={config['target_flops_reduction']}` "
            f"(remove {config['target_flops_reduction']:.1%} of the FLOPs)"
        )
    lines.append(
        f"Budget: {budget}; achieved: {_percent_removed(pruned.params, dense.params)} of the parameters and "
        f"{_percent_removed(pruned.flops, dense.flops)} of the FLOPs removed."
    )
    units = []
    if config["prune_heads"]:
        units.append(
            f"attention heads (at least {config['min_heads_per_layer']} per layer, "
            f"in multiples of {config['round_heads_to']})"
        )
    if config["prune_neurons"]:
        units.append(
            f"MLP neurons (at least {config['min_neurons_per_layer']} per layer, "
            f"in multiples of {config['round_neurons_to']})"
        )
    lines.append(f"Pruned units: {' and '.join(units)}.")
    ranking = f"Ranking: {config['calibration_samples']} calibration images"
    if report.method == "gohsp":
        ranking += (
            f"; head graph with edge statistic `{config['edge_statistic']}`, damping {config['damping']}, "
            f"importance exponent {config['importance_alpha']}"
        )
    lines.append(ranking + ".")
    if config.get("admm_rho_final") is not None:
        growth = f"growing geometrically to {config['admm_rho_final']} at the last update"
    else:
        growth = f"growing ×{config['admm_rho_growth']} per update"
    lines.append(
        f"Schedule: ADMM for the first {config['admm_fraction']:.0%} of the optimizer steps (Z/U update every "
        f"{config['admm_update_steps']} steps, rho from {config['admm_rho']} {growth}), then a hard prune to the "
        "ADMM solution, physical compaction, and fine-tuning of the compacted model with a fresh optimizer for the "
        "remaining steps."
    )
    if config["distillation_weight"] > 0:
        token = " (through the distillation token where the model has one)" if config["use_distillation_token"] else ""
        lines.append(
            f"Distillation: from the frozen dense model during fine-tuning, weight {config['distillation_weight']}, "
            f"temperature {config['distillation_temperature']}{token}."
        )
    else:
        lines.append("Distillation: none (labels only).")
    training = report.training or {}
    if training:
        lines.append("Training arguments: " + ", ".join(f"`{key}={training[key]}`" for key in sorted(training)) + ".")
    return lines


def _citations(report: PruningReport) -> list[dict]:
    keys = []
    if report.method in ("gohsp", "taylor"):
        keys.append(report.method)
    keys.append("admm")
    if report.pruning_config["distillation_weight"] > 0:
        keys.append("distillation")
    return [{"what": CITATIONS[key][0], "bibtex": CITATIONS[key][1]} for key in keys]


_STAGE_NOTES = {
    "final": None,
    "admm-checkpoint": "Training checkpoint during the ADMM phase: the weights are not pruned yet; the tables "
    "describe the model as saved.",
    "finetune-checkpoint": "Training checkpoint during fine-tuning of the compacted model; the final model "
    "may differ.",
}


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
        stage_note=_STAGE_NOTES[report.stage],
        summary=_summary(report),
        compression_rows=_compression_rows(report),
        speed_note=_speed_note(report),
        metric_rows=_metric_rows(report),
        metrics_note=_metrics_note(report),
        layer_rows=_layer_rows(report),
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


def write_trainer_card(trainer, directory: str | os.PathLike | None = None, **fields) -> ModelCard | None:
    """Write the card and ``pruning_report.json`` of a :class:`~hf_vitprune.PruningTrainer` into ``directory``.

    Call it from ``save_model`` (every process may call it; only the one that saves writes). A
    ``checkpoint-*`` directory gets a checkpoint card without timing; any other save of a compacted
    model measures latency and throughput against the frozen dense teacher (or, without distillation,
    a fresh model of the dense architecture). ``fields`` override report fields (``speed=None`` skips
    timing, ``dataset=``, ``metrics_dense=``, ``license=``, ...). Returns the card, or None when this
    process does not save.
    """
    if not trainer.args.should_save:
        return None
    directory = Path(directory if directory is not None else trainer.args.output_dir)
    checkpoint = directory.name.startswith("checkpoint-")
    if "stage" not in fields:
        during_training = checkpoint and trainer.phase in ("admm", "finetune")
        fields["stage"] = f"{trainer.phase}-checkpoint" if during_training else "final"
    if "speed" not in fields:
        fields["speed"] = None
        if not checkpoint and trainer.plan is not None:
            from .speed import dense_counterpart, measure_speed

            model = trainer.accelerator.unwrap_model(trainer.model)
            dense = trainer.teacher if trainer.teacher is not None else dense_counterpart(model)
            fields["speed"] = measure_speed(model, dense)
    return write_model_card(directory, PruningReport.from_trainer(trainer, **fields))


# --------------------------------------------------------------------------- the Hub


def hub_files(directory: str | os.PathLike) -> list[str]:
    """The top-level files of a saved pruned model that :func:`push_model_directory` uploads."""
    directory = Path(directory)
    return sorted(
        entry.name
        for entry in directory.iterdir()
        if entry.is_file() and any(re.fullmatch(pattern, entry.name) for pattern in HUB_FILE_PATTERNS)
    )


def push_model_directory(
    directory: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload pruned model (hf_vitprune)",
    create_pr: bool = False,
    endpoint: str | None = None,
):
    """Upload a saved pruned model (weights, config, remote code, pruning files, card) to ``repo_id``.

    Creates the repo if needed, validates the card's metadata with the Hub, then commits
    :func:`hub_files` of ``directory`` in one commit. Refuses (ValueError) to upload a file that
    contains the token. Returns the ``CommitInfo``.
    """
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory} holds no config.json; save the model there first (save_pretrained).")
    files = hub_files(directory)
    from huggingface_hub import get_token

    secret = token if isinstance(token, str) else get_token()
    if secret:
        needle = secret.encode()
        leaking = [name for name in files if needle in (directory / name).read_bytes()]
        if leaking:
            raise ValueError(
                f"Refusing to upload: {', '.join(leaking)} contain(s) your Hub token. Remove it and save again."
            )
    api = HfApi(endpoint=endpoint, token=token, library_name="hf_vitprune", library_version=_version())
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if CARD_FILE in files and endpoint is None:
        # ModelCard.validate talks to the configured endpoint (HF_ENDPOINT) and sends no token
        ModelCard((directory / CARD_FILE).read_text(encoding="utf-8")).validate()
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=directory,
        allow_patterns=files,
        commit_message=commit_message,
        revision=revision,
        create_pr=create_pr,
    )


def _version() -> str:
    try:
        return metadata.version("hf_vitprune")
    except metadata.PackageNotFoundError:
        return "unknown"
