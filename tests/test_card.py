"""PruningReport, measure_speed and the model card: JSON round trip, Hub metadata, numbers equal the measured ones."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results
from transformers import TrainingArguments, ViTConfig, ViTForImageClassification, ViTModel

import hf_vitprune
from hf_vitprune import PruningConfig, PruningPlan, apply_plan, model_stats
from hf_vitprune.architectures import find_encoder_layers
from hf_vitprune.reporting import (
    REPORT_FILE,
    PruningReport,
    eval_results,
    metrics_from_logs,
    render_model_card,
    template_path,
    training_summary,
    write_model_card,
)
from hf_vitprune.reporting.table import comparison_rows, latency_ratio, text_table
from hf_vitprune.speed import dense_counterpart, measure_speed

TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37, image_size=16,
            patch_size=4)
PLAN = PruningPlan(heads={0: [0, 2]}, neurons={1: [0, 1, 2]})
TOKEN = "hf_fake_secret_token"


def tiny_models(cls=ViTForImageClassification):
    torch.manual_seed(0)
    extra = {"num_labels": 5} if cls is ViTForImageClassification else {}
    dense = cls(ViTConfig(**TINY, **extra))
    pruned = apply_plan(copy.deepcopy(dense), PLAN)
    return dense, pruned


def make_report(speed=None, pruning_config=None, **fields) -> PruningReport:
    dense, pruned = tiny_models()
    fields = {
        "base_model": "google/vit-base-patch16-224",
        "dataset": "fashion_mnist",
        "dataset_split": "test",
        "metrics_dense": {"accuracy": 0.9375},
        "metrics_pruned": {"accuracy": 0.90625, "f1": 0.5},
        "created": "2025-01-02T03:04:05+00:00",
        **fields,
    }
    return PruningReport.from_models(
        dense, pruned, pruning_config=pruning_config or PruningConfig(target_sparsity=0.4), plan=PLAN, speed=speed,
        **fields
    )


def table(text: str, heading: str) -> list[list[str]]:
    """The rows (cells stripped) of the first Markdown table after ``heading``."""
    lines = text[text.index(heading):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def number(cell: str) -> float:
    return float(re.match(r"[-\d,.]+", cell).group(0).replace(",", ""))


# --------------------------------------------------------------------------- the report


def test_report_json_round_trip(tmp_path):
    report = make_report(speed={"pruned": {"latency_ms": 1.5, "throughput": 99.0}})
    path = report.save_pretrained(tmp_path)
    assert path == tmp_path / REPORT_FILE
    loaded = PruningReport.from_pretrained(tmp_path)
    assert loaded == report
    assert loaded.to_dict() == json.loads(path.read_text())
    assert loaded.to_json_string() == report.to_json_string()
    assert loaded.pruned_stats == model_stats(tiny_models()[1])
    assert loaded.dense_stats == model_stats(tiny_models()[0])
    assert PruningPlan.from_dict(loaded.plan) == PLAN
    assert not list(tmp_path.glob("*.partial")), "the atomic write left its staging directory behind"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"metrics_pruned": {"accuracy": float("nan")}}, "finite"),
        ({"method": "magnitude"}, "disagrees"),
        ({"stage": "halfway"}, "stage"),
        ({"stage": "ADMM-checkpoint"}, "stage"),
        ({"method_card": {"description": "x", "recipe": "one sentence", "citations": []}}, "recipe"),
        ({"method_card": {"description": "x", "recipe": [], "citations": [{"what": "x"}]}}, "citations"),
        ({"method_card": {"description": "", "recipe": [], "citations": []}}, "description"),
        ({"pruned": {"params": 1}}, "ModelStats"),
    ],
)
def test_report_rejects_bad_fields(change, message):
    data = {**make_report().to_dict(), **change}
    with pytest.raises(ValueError, match=message):
        PruningReport.from_dict(data)


def test_report_rejects_unknown_fields_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="Unknown PruningReport fields"):
        PruningReport.from_dict({**make_report().to_dict(), "hub_token": TOKEN})
    with pytest.raises(FileNotFoundError, match=REPORT_FILE):
        PruningReport.from_pretrained(tmp_path)


def test_local_paths_are_not_base_models(tmp_path):
    dense, pruned = tiny_models()
    dense.config._name_or_path = str(tmp_path)
    report = PruningReport.from_models(dense, pruned, pruning_config=PruningConfig(target_sparsity=0.4))
    assert report.base_model is None  # the Hub rejects a base_model that is not a repo id
    assert "base_model" not in render_model_card(report).data.to_dict()


def test_metrics_from_trainer_logs():
    history = [
        {"loss": 1.0, "step": 1},
        {"eval_loss": 0.9, "eval_accuracy": 0.5, "eval_runtime": 1.0, "epoch": 1.0, "params": 5},
        {"eval_loss": 0.7, "eval_accuracy": 0.75, "eval_samples_per_second": 3.0, "kept_heads": 4},
        {"train_runtime": 3.0},
    ]
    assert metrics_from_logs(history) == {"accuracy": 0.75}
    assert metrics_from_logs([{"loss": 1.0}]) is None


def test_report_from_models_with_what_a_trainer_holds(tmp_path):
    """The fields PruningTrainer.run_record() passes: stats, plan, config, logs, schedule, speed."""
    dense, pruned = tiny_models()
    dense.config._name_or_path = "facebook/deit-tiny-patch16-224"
    args = TrainingArguments(str(tmp_path / "deit-tiny-gohsp"), learning_rate=3e-4, max_steps=7, report_to=[],
                             hub_token=TOKEN)
    speed = {"pruned": {"latency_ms": 2.0, "throughput": 50.0}, "dense": {"latency_ms": 3.0, "throughput": 40.0},
             "batch_size_latency": 1, "batch_size_throughput": 4}  # a stand-in for measure_speed's output
    report = PruningReport.from_models(
        model_stats(dense), pruned, pruning_config=PruningConfig(target_sparsity=0.4, method="magnitude"), plan=PLAN,
        base_model=dense.config.name_or_path, dataset="beans", speed=speed,
        metrics_pruned=metrics_from_logs([{"eval_accuracy": 0.8, "eval_loss": 0.3}]),
        model_name=Path(args.output_dir).name, training=training_summary(args),
    )
    assert report.method == "magnitude"
    assert report.base_model == "facebook/deit-tiny-patch16-224"
    assert report.metrics_pruned == {"accuracy": 0.8}
    assert report.dense == model_stats(dense).to_dict() and report.pruned == model_stats(pruned).to_dict()
    assert report.model_name == "deit-tiny-gohsp"
    assert report.training["learning_rate"] == 3e-4 and report.training["max_steps"] == 7
    assert report.architecture == "PrunedViTForImageClassification"
    assert report.speed == speed
    assert TOKEN not in report.to_json_string()


# --------------------------------------------------------------------------- speed


def test_measure_speed_interleaves_and_restores_models():
    dense, pruned = tiny_models()
    dense.train()
    pruned.eval()
    speed = measure_speed(pruned, dense, batch_size_throughput=4, repeats=5, warmup=1)
    assert dense.training and not pruned.training  # each model's mode is restored
    for name in ("pruned", "dense"):
        assert speed[name]["latency_ms"] > 0 and speed[name]["throughput"] > 0
    assert speed["latency_speedup"] == pytest.approx(speed["dense"]["latency_ms"] / speed["pruned"]["latency_ms"])
    assert speed["throughput_speedup"] == pytest.approx(speed["pruned"]["throughput"] / speed["dense"]["throughput"])
    assert (speed["batch_size_latency"], speed["batch_size_throughput"], speed["repeats"]) == (1, 4, 5)
    assert speed["device"] == "cpu" and speed["torch_threads"] == torch.get_num_threads()
    assert speed["hardware"] and speed["dtype"] == "float32"
    json.dumps(speed, allow_nan=False)  # JSON-ready


def test_measure_speed_rejects_bad_arguments():
    _, pruned = tiny_models()
    with pytest.raises(ValueError, match="repeats"):
        measure_speed(pruned, repeats=0)
    with pytest.raises(ValueError, match="batch_size_throughput"):
        measure_speed(pruned, batch_size_throughput=2.5)


def test_dense_counterpart_has_the_dense_architecture():
    dense, pruned = tiny_models()
    reference = dense_counterpart(pruned)
    assert model_stats(reference) == model_stats(dense)
    assert not reference.config.is_heterogeneous


# --------------------------------------------------------------------------- the card


def test_card_metadata_and_model_index_round_trip(tmp_path):
    report = make_report()
    write_model_card(tmp_path, report)
    card = ModelCard.load(tmp_path / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "hf_vitprune"
    assert data["pipeline_tag"] == "image-classification"
    assert data["base_model"] == "google/vit-base-patch16-224"
    assert data["tags"] == ["pruned", "vision-transformer", "hf_vitprune", "gohsp"]
    assert data["datasets"] == ["fashion_mnist"]
    assert data["metrics"] == ["accuracy", "f1"]

    model_index = data["model-index"]
    name, results = model_index_to_eval_results(model_index)
    assert name == report.display_name
    assert results == eval_results(report)
    assert eval_results_to_model_index(name, results) == model_index
    values = {r.metric_type: r.metric_value for r in results}
    assert values == report.metrics_pruned  # exactly the evaluated numbers, not rounded
    assert {(r.task_type, r.dataset_type, r.dataset_split) for r in results} == {
        ("image-classification", "fashion_mnist", "test")
    }
    assert PruningReport.from_pretrained(tmp_path) == report


def test_card_numbers_equal_the_measured_ones(tmp_path):
    dense, pruned = tiny_models()
    speed = measure_speed(pruned, dense, batch_size_throughput=8, repeats=5, warmup=1)
    report = make_report(speed=speed)
    write_model_card(tmp_path, report)
    text = ModelCard.load(tmp_path / "README.md").text

    rows = {row[0]: row[1:] for row in table(text, "## Compression")}
    # independent counts: parameters of the modules, heads and widths from the weight shapes
    assert number(rows["Parameters"][0]) == sum(p.numel() for p in dense.parameters())
    assert number(rows["Parameters"][1]) == sum(p.numel() for p in pruned.parameters())
    assert number(rows["FLOPs per image"][0]) == model_stats(dense).flops
    assert number(rows["FLOPs per image"][1]) == model_stats(pruned).flops
    assert number(rows["Attention heads"][1]) == 10 and number(rows["Attention heads"][0]) == 12
    assert number(rows["MLP neurons"][1]) == 37 + 3 + 37
    ratio = sum(p.numel() for p in pruned.parameters()) / sum(p.numel() for p in dense.parameters())
    assert number(rows["Parameters"][2]) == pytest.approx(ratio, abs=5e-4)

    latency = rows["Latency, batch 1 (ms)"]
    assert number(latency[0]) == pytest.approx(speed["dense"]["latency_ms"], abs=5e-4)
    assert number(latency[1]) == pytest.approx(speed["pruned"]["latency_ms"], abs=5e-4)
    throughput = rows["Throughput, batch 8 (images/s)"]
    assert number(throughput[0]) == pytest.approx(speed["dense"]["throughput"], abs=0.05)
    assert number(throughput[1]) == pytest.approx(speed["pruned"]["throughput"], abs=0.05)
    assert number(throughput[2]) == pytest.approx(speed["throughput_speedup"], abs=5e-4)
    assert speed["hardware"] in text and "batch size 8" in text

    layers = table(text, "### Per layer")
    for row, layer, reference in zip(layers, find_encoder_layers(pruned), find_encoder_layers(dense)):
        heads = layer.attention.q_proj.out_features // layer.head_dim
        assert row[1] == f"{heads} / {reference.num_heads}"
        assert number(row[2].split("/")[0]) == layer.mlp_out.in_features
        assert number(row[3].split("/")[0]) == sum(p.numel() for p in layer.module.parameters())
    assert [row[1] for row in layers] == ["2 / 4", "4 / 4", "4 / 4"]

    metrics = {row[0]: row[1:] for row in table(text, "### Evaluation")}
    assert number(metrics["accuracy"][0]) == pytest.approx(0.9375, abs=5e-5)
    assert number(metrics["accuracy"][1]) == pytest.approx(0.90625, abs=5e-5)
    assert number(metrics["accuracy"][2]) == pytest.approx(0.90625 - 0.9375, abs=6e-5)


def test_card_body_sections():
    text = str(render_model_card(make_report()))
    assert 'AutoModelForImageClassification.from_pretrained("<your-username>/' in text
    assert "import hf_vitprune" in text and "trust_remote_code=True" in text
    assert "2301.05345" in text and "Alternating Direction Method of Multipliers" in text
    assert f"transformers {hf_vitprune.reporting.library_versions()['transformers']}" in text
    assert "Speed was not measured" in text
    assert "`target_sparsity=0.4`" in text and "Distillation: from the frozen dense model" in text
    recipe = render_model_card(make_report(repo_id="me/tiny-pruned")).text
    assert 'from_pretrained("me/tiny-pruned", trust_remote_code=True)' in recipe


def test_card_is_deterministic_and_has_no_token(tmp_path):
    report = make_report(speed={"pruned": {"latency_ms": 1.25, "throughput": 10.0}, "batch_size_latency": 1,
                                "batch_size_throughput": 4, "hardware": "Test CPU", "device": "cpu",
                                "torch_threads": 1, "dtype": "float32", "repeats": 5, "warmup": 2})
    first = str(render_model_card(report))
    assert str(render_model_card(report)) == first
    assert str(render_model_card(PruningReport.from_json_string(report.to_json_string()))) == first
    write_model_card(tmp_path, report)
    assert (tmp_path / "README.md").read_text() == first
    assert TOKEN not in first and "hf_" + "fake" not in (tmp_path / REPORT_FILE).read_text()


def test_card_without_metrics_or_dataset_and_for_a_backbone():
    dense, pruned = tiny_models(ViTModel)
    report = PruningReport.from_models(
        dense, pruned, pruning_config=PruningConfig(target_flops_reduction=0.3, distillation_weight=0.0),
        stage="admm-checkpoint",
    )
    card = ModelCard(str(render_model_card(report)))
    data = card.data.to_dict()
    assert data["pipeline_tag"] == "image-feature-extraction"
    assert "model-index" not in data and "datasets" not in data and "base_model" not in data
    assert "AutoModel.from_pretrained(" in card.text and "Distillation: none" in card.text
    assert "during the `admm` search phase: the weights are not pruned yet" in card.text
    assert "Hinton" not in card.text
    assert "`target_flops_reduction=0.3`" in card.text


def test_metrics_without_dataset_still_give_a_valid_model_index():
    report = make_report(dataset=None, dataset_split=None)
    data = ModelCard(str(render_model_card(report))).data.to_dict()
    _, results = model_index_to_eval_results(data["model-index"])
    assert {r.dataset_type for r in results} == {"custom"}


def test_template_ships_with_the_package():
    path = template_path()
    assert path.name == "pruned_vit.md" and path.read_text().startswith("---\n{{ card_data }}\n---")
    # the source checkout's copy is the one the wheel packs (pyproject data-files)
    repo_template = Path(__file__).resolve().parent.parent / "model_cards" / "pruned_vit.md"
    assert path.read_bytes() == repo_template.read_bytes()


# --------------------------------------------------------------------------- PruningTrainer


def test_card_of_a_real_run_and_its_checkpoint(tmp_path):
    from datasets import Dataset

    from hf_vitprune import PruningTrainer

    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(**TINY, num_labels=5))
    model.config._name_or_path = "google/vit-tiny-test"
    generator = torch.Generator().manual_seed(0)
    data = Dataset.from_dict({
        "pixel_values": torch.randn(32, 3, 16, 16, generator=generator).numpy(),
        "labels": torch.randint(0, 5, (32,), generator=generator).numpy(),
    }).with_format("torch")

    def accuracy(prediction):
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        return {"accuracy": float((logits.argmax(-1) == prediction.label_ids).mean())}

    args = TrainingArguments(str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=8, learning_rate=1e-3,
                             report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True, hub_token=TOKEN)
    trainer = PruningTrainer(model=model, args=args, train_dataset=data, eval_dataset=data, compute_metrics=accuracy,
                             pruning_config=PruningConfig(target_sparsity=0.4, calibration_samples=8,
                                                          admm_update_steps=1))
    trainer.train()
    card = write_model_card(tmp_path / "final",
                            trainer.run_record(dataset="random-images", speed=trainer.measure_speed()))
    report = PruningReport.from_pretrained(tmp_path / "final")
    pruned = trainer.model
    assert report.pruned == model_stats(pruned).to_dict() and report.dense == trainer.dense_stats.to_dict()
    assert PruningPlan.from_dict(report.plan) == trainer.plan
    assert report.base_model == "google/vit-tiny-test" and report.stage == "final"
    assert report.metrics_pruned["accuracy"] == trainer.evaluate()["eval_accuracy"]
    assert report.speed["dense"]["latency_ms"] > 0 and report.speed["batch_size_throughput"] == 64
    (metric,) = card.data.to_dict()["model-index"][0]["results"][0]["metrics"]
    assert metric == {"type": "accuracy", "value": report.metrics_pruned["accuracy"]}
    assert TOKEN not in (tmp_path / "final" / "README.md").read_text()
    assert TOKEN not in (tmp_path / "final" / REPORT_FILE).read_text()

    checkpoint = write_model_card(tmp_path / "run" / "checkpoint-4", trainer.run_record(stage="finetune-checkpoint"))
    assert "Speed was not measured" in checkpoint.text
    assert PruningReport.from_pretrained(tmp_path / "run" / "checkpoint-4").stage == "finetune-checkpoint"


def test_recipe_states_the_rho_schedule_that_ran():
    dense, pruned = tiny_models()
    scheduled = render_model_card(make_report(pruning_config=PruningConfig(target_sparsity=0.4,
                                                                           admm_fraction=0.5))).text
    assert "rho from 0.1 growing geometrically to 10.0 at the last update" in scheduled and "×1.3" not in scheduled
    report = PruningReport.from_models(dense, pruned, plan=PLAN, created="2025-01-02T03:04:05+00:00",
                                       pruning_config=PruningConfig(target_sparsity=0.4, admm_rho=0.001,
                                                                    admm_rho_final=None, admm_fraction=0.5))
    fixed = render_model_card(report).text
    assert "rho from 0.001 growing ×1.3 per update" in fixed and "geometrically" not in fixed


# --------------------------------------------------------------------------- what the card takes from the method

CUSTOM_METHOD_CARD = {
    "description": "a made-up criterion for this test",
    "recipe": ["Ranking: by coin flip, seed 3.", "Schedule: prune at once, then fine-tune."],
    "citations": [{"what": "Coin flips (Doe, 2024)", "bibtex": "@misc{doe2024coin,\n  title = {Coin}\n}"}],
}


def recipe_lines(text: str) -> list[str]:
    section = text[text.index("## Recipe"):text.index("<details>")]
    return [line[2:] for line in section.splitlines() if line.startswith("- ")]


def citation_titles(text: str) -> list[str]:
    section = text[text.index("## Citations"):]
    return [line[:-1] for line in section.splitlines() if line.endswith(":") and not line.startswith("#")]


def test_default_card_recipe_and_citations():
    """The default config's recipe and citations, word for word."""
    text = render_model_card(make_report()).text
    assert recipe_lines(text) == [
        "Method: `gohsp` — GOHSP: heads and MLP neurons ranked by their loss sensitivity, heads weighted by a "
        "graph-based (Markov chain) importance, then structured pruning in one shot or by ADMM (Yin et al., AAAI "
        "2023).",
        "Budget: `target_sparsity=0.4` (remove 40.0% of the parameters); achieved: 18.9% of the parameters and "
        "19.8% of the FLOPs removed.",
        "Pruned units: attention heads (at least 1 per layer, in multiples of 1) and MLP neurons (at least 1 per "
        "layer, in multiples of 1).",
        "Ranking: 256 calibration images; heads and MLP neurons by group Fisher (loss sensitivity), heads weighted by "
        "a directed head graph (edge statistic `output`, damping 0.85, teleport by currency, importance exponent 1.0), "
        "norm exponent 0.5.",
        "Schedule: one shot: the plan is the first projection of the ranking onto the budget, made on the dense model "
        "(no ADMM update), then a hard prune, physical compaction, and fine-tuning of the compacted model with a fresh "
        "optimizer for every remaining step.",
        "Distillation: from the frozen dense model during fine-tuning, weight 0.5, temperature 2.0 (through the "
        "distillation token where the model has one).",
    ]
    assert citation_titles(text) == [
        "GOHSP (Yin et al., AAAI 2023, arXiv:2301.05345)",
        "ADMM pruning (Zhang et al., ECCV 2018, arXiv:1804.03294)",
        "Knowledge distillation (Hinton et al., 2015, arXiv:1503.02531)",
    ]


