"""The token benchmark's quick mode end to end (``python -m benchmarks.tokens --quick``): every row and seed is in
the JSON, the budgets hold, the stacked row starts from its gohsp model, the page and --report_only, --resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOKEN_ROWS = {"tokens35": 0.35, "tokens50": 0.5}
ROWS = [*TOKEN_ROWS, "gohsp40", "gohsp40+tokens"]
SEEDS = [0, 1]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def _command(out: Path, *extra: str) -> list[str]:
    # The quick mode with the shortest schedule that still trains: this checks the pipeline, not the targets.
    return [sys.executable, "-m", "benchmarks.tokens", "--quick", "--output_dir", str(out / "results"),
            "--cache_dir", str(out / "dense"), "--seeds", *map(str, SEEDS), "--dense_epochs", "2",
            "--prune_epochs", "1", "--max_train_samples", "256", *extra]


def _run(command: list[str]) -> subprocess.CompletedProcess:
    completed = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return completed


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tokens-bench")
    _run(_command(out))
    return out


def _results(out: Path) -> dict:
    return json.loads((out / "results" / "digits_tokens_quick.json").read_text())


def test_every_row_and_seed_is_in_the_json(quick_run):
    results = _results(quick_run)
    assert {(r["row"], r["seed"]) for r in results["runs"]} == {(row, seed) for row in ROWS for seed in SEEDS}
    assert [r["row"] for r in results["summary"]["rows"]] == ROWS
    assert results["settings"]["methods"] == ROWS and results["settings"]["token_reductions"] == [0.35, 0.5]
    for run in results["runs"]:
        assert 0 <= run["test_accuracy"] <= 1 and 0 <= run["validation_accuracy"] <= 1
        speed = run["speed"]
        assert speed["batch_size_latency"] == 1 and speed["batch_size_throughput"] == 64 and speed["repeats"] >= 5
        assert speed["pruned"]["throughput"] > 0 and run["throughput_speedup_over_flops_speedup"] > 0
        assert (quick_run / "results" / "models").is_dir() and Path(run["model_dir"]).is_dir()


def test_token_rows_meet_their_flops_budget_and_drop_tokens_after_the_first_stage(quick_run):
    results = _results(quick_run)
    dense = results["dense"]
    assert dense["tokens"] == 17 and dense["patches"] == 16  # 8x8 digits in 2x2 patches + CLS
    for run in results["runs"]:
        if run["row"] not in TOKEN_ROWS:
            continue
        assert run["kind"] == "tokens" and run["target_flops_reduction"] == TOKEN_ROWS[run["row"]]
        assert run["flops_ratio"] < 1 and run["flops_ratio"] <= 1 - TOKEN_ROWS[run["row"]] + 1e-9, run
        assert run["params"] > dense["params"]  # no unit removed; the selectors add a few parameters
        tokens, first = run["tokens_per_layer"], run["token_stages"]["depths"][0]
        assert tokens[:first] == [17] * first and tokens[first] < 17, tokens
        assert all(later <= earlier for earlier, later in zip(tokens, tokens[1:])) and tokens[-1] < tokens[first]
        assert len(run["token_stages"]["keep_counts"]) == len(run["token_stages"]["depths"])
    rows = {r["row"]: r for r in results["summary"]["rows"]}
    assert rows["tokens50"]["flops"] < rows["tokens35"]["flops"]
    gohsp = [r for r in results["runs"] if r["row"] == "gohsp40"]
    assert all(r["tokens_per_layer"] == [17] * 4 and abs(r["achieved_sparsity"] - 0.4) <= 0.01 for r in gohsp)


def test_the_stacked_row_starts_from_the_gohsp_model_of_its_seed(quick_run):
    results = _results(quick_run)
    base = {r["seed"]: r for r in results["runs"] if r["row"] == "gohsp40"}
    for run in (r for r in results["runs"] if r["row"] == "gohsp40+tokens"):
        gohsp = base[run["seed"]]
        assert run["flops"] < gohsp["flops"], run
        assert run["base"]["flops"] == gohsp["flops"] and run["base"]["model_dir"] == gohsp["model_dir"]
        assert run["flops_ratio_vs_base"] <= 1 - run["target_flops_reduction"] + 1e-9
        # the same heads and neurons as its gohsp model: the stack only drops tokens
        assert run["heads_per_layer"] == gohsp["heads_per_layer"]
        assert run["neurons_per_layer"] == gohsp["neurons_per_layer"]
        assert run["tokens_per_layer"][-1] < 17
        assert run["speed_vs_base"]["pruned"]["throughput"] > 0 and run["throughput_ratio_vs_base"] > 0


def test_the_page_has_the_results_and_the_targets(quick_run):
    results = _results(quick_run)
    targets = {t["id"]: t for t in results["summary"]["targets"]}
    assert set(targets) == {"tokens_accuracy", "tokens_efficiency", "stack_throughput", "stack_accuracy"}
    assert all(t["met"] in (True, False) for t in targets.values())  # every target measured
    page = (quick_run / "results" / "BENCHMARKS_TOKENS.md").read_text()
    assert "## Targets" in page and "| target | measured | status |" in page
    for target in targets.values():
        assert f"| {target['target']} | {target['measured']} |" in page
        assert (f"- **{target['target']}**" in page) == (target["met"] is False)  # each miss is explained
    for row in ROWS:
        assert f"| {row} |" in page
    assert "digits_tokens_quick.json" in page


def test_report_only_rebuilds_the_same_page_and_resume_keeps_every_run(quick_run):
    page = quick_run / "results" / "BENCHMARKS_TOKENS.md"
    before, runs = page.read_text(), _results(quick_run)["runs"]
    page.unlink()
    _run(_command(quick_run, "--report_only"))
    assert page.read_text() == before
    _run(_command(quick_run, "--resume"))  # nothing left to train or time
    results = _results(quick_run)
    assert results["runs"] == runs and len(results["invocations"]) == 2
