"""The hf-vitprune command line: report, card, prune forwarding, and clear errors."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
import types

import pytest
import torch
from transformers import ViTConfig, ViTForImageClassification

import hf_vitprune
import hf_vitprune.cli
from hf_vitprune import PruningConfig, PruningPlan, apply_plan, model_stats
from hf_vitprune.cli import main
from hf_vitprune.reporting import REPORT_FILE, PruningReport, render_model_card, write_model_card
from hf_vitprune.reporting.table import comparison_rows, text_table

TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37, image_size=16,
            patch_size=4, num_labels=5)
PLAN = PruningPlan(heads={0: [0, 2]}, neurons={1: [0, 1, 2]})
FAST = ["--batch-size", "4", "--repeats", "1", "--warmup", "0"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A dense model directory and a pruned one (with pruning_config.json, README.md and pruning_report.json)."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    dense = ViTForImageClassification(ViTConfig(**TINY))
    dense.save_pretrained(root / "dense")
    pruned = apply_plan(copy.deepcopy(dense), PLAN)
    pruned.save_pretrained(root / "pruned")
    config = PruningConfig(target_sparsity=0.4)
    config.save_pretrained(root / "pruned")
    report = PruningReport.from_models(dense, pruned, pruning_config=config, plan=PLAN, dataset="beans",
                                       metrics_pruned={"accuracy": 0.5}, created="2025-01-01T00:00:00+00:00")
    write_model_card(root / "pruned", report)
    return types.SimpleNamespace(root=root, dense=root / "dense", pruned=root / "pruned", report=report,
                                 dense_stats=model_stats(dense), pruned_stats=model_stats(pruned))


def rows_of(output: str, first_cell: str) -> list[str]:
    """Whitespace-split cells of the lines of ``output`` whose first cell is ``first_cell``."""
    return [line.split() for line in output.splitlines() if line.split()[:1] == [first_cell]]


def test_report_on_a_pruned_directory(saved, capsys):
    assert main(["report", str(saved.pruned), *FAST]) == 0
    out = capsys.readouterr().out
    assert f"Dense reference: recorded in {REPORT_FILE}" in out
    for layer, dense in zip(saved.pruned_stats.layers, saved.dense_stats.layers):
        (row,) = rows_of(out, str(layer.index))
        assert row[1:5] == [f"{layer.heads}/{dense.heads}", f"{layer.neurons:,}/{dense.neurons:,}",
                            f"{layer.params:,}", f"{layer.flops:,}"]
        assert row[5] == f"{layer.params / dense.params:.3f}x"
    (params,) = rows_of(out, "Parameters")
    assert params[1:] == [f"{saved.dense_stats.params:,}", f"{saved.pruned_stats.params:,}",
                          f"{saved.pruned_stats.params / saved.dense_stats.params:.3f}x",
                          f"({(saved.pruned_stats.params / saved.dense_stats.params - 1) * 100:+.1f}%)"]
    flops = next(line for line in out.splitlines() if line.lstrip().startswith("FLOPs per image"))
    assert f"{saved.pruned_stats.flops:,}" in flops and f"{saved.dense_stats.flops:,}" in flops
    latency = next(line for line in out.splitlines() if line.lstrip().startswith("Latency, batch 1 (ms)"))
    throughput = next(line for line in out.splitlines() if line.lstrip().startswith("Throughput, batch 4"))
    # dense, this model, ratio: all measured, all positive; the ratio says which way it went
    dense_ms, pruned_ms = (float(n) for n in re.findall(r"\d+\.\d+", latency)[:2])
    factor, direction = re.search(r"\(([\d.]+)x (faster|slower)\)$", latency).groups()
    ratio = pruned_ms / dense_ms
    assert float(factor) == pytest.approx(1 / ratio if direction == "faster" else ratio, abs=0.02)
    assert (ratio <= 1.001) if direction == "faster" else (ratio >= 0.999)
    assert len(re.findall(r"\d+\.\d+", throughput)) >= 3
    assert "Speed measured on" in out and "interleaved with the dense architecture" in out


def test_report_totals_are_the_cards_comparison(saved, capsys):
    """Without timing, the totals table is the card's Compression table, cell for cell (in ASCII)."""
    assert main(["report", str(saved.pruned), "--no-speed"]) == 0
    out = capsys.readouterr().out
    expected = text_table(comparison_rows(saved.dense_stats, saved.pruned_stats),
                          ["total", "dense", "this model", "this model / dense"])
    assert expected in out
    card = (saved.pruned / "README.md").read_text()
    for row in comparison_rows(saved.dense_stats, saved.pruned_stats):
        assert f"| {row.name} | {row.dense} | {row.pruned} | {row.ratio} |" in card