def test_card_says_what_the_method_card_says(tmp_path):
    report = make_report(method_card=CUSTOM_METHOD_CARD, training={"max_steps": 7})
    write_model_card(tmp_path, report)
    text = ModelCard.load(tmp_path / "README.md").text
    lines = recipe_lines(text)
    assert lines[0] == "Method: `gohsp` — a made-up criterion for this test."
    # the method's sentences stand where the ranking and schedule stood, between the units and the distillation
    assert lines[3:5] == CUSTOM_METHOD_CARD["recipe"]
    assert lines[2].startswith("Pruned units:") and lines[5].startswith("Distillation:")
    assert lines[6] == "Training arguments: `max_steps=7`."
    assert citation_titles(text) == ["Coin flips (Doe, 2024)", "Knowledge distillation (Hinton et al., 2015, "
                                     "arXiv:1503.02531)"]
    assert CUSTOM_METHOD_CARD["citations"][0]["bibtex"] in text
    assert "Yin" not in text and "Zhang" not in text and "Z/U update" not in text
    assert PruningReport.from_pretrained(tmp_path).method_card == CUSTOM_METHOD_CARD


# pruning_config.json as PruningConfig(target_sparsity=0.4).to_dict() wrote it before method options were nested
OLD_FLAT_CONFIG = {
    "admm_fraction": 0.5, "admm_rho": 0.001, "admm_rho_final": None, "admm_rho_growth": 1.3, "admm_update_steps": 20,
    "calibration_samples": 256, "damping": 0.85, "distillation_temperature": 2.0, "distillation_weight": 0.5,
    "edge_statistic": "output", "importance_alpha": 1.0, "method": "gohsp", "min_heads_per_layer": 1,
    "min_neurons_per_layer": 1, "prune_heads": True, "prune_neurons": True, "random_seed": 0,
    "ranking_max_iterations": 1000, "ranking_tolerance": 1e-08, "round_heads_to": 1, "round_neurons_to": 1,
    "target_flops_reduction": None, "target_sparsity": 0.4, "use_distillation_token": True,
}


