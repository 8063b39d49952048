"""The benchmark's quick mode end to end: every run is in the JSON, the numbers are sane, the reports exist."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
METHODS = ["gohsp", "magnitude", "taylor", "random", "torch_pruning"]  # matched on parameters
FLOPS_METHODS = ["ofb", "ofb_no_pmim", "spvit"]  # matched on the FLOPs of the gohsp runs
ADMM_METHODS = ["gohsp", "magnitude", "taylor", "random"]
SPARSITIES = [0.4, 0.6]
SEEDS = [0, 1]

import matplotlib  # noqa: E402,F401  (in the test extra: a missing plotting library must fail, not skip)
import sklearn  # noqa: E402,F401


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # The quick mode with the shortest schedule that still trains: this checks the pipeline, not the targets.
    command = [sys.executable, "-m", "benchmarks.run", "--quick", "--output_dir", str(out / "results"),
               "--markdown_file", str(out / "BENCHMARKS.md"), "--cache_dir", str(out / "dense"),
               "--dense_epochs", "4", "--prune_epochs", "1", "--max_train_samples", "512"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    completed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return out


def test_every_method_sparsity_and_seed_is_in_the_json(quick_run):
    results = json.loads((quick_run / "results" / "digits_quick.json").read_text())
    runs = {(r["method"], r["sparsity"], r["seed"]) for r in results["runs"]}
    assert runs == {(m, s, seed) for m in METHODS + FLOPS_METHODS for s in SPARSITIES for seed in SEEDS}
    rows = {(r["method"], r["sparsity"]) for r in results["summary"]["rows"]}
    assert rows == {(m, s) for m in METHODS + FLOPS_METHODS for s in SPARSITIES}
    assert {t["id"] for t in results["summary"]["targets"]} >= {
        "accuracy_40", "gohsp_best_at_40", "gohsp_best_at_60", "admm_step", "memory", "ofb_best_at_60",
        "ofb_speedup_efficiency", "spvit_close_at_40", "spvit_batch1_vs_gohsp"}
    # the ADMM methods prune in one shot (the library's default): no ADMM phase, so no residual target
    assert not any(t["id"].startswith("admm_residual") for t in results["summary"]["targets"])


def test_torch_pruning_rows_hit_the_budget_and_one_shot_runs_record_no_admm_residual(quick_run):
    import math

    results = json.loads((quick_run / "results" / "digits_quick.json").read_text())
    dense_params = results["dense"]["params"]
    peer = [r for r in results["runs"] if r["method"] == "torch_pruning"]
    assert {(r["sparsity"], r["seed"]) for r in peer} == {(s, seed) for s in SPARSITIES for seed in SEEDS}
    for run in peer:
        limit = (1 - run["sparsity"]) * dense_params
        # at most the budget, and within one unit's cost of it (the neurons fill the rest exactly)
        assert limit - run["torch_pruning"]["neuron_cost"] < run["params"] <= limit, run
        assert math.isfinite(run["test_accuracy"]) and 0 <= run["test_accuracy"] <= 1
        assert run["admm_residual_last_logged"] is None
        assert min(run["heads_per_layer"]) >= 1 and run["finetune_steps"] > 0
    for run in (r for r in results["runs"] if r["method"] in ADMM_METHODS):
        assert run["admm_residual_last_logged"] is None and run["search_steps"] == 1, run
    rows = {r["method"]: r for r in results["summary"]["rows"]}
    assert rows["gohsp"]["admm_residual_mean"] is None and rows["torch_pruning"]["admm_residual_mean"] is None


def test_speed_section_at_model_shapes_is_measured(quick_run):
    results = json.loads((quick_run / "results" / "digits_quick.json").read_text())
    speed = results["speed_shapes"]
    assert json.loads((quick_run / "results" / "digits_quick_speed_shapes.json").read_text()) == speed
    (shape,) = speed["shapes"]
    assert {(r["method"], r["sparsity"]) for r in shape["runs"]} == {(m, s) for m in METHODS for s in (0.3, 0.5)}
    for row in shape["runs"]:
        assert abs(row["achieved_sparsity"] - row["sparsity"]) <= 0.01 and row["flops_speedup"] > 1
        run = shape["modes"]["eager"]["runs"][row["key"]]
        assert run["throughput"] > 0 and run["efficiency"] > 0
    assert shape["repeats"] >= 5

def test_the_numbers_are_plausible(quick_run):
    results = json.loads((quick_run / "results" / "digits_quick.json").read_text())
    dense = results["dense"]
    assert dense["split_sizes"]["test"] == 270
    assert 0.1 <= dense["test"]["accuracy"] <= 1
    gohsp_flops = {r["sparsity"]: r["flops_ratio"] for r in results["runs"] if r["method"] == "gohsp"}
    for run in results["runs"]:
        assert 0 <= run["test_accuracy"] <= 1
        if run["method"] in FLOPS_METHODS:  # their budget is the gohsp run's FLOPs, within 1%
            assert run["flops_matched_to"] == "gohsp"
            assert abs(run["flops_ratio"] - gohsp_flops[run["sparsity"]]) <= 0.01, run
        else:
            assert abs(run["achieved_sparsity"] - run["sparsity"]) <= 0.01, run
        assert run["flops"] < dense["flops"] and run["params"] < dense["params"]
        assert run["flops_speedup"] > 1
        speed = run["speed"]
        assert speed["repeats"] >= 5 and speed["batch_size_latency"] == 1 and speed["batch_size_throughput"] == 64
        assert speed["pruned"]["latency_ms"] > 0 and speed["dense"]["throughput"] > 0
        assert run["throughput_speedup_over_flops_speedup"] > 0
        assert run["ranking_share"] is None if run["method"] in FLOPS_METHODS else 0 <= run["ranking_share"] < 1
    step = results["training_step"]
    assert 0 < step["plain_step_seconds"] and step["ratio"] > 0.2
    # timed against a distilled fine-tuning step, with an ADMM search even though the runs prune in one shot
    assert step["plain_phase"] == "finetune" and step["admm_fraction"] > 0
    memory = results["memory"]
    assert memory["plain"]["peak_delta_bytes"] > 0 and memory["admm"]["peak_delta_bytes"] > 0
    assert results["total_seconds"] > 0


def test_table_and_plot_are_written(quick_run):
    markdown = (quick_run / "BENCHMARKS.md").read_text()
    for method in METHODS + FLOPS_METHODS:
        assert f"| {method} |" in markdown
    assert "## Targets" in markdown and "digits_quick_accuracy.png" in markdown
    assert "## Speed at real model shapes" in markdown and "ADMM residual at hard prune" in markdown
    plot = quick_run / "results" / "digits_quick_accuracy.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dense_model_trained_by_two_processes_is_cached_once_and_is_the_trained_one(tmp_path):
    """dense_processes=2 trains under torchrun; rank 0 writes the cache, whose model scores what training logged."""
    from transformers import Trainer

    from benchmarks.common import DIGITS_QUICK, Settings, load_data, load_dense, train_or_reuse_dense, training_arguments
    from hf_vitprune.metrics import make_compute_metrics

    settings = Settings(**dict(DIGITS_QUICK, dense_processes=2, dense_epochs=2, max_train_samples=256,
                               cache_dir=str(tmp_path / "dense")))
    data = load_data(settings)
    info = train_or_reuse_dense(settings, data)
    assert info["processes"] == 2 and not info["reused_from_cache"]
    assert [point["epoch"] for point in info["validation_curve"]] == [1, 2]
    assert sorted(p.name for p in (tmp_path / "dense").iterdir()) == ["benchmark_dense.json", "config.json",
                                                                       "model.safetensors", "trainer"]
    model = load_dense(settings)
    args = training_arguments(settings, tmp_path / "eval", epochs=1, learning_rate=1e-3, seed=0)
    metrics = Trainer(model=model, args=args, compute_metrics=make_compute_metrics()).evaluate(data["validation"])
    assert metrics["eval_accuracy"] == pytest.approx(info["validation_curve"][-1]["validation_accuracy"], abs=1e-9)
    assert train_or_reuse_dense(settings, data)["reused_from_cache"] is True


def test_a_cache_trained_with_other_settings_is_refused(tmp_path):
    from benchmarks.common import DIGITS_QUICK, Settings, load_data, train_or_reuse_dense

    settings = Settings(**dict(DIGITS_QUICK, dense_epochs=1, max_train_samples=128, cache_dir=str(tmp_path / "dense")))
    data = load_data(settings)
    train_or_reuse_dense(settings, data)
    changed = Settings(**dict(DIGITS_QUICK, dense_epochs=1, max_train_samples=128, augment=True,
                              cache_dir=str(tmp_path / "dense")))
    with pytest.raises(SystemExit, match="trained with other settings"):
        train_or_reuse_dense(changed, data)


def test_checks_parse_overrides_and_round_widths():
    import argparse

    from benchmarks.checks import _override, rounded

    assert rounded([159, 75, 112, 139, 3]) == [160, 80, 112, 144, 16]
    assert _override("admm_update_steps=1000") == ("admm_update_steps", 1000)
    assert _override("augment=false") == ("augment", False)
    assert _override("cache_dir=outputs/other") == ("cache_dir", "outputs/other")
    with pytest.raises(argparse.ArgumentTypeError, match="FIELD one of Settings' fields"):
        _override("admm_steps=3")


def test_torch_pruning_peer_prunes_heads_and_neurons_to_the_budget():
    """A random tiny ViT: whole heads and MLP neurons go, the embedding width stays, the model still runs."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    from benchmarks.torch_pruning_peer import prune_with_torch_pruning
    from hf_vitprune import model_stats

    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                                intermediate_size=96, image_size=8, patch_size=2, num_channels=1,
                                                num_labels=5))
    dense = model_stats(model).params
    batch = {"pixel_values": torch.randn(6, 1, 8, 8), "labels": torch.randint(0, 5, (6,))}
    model, info = prune_with_torch_pruning(model, 0.4, [batch])
    stats = model_stats(model)
    assert (1 - 0.4) * dense - info["neuron_cost"] < stats.params <= (1 - 0.4) * dense
    assert sum(layer.heads for layer in stats.layers) == 8 - info["heads"] and info["heads"] > 0
    for layer in model.vit.layers:
        attention = layer.attention
        assert attention.o_proj.out_features == 48 and attention.head_dim == 12
        assert attention.num_attention_heads * attention.head_dim == attention.q_proj.out_features
    assert model(pixel_values=batch["pixel_values"]).logits.shape == (6, 5)
    assert min(layer.heads for layer in stats.layers) >= 1