def test_report_on_a_dense_directory(saved, capsys):
    assert main(["report", str(saved.dense), *FAST]) == 0
    out = capsys.readouterr().out
    assert "Dense reference" not in out and "ratio" not in out
    for layer in saved.dense_stats.layers:
        (row,) = rows_of(out, str(layer.index))
        assert row[1:] == [str(layer.heads), f"{layer.neurons:,}", f"{layer.params:,}", f"{layer.flops:,}"]
    (params,) = rows_of(out, "Parameters")
    assert params[1:] == [f"{saved.dense_stats.params:,}"]
    assert "Latency, batch 1 (ms)" in out and "Throughput, batch 4 (images/s)" in out


def test_report_without_a_recorded_base_uses_the_dense_architecture(saved, tmp_path, capsys):
    directory = tmp_path / "pruned"
    shutil.copytree(saved.pruned, directory)
    (directory / REPORT_FILE).unlink()
    assert main(["report", str(directory), "--no-speed"]) == 0
    out = capsys.readouterr().out
    assert "Dense reference: the dense architecture in config.json" in out
    (params,) = rows_of(out, "Parameters")
    assert params[1] == f"{saved.dense_stats.params:,}"
    assert "Latency" not in out


def test_missing_path_and_non_model_directory(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert main(["report", str(missing)]) == 1
    err = capsys.readouterr().err
    assert str(missing) in err and "does not exist" in err and err.startswith("hf-vitprune report: error:")
    assert main(["report", str(tmp_path)]) == 1
    assert "no config.json" in capsys.readouterr().err
    (tmp_path / "file.txt").write_text("x")
    assert main(["report", str(tmp_path / "file.txt")]) == 1
    assert "is a file" in capsys.readouterr().err
    assert main(["card", str(missing)]) == 1
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "COMMAND"),
        (["frobnicate"], "invalid choice"),
        (["report"], "MODEL"),
        (["report", "x", "--batch-size", "0"], "must be >= 1"),
        (["report", "x", "--repeats", "two"], "not an integer"),
        (["report", "x", "--warmup", "-1"], "must be >= 0"),
        (["card", "x", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_arguments_exit_2(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_card_rerenders_readme(saved, tmp_path, capsys):
    directory = tmp_path / "pruned"
    shutil.copytree(saved.pruned, directory)
    (directory / "README.md").unlink()
    assert main(["card", str(directory)]) == 0
    assert "Wrote" in capsys.readouterr().out
    assert (directory / "README.md").read_text() == str(render_model_card(saved.report))
    assert (saved.pruned / "README.md").read_text() == (directory / "README.md").read_text()
    assert main(["card", str(directory), "--repo-id", "me/tiny"]) == 0
    assert 'from_pretrained("me/tiny")' in (directory / "README.md").read_text()
    assert PruningReport.from_pretrained(directory).repo_id == "me/tiny"


def test_card_without_report_or_with_a_broken_one(saved, tmp_path, capsys):
    assert main(["card", str(saved.dense)]) == 1
    err = capsys.readouterr().err
    assert REPORT_FILE in err and "save_model" in err
    directory = tmp_path / "broken"
    directory.mkdir()
    (directory / REPORT_FILE).write_text('{"method": "gohsp"')
    assert main(["card", str(directory)]) == 1
    assert "not a valid pruning report" in capsys.readouterr().err


def test_prune_forwards_its_arguments(monkeypatch):
    seen = []
    recipe = types.ModuleType("hf_vitprune.recipe")
    recipe.main = lambda argv, prog: seen.append((argv, prog)) or 3
    monkeypatch.setitem(sys.modules, "hf_vitprune.recipe", recipe)
    monkeypatch.setattr(hf_vitprune, "recipe", recipe, raising=False)
    argv = ["--config", "x.yaml", "--help", "positional", "--output_dir=out"]
    assert main(["prune", *argv]) == 3
    assert seen == [(argv, "hf-vitprune prune")]


def test_prune_help_is_short_and_names_the_command(capsys):
    assert main(["prune", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: hf-vitprune prune [options]")
    assert "--resume_from_checkpoint" in out and "--target_sparsity" in out and "--help-all" in out
    assert "--adam_beta1" not in out  # one of the ~100 TrainingArguments flags only --help-all lists
    assert len(out.splitlines()) < 320
    assert main(["prune", "--help-all"]) == 0
    assert "--adam_beta1" in capsys.readouterr().out


HELP_SCRIPT = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("standalone_cli", sys.argv[1])
cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cli)
try:
    cli.main(["--help"])
finally:
    heavy = sorted(name for name in ("torch", "transformers", "datasets") if name in sys.modules)
    print("HEAVY", heavy)
"""


def test_cli_help_imports_no_torch_or_transformers(tmp_path):
    """cli.py's own top level stays light: `--help` needs neither torch nor transformers."""
    script = tmp_path / "help.py"
    script.write_text(HELP_SCRIPT)
    result = subprocess.run([sys.executable, str(script), hf_vitprune.cli.__file__], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage: hf-vitprune" in result.stdout and "HEAVY []" in result.stdout


def test_report_on_a_device_this_torch_lacks(saved, capsys):
    if torch.cuda.is_available():
        assert main(["report", str(saved.dense), "--device", "cuda:99", *FAST]) == 1
        assert "there are only" in capsys.readouterr().err
    else:
        assert main(["report", str(saved.dense), "--device", "cuda", *FAST]) == 1
        err = capsys.readouterr().err
        assert "no usable cuda device" in err and "--device cpu" in err and "Traceback" not in err


def test_console_script(saved, tmp_path):
    """The installed `hf-vitprune` entry point (python -m hf_vitprune.cli where it is not on PATH)."""
    script = shutil.which("hf-vitprune")
    command = [script] if script else [sys.executable, "-m", "hf_vitprune.cli"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    missing = tmp_path / "missing-model"
    result = subprocess.run([*command, "report", str(missing)], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1
    assert f"hf-vitprune report: error: {missing} does not exist" in result.stderr


LAUNCHER_SCRIPT = """
import sys
import hf_vitprune_cli
code = hf_vitprune_cli.main(sys.argv[1:])
heavy = sorted(name for name in ("torch", "transformers", "datasets", "hf_vitprune") if name in sys.modules)
print("EXIT", code, "HEAVY", heavy)
"""


@pytest.mark.parametrize("argv, code", [(["--help"], 0), ([], 2), (["no-such-command"], 2)])
def test_the_console_script_answers_help_and_usage_errors_without_importing_torch(argv, code):
    """`hf-vitprune --help` is instant: the launcher imports neither the package nor torch for it."""
    result = subprocess.run([sys.executable, "-c", LAUNCHER_SCRIPT, *argv], capture_output=True, text=True, timeout=120)
    assert f"EXIT {code} HEAVY []" in result.stdout, result.stdout + result.stderr
    assert "usage: hf-vitprune" in result.stdout + result.stderr


def test_the_console_script_runs_commands_through_the_package(tmp_path):
    import hf_vitprune_cli

    assert hf_vitprune_cli.main(["card", str(tmp_path / "missing")]) == 1  # the real command, its own error


def test_prune_help_lists_the_chosen_methods_options(capsys):
    """--help shows the default method's options; --method NAME --help that method's; --help-all all of them."""
    assert main(["prune", "--help"]) == 0
    default = capsys.readouterr().out
    assert "--admm_update_steps" in default and "--pmim " not in default
    assert main(["prune", "--method", "ofb", "--help"]) == 0
    ofb = capsys.readouterr().out
    assert "--pmim" in ofb and "--admm_update_steps" not in ofb and "--method ofb" in ofb
    assert main(["prune", "--help-all"]) == 0
    everything = capsys.readouterr().out
    assert "--pmim" in everything and "--admm_update_steps" in everything