@pytest.mark.parametrize("stage", ["final", "admm-checkpoint"])
def test_report_written_before_method_cards_loads_and_renders_the_same_card(tmp_path, stage):
    from hf_vitprune.methods import method_card

    report = make_report(stage=stage, pruning_config=PruningConfig.from_dict(OLD_FLAT_CONFIG))
    old = {key: value for key, value in report.to_dict().items() if key != "method_card"}
    old["pruning_config"] = OLD_FLAT_CONFIG
    (tmp_path / REPORT_FILE).write_text(json.dumps(old))
    loaded = PruningReport.from_pretrained(tmp_path)
    assert loaded.method_card == method_card(PruningConfig.from_dict(OLD_FLAT_CONFIG)) == report.method_card
    assert "rho from 0.001 growing ×1.3 per update" in " ".join(loaded.method_card["recipe"])
    assert loaded == report
    assert str(render_model_card(loaded)) == str(render_model_card(report))


def test_stage_notes_name_the_phase():
    finetune = render_model_card(make_report(stage="finetune-checkpoint")).text
    note = "> **Training checkpoint during fine-tuning of the compacted model; the final model may differ.**"
    assert note in finetune
    search = render_model_card(make_report(stage="lottery_search-checkpoint")).text
    assert ("> **Training checkpoint during the `lottery_search` search phase: the weights are not pruned yet; the "
            "tables describe the model as saved.**") in search
    assert "Training checkpoint" not in render_model_card(make_report()).text


