"""GOHSP that converges and ranks: scaled ADMM, the hard prune to the last Z's support, output-energy
importance for heads and neurons (layer scale included), and the smaller defects around them."""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from transformers import (
    BeitConfig,
    BeitForImageClassification,
    DeiTConfig,
    DeiTForImageClassificationWithTeacher,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
)

from hf_vitprune import PruningConfig, PruningPlan, PruningTrainer
from hf_vitprune.architectures import find_encoder_layers
from hf_vitprune.data import load_digits_dataset
from hf_vitprune.importance.graph import collect_calibration_statistics
from hf_vitprune.methods.admm import ADMMState, _unit_mask, prunable_tensors

PIXELS = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def tiny_vit(**overrides) -> ViTForImageClassification:
    torch.manual_seed(0)
    values = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37, image_size=16,
                  patch_size=4, num_labels=5)
    values.update(overrides)
    return ViTForImageClassification(ViTConfig(**values))


def random_images(count: int = 48, channels: int = 3) -> Dataset:
    generator = torch.Generator().manual_seed(0)
    return Dataset.from_dict({
        "pixel_values": torch.randn(count, channels, 16, 16, generator=generator).numpy(),
        "labels": torch.randint(0, 5, (count,), generator=generator).numpy(),
    }).with_format("torch")


# --------------------------------------------------------------------------- scaled ADMM


def test_u_is_rescaled_when_rho_changes_and_matches_the_unscaled_form():
    """Scaled form (U = Y / rho) with the rescale equals the unscaled ADMM with the dual Y, step by step."""
    model = tiny_vit()
    plan = PruningPlan(heads={0: [0, 1], 1: [2], 2: [0, 3]}, neurons={1: list(range(0, 37, 2))})
    rho, growth = 0.2, 1.5
    scaled = ADMMState.initialize(model, rho, rho_growth=growth)
    duals = {key: torch.zeros_like(u) for key, u in scaled.U.items()}  # Y, unscaled
    unscaled_rho = rho
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
        old_rho = scaled.rho
        scaled.update(model, plan)
        assert scaled.rho == pytest.approx(old_rho * growth)
        # unscaled reference: Z = Proj(W + Y / rho), Y += rho (W - Z), then rho grows
        for key, (group, tensor, layer) in prunable_tensors(model).items():
            w = tensor.detach().float()
            z = (w + duals[key] / unscaled_rho) * _unit_mask(group, layer, plan, w)
            torch.testing.assert_close(scaled.Z[key], z, rtol=1e-5, atol=1e-6)
            duals[key] = duals[key] + unscaled_rho * (w - z)
            # the scaled dual after the rho change is Y / rho_new (the unrescaled code kept Y / rho_old)
            torch.testing.assert_close(scaled.U[key], duals[key] / scaled.rho, rtol=1e-5, atol=1e-6)
        unscaled_rho *= growth


# --------------------------------------------------------------------------- convergence on real data


@pytest.fixture(scope="module")
def digits():
    splits = load_digits_dataset()
    return splits["train"], splits["validation"]


def digits_vit():
    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=8,
                       patch_size=2, num_channels=1, num_labels=10)
    return ViTForImageClassification(config)


def test_default_admm_converges_and_the_plan_is_the_last_z_support(tmp_path, digits):
    train, _ = digits
    # the default ADMM schedule (rho 0.1 -> 10, a Z/U update every 20 steps) over half the steps: 11 updates on digits
    args = TrainingArguments(str(tmp_path), max_steps=440, per_device_train_batch_size=16, learning_rate=2e-3,
                             report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True, seed=0,
                             logging_steps=20, warmup_steps=0.05)
    trainer = PruningTrainer(model=digits_vit(), args=args, train_dataset=train,
                             pruning_config=PruningConfig(target_sparsity=0.4, calibration_samples=64,
                                                          admm_fraction=0.5))
    last_support = {}
    original_finalize = trainer.method.finalize

    def finalize(model):
        last_support["plan"] = copy.deepcopy(trainer.method.admm.plan)
        last_support["returned"] = original_finalize(model)
        return last_support["returned"]

    trainer.method.finalize = finalize
    trainer.train()
    assert trainer.method.final_residual <= 0.05
    assert last_support["returned"] == last_support["plan"]  # the hard prune cuts to the last Z's support
    logged = [log["admm_residual_at_hard_prune"] for log in trainer.state.log_history
              if "admm_residual_at_hard_prune" in log]
    assert logged and logged[-1] == pytest.approx(trainer.method.final_residual)
    card = trainer.run_record().method_card
    assert any("at the hard prune" in line for line in card["recipe"])


