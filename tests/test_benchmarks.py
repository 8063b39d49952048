"""The benchmark's quick mode end to end: every run is in the JSON, the numbers are sane, the reports exist."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
METHODS = ["gohsp", "magnitude", "taylor", "random"]
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
    assert runs == {(m, s, seed) for m in METHODS for s in SPARSITIES for seed in SEEDS}
    rows = {(r["method"], r["sparsity"]) for r in results["summary"]["rows"]}
    assert rows == {(m, s) for m in METHODS for s in SPARSITIES}
    assert {t["id"] for t in results["summary"]["targets"]} >= {"accuracy_40", "gohsp_best_at_60", "admm_step", "memory"}


def test_the_numbers_are_plausible(quick_run):
    results = json.loads((quick_run / "results" / "digits_quick.json").read_text())
    dense = results["dense"]
    assert dense["split_sizes"]["test"] == 270
    assert 0.1 <= dense["test"]["accuracy"] <= 1
    for run in results["runs"]:
        assert 0 <= run["test_accuracy"] <= 1
        assert abs(run["achieved_sparsity"] - run["sparsity"]) <= 0.01, run
        assert run["flops"] < dense["flops"] and run["params"] < dense["params"]
        assert run["flops_speedup"] > 1
        speed = run["speed"]
        assert speed["repeats"] >= 5 and speed["batch_size_latency"] == 1 and speed["batch_size_throughput"] == 64
        assert speed["pruned"]["latency_ms"] > 0 and speed["dense"]["throughput"] > 0
        assert run["throughput_speedup_over_flops_speedup"] > 0
        assert 0 <= run["ranking_share"] < 1
    step = results["training_step"]
    assert 0 < step["plain_step_seconds"] and step["ratio"] > 0.2
    memory = results["memory"]
    assert memory["plain"]["peak_delta_bytes"] > 0 and memory["admm"]["peak_delta_bytes"] > 0
    assert results["total_seconds"] > 0


def test_table_and_plot_are_written(quick_run):
    markdown = (quick_run / "BENCHMARKS.md").read_text()
    for method in METHODS:
        assert f"| {method} |" in markdown
    assert "## Targets" in markdown and "digits_quick_accuracy.png" in markdown
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