# --------------------------------------------------------------------------- one comparison table


def text_rows(text: str) -> dict[str, list[str]]:
    """Rows of a text_table: the name (up to the first two spaces) and the cells after it."""
    rows = {}
    for line in text.splitlines()[2:]:
        name, _, rest = line.partition("  ")
        rows[name] = re.split(r"\s{2,}", rest.strip())
    return rows


def test_card_and_text_show_the_same_comparison():
    speed = {"pruned": {"latency_ms": 1.03, "throughput": 91.0}, "dense": {"latency_ms": 1.0, "throughput": 100.0},
             "batch_size_latency": 1, "batch_size_throughput": 8, "hardware": "Test CPU", "device": "cpu",
             "torch_threads": 1, "dtype": "float32", "repeats": 5, "warmup": 2}
    report = make_report(speed=speed)
    text = render_model_card(report).text
    card = {row[0]: row[1:] for row in table(text, "## Compression")}
    card.update({row[0]: row[1:] for row in table(text, "### Evaluation")})
    rows = comparison_rows(report.dense_stats, report.pruned_stats, metrics_dense=report.metrics_dense,
                           metrics_pruned=report.metrics_pruned, speed=report.speed)
    printed = text_rows(text_table(rows))
    assert set(printed) == set(card) == {row.name for row in rows}
    for name, cells in card.items():
        assert printed[name] == [cell.replace("×", "x").replace("—", "-") for cell in cells], name
        assert [number(cell) for cell in printed[name] if cell != "-"] == [
            number(cell) for cell in cells if cell != "—"]
    assert card["Parameters"][:2] == [f"{report.dense_stats.params:,}", f"{report.pruned_stats.params:,}"]
    assert card["accuracy"] == ["0.9375", "0.9062", "-0.0312"] and card["f1"] == ["—", "0.5000", "—"]
    # a slower pruned model reads as slower, in both forms
    assert card["Latency, batch 1 (ms)"] == ["1.000", "1.030", "1.030× (1.03× slower)"]
    assert printed["Latency, batch 1 (ms)"][-1] == "1.030x (1.03x slower)"
    assert card["Throughput, batch 8 (images/s)"] == ["100.0", "91.0", "0.910×"]


