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

from conftest import assert_same_weights, uninterrupted_and_resumed
from hf_vitprune import PruningConfig, PruningPlan, PruningTrainer, apply_plan, model_stats
from hf_vitprune.methods import spvit_tokens
from hf_vitprune.methods.spvit_tokens import predicted_latency_ms
from hf_vitprune.speed import layer_latency_table
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
    def make_trainer(directory):
        return PruningTrainer(model=digits_vit(), args=ofb_args(directory, save_strategy="steps", save_steps=4),
                              train_dataset=digits(), pruning_config=token_config())

    reference, resumed = uninterrupted_and_resumed(make_trainer, tmp_path, "token_search", crash=4)
    assert resumed.method.stages == reference.method.stages
    assert any("token_pruning" in name for name in resumed.model.state_dict())
    assert_same_weights(resumed.model, reference.model)


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


def test_budgets_the_method_cannot_meet_are_refused_with_the_config():
    with pytest.raises(ValueError, match=r"takes target_flops_reduction or target_latency_reduction, not "
                                         r"target_sparsity \(it removes no parameters\)"):
        token_config(target_flops_reduction=None, target_sparsity=0.3)
    with pytest.raises(ValueError, match="'gohsp' takes target_sparsity or target_flops_reduction, not "
                                         "target_latency_reduction"):
        PruningConfig(method="gohsp", target_latency_reduction=0.3)


def test_a_latency_budget_reads_the_keep_ratios_off_the_latency_table(tmp_path, monkeypatch):
    measured = {}

    def table(model, token_counts, **kwargs):  # a made-up machine: 0.01 ms per token and layer, 0.1 ms outside
        measured.update(token_counts=token_counts, **kwargs)
        return {"token_counts": token_counts, "layers_ms": [[0.01 * n for n in token_counts]] * 4,
                "model_ms": 0.04 * 17 + 0.1, "hardware": "made-up CPU", "device": "cpu", "torch_threads": 1,
                "batch_size": kwargs["batch_size"], "repeats": kwargs["repeats"]}

    monkeypatch.setattr(spvit_tokens, "layer_latency_table", table)
    config = token_config(target_flops_reduction=None, target_latency_reduction=0.3, latency_batch_size=16,
                          latency_repeats=2, latency_calibrations=0)
    trainer = train(tmp_path, config=config, max_steps=4)
    assert measured["token_counts"][0] == 2 and measured["token_counts"][-1] == 17  # CLS + 1 .. 16 patches
    assert measured["batch_size"] == 16 and measured["repeats"] == 2
    method, path = trainer.method, token_pruning_of(trainer.model)
    tokens = path.tokens_per_layer(17, 4)
    predicted = 0.1 + 0.01 * sum(tokens)
    assert predicted == pytest.approx(predicted_latency_ms(method.latency_table, path, 17))
    assert predicted <= 0.7 * (0.04 * 17 + 0.1) < predicted + 0.01 * 3  # on the budget, within a token per stage
    trainer.save_model()
    report = json.loads((tmp_path / "pruning_report.json").read_text())
    assert report["method_card"]["details"]["token_latency_table"] == method.latency_table
    card = (tmp_path / "README.md").read_text()
    assert "Keep ratios chosen for the latency budget from a table measured on made-up CPU" in card


