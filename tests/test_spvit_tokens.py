"""The spvit_tokens method in PruningTrainer: the FLOPs budget, the keep rates it learns, resume, two processes,
stacking on structural pruning, the card, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageClassification

from conftest import SimulatedCrash
from hf_vitprune import PruningConfig, PruningPlan, PruningTrainer, apply_plan, model_stats
from hf_vitprune.tokens import token_pruning_of
from test_ofb import digits, digits_vit, ofb_args

SCRIPTS = Path(__file__).parent / "scripts"


def token_config(**overrides) -> PruningConfig:
    values = dict(method="spvit_tokens", target_flops_reduction=0.35, calibration_samples=32)
    values.update(overrides)
    return PruningConfig(**values)


def train(directory, model=None, config=None, **arguments):
    trainer = PruningTrainer(model=model if model is not None else digits_vit(),
                             args=ofb_args(directory, **{"learning_rate": 2e-3, **arguments}),
                             train_dataset=digits(), pruning_config=config or token_config())
    trainer.train()
    return trainer


def test_flops_budget_and_learned_keep_rates(tmp_path):
    trainer = train(tmp_path, max_steps=128, logging_steps=16)
    dense, pruned = trainer.dense_stats, model_stats(trainer.model)
    assert 0.60 <= pruned.flops / dense.flops <= 0.65  # at most the budget; 16 patches make coarse steps
    stages = trainer.method.stages
    assert stages.depths == (1, 2, 3) and list(stages.keep_ratios) == sorted(stages.keep_ratios, reverse=True)
    flops = [layer.flops for layer in pruned.layers]
    assert flops[0] > flops[1] > flops[2] > flops[3]
    # the sampled decisions' kept shares over the selection's last 16 steps, against what inference keeps
    (last,) = [e for e in trainer.state.log_history if e.get("step") == 64 and "token_kept_stage0" in e]
    targets = [keep / 16 for keep in stages.keep_counts(16)]
    shares = [last[f"token_kept_stage{s}"] for s in range(3)]
    assert all(abs(share - target) <= 0.02 for share, target in zip(shares, targets)), (shares, targets)
    trainer.model.eval()
    images = digits()[:8]["pixel_values"]
    with torch.no_grad():  # the trained model drops tokens for real: batched equals one image at a time
        batched = trainer.model(pixel_values=images).logits
        singles = torch.cat([trainer.model(pixel_values=images[i:i + 1]).logits for i in range(8)])
    torch.testing.assert_close(batched, singles, rtol=1e-5, atol=1e-6)


def test_resume_mid_search_equals_the_uninterrupted_run(tmp_path):
    def run(directory, crash=None):
        args = dict(save_strategy="steps", save_steps=4)
        trainer = PruningTrainer(model=digits_vit(), args=ofb_args(directory, **args), train_dataset=digits(),
                                 pruning_config=token_config())
        if crash is None:
            trainer.train()
            return trainer
        trainer.add_callback(SimulatedCrash(trainer, "token_search", crash))
        with pytest.raises(KeyboardInterrupt):
            trainer.train()
        resumed = PruningTrainer(model=digits_vit(), args=ofb_args(directory, **args), train_dataset=digits(),
                                 pruning_config=token_config())
        resumed.train(resume_from_checkpoint=True)
        return resumed

    reference, resumed = run(tmp_path / "reference"), run(tmp_path / "resumed", crash=4)
    assert resumed.method.stages == reference.method.stages
    expected, got = reference.model.state_dict(), resumed.model.state_dict()
    assert expected.keys() == got.keys() and any("token_pruning" in name for name in got)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)


def test_two_processes_derive_the_same_stages_and_weights(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(SCRIPTS / "distributed_prune.py"), str(tmp_path), "spvit_tokens"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert runs[0] == runs[1] and runs[0]["world_size"] == 2
    assert len(runs[0]["search_weights"]) == 5 and runs[0]["stages"]["keep_ratios"]
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "model")
    assert token_pruning_of(reloaded) is not None


def test_stacked_on_a_structurally_pruned_model(tmp_path):
    model = digits_vit()
    apply_plan(model, PruningPlan(heads={0: [0, 1], 3: [2]}, neurons={1: list(range(40))}))
    structural = model_stats(model)
    trainer = train(tmp_path, model=model, max_steps=8)
    trainer.save_model()
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    stats = model_stats(reloaded)
    assert [layer.heads for layer in stats.layers] == [2, 4, 4, 1] and stats.layers[1].neurons == 40
    assert stats.flops <= 0.65 * structural.flops  # the budget counts from the model it was given
    images = digits()[:4]["pixel_values"]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values=images).logits,
                                   trainer.model.eval()(pixel_values=images).logits, rtol=0, atol=0)
    card = (tmp_path / "README.md").read_text()
    assert "kong2022spvit" in card and "Token stages" in card and "package token" in card
    tokens = [layer.tokens for layer in stats.layers]  # 16 patches + CLS, a package token per stage
    assert tokens[0] == 17 and tokens[1] < 17 and f"the last layer sees {tokens[-1]} of the 17 tokens" in card
    for layer in stats.layers:
        assert f"| {layer.index} | {layer.tokens} / 17 | {layer.heads} / {layer.heads} |" in card  # the given model


def test_a_parameter_budget_is_refused(tmp_path):
    trainer = PruningTrainer(model=digits_vit(), args=ofb_args(tmp_path), train_dataset=digits(),
                             pruning_config=token_config(target_flops_reduction=None, target_sparsity=0.3))
    with pytest.raises(ValueError, match="takes a FLOPs budget: set target_flops_reduction"):
        trainer.train()


def test_an_unreachable_budget_is_refused(tmp_path):
    trainer = PruningTrainer(model=digits_vit(), args=ofb_args(tmp_path), train_dataset=digits(),
                             pruning_config=token_config(target_flops_reduction=0.9))
    with pytest.raises(ValueError, match="keeping one token per stage at these depths still costs"):
        trainer.train()
    assert token_pruning_of(trainer.model) is None


@pytest.mark.parametrize("option, value, message", [
    ("keep_ratios", [0.5, 0.7], "increase"),
    ("keep_ratios", [0.0], r"must be a number in \(0, 1\]"),
    ("num_stages", 0, "num_stages=0 must be an integer >= 1"),
])
def test_bad_options_name_the_problem(option, value, message):
    with pytest.raises(ValueError, match=message):
        token_config(**{option: value})