def test_the_search_phase_keeps_a_constant_learning_rate(tmp_path):
    args = TrainingArguments(str(tmp_path), max_steps=8, per_device_train_batch_size=8, learning_rate=1e-3,
                             report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True, seed=0, logging_steps=1,
                             lr_scheduler_type="linear")
    trainer = PruningTrainer(model=tiny_vit(), args=args, train_dataset=random_images(),
                             pruning_config=PruningConfig(target_sparsity=0.4, calibration_samples=8,
                                                          admm_update_steps=2, admm_fraction=0.5))
    trainer.train()
    rates = [(log["phase_admm"], log["learning_rate"]) for log in trainer.state.log_history if "learning_rate" in log]
    search = [rate for phase, rate in rates if phase == 1.0]
    finetune = [rate for phase, rate in rates if phase == 0.0]
    assert search == [pytest.approx(1e-3)] * len(search) and len(search) == 4
    assert finetune[-1] < finetune[0]  # the TrainingArguments schedule still anneals the fine-tuning


# --------------------------------------------------------------------------- the importance


def test_a_neuron_that_never_activates_ranks_last_in_its_layer_whatever_its_norm():
    model = tiny_vit().eval()
    layer = find_encoder_layers(model)[1]
    with torch.no_grad():
        layer.mlp_in[0].weight[5].zero_()
        layer.mlp_in[0].bias[5] = -100.0  # GELU(-100) = 0 on every token: neuron 5 never activates
        layer.mlp_out.weight[:, 5].mul_(50.0)  # ...but it has by far the largest weight norm
    config = PruningConfig(target_sparsity=0.4, calibration_samples=8)
    trainer = PruningTrainer(model=model, args=TrainingArguments("unused", use_cpu=True, report_to=[]),
                             train_dataset=random_images(8), pruning_config=config)
    from hf_vitprune.methods import SearchContext

    scores = trainer.method.rank(SearchContext(model=model, budget=config.budget, search_steps=4,
                                               calibration_batches=trainer._calibration_batches))
    assert scores.neurons[1].argmin().item() == 5 and scores.neurons[1][5] == 0
    norms = layer.mlp_out.weight.detach().pow(2).sum(0)
    assert norms.argmax().item() == 5


def test_output_energy_matches_the_contributions_and_includes_layer_scale():
    torch.manual_seed(0)
    config = BeitConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=24, image_size=16,
                        patch_size=4, num_labels=3, layer_scale_init_value=0.1, use_mask_token=False)
    model = BeitForImageClassification(config).eval()
    with torch.no_grad():
        for layer in find_encoder_layers(model):
            layer.module.lambda_1.copy_(torch.linspace(0.05, 2.0, 32))
            layer.module.lambda_2.copy_(torch.linspace(2.0, 0.05, 32))
    captured = {}
    layer = find_encoder_layers(model)[1]
    handles = [layer.attention.o_proj.register_forward_pre_hook(lambda m, a: captured.__setitem__("context", a[0])),
               layer.mlp_out.register_forward_pre_hook(lambda m, a: captured.__setitem__("activation", a[0]))]
    _, energy = collect_calibration_statistics(model, [{"pixel_values": PIXELS}])
    for handle in handles:
        handle.remove()
    with torch.no_grad():
        model(pixel_values=PIXELS)
    context, activation = captured["context"], captured["activation"]
    weight_o, weight_out = layer.attention.o_proj.weight, layer.mlp_out.weight
    head = 2
    contribution = context[..., head * 8:(head + 1) * 8] @ weight_o[:, head * 8:(head + 1) * 8].T
    expected_head = (contribution * layer.module.lambda_1).pow(2).sum(-1).mean(-1).mean(0)
    torch.testing.assert_close(energy.head_energy()[1][head].float(), expected_head, rtol=1e-4, atol=0)
    j = 7
    expected_neuron = (activation[..., j:j + 1] * (weight_out[:, j] * layer.module.lambda_2)).pow(2).sum(-1).mean(-1)
    torch.testing.assert_close(energy.neuron_energy(model)[1][j].float(), expected_neuron.mean(0), rtol=1e-4, atol=0)


# --------------------------------------------------------------------------- the currency and the graph


def gohsp_ranking(model, **options):
    """GOHSP's unit scores on ``model`` and the calibration batches they came from."""
    config = PruningConfig(target_sparsity=0.4, calibration_samples=16, method_options=options or None)
    trainer = PruningTrainer(model=model, args=TrainingArguments("unused", use_cpu=True, report_to=[],
                                                                 per_device_eval_batch_size=16),
                             train_dataset=random_images(16), pruning_config=config)
    from hf_vitprune.methods import SearchContext

    context = SearchContext(model=model, budget=config.budget, search_steps=4,
                            calibration_batches=trainer._calibration_batches)
    return trainer.method.rank(context), list(trainer._calibration_batches())


