"""ADMM's mid-search removal: units outside Z's support for ``admm_remove_after`` updates in a row are cut out,
and the search goes on, on the smaller model, to the same budget of the dense model."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import TrainingArguments

from hf_vitprune import PruningConfig, PruningPlan, PruningTrainer, apply_plan, model_stats
from hf_vitprune.methods.admm import ADMMState, prunable_tensors
from hf_vitprune.methods.admm_shrinking import SupportHistory, reindex

from conftest import assert_same_weights, uninterrupted_and_resumed
from test_resume import random_images, tiny_vit  # the same tiny ViT and images as the resume tests


def make_trainer(output_dir, remove_after=1, **overrides) -> PruningTrainer:
    values = dict(max_steps=16, per_device_train_batch_size=8, learning_rate=1e-3, report_to=[], save_strategy="steps",
                  save_steps=2, disable_tqdm=True, seed=0, use_cpu=True, logging_steps=1)
    values.update(overrides)
    config = PruningConfig(target_sparsity=0.4, calibration_samples=16, admm_update_steps=2, admm_fraction=0.5,
                           admm_remove_after=remove_after)
    return PruningTrainer(model=tiny_vit(), args=TrainingArguments(str(output_dir), **values),
                          train_dataset=random_images(), pruning_config=config)


def test_the_history_counts_updates_outside_the_support_and_removes_after_k():
    model = tiny_vit()
    history = SupportHistory.start(model)
    support = PruningPlan(heads={0: [0, 1, 2]}, neurons={1: list(range(30))})
    for expected in (None, None):
        history.record(model, support)
        assert history.removal(3) is expected
    history.record(model, support)
    removal = history.removal(3)
    assert removal == PruningPlan(heads={0: [0, 1, 2]}, neurons={1: list(range(30))})
    history.record(model, PruningPlan(heads={0: [0, 1, 3]}))  # head 3 is back in (its count restarts), 2 is out
    assert history.counts["heads"][0].tolist() == [0, 0, 1, 0]
    wide = PruningPlan(heads={0: [0, 1]}, neurons={1: [2, 5]})
    assert reindex(wide, removal, {"heads": [4, 4, 4], "neurons": [37, 37, 37]}).kept_heads(0, 3) == [0, 1]


def test_the_admm_state_is_sliced_like_the_weights():
    model = tiny_vit()
    state = ADMMState.initialize(model, rho=0.7)
    generator = torch.Generator().manual_seed(3)
    for key in state.Z:
        state.U[key] = torch.randn(state.U[key].shape, generator=generator)
        state.Z[key] = torch.randn(state.Z[key].shape, generator=generator)
    removal = PruningPlan(heads={1: [0, 3]}, neurons={0: list(range(0, 37, 3)), 2: [1, 2, 3]})
    heads_before, neurons_before = state.group_norms(model)
    positions = ADMMState.kept_positions(model, removal)
    weights = {key: tensor.detach() for key, (_, tensor, _) in prunable_tensors(model).items()}
    expected = 0.5 * 0.7 * sum(
        (weights[key].index_select(dim, index) - state.Z[key].index_select(dim, index)
         + state.U[key].index_select(dim, index)).pow(2).sum()
        for key, (dim, index) in positions.items())
    compacted = apply_plan(model, removal)
    state.keep(positions)
    torch.testing.assert_close(state.penalty(compacted).detach(), expected.float(), rtol=1e-5, atol=1e-6)
    heads_after, neurons_after = state.group_norms(compacted)
    torch.testing.assert_close(heads_after[1], heads_before[1][[0, 3]])
    torch.testing.assert_close(neurons_after[0], neurons_before[0][list(range(0, 37, 3))])
    torch.testing.assert_close(neurons_after[1], neurons_before[1])


def test_a_search_that_removes_units_midway_ends_on_the_dense_models_budget(tmp_path):
    run = make_trainer(tmp_path / "run", save_strategy="no")
    dense = copy.deepcopy(run.model)
    limit = 0.6 * model_stats(dense).params
    run.train()
    removed = [log["admm_removed_units"] for log in run.state.log_history if "admm_removed_units" in log]
    assert removed and removed[-1] > 0
    final = model_stats(run.model)
    assert final.params <= limit < final.params + 2 * 32 + 1  # within one neuron of the budget
    # the recorded plan, applied to the dense model, is the model that was trained
    assert model_stats(apply_plan(dense, run.plan)).layers == final.layers
    assert run.method.final_residual <= 0.5 and "admm_residual_at_removal" in run.method.log_values()


def test_resuming_after_a_mid_search_removal_matches_an_uninterrupted_run(tmp_path):
    reference, resumed = uninterrupted_and_resumed(make_trainer, tmp_path, "admm", crash=6)
    assert resumed.plan == reference.plan
    assert_same_weights(resumed.model, reference.model)


def test_removal_is_not_due_before_k_updates_and_none_turns_it_off(tmp_path):
    run = make_trainer(tmp_path / "off", remove_after=None, save_strategy="no")
    run.train()
    assert not any("admm_removed_units" in log for log in run.state.log_history)
    with pytest.raises(ValueError, match="admm_remove_after=0 must be an integer >= 1"):
        PruningConfig(target_sparsity=0.4, admm_remove_after=0)


def test_admm_fraction_zero_prunes_in_one_shot_to_the_first_projection(tmp_path):
    run = make_trainer(tmp_path / "one-shot", save_strategy="no")
    run.pruning_config.method_options.admm_fraction = 0.0
    first = {}
    setup = run.method.setup

    def record_first_projection(context):
        setup(context)
        first["plan"] = copy.deepcopy(run.method.admm.plan)

    run.method.setup = record_first_projection
    run.train()
    search = [log for log in run.state.log_history if log.get("phase_admm") == 1.0 and "loss" in log]
    assert len(search) == 1 and run.method.search_steps(16) == 1
    assert run.plan == first["plan"]
    # no ADMM ran: its single step is a plain one (no penalty) and no residual or rho is logged or carded
    assert not any(key.startswith(("admm_penalty", "admm_residual", "admm_rho")) for log in run.state.log_history
                   for key in log)
    assert run.method.final_residual is None
