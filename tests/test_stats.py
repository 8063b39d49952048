"""model_stats: exact parameter counts, FLOPs that agree with torch's counter, exact predictions for a plan."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from hf_vitprune import LayerStats, ModelStats, PruningPlan, apply_plan, model_stats


def numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


def counted_flops(model, set_eager: bool = True) -> int:
    """FLOPs torch counts for one image. Eager attention: FlopCounterMode has no formula for the fused
    CPU SDPA kernel, so with the default "sdpa" it would leave out the QK^T and AV matmuls."""
    if set_eager:
        model.set_attn_implementation("eager")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(pixel_values=torch.randn(1, 3, 16, 16))
    return counter.get_total_flops()


def test_dense_stats(model, arch):
    stats = model_stats(model)
    assert isinstance(stats, ModelStats)
    assert stats.params == numel(model)
    assert stats.flops == pytest.approx(counted_flops(model), rel=0.02)
    # tokens: what the encoder really sees (patches + class/distillation tokens)
    with torch.no_grad():
        hidden = model(pixel_values=torch.randn(1, 3, 16, 16), output_hidden_states=True).hidden_states[-1]
    assert stats.tokens == hidden.shape[1]
    assert [(s.index, s.heads) for s in stats.layers] == [(0, 4), (1, 4), (2, 4)]
    assert all(isinstance(s, LayerStats) for s in stats.layers)


@pytest.mark.parametrize("seed", [0, 3])
def test_plan_prediction_is_exact_and_matches_pruned_model(model, arch, seed, helpers):
    plan = helpers.random_plan(model, seed)
    dense = model_stats(model)
    predicted = model_stats(model, plan)
    pruned = apply_plan(copy.deepcopy(model), plan)
    actual = model_stats(pruned)
    assert predicted == actual  # totals, tokens and every layer
    assert actual.params == numel(pruned)
    assert actual.flops == pytest.approx(counted_flops(pruned), rel=0.02)
    assert actual.params < dense.params and actual.flops < dense.flops
    assert [(s.heads, s.neurons) for s in actual.layers] == helpers.widths(pruned)
    # each layer's parameters are that layer's own (a shared BEiT table became per-layer)
    for layer_stats, layer in zip(actual.layers, helpers.encoder_layers(pruned)):
        assert layer_stats.params == numel(layer)


def test_empty_branches_stats(model, arch):
    plan = PruningPlan(heads={1: []}, neurons={0: [], 2: [3]}, allow_empty_attention=True, allow_empty_mlp=True)
    predicted = model_stats(model, plan)
    pruned = apply_plan(copy.deepcopy(model), plan)
    assert predicted == model_stats(pruned)
    assert predicted.params == numel(pruned)
    assert predicted.flops == pytest.approx(counted_flops(pruned), rel=0.02)
    assert (predicted.layers[1].heads, predicted.layers[0].neurons, predicted.layers[2].neurons) == (0, 0, 1)


def test_empty_plan_predicts_dense_stats_except_shared_bias(model, arch):
    """A plan keeping everything predicts the dense numbers (a shared BEiT table just moves into the layers)."""
    dense, same = model_stats(model), model_stats(model, PruningPlan())
    assert (same.flops, same.tokens) == (dense.flops, dense.tokens)
    if arch in ("beit_shared_bias", "beit_both_bias"):
        # apply_plan copies the shared table into each of the 3 layers (or adds it to their own)
        table = model.beit.shared_position_bias.relative_position_bias_table
        moved = 2 * table.numel() if arch == "beit_shared_bias" else -table.numel()
        assert same.params == dense.params + moved
        assert same.params == numel(apply_plan(copy.deepcopy(model), PruningPlan()))
    else:
        assert same == dense


def test_flops_per_unit_are_consistent(make_model):
    """Removing one head (one neuron) lowers FLOPs by the same amount in every layer of a uniform model."""
    model = make_model("vit")
    dense = model_stats(model)
    drops = [
        dense.flops - model_stats(model, PruningPlan(heads={i: [0, 1, 2]})).flops for i in range(3)
    ]
    assert len(set(drops)) == 1 and drops[0] > 0
    tokens, width, head_dim = dense.tokens, 32, 8
    assert drops[0] == 2 * tokens * 4 * width * head_dim + 2 * 2 * tokens * tokens * head_dim
    neuron_drop = dense.flops - model_stats(model, PruningPlan(neurons={1: list(range(36))})).flops
    assert neuron_drop == 2 * tokens * 2 * width


def test_stats_to_dict(make_model):
    stats = model_stats(make_model("deit_teacher"))
    data = stats.to_dict()
    assert data["params"] == stats.params and data["tokens"] == 18  # 16 patches + cls + distillation
    assert data["layers"][0] == {"index": 0, "heads": 4, "neurons": 37, "params": stats.layers[0].params,
                                 "flops": stats.layers[0].flops}


def test_attention_implementation_survives_pruning(make_model, helpers):
    """A model switched to eager attention stays eager in every layer after apply_plan."""
    model = make_model("beit_shared_bias")
    model.set_attn_implementation("eager")
    plan = helpers.random_plan(model, 0)
    pruned = apply_plan(model, plan)
    assert pruned.config._attn_implementation == "eager"
    assert all(layer.attention.config._attn_implementation == "eager" for layer in helpers.encoder_layers(pruned))
    assert model_stats(pruned).flops == pytest.approx(counted_flops(pruned, set_eager=False), rel=0.02)


def test_models_run_at_another_resolution_are_costed_there(tmp_path):
    """DINOv2 records its pre-training image_size and interpolates its position embeddings: set_input_size makes
    the statistics count the tokens it really sees, exactly as FlopCounterMode does; PruningTrainer sets it
    from its training images."""
    from datasets import Dataset
    from transformers import Dinov2Config, Dinov2ForImageClassification, TrainingArguments

    from hf_vitprune import PruningConfig, PruningTrainer
    from hf_vitprune.architectures import set_input_size

    def dinov2():
        torch.manual_seed(0)
        return Dinov2ForImageClassification(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                         image_size=32, patch_size=4, mlp_ratio=2, num_labels=3))

    model = dinov2()
    assert model_stats(model).tokens == 65  # 8 x 8 patches + CLS at the configured 32 x 32
    set_input_size(model, 16, 16)
    stats = model_stats(model)
    model.config._attn_implementation = "eager"
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(pixel_values=torch.randn(1, 3, 16, 16))
    assert stats.tokens == 17 and stats.flops == counter.get_total_flops()
    with pytest.raises(ValueError, match="height=0 must be a positive integer"):
        set_input_size(model, 0, 16)

    data = Dataset.from_dict({"pixel_values": torch.randn(8, 3, 16, 16).numpy(), "labels": [0, 1, 2, 0, 1, 2, 0, 1]})
    trainer = PruningTrainer(model=dinov2(), args=TrainingArguments(str(tmp_path), use_cpu=True, report_to=[]),
                             train_dataset=data.with_format("torch"), pruning_config=PruningConfig(target_sparsity=0.3))
    assert trainer.dense_stats.tokens == 17 and trainer.dense_stats.flops == stats.flops