def test_torch_pruning_peer_gives_heads_back_when_a_layer_would_be_emptied(monkeypatch):
    """An attempt that empties a layer of heads (None) is retried with one head fewer, neurons filling the budget."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    from benchmarks import torch_pruning_peer
    from hf_vitprune import model_stats

    torch.manual_seed(1)
    model = ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                                intermediate_size=64, image_size=8, patch_size=2, num_channels=1,
                                                num_labels=5))
    dense = model_stats(model).params
    even_split = torch_pruning_peer.units_to_remove(model, 0.5)["heads"]
    real, attempts = torch_pruning_peer._prune_once_with_torch_pruning, []

    def first_attempt_empties_a_layer(candidate, *args):
        attempts.append(args[-1])
        return None if len(attempts) == 1 else real(candidate, *args)

    monkeypatch.setattr(torch_pruning_peer, "_prune_once_with_torch_pruning", first_attempt_empties_a_layer)
    batch = {"pixel_values": torch.randn(6, 1, 8, 8), "labels": torch.randint(0, 5, (6,))}
    pruned, info = torch_pruning_peer.prune_with_torch_pruning(model, 0.5, [batch])
    stats = model_stats(pruned)
    assert attempts == [0, 1] and info["heads_given_back"] == 1 and info["heads"] == even_split - 1
    assert sum(layer.heads for layer in stats.layers) == 12 - even_split + 1
    assert (1 - 0.5) * dense - info["neuron_cost"] < stats.params <= (1 - 0.5) * dense
    assert pruned(pixel_values=batch["pixel_values"]).logits.shape == (6, 5)


# ----------------------------------------------------------------------------------- held-out model and epoch axis

# The Settings fields the held-out preset may set itself: its architecture, its dense model's recipe and cache, and
# where its results go. Every other field is the pruning recipe (or how it is run) and must be the main preset's.
HELDOUT_MAY_SET = {"model", "dense_epochs", "dense_learning_rate", "cache_dir", "results_name", "speed_shapes",
                   "benchmark_model"}


def test_heldout_preset_copies_every_pruning_field_from_the_main_preset():
    import dataclasses

    from benchmarks.common import FASHION_MNIST, HELDOUT_FASHION_MNIST, HELDOUT_OWN_FIELDS, Settings

    assert set(HELDOUT_OWN_FIELDS) <= HELDOUT_MAY_SET, "a pruning field was made the held-out model's own"
    main, heldout = Settings(**FASHION_MNIST), Settings(**HELDOUT_FASHION_MNIST)
    for f in dataclasses.fields(Settings):
        if f.name not in HELDOUT_MAY_SET:
            assert getattr(heldout, f.name) == getattr(main, f.name), f"held-out preset sets {f.name}"
    assert heldout.benchmark_model == "heldout" and main.benchmark_model == "main"
    assert heldout.cache_dir != main.cache_dir and heldout.results_name != main.results_name
    assert heldout.output_dir == main.output_dir and heldout.markdown_file == main.markdown_file


def test_heldout_model_differs_in_shape_and_stays_within_the_flops_budget():
    from transformers import ViTConfig, ViTForImageClassification

    from benchmarks.common import FASHION_MNIST, HELDOUT_FASHION_MNIST
    from hf_vitprune import model_stats

    main, heldout = FASHION_MNIST["model"], HELDOUT_FASHION_MNIST["model"]
    for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "patch_size"):
        assert main[key] != heldout[key], key
    assert main["hidden_size"] // main["num_attention_heads"] != heldout["hidden_size"] // heldout["num_attention_heads"]
    assert (main["image_size"], main["num_channels"]) == (heldout["image_size"], heldout["num_channels"])
    flops = [model_stats(ViTForImageClassification(ViTConfig(**m, num_labels=10))).flops for m in (main, heldout)]
    assert flops[1] <= 1.5 * flops[0]


def test_model_flag_chooses_the_preset_and_prune_epochs_is_a_list():
    from transformers import HfArgumentParser

    from benchmarks.run import BenchmarkArguments, resolve_settings

    def settings(*argv):
        (args,) = HfArgumentParser(BenchmarkArguments).parse_args_into_dataclasses(args=list(argv))
        return resolve_settings(args)

    default = settings()
    assert default.benchmark_model == "main" and default.epoch_axis == [2.0]
    axis = settings("--model", "heldout", "--prune_epochs", "2", "8")
    assert axis.benchmark_model == "heldout" and axis.results_name == "heldout_fashion_mnist"
    assert axis.epoch_axis == [2.0, 8.0] and axis.prune_epochs == 2.0
    with pytest.raises(SystemExit, match="digits smoke test"):
        settings("--model", "heldout", "--quick")
    with pytest.raises(SystemExit, match="distinct positive"):
        settings("--prune_epochs", "2", "2")


def _fake_record(method, sparsity, seed, epochs, target_flops_reduction=None):
    """What a pruning run records, with made-up figures (accuracy and FLOPs differ per epoch budget)."""
    flops_ratio = 1 - target_flops_reduction if target_flops_reduction is not None else 0.5 + epochs / 100
    record = {"method": method, "sparsity": sparsity, "seed": seed, "test_accuracy": 0.8 + epochs / 100,
              "flops_ratio": flops_ratio, "flops_speedup": 1 / flops_ratio, "train_seconds": 1.0, "ranking_seconds": None}
    if target_flops_reduction is not None:
        record["target_flops_reduction"] = target_flops_reduction
    return record


@pytest.fixture
def fake_pruning(monkeypatch):
    """benchmarks.run.run with every training, loading and timing step replaced: records which runs it asks for."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    from benchmarks import run as bench

    calls = []
    dense = ViTForImageClassification(ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                intermediate_size=32, image_size=8, patch_size=4, num_channels=1,
                                                num_labels=3))
    monkeypatch.setattr(bench, "load_data", lambda settings: {"train": [0] * 8, "validation": [0] * 4, "test": [0] * 4})
    monkeypatch.setattr(bench, "train_or_reuse_dense", lambda settings, data: {"train_seconds": 1.0})
    monkeypatch.setattr(bench, "load_dense", lambda settings: dense)
    monkeypatch.setattr(bench, "evaluate", lambda model, settings, dataset, prefix: {"accuracy": 0.9})
    monkeypatch.setattr(bench, "time_pruned", lambda settings, record, pruned, dense: record.update(
        speed={"throughput_speedup": 1.0}))
    monkeypatch.setattr(bench, "_measure_sections", lambda settings, data, results: None)
    monkeypatch.setattr(bench, "summarise", lambda results: {})

    class NoModel:
        @staticmethod
        def from_pretrained(directory):
            return None

    monkeypatch.setattr(bench, "AutoModelForImageClassification", NoModel)

    def prune_once(settings, data, method, sparsity, seed, save_dir, target_flops_reduction=None):
        calls.append((settings.prune_epochs, method, sparsity, seed))
        Path(save_dir).mkdir(parents=True)  # where the pruned model waits to be timed
        return _fake_record(method, sparsity, seed, settings.prune_epochs, target_flops_reduction)

    monkeypatch.setattr(bench, "prune_once", prune_once)
    torch.set_num_threads(1)
    return calls