@pytest.mark.parametrize(
    "pruned_ms, dense_ms, expected",
    [
        (0.8, 1.0, "0.800× (1.25× faster)"),
        (1.03, 1.0, "1.030× (1.03× slower)"),
        (2.0, 2.0, "1.000× (1.00× faster)"),
        (1.0, 0.0, "n/a"),
    ],
)
def test_latency_ratio_says_faster_or_slower(pruned_ms, dense_ms, expected):
    assert latency_ratio(pruned_ms, dense_ms) == expected


# --------------------------------------------------------------------------- what the card leaves out


@pytest.mark.parametrize("classes, top5", [(3, False), (5, False), (6, True), (10, True)])
def test_top5_accuracy_only_with_more_than_five_classes(classes, top5):
    from transformers import EvalPrediction

    from hf_vitprune.metrics import make_compute_metrics

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(40, classes, generator=generator).numpy()
    labels = torch.randint(0, classes, (40,), generator=generator).numpy()
    metrics = make_compute_metrics()(EvalPrediction(predictions=logits, label_ids=labels))
    assert metrics["accuracy"] == float((logits.argmax(-1) == labels).mean())
    assert ("top5_accuracy" in metrics) == top5
    if top5:
        ranks = (logits > logits[range(40), labels][:, None]).sum(-1)
        assert metrics["top5_accuracy"] == float((ranks < 5).mean()) < 1


