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
        "ofb_speedup_efficiency", "spvit_close_at_40", "spvit_batch1_vs_gohsp",
        *(f"admm_residual_{method}" for method in ADMM_METHODS)}


def test_torch_pruning_rows_hit_the_budget_and_admm_residuals_are_recorded(quick_run):
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
        residual = run["admm_residual_last_logged"]
        assert residual is not None and math.isfinite(residual) and residual >= 0, run
    rows = {r["method"]: r for r in results["summary"]["rows"]}
    assert rows["gohsp"]["admm_residual_mean"] is not None and rows["torch_pruning"]["admm_residual_mean"] is None


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