def _axis_settings(tmp_path, epochs, **overrides):
    from benchmarks.common import DIGITS_QUICK, Settings

    return Settings(**dict(DIGITS_QUICK, methods=["gohsp", "torch_pruning", "ofb"], sparsities=[0.4, 0.6], seeds=[0, 1],
                           prune_epochs=epochs[0], epoch_budgets=list(epochs), workers=1, threads=1,
                           speed_shapes="none", output_dir=str(tmp_path), **overrides))


def test_epoch_axis_runs_every_method_sparsity_and_seed_at_every_budget(tmp_path, fake_pruning):
    from benchmarks.run import run

    results = run(_axis_settings(tmp_path, [1.0, 3.0]), "python -m benchmarks.run")
    expected = {(e, m, s, seed) for e in (1.0, 3.0) for m in ("gohsp", "torch_pruning", "ofb") for s in (0.4, 0.6)
                for seed in (0, 1)}
    assert sorted(fake_pruning) == sorted(expected)  # one run each, none twice
    saved = json.loads((tmp_path / "digits_quick.json").read_text())
    assert {(r["prune_epochs"], r["method"], r["sparsity"], r["seed"]) for r in saved["runs"]} == expected
    assert saved["runs"] == results["runs"]
    # the FLOPs-matched rows take the FLOPs of gohsp's runs at the same budget
    for run_ in saved["runs"]:
        if run_["method"] == "ofb":
            assert run_["target_flops_reduction"] == pytest.approx(1 - (0.5 + run_["prune_epochs"] / 100))