def test_the_latency_table_times_every_layer_and_the_stage_at_every_token_count():
    model = digits_vit()
    received = []

    def stage(hidden):
        received.append(hidden.shape[1])
        return hidden[:, : hidden.shape[1] // 2 + 1]

    table = layer_latency_table(model, [2, 9, 17], batch_size=4, repeats=2, warmup=1, stage=stage)
    assert table["token_counts"] == [2, 9, 17] and len(table["layers_ms"]) == 4
    assert all(len(row) == 3 and all(ms > 0 for ms in row) for row in table["layers_ms"])
    assert len(table["stages_ms"]) == 3 and all(ms > 0 for ms in table["stages_ms"])
    assert sorted(set(received)) == [2, 9, 17]
    assert table["model_ms"] > 0 and table["batch_size"] == 4 and table["device"] == "cpu"
    assert model.training  # the model's mode is left as it was
    assert layer_latency_table(model, [2, 17], batch_size=1, repeats=1, warmup=0)["stages_ms"] is None


def made_up_table(stage_ms: float):
    """A made-up machine: 0.01 ms per token and layer, 0.1 ms outside the layers, ``stage_ms`` per token stage."""
    def table(model, token_counts, **kwargs):
        return {"token_counts": token_counts, "layers_ms": [[0.01 * n for n in token_counts]] * 4,
                "stages_ms": [stage_ms] * len(token_counts), "model_ms": 0.04 * 17 + 0.1, "hardware": "made-up CPU",
                "device": "cpu", "torch_threads": 1, "batch_size": kwargs["batch_size"], "repeats": kwargs["repeats"]}
    return table


@pytest.mark.parametrize("stage_ms", [0.0, 0.04, 0.1])
def test_a_latency_budget_counts_each_stages_own_time_and_places_only_stages_that_gain(monkeypatch, stage_ms):
    """The prediction adds each dropping stage's measured time at the tokens it receives; the stages are placed
    where the table says they gain: a stage that costs more than the tokens it drops save is left out."""
    monkeypatch.setattr(spvit_tokens, "layer_latency_table", made_up_table(stage_ms))
    config = token_config(target_flops_reduction=None, target_latency_reduction=0.3, latency_calibrations=0)
    method = spvit_tokens.SPViTTokens(config)
    assert method.options.latency_batch_size == 1  # the latency a user sees at batch 1 by default
    model = digits_vit()
    method.setup(spvit_tokens.SearchContext(model=model, budget=config.budget, search_steps=4,
                                            calibration_batches=lambda: iter(())))
    path = token_pruning_of(model)
    stages = path.stage_inputs(17)
    predicted = 0.1 + 0.01 * sum(path.tokens_per_layer(17, 4)) + stage_ms * len(stages)
    assert predicted == pytest.approx(predicted_latency_ms(method.latency_table, path, 17))
    assert predicted <= 0.7 * (0.04 * 17 + 0.1)
    assert f"a token stage: {stage_ms:.3g} / " in "\n".join(method.card_recipe())
    if stage_ms == 0:
        assert len(method.stages.depths) == 3  # free stages: all three, each keeping more
    else:  # a stage's 0.04 ms is four token-layers: fewer stages keep more tokens in all; at 0.1 ms three stages
        # keeping one token each would miss the budget, one meets it
        assert len(method.stages.depths) < 3 and len(stages) == len(method.stages.depths)
        assert stage_ms < 0.1 or len(stages) == 1


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


# ------------------------------------------------------------------ shallow models, explicit ratios (issue 24)


def _shallow_vit(layers: int):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                                               intermediate_size=64, image_size=8, patch_size=2, num_channels=1,
                                               num_labels=10))


@pytest.mark.parametrize("layers", [1, 2])
def test_a_shallow_model_gets_fewer_stages_and_meets_the_budget(tmp_path, layers):
    """The help promises fewer stages for a model too shallow for three: one stage, the budget met to a token."""
    from hf_vitprune.architectures import meta_copy
    from hf_vitprune.surgery import add_token_pruning

    trainer = train(tmp_path, model=_shallow_vit(layers), config=token_config(target_flops_reduction=0.3),
                    max_steps=4)
    stages = trainer.method.stages
    assert stages.depths == ((0,) if layers == 1 else (1,))
    dense, pruned = trainer.dense_stats.flops, model_stats(trainer.model).flops
    assert pruned <= 0.7 * dense  # the budget is met
    (keep,) = stages.keep_counts(16)  # and one more kept token would break it: the largest ratio that meets it
    looser = add_token_pruning(meta_copy(_shallow_vit(layers)), [(keep + 1) / 16], stages.depths)
    assert model_stats(looser).flops > 0.7 * dense


def test_explicit_keep_ratios_that_cannot_meet_the_target_are_refused_when_the_trainer_is_made(tmp_path):
    """keep_ratios=[0.9] removed 0.5% of the FLOPs under target_flops_reduction=0.5 without a word. Keeping 90% of
    the tokens removes at most 19% of any model's FLOPs: refused at PruningTrainer(...), naming both options and
    the fix."""
    config = token_config(target_flops_reduction=0.5, keep_ratios=[0.9])
    with pytest.raises(ValueError) as error:
        PruningTrainer(model=digits_vit(), args=ofb_args(tmp_path), train_dataset=digits(), pruning_config=config)
    message = str(error.value)
    assert "keep_ratios=[0.9]" in message and "removes at most 19% of the FLOPs" in message
    assert "target_flops_reduction=0.5" in message
    assert "drop keep_ratios" in message and "lower target_flops_reduction" in message