def test_a_three_class_card_shows_no_top5_accuracy(tmp_path):
    torch.manual_seed(0)
    dense = ViTForImageClassification(ViTConfig(**TINY, num_labels=3))
    pruned = apply_plan(copy.deepcopy(dense), PLAN)
    metrics = {"accuracy": 0.75, "top5_accuracy": 1.0}  # as the metric computed it before: always 1 for 3 classes
    report = PruningReport.from_models(dense, pruned, pruning_config=PruningConfig(target_sparsity=0.4),
                                       metrics_dense=dict(metrics), metrics_pruned=dict(metrics))
    assert report.num_labels == 3 and report.metrics_pruned == report.metrics_dense == {"accuracy": 0.75}
    card = write_model_card(tmp_path, report)
    assert "top5" not in str(card)
    assert [row[0] for row in table(card.text, "### Evaluation")] == ["accuracy"]
    # a report saved before num_labels was recorded keeps what it has; with num_labels it drops the top-5
    saved = json.loads((tmp_path / REPORT_FILE).read_text())
    assert PruningReport.from_dict({**saved, "metrics_pruned": metrics}).metrics_pruned == {"accuracy": 0.75}
    del saved["num_labels"]
    assert PruningReport.from_dict({**saved, "metrics_pruned": metrics}).metrics_pruned == metrics
    # ten classes: top-5 stays
    ten = make_report(metrics_pruned={"accuracy": 0.5, "top5_accuracy": 0.9}, num_labels=10)
    assert "| top5_accuracy |" in render_model_card(ten).text