def test_resume_trains_only_the_budgets_not_yet_run(tmp_path, fake_pruning):
    from benchmarks.run import run

    run(_axis_settings(tmp_path, [1.0]), "first")
    fake_pruning.clear()
    results = run(_axis_settings(tmp_path, [1.0, 3.0]), "second", resume=True)
    assert {call[0] for call in fake_pruning} == {3.0} and len(fake_pruning) == 3 * 2 * 2
    assert len(results["runs"]) == 2 * 3 * 2 * 2
    fake_pruning.clear()
    run(_axis_settings(tmp_path, [1.0, 3.0]), "third", resume=True)
    assert fake_pruning == []  # everything present
    with pytest.raises(SystemExit, match="pruning epochs, which --prune_epochs does not list"):
        run(_axis_settings(tmp_path, [3.0]), "fourth", resume=True)


def test_resume_counts_runs_without_an_epochs_field_as_the_settings_budget(tmp_path, fake_pruning):
    """Results written before the epoch axis: their runs ran at settings.prune_epochs and are kept as such."""
    from benchmarks.run import run

    settings = _axis_settings(tmp_path, [1.0])
    run(settings, "first")
    saved = json.loads((tmp_path / "digits_quick.json").read_text())
    for record in saved["runs"]:
        del record["prune_epochs"]
    for key in ("epoch_budgets", "benchmark_model"):  # fields an older JSON does not have
        del saved["settings"][key]
    (tmp_path / "digits_quick.json").write_text(json.dumps(saved))
    fake_pruning.clear()
    results = run(_axis_settings(tmp_path, [1.0, 2.0]), "second", resume=True)
    assert {call[0] for call in fake_pruning} == {2.0}
    assert sorted({r["prune_epochs"] for r in results["runs"]}) == [1.0, 2.0]