def test_explicit_keep_ratios_that_miss_the_target_on_this_model_are_refused_before_any_step(tmp_path):
    """keep_ratios=[0.7] could remove 51% on some model, not on this one (its one stage runs before layer 2 of 4):
    refused when the run starts, before any step, and the model is left without a token path."""
    trainer = PruningTrainer(model=digits_vit(), args=ofb_args(tmp_path), train_dataset=digits(),
                             pruning_config=token_config(target_flops_reduction=0.5, keep_ratios=[0.7]))
    with pytest.raises(ValueError) as error:
        trainer.train()
    message = str(error.value)
    assert "keep_ratios=[0.7] remove" in message and "target_flops_reduction=0.5 asks to remove 50%" in message
    assert "drop keep_ratios" in message and "lower target_flops_reduction" in message
    assert token_pruning_of(trainer.model) is None and trainer.state.global_step == 0


def test_explicit_keep_ratios_that_meet_the_target_are_used_as_given(tmp_path):
    trainer = train(tmp_path, config=token_config(target_flops_reduction=0.3, keep_ratios=[0.5, 0.25, 0.125]),
                    max_steps=4)
    assert trainer.method.stages.keep_ratios == (0.5, 0.25, 0.125)
    assert model_stats(trainer.model).flops <= 0.7 * trainer.dense_stats.flops


@pytest.mark.parametrize("overhead", [0.0, 0.06])
def test_a_latency_budget_is_calibrated_on_the_model_timed_whole(monkeypatch, overhead):
    """Where the model timed whole beside dense falls short of the table's prediction (a layer inside the model also
    runs the stages' hooks), the table is asked for as much more as was missing, until the measurement meets the
    budget; where it agrees, the table's choice stands."""
    table = made_up_table(0.0)
    monkeypatch.setattr(spvit_tokens, "layer_latency_table", table)
    dense_ms = 0.04 * 17 + 0.1
    timed = []

    def measured_latency_ratio(model, dense, batch_size, repeats):  # the prediction, plus a fixed overhead
        path = token_pruning_of(model)
        ratio = predicted_latency_ms(table(model, spvit_tokens._token_grid(dense), batch_size=1, repeats=1), path,
                                     17) / dense_ms + overhead
        timed.append(ratio)
        return ratio

    monkeypatch.setattr(spvit_tokens, "measured_latency_ratio", measured_latency_ratio)
    config = token_config(target_flops_reduction=None, target_latency_reduction=0.3)
    method = spvit_tokens.SPViTTokens(config)
    method.setup(spvit_tokens.SearchContext(model=digits_vit(), budget=config.budget, search_steps=4,
                                            calibration_batches=lambda: iter(())))
    assert timed[-1] <= 0.7  # the last model timed meets the budget
    if overhead == 0:
        assert len(timed) == 1  # the table was right: one measurement, no second choice
    else:
        assert len(timed) > 1 and timed[0] > 0.7 and timed[-1] >= 0.7 - 0.1  # asked for more, not far more


def test_the_calibration_times_each_model_at_the_asked_batch_size_only():
    """The latency ratio behind the calibration runs both models at one batch size, interleaved, no more."""
    from hf_vitprune.speed import measured_latency_ratio

    seen = {"pruned": [], "dense": []}
    models = {name: digits_vit() for name in seen}
    for name, model in models.items():
        model.register_forward_pre_hook(lambda module, args, kwargs, name=name: seen[name].append(
            kwargs["pixel_values"].shape[0]), with_kwargs=True)
    ratio = measured_latency_ratio(models["pruned"], models["dense"], batch_size=3, repeats=2, warmup=1)
    assert ratio > 0 and seen == {"pruned": [3, 3, 3], "dense": [3, 3, 3]}
    assert models["pruned"].training  # modes are restored
