"""Issue 24, what a user made is never lost or misdescribed: a model card or report built from another model's
pruning_report.json is refused; data errors name the file, the label and the fix before or where they happen;
the quickstart's model works in ``transformers.pipeline``."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from transformers import ViTConfig, ViTForImageClassification

from hf_vitprune import PruningConfig, PruningPlan, apply_plan
from hf_vitprune.cli import main
from hf_vitprune.reporting import REPORT_FILE, PruningReport, write_model_card
from hf_vitprune.surgery import add_token_pruning

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=8, intermediate_size=37, image_size=16,
            patch_size=4, num_labels=3)


def _files(directory) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir()) if path.is_file()}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """gohsp/: heads pruned to 2 of 8 in layer 0, with its report and card; tokens/: 8 of 8 heads and a token
    path; heads/: other heads pruned; each of the last two with gohsp/'s report and card copied in."""
    root = tmp_path_factory.mktemp("cards")
    torch.manual_seed(0)
    dense = ViTForImageClassification(ViTConfig(**TINY))
    gohsp = apply_plan(copy.deepcopy(dense), PruningPlan(heads={0: [0, 1]}))
    gohsp.save_pretrained(root / "gohsp")
    report = PruningReport.from_models(dense, gohsp, pruning_config=PruningConfig(target_sparsity=0.2),
                                       created="2025-01-01T00:00:00+00:00")
    write_model_card(root / "gohsp", report)
    add_token_pruning(copy.deepcopy(dense), [0.5]).save_pretrained(root / "tokens")
    apply_plan(copy.deepcopy(dense), PruningPlan(heads={1: [0, 1]})).save_pretrained(root / "heads")
    for other in ("tokens", "heads"):
        for name in (REPORT_FILE, "README.md"):
            shutil.copy(root / "gohsp" / name, root / other / name)
    return root


@pytest.mark.parametrize("command", ["card", "report"])
@pytest.mark.parametrize("model, names", [
    ("tokens", ["'gohsp' removes heads and neurons", "the model has a token path"]),
    ("heads", ["layer 0: the report records 2 attention heads, the model has 8"]),
])
def test_a_report_of_another_model_is_refused(models, tmp_path, capsys, command, model, names):
    """The card would claim gohsp and 2 of 8 heads for a model with 8 of 8: refused, naming the mismatch, and the
    directory's files stay byte for byte as they were."""
    directory = tmp_path / model
    shutil.copytree(models / model, directory)
    before = _files(directory)
    argv = ["card", str(directory)] if command == "card" else ["report", str(directory), "--no-speed"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"{REPORT_FILE} does not describe the model" in err and "belongs to another model" in err
    for name in names:
        assert name in err, err.split(": error: ")[-1]
    assert _files(directory) == before


def test_the_card_of_the_report_own_model_is_still_written(models, tmp_path, capsys):
    directory = tmp_path / "gohsp"
    shutil.copytree(models / "gohsp", directory)
    (directory / "README.md").unlink()
    assert main(["card", str(directory)]) == 0
    assert "keeping 10 of 16 attention heads" in (directory / "README.md").read_text()