# ------------------------------------------------------------------------ the page: both models, computed figures


def _synthetic_results(tmp_path, accuracies: dict, *, heldout: bool = False, epochs=(2.0,)) -> dict:
    """A results dict as benchmarks.run writes it, for gohsp and the peer at 40%, 2 seeds; ``accuracies`` maps
    (method, epochs) to the test accuracy of every seed."""
    from benchmarks.common import FASHION_MNIST, HELDOUT_FASHION_MNIST, Settings

    preset = HELDOUT_FASHION_MNIST if heldout else FASHION_MNIST
    settings = Settings(**dict(preset, methods=["gohsp", "torch_pruning"], sparsities=[0.4], seeds=[0, 1],
                               prune_epochs=epochs[0], epoch_budgets=list(epochs), output_dir=str(tmp_path),
                               markdown_file=str(tmp_path / "BENCHMARKS.md"), speed_shapes="none"))
    runs = []
    for (method, budget), accuracy in accuracies.items():
        for seed in (0, 1):
            runs.append({
                "method": method, "sparsity": 0.4, "seed": seed, "prune_epochs": budget,
                "test_accuracy": accuracy, "test_top5_accuracy": 1.0, "validation_accuracy": accuracy,
                "params": 600, "flops": 6000, "params_ratio": 0.6, "flops_ratio": 0.6, "achieved_sparsity": 0.4,
                "flops_speedup": 1 / 0.6, "heads_per_layer": [2, 2], "neurons_per_layer": [10, 10],
                "embedding_width": 8, "train_seconds": 10.0, "ranking_seconds": 0.1, "ranking_share": 0.01,
                "finetune_steps": 30, "search_steps": 30 if method == "gohsp" else 0,
                "admm_residual_last_logged": 0.01 if method == "gohsp" else None,
                "speed": {"latency_speedup": 1.1, "throughput_speedup": 1.2, "warmup": 2,
                          "pruned": {"latency_ms": 1.0, "throughput": 100.0},
                          "dense": {"latency_ms": 1.1, "throughput": 80.0}},
                "throughput_speedup_over_flops_speedup": 0.72, "latency_speedup_over_flops_speedup": 0.66})
    return {
        "command": "python -m benchmarks.run", "started": "2026-12-03T00:00:00+00:00", "total_seconds": 600.0,
        "settings": settings.to_dict(),
        "environment": {"hardware": "test CPU", "cpu_count": 2, "workers": 2, "torch_threads": 1, "speed_threads": 1,
                        "load_average_at_start": [1.0, 1.0, 1.0]},
        "dense": {"params": 1000, "flops": 10000, "test": {"accuracy": 0.9}, "validation": {"accuracy": 0.9},
                  "training": {"train_seconds": 60.0, "reused_from_cache": False, "validation_curve": []},
                  "split_sizes": {"train": 1920, "validation": 100, "test": 1000}},
        "runs": runs,
    }




def test_a_target_counts_as_met_only_where_both_models_meet_it(tmp_path):
    from benchmarks.report import compare_models, summarise

    def gohsp_vs_peer(main_gohsp, heldout_gohsp):
        main = summarise(_synthetic_results(tmp_path, {("gohsp", 2.0): main_gohsp, ("torch_pruning", 2.0): 0.88}))
        heldout = None if heldout_gohsp is None else summarise(_synthetic_results(
            tmp_path, {("gohsp", 2.0): heldout_gohsp, ("torch_pruning", 2.0): 0.88}, heldout=True))
        (entry,) = [e for e in compare_models(main, heldout) if e["id"] == "gohsp_vs_peer_at_40"]
        return entry

    both = gohsp_vs_peer(0.89, 0.885)  # +1.0 and +0.5 points over the peer: >= 0.3 on both
    assert both["main"]["met"] and both["heldout"]["met"] and both["met"] is True
    only_main = gohsp_vs_peer(0.89, 0.881)  # +0.1 on the held-out model
    assert only_main["main"]["met"] and only_main["heldout"]["met"] is False and only_main["met"] is False
    only_heldout = gohsp_vs_peer(0.881, 0.89)
    assert only_heldout["met"] is False
    not_run = gohsp_vs_peer(0.89, None)
    assert not_run["main"]["met"] and not_run["heldout"] is None and not_run["met"] is None