@pytest.mark.parametrize("schedule, shown, hidden", [
    ({"max_steps": 7, "num_train_epochs": 3}, "`max_steps=7`", "num_train_epochs"),
    ({"num_train_epochs": 3}, "`num_train_epochs=3`", "max_steps"),
])
def test_the_card_lists_only_the_length_setting_that_governed(tmp_path, schedule, shown, hidden):
    args = TrainingArguments(str(tmp_path), report_to=[], **schedule)
    summary = training_summary(args)
    assert hidden not in summary
    line = recipe_lines(render_model_card(make_report(training=summary)).text)[-1]
    assert line.startswith("Training arguments:") and shown in line and hidden not in line
    # a report saved with both (as before) renders only the one that governed
    both = {"max_steps": args.max_steps, "num_train_epochs": args.num_train_epochs, "seed": 42}
    line = recipe_lines(render_model_card(make_report(training=both)).text)[-1]
    assert shown in line and hidden not in line


def test_base_model_is_a_hub_id_or_nothing(tmp_path):
    dense, pruned = tiny_models()

    def base(name_or_path):
        dense.config._name_or_path = str(name_or_path)
        report = PruningReport.from_models(dense, pruned, pruning_config=PruningConfig(target_sparsity=0.4))
        assert report.base_model == render_model_card(report).data.to_dict().get("base_model")
        return report.base_model

    assert base("google/vit-base-patch16-224") == "google/vit-base-patch16-224"
    # a snapshot folder of the Hub cache (what snapshot_download returns) stands for its repository
    snapshot = tmp_path / "hub" / "models--google--vit-base-patch16-224" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    assert base(snapshot) == "google/vit-base-patch16-224"
    assert base(snapshot / "subfolder") is None
    # a local folder saved from a Hub model records no Hub id (transformers 5 writes no _name_or_path): omitted
    hub_named = ViTForImageClassification(ViTConfig(**TINY, num_labels=5))
    hub_named.config._name_or_path = "google/vit-base-patch16-224"
    hub_named.save_pretrained(tmp_path / "saved")
    reloaded = ViTForImageClassification.from_pretrained(tmp_path / "saved")
    assert reloaded.config.name_or_path == str(tmp_path / "saved")
    assert base(reloaded.config.name_or_path) is None
    assert base(tmp_path / "missing" / "dir") is None and base("./vit") is None


def test_an_admm_schedule_is_told_as_such():
    config = PruningConfig(target_sparsity=0.4, admm_fraction=0.5)
    lines = recipe_lines(render_model_card(make_report(pruning_config=config)).text)
    assert lines[4] == (
        "Schedule: ADMM for the first 50% of the optimizer steps (Z/U update every 20 steps, rho from 0.1 growing "
        "geometrically to 10.0 at the last update, support frozen for the last 25% of the updates, constant learning "
        "rate after warm-up, distilling from the dense model, units left out of Z for 3 updates in a row cut out at "
        "once), then a hard prune to the ADMM solution, physical compaction, and fine-tuning of the compacted model "
        "with a fresh optimizer for the remaining steps.")