def test_gohsp_scores_are_fisher_weighted_by_the_personalised_head_chain():
    """Heads: group Fisher x (stationary mass of the chain personalised by it / its layer's mean); neurons:
    group Fisher. Fails if the head importance falls back to plain energy or the chain to a uniform one."""
    from hf_vitprune.importance import ImportanceOptions, score_fisher
    from hf_vitprune.importance.graph import collect_head_statistics, stationary_importance

    model = tiny_vit().eval()
    scores, batches = gohsp_ranking(model)
    fisher = score_fisher(model, batches, options=ImportanceOptions(micro_batch_size=1))
    chain = stationary_importance(collect_head_statistics(model, batches), 0.85, teleport=fisher.heads)
    for layer, (heads, currency, pi) in enumerate(zip(scores.heads, fisher.heads, chain)):
        factor = pi / pi.mean()
        torch.testing.assert_close(heads, currency * factor)
        assert (factor - 1).abs().max() > 0.01, f"layer {layer}: the graph changed nothing"
    for neurons, currency in zip(scores.neurons, fisher.neurons):
        torch.testing.assert_close(neurons, currency)
    _, energy = collect_calibration_statistics(model, batches)
    for heads, plain in zip(scores.heads, energy.head_energy()):
        assert not torch.allclose(heads / heads.sum(), plain / plain.sum(), rtol=0.05)


@pytest.mark.parametrize("currency", ["fisher", "taylor", "energy"])
def test_the_cross_layer_currency_ignores_a_function_preserving_rescale(currency):
    """v_proj x 50 and o_proj / 50 in one layer leave the function, and so the loss-calibrated scores, as they
    were; raw weight norms (which a currency must not be) change by far more."""
    from hf_vitprune.importance import score_magnitude

    model = tiny_vit().eval()
    before, _ = gohsp_ranking(model, currency=currency)
    norms_before = score_magnitude(model)
    logits = model(pixel_values=PIXELS).logits
    attention = find_encoder_layers(model)[1].attention
    with torch.no_grad():
        attention.v_proj.weight.mul_(50.0)
        attention.v_proj.bias.mul_(50.0)
        attention.o_proj.weight.div_(50.0)
    torch.testing.assert_close(model(pixel_values=PIXELS).logits, logits, rtol=1e-4, atol=1e-5)
    after, _ = gohsp_ranking(model, currency=currency)
    for a, b in zip(before.heads + before.neurons, after.heads + after.neurons):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=1e-12)
    assert (score_magnitude(model).heads[1] / norms_before.heads[1]).min() > 10


def test_distillation_runs_during_admm_only_when_asked(tmp_path):
    def search_logs(admm_distillation):
        args = TrainingArguments(str(tmp_path / str(admm_distillation)), max_steps=8, per_device_train_batch_size=8,
                                 learning_rate=1e-3, report_to=[], save_strategy="no", disable_tqdm=True,
                                 use_cpu=True, seed=0, logging_steps=1)
        config = PruningConfig(target_sparsity=0.4, calibration_samples=8, admm_update_steps=2, admm_fraction=0.5,
                               admm_distillation=admm_distillation)
        trainer = PruningTrainer(model=tiny_vit(), args=args, train_dataset=random_images(), pruning_config=config)
        trainer.train()
        return [log for log in trainer.state.log_history if log.get("phase_admm") == 1.0 and "loss" in log]

    distilled, plain = search_logs(True), search_logs(False)
    # the student starts as the teacher (distillation loss 0 at the first step), then departs from it
    assert distilled and all("distillation_loss" in log for log in distilled)
    assert distilled[-1]["distillation_loss"] > 0
    assert plain and not any("distillation_loss" in log for log in plain)
    assert [log["loss"] for log in distilled] != [log["loss"] for log in plain]


# --------------------------------------------------------------------------- the smaller defects


@pytest.mark.parametrize("pruning", [dict(distillation_weight=0.0), dict(use_distillation_token=False)],
                         ids=["no-distillation", "no-distillation-token"])
def test_deit_distillation_head_is_trained_when_nothing_distils_through_it(tmp_path, pruning):
    torch.manual_seed(0)
    model = DeiTForImageClassificationWithTeacher(DeiTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=16, patch_size=4,
        num_labels=5))
    args = TrainingArguments(str(tmp_path), max_steps=6, per_device_train_batch_size=8, learning_rate=1e-2,
                             report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True, seed=0)
    trainer = PruningTrainer(model=model, args=args, train_dataset=random_images(),
                             pruning_config=PruningConfig(target_sparsity=0.3, calibration_samples=8,
                                                          admm_update_steps=2, **pruning))
    captured = {}
    original = trainer._compact

    def compact(plan):
        original(plan)
        captured["head"] = trainer.model.distillation_classifier.weight.detach().clone()

    trainer._compact = compact
    trainer.train()
    assert not torch.equal(trainer.model.distillation_classifier.weight, captured["head"])