def test_the_page_shows_both_models_and_says_when_the_heldout_model_is_not_yet_run(tmp_path):
    from benchmarks.common import FASHION_MNIST, HELDOUT_FASHION_MNIST, Settings
    from benchmarks.report import summarise, write_reports

    main = _synthetic_results(tmp_path, {("gohsp", 2.0): 0.89, ("torch_pruning", 2.0): 0.88,
                                         ("gohsp", 8.0): 0.897, ("torch_pruning", 8.0): 0.89}, epochs=(2.0, 8.0))
    main["summary"] = summarise(main)
    settings = Settings(**main["settings"])
    write_reports(main, settings)
    page = (tmp_path / "BENCHMARKS.md").read_text()
    assert "**Not yet run.**" in page and "open: held-out model not yet run" in page
    assert "| met on both models |" not in page
    # the schedule's steps come from the run records, not from canned text: one shot (the preset's)...
    assert "2 epochs (gohsp: pruned in one shot, then 30 fine-tuning steps)" in page and "ADMM steps" not in page
    # ...or ADMM steps and Z/U updates
    admm = json.loads(json.dumps(main))
    admm["settings"]["admm_fraction"] = 0.5
    admm["summary"] = summarise(admm)
    write_reports(admm, Settings(**admm["settings"]))
    page = (tmp_path / "BENCHMARKS.md").read_text()
    assert "30 ADMM steps" in page and f"{30 // FASHION_MNIST['admm_update_steps']} Z/U updates" in page
    assert "~200 ADMM steps" not in page and "10 Z/U updates" not in page

    heldout = _synthetic_results(tmp_path, {("gohsp", 2.0): 0.89, ("torch_pruning", 2.0): 0.889,
                                            ("gohsp", 8.0): 0.898, ("torch_pruning", 8.0): 0.89},
                                 heldout=True, epochs=(2.0, 8.0))
    (tmp_path / f"{HELDOUT_FASHION_MNIST['results_name']}.json").write_text(json.dumps(heldout))
    write_reports(main, settings)
    page = (tmp_path / "BENCHMARKS.md").read_text()
    assert "**Not yet run.**" not in page and "## Held-out model" in page
    assert "the main model's, field for field" in page
    rows = [line for line in page.splitlines() if line.startswith("| 40% sparsity: gohsp >= torch_pruning + 0.3")]
    assert len(rows) == 2  # one per epoch budget
    assert rows[0].endswith("| **missed** on held-out |")  # 2 epochs: +1.0 on main, +0.1 on the held-out model
    assert rows[1].endswith("| met on both models |")  # 8 epochs: +0.7 and +0.8
    long_budget = next(line for line in page.splitlines() if line.startswith("| 40% sparsity, 8 pruning epochs"))
    assert long_budget.endswith("| met on both models |")  # 0.3 and 0.2 points below dense


def test_an_axis_interrupted_keeps_every_budget_it_finished(tmp_path, fake_pruning, monkeypatch):
    """Each budget is trained, timed and written before the next starts: a crash at 3 epochs keeps the 1-epoch runs."""
    from benchmarks import run as bench

    fake = bench.prune_once

    def crash_at_three(settings, *args, **kwargs):
        if settings.prune_epochs == 3.0:
            raise RuntimeError("interrupted")
        return fake(settings, *args, **kwargs)

    monkeypatch.setattr(bench, "prune_once", crash_at_three)
    with pytest.raises(RuntimeError, match="interrupted"):
        bench.run(_axis_settings(tmp_path, [1.0, 3.0]), "first")
    saved = json.loads((tmp_path / "digits_quick.json").read_text())
    assert {r["prune_epochs"] for r in saved["runs"]} == {1.0} and len(saved["runs"]) == 3 * 2 * 2
    monkeypatch.setattr(bench, "prune_once", fake)
    fake_pruning.clear()
    bench.run(_axis_settings(tmp_path, [1.0, 3.0]), "second", resume=True)
    assert {call[0] for call in fake_pruning} == {3.0}


@pytest.mark.parametrize("preset", ["FASHION_MNIST", "HELDOUT_FASHION_MNIST"])
def test_the_committed_dense_models_are_their_presets_and_load(preset):
    """benchmarks/dense/<name> is reused as it is (its record matches the preset's dense recipe), so a benchmark
    run never retrains it, and it loads as the preset's architecture."""
    from benchmarks import common

    settings = common.Settings(**getattr(common, preset))
    info = common.train_or_reuse_dense(settings, data=None)  # never touches the data when the cache is complete
    assert info["reused_from_cache"] and info["validation_curve"][-1]["epoch"] == settings.dense_epochs
    config = common.load_dense(settings).config
    assert {key: getattr(config, key) for key in settings.model} == settings.model


def test_one_shot_runs_take_the_admm_residual_target_from_the_validation_sweep(tmp_path):
    """Runs of the ADMM methods in one shot have no ADMM phase: a residual they recorded (older code logged the
    projection's) is not a residual, and the target is read from the sweep's ADMM-schedule runs instead."""
    from benchmarks.report import summarise

    results = _synthetic_results(tmp_path, {("gohsp", 2.0): 0.89, ("torch_pruning", 2.0): 0.88})
    results["settings"]["admm_fraction"] = 0.5
    summary = summarise(results)
    assert {t["id"] for t in summary["targets"]} >= {"admm_residual_gohsp"}
    assert next(r for r in summary["rows"] if r["method"] == "gohsp")["admm_residual_mean"] == pytest.approx(0.01)

    results["settings"]["admm_fraction"] = 0.0
    for run in results["runs"]:
        run["admm_residual_last_logged"] = 0.6 if run["method"] == "gohsp" else None
    assert not any(t["id"].startswith("admm_residual") for t in summarise(results)["targets"])  # no sweep file
    sweep = [{"method": "gohsp", "options": {"admm_fraction": 0.5}, "epochs": 2.0,
              "runs": [{"sparsity": 0.4, "seed": 0, "residual": 0.004, "removal_residual": 0.4},
                       {"sparsity": 0.6, "seed": 0, "residual": 0.07, "removal_residual": 0.5}]},
             {"method": "gohsp", "options": {"admm_fraction": 0.5, "currency": "energy"}, "epochs": 2.0,
              "runs": [{"sparsity": 0.4, "seed": 0, "residual": 0.9}]}]  # another variant: not the library's
    (tmp_path / "validation_fashion_mnist.json").write_text(json.dumps(sweep))
    summary = summarise(results)
    assert next(r for r in summary["rows"] if r["method"] == "gohsp")["admm_residual_mean"] is None
    (target,) = [t for t in summary["targets"] if t["id"].startswith("admm_residual")]
    assert target["id"] == "admm_residual_swept" and target["met"] is False and "max 0.0700 over 2 runs" in target["measured"]


def test_the_page_warns_when_its_runs_used_other_method_defaults():
    from benchmarks.report import _stale_defaults_warning
    from benchmarks.run import method_defaults

    today = method_defaults()
    assert _stale_defaults_warning({"environment": {"method_defaults": today}}) == []
    earlier = json.loads(json.dumps(today))
    earlier["gohsp"]["currency"] = "energy"
    (warning, _) = _stale_defaults_warning({"environment": {"method_defaults": earlier}})
    assert "gohsp.currency" in warning and "earlier versions of the methods" in warning
    assert "did not record" in _stale_defaults_warning({"environment": {}})[0]


def test_a_budget_interrupted_midway_keeps_its_trained_runs_and_times_them_on_resume(tmp_path, fake_pruning,
                                                                                      monkeypatch):
    """Every trained run is written as it ends (its model kept on disk): a crash after 5 runs of a budget loses
    none of them; --resume trains only the rest and times all."""
    from benchmarks import run as bench

    fake = bench.prune_once

    def crash_after_five(*args, **kwargs):
        if len(fake_pruning) == 5:
            raise RuntimeError("interrupted")
        return fake(*args, **kwargs)

    monkeypatch.setattr(bench, "prune_once", crash_after_five)
    with pytest.raises(RuntimeError, match="interrupted"):
        bench.run(_axis_settings(tmp_path, [1.0]), "first")
    saved = json.loads((tmp_path / "digits_quick.json").read_text())
    assert saved["runs"] == [] and len(saved["untimed"]) == 5
    first = list(fake_pruning)
    monkeypatch.setattr(bench, "prune_once", fake)
    fake_pruning.clear()
    results = bench.run(_axis_settings(tmp_path, [1.0]), "second", resume=True)
    assert not set(fake_pruning) & set(first) and len(fake_pruning) == 3 * 2 * 2 - 5
    assert len(results["runs"]) == 3 * 2 * 2 and all("speed" in r for r in results["runs"])
    assert "untimed" not in json.loads((tmp_path / "digits_quick.json").read_text())
    assert not any((tmp_path / "untimed").rglob("*-1ep"))  # timed models are removed


def small_deit(layers: int = 4):
    from benchmarks.speed_shapes import dense_model

    return dense_model("deit_tiny", {"num_hidden_layers": layers, "image_size": 64})


def test_speed_rows_without_a_plan_meet_their_budgets_and_onnx_runtime_gives_the_models_logits(tmp_path):
    """The extra rows of the speed section: token stages at a FLOPs budget, a conv hybrid at a parameter budget;
    ONNX Runtime runs the exported model, batch 1 and batch 3 alike."""
    import torch

    from benchmarks.speed_shapes import calibration_batches, conv_hybrid, onnx_runtime_model, plan_model, token_pruned
    from hf_vitprune import model_stats

    dense = small_deit()
    dense_stats = model_stats(dense)
    rounded = model_stats(plan_model("gohsp", dense, 0.3, calibration_batches(dense, 4), round_neurons_to=64))
    assert all(layer.neurons % 64 == 0 for layer in rounded.layers) and rounded.params <= 0.7 * dense_stats.params
    tokens = token_pruned(dense, 0.35)
    assert 0.6 <= model_stats(tokens).flops / dense_stats.flops <= 0.65
    hybrid = conv_hybrid(dense, 0.3)
    stats = model_stats(hybrid)
    assert [layer.layer_type for layer in stats.layers][0] == "conv3x3"
    assert 0.69 <= stats.params / dense_stats.params <= 0.7
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for model, name in ((tokens, "tokens"), (hybrid, "hybrid")):
        runtime = onnx_runtime_model(model, tmp_path / f"{name}.onnx", threads=1)
        with torch.no_grad():
            want = model(pixel_values=images).logits
        for batch in (images[:1], images):
            got = torch.from_numpy(runtime(pixel_values=batch)[0])
            torch.testing.assert_close(got, want[: len(batch)], rtol=1e-3, atol=1e-4)


def test_speed_targets_read_every_runtime_token_latency_and_as_fast_as_dense():
    from benchmarks import report

    def mode(batch, speedups):
        return {"batch_size": batch, "dense_throughput": 10.0, "dense_latency_ms": 5.0, "timing_seconds": 1.0,
                "runs": {key: {"throughput": 10 * s, "latency_ms": 5 / s, "throughput_speedup": s,
                               "efficiency": s / flops[key]} for key, s in speedups.items()}}

    flops = {"gohsp@0.3": 1.5, "spvit_tokens@0.35": 1.6}
    runs = [{"method": "gohsp", "sparsity": 0.3, "key": "gohsp@0.3", "flops_speedup": 1.5, "params": 7},
            {"method": "spvit_tokens", "sparsity": 0.0, "budget": "35% FLOPs", "key": "spvit_tokens@0.35",
             "flops_speedup": 1.6, "params": 10, "tokens_per_layer": [197, 120, 80]}]
    shape = {"shape": "deit_small", "runs": runs, "modes": {
        "eager": mode(64, {"gohsp@0.3": 1.4, "spvit_tokens@0.35": 1.5}),
        "eager_b1": mode(1, {"gohsp@0.3": 1.2, "spvit_tokens@0.35": 0.95}),
        "compile": mode(64, {"gohsp@0.3": 1.4, "spvit_tokens@0.35": 1.5}),
        "onnxruntime": {"error": "RuntimeError: no exporter"}}}
    targets = {t["id"]: t for t in report._speed_shape_targets({"target_shape": "deit_small", "shapes": [shape]})}
    # the same efficiency (1.4 / 1.5 = 0.93) meets eager's bar and misses compile's own
    assert targets["shape_efficiency_eager_0.3"]["met"] and not targets["shape_efficiency_compile_0.3"]["met"]
    assert "0.95 x FLOPs" in targets["shape_efficiency_compile_0.3"]["target"]
    assert targets["shape_efficiency_onnxruntime_0.3"]["met"] is False
    assert not any(key.startswith("shape_efficiency_eager_b1") for key in targets)  # batch 1 has its own targets
    token_b1 = targets["token_eager_b1_deit_small_spvit_tokens@0.35"]
    assert token_b1["met"] is False and "0.9 x FLOPs" in token_b1["target"] and "0.59" in token_b1["measured"]
    assert targets["token_eager_deit_small_spvit_tokens@0.35"]["met"] is True  # 1.5 / 1.6 = 0.94 >= 0.9
    fastest = targets["as_fast_as_dense_deit_small"]
    assert fastest["met"] is False and "spvit_tokens@0.35 in eager_b1, 0.95x" in fastest["measured"]
    assert "failed: onnxruntime" in fastest["measured"]
    config = {"patch_size": 16, "hidden_size": 384, "num_attention_heads": 6, "intermediate_size": 1536,
              "num_hidden_layers": 12, "image_size": 224}
    speed = {"preset": "t", "settings": {"calibration_images": 2, "batch_size": 64, "threads": 2, "warmup": 1},
             "notes": [], "hardware": "cpu", "torch": "x", "total_seconds": 60,
             "shapes": [{**shape, "config": config, "dense": {"params": 10, "flops": 10}, "repeats": 5}]}
    page = "\n".join(report.speed_shapes_section(speed))
    assert "| spvit_tokens | 35% FLOPs |" in page and "0.95x (**0.59**)" in page and "5.0 ms" in page
