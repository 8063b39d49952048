"""apply_plan and attach_masks: compaction is exact, masks agree with it, bad models are refused."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    BeitForImageClassification,
    SwinConfig,
    SwinForImageClassification,
    ViTConfig,
    ViTForImageClassification,
    ViTForMaskedImageModeling,
)

import hf_vitprune
from hf_vitprune import PruningPlan, apply_plan, attach_masks, model_stats

TOL = 1e-5


def _check_against_reference(model, plan, pixel_values, helpers):
    """Compacted == zeroed original == masked original (max abs diff <= TOL); returns the compacted model."""
    original = helpers.outputs(model, pixel_values)
    reference = helpers.outputs(helpers.zeroed_reference(model, plan), pixel_values)
    # the plan must matter, or the comparison below proves nothing
    assert helpers.max_abs_diff(original, reference) > 1e-3

    with attach_masks(model, plan):
        masked = helpers.outputs(model, pixel_values)
    assert helpers.max_abs_diff(helpers.outputs(model, pixel_values), original) == 0, "masks were not removed"

    pruned = apply_plan(copy.deepcopy(model), plan)
    compacted = helpers.outputs(pruned, pixel_values)
    assert helpers.max_abs_diff(compacted, reference) <= TOL
    assert helpers.max_abs_diff(masked, reference) <= TOL
    assert helpers.max_abs_diff(compacted, masked) <= TOL
    return pruned


@pytest.mark.parametrize("seed", [0, 1])
def test_compacted_equals_zeroed_original_and_masked(model, arch, seed, pixel_values, helpers):
    plan = helpers.random_plan(model, seed)
    dense_widths = helpers.widths(model)
    pruned = _check_against_reference(model, plan, pixel_values, helpers)

    # the shapes really shrank, to exactly the kept units
    expected = [
        (len(plan.heads.get(i, range(h))), len(plan.neurons.get(i, range(n)))) for i, (h, n) in enumerate(dense_widths)
    ]
    assert helpers.widths(pruned) == expected
    assert expected[0][0] == 1 and expected[1][1] == 1
    assert len(set(expected)) > 1, "the plan should be heterogeneous"
    # and the model became the Pruned* class recording those widths in per_layer_config
    stock = type(model)
    assert type(pruned).__name__ == "Pruned" + stock.__name__
    assert isinstance(pruned, stock)
    assert pruned.config.model_type == "pruned_" + model.config.model_type
    recorded = [(view.num_attention_heads, view.intermediate_size) for view in pruned.config.per_layer_config]
    assert recorded == expected
    for layer, (heads, _) in zip(helpers.encoder_layers(pruned), expected):
        for name in ("q_proj", "k_proj", "v_proj"):
            assert getattr(layer.attention, name).out_features == heads * layer.attention.head_dim


def test_kept_heads_keep_their_own_weights(make_model, pixel_values, helpers):
    """Which heads survive matters: keeping heads [1, 3] differs from keeping [0, 2] and matches its reference."""
    model = make_model("vit")
    a = apply_plan(copy.deepcopy(model), PruningPlan(heads={0: [3, 1]}))
    b = apply_plan(copy.deepcopy(model), PruningPlan(heads={0: [0, 2]}))
    assert helpers.max_abs_diff(helpers.outputs(a, pixel_values), helpers.outputs(b, pixel_values)) > 1e-3
    reference = helpers.zeroed_reference(model, PruningPlan(heads={0: [1, 3]}))
    assert helpers.max_abs_diff(helpers.outputs(a, pixel_values), helpers.outputs(reference, pixel_values)) <= TOL
    original_q = helpers.encoder_layers(model)[0].attention.q_proj.weight
    kept_q = helpers.encoder_layers(a)[0].attention.q_proj.weight
    assert torch.equal(kept_q, torch.cat([original_q[8:16], original_q[24:32]]))


def test_beit_position_bias_follows_kept_heads(make_model):
    model = make_model("beit_both_bias")
    shared = model.beit.shared_position_bias.relative_position_bias_table.detach().clone()
    own = [layer.relative_position_bias.relative_position_bias_table.detach().clone() for layer in model.beit.layers]
    apply_plan(model, PruningPlan(heads={0: [2], 1: [0, 3]}))
    assert model.beit.shared_position_bias is None
    assert model.config.use_shared_relative_position_bias is False
    for layer, kept, table in zip(model.beit.layers, ([2], [0, 3], [0, 1, 2, 3]), own):
        assert torch.equal(layer.relative_position_bias.relative_position_bias_table, (table + shared)[:, kept])


def test_empty_attention_and_mlp_branches(model, arch, pixel_values, helpers):
    """allow_empty_*: a layer with no heads (and one with no neurons) equals the zeroed original."""
    plan = PruningPlan(
        heads={0: [], 1: [2], 2: []},
        neurons={0: [], 1: [0, 5, 7], 2: []},
        allow_empty_attention=True,
        allow_empty_mlp=True,
    )
    pruned = _check_against_reference(model, plan, pixel_values, helpers)
    assert helpers.widths(pruned) == [(0, 0), (1, 3), (0, 0)]
    stats = model_stats(pruned)
    assert [(s.heads, s.neurons) for s in stats.layers] == [(0, 0), (1, 3), (0, 0)]
    assert stats.params == sum(p.numel() for p in pruned.parameters())
    # the whole attention branch of an emptied layer is gone, only o_proj's bias remains
    for index in (0, 2):
        layer = helpers.encoder_layers(pruned)[index]
        assert not any(hasattr(layer.attention, n) for n in ("q_proj", "k_proj", "v_proj"))
        assert getattr(layer, "relative_position_bias", None) is None


@pytest.mark.parametrize("which", ["attention", "mlp"])
def test_empty_single_branch(make_model, which, pixel_values, helpers):
    model = make_model("beit_shared_bias")
    if which == "attention":
        plan = PruningPlan(heads={1: []}, allow_empty_attention=True)
    else:
        plan = PruningPlan(neurons={1: []}, allow_empty_mlp=True)
    _check_against_reference(model, plan, pixel_values, helpers)


def test_second_plan_indices_refer_to_the_pruned_model(model, arch, pixel_values, helpers):
    first = PruningPlan(
        heads={0: [0, 2, 3], 1: [1, 3], 2: [0, 1, 3]}, neurons={0: [1, 4, 6, 9, 20], 2: list(range(0, 30, 2))}
    )
    second = PruningPlan(heads={0: [2, 0], 2: [1]}, neurons={0: [4, 1], 1: [3, 30]})
    # the same units, in the original model's numbering
    composed = PruningPlan(
        heads={0: [0, 3], 1: [1, 3], 2: [1]}, neurons={0: [4, 20], 1: [3, 30], 2: list(range(0, 30, 2))}
    )
    twice = apply_plan(apply_plan(copy.deepcopy(model), first), second)
    once = apply_plan(copy.deepcopy(model), composed)
    reference = helpers.zeroed_reference(model, composed)
    out_twice = helpers.outputs(twice, pixel_values)
    assert helpers.max_abs_diff(out_twice, helpers.outputs(once, pixel_values)) <= TOL
    assert helpers.max_abs_diff(out_twice, helpers.outputs(reference, pixel_values)) <= TOL
    assert type(twice) is type(once)
    assert model_stats(twice) == model_stats(once)
    assert [(v.num_attention_heads, v.intermediate_size) for v in twice.config.per_layer_config] == helpers.widths(once)
    # an index that was valid in the original is out of range now
    with pytest.raises(ValueError, match=r"heads\[1\] keeps \[3\].*layer 1 has 2 heads"):
        apply_plan(twice, PruningPlan(heads={1: [3]}))


def test_masks_gate_gradients_of_removed_units(model, arch, helpers, pixel_values):
    """With a unit gated to zero, no gradient reaches its q/k/v rows, o_proj columns or MLP weights."""
    plan = PruningPlan(heads={0: [1], 2: [0, 3]}, neurons={1: [0, 2, 4]})
    masks = attach_masks(model, plan)
    try:
        out = model(pixel_values=pixel_values)
        tensor = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
        (tensor.square().sum()).backward()
    finally:
        masks.remove()
    layers = helpers.encoder_layers(model)
    for index, kept in ((0, [1]), (2, [0, 3])):
        attention, head_dim = layers[index].attention, layers[index].attention.head_dim
        removed = [h for h in range(4) if h not in kept]
        rows = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in removed])
        kept_rows = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in kept])
        for name in ("q_proj", "k_proj", "v_proj"):
            grad = getattr(attention, name).weight.grad
            assert torch.all(grad[rows] == 0), name
        assert torch.all(attention.o_proj.weight.grad[:, rows] == 0)
        assert attention.o_proj.weight.grad[:, kept_rows].abs().sum() > 0
        assert attention.v_proj.weight.grad[kept_rows].abs().sum() > 0
    mlp = layers[1].mlp
    out_proj = helpers.mlp_out(layers[1])
    removed = [n for n in range(out_proj.in_features) if n not in (0, 2, 4)]
    assert torch.all(out_proj.weight.grad[:, removed] == 0)
    assert out_proj.weight.grad[:, [0, 2, 4]].abs().sum() > 0
    for name in ("fc1", "gate_proj", "up_proj"):
        if hasattr(mlp, name):
            assert torch.all(getattr(mlp, name).weight.grad[removed] == 0), name


def test_masks_are_soft_gates_and_detach(make_model, pixel_values, helpers):
    model = make_model("deit_teacher")
    original = helpers.outputs(model, pixel_values)
    half = copy.deepcopy(model)
    masks = attach_masks(model)  # no plan: every gate open, outputs unchanged
    assert helpers.max_abs_diff(helpers.outputs(model, pixel_values), original) == 0
    masks.head_gates[1][2] = 0.5  # a fractional gate scales that head's contribution
    masks_half = helpers.outputs(model, pixel_values)
    masks.remove()
    assert helpers.max_abs_diff(helpers.outputs(model, pixel_values), original) == 0
    with torch.no_grad():
        helpers.encoder_layers(half)[1].attention.o_proj.weight[:, 16:24] *= 0.5
    assert helpers.max_abs_diff(masks_half, helpers.outputs(half, pixel_values)) <= TOL
    assert helpers.max_abs_diff(masks_half, original) > 1e-4


def test_failed_apply_leaves_model_untouched(make_model, pixel_values, helpers):
    model = make_model("beit_shared_bias")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="neurons"):
        apply_plan(model, PruningPlan(heads={0: [1]}, neurons={2: [0, 37]}))
    assert type(model) is BeitForImageClassification
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


# --------------------------------------------------------------------------- unsupported models


def _swin():
    config = SwinConfig(image_size=16, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=2)
    return SwinForImageClassification(config).eval()


def _vit_mim():
    config = ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=16, patch_size=4,
        encoder_stride=4,
    )
    return ViTForMaskedImageModeling(config).eval()


@pytest.mark.parametrize(
    "factory, class_name, model_type",
    [(_swin, "SwinForImageClassification", "swin"), (_vit_mim, "ViTForMaskedImageModeling", "vit")],
)
@pytest.mark.parametrize(
    "call",
    [
        lambda m: apply_plan(m, PruningPlan(heads={0: [0]})),
        lambda m: attach_masks(m, PruningPlan(heads={0: [0]})),
        lambda m: attach_masks(m),
        lambda m: model_stats(m),
        lambda m: model_stats(m, PruningPlan(heads={0: [0]})),
    ],
    ids=["apply_plan", "attach_masks_plan", "attach_masks", "model_stats", "model_stats_plan"],
)
def test_unsupported_model_is_refused(factory, class_name, model_type, call):
    model = factory()
    with pytest.raises(ValueError, match=rf"cannot prune {class_name} \(model_type='{model_type}'\)") as info:
        call(model)
    message = str(info.value)
    for supported in (
        "ViTForImageClassification",
        "DeiTForImageClassificationWithTeacher",
        "BeitForImageClassification",
        "Dinov2ForImageClassification",
        "ViTMSNForImageClassification",
    ):
        assert supported in message
    assert type(model).__name__ == class_name  # nothing was converted


def test_public_api_names():
    expected = {"PruningPlan", "apply_plan", "attach_masks", "model_stats", "UnitMasks", "ModelStats", "LayerStats"}
    assert set(hf_vitprune.__all__) >= expected
    assert all(hasattr(hf_vitprune, name) for name in expected)


# --------------------------------------------------------------------------- plans given as dicts, or twice


def test_a_dict_plan_is_read_as_pruning_plan_from_dict(make_model, pixel_values, helpers):
    data = {"heads": {"0": [1], "2": [0, 3]}, "neurons": {"1": list(range(9))}}
    by_dict = apply_plan(make_model("vit"), data)
    by_plan = apply_plan(make_model("vit"), PruningPlan.from_dict(data))
    assert helpers.widths(by_dict) == helpers.widths(by_plan) == [(1, 37), (4, 9), (2, 37)]
    assert helpers.max_abs_diff(helpers.outputs(by_dict, pixel_values), helpers.outputs(by_plan, pixel_values)) == 0
    with attach_masks(make_model("vit"), data) as masks:
        assert masks.head_gates[0].tolist() == [0, 1, 0, 0]


@pytest.mark.parametrize(
    "plan, error, message",
    [
        ({"heads": {"0": [1]}, "layers": {}}, ValueError, r"Unknown PruningPlan fields \['layers'\]"),
        ([[0, 1]], TypeError, r"got list.*PruningPlan\(heads=.*PruningPlan\.from_dict"),
        (None, TypeError, r"got NoneType.*PruningPlan\(heads="),
    ],
    ids=["unknown_key", "list", "none"],
)
def test_a_plan_that_is_not_one_is_refused(make_model, plan, error, message):
    model = make_model("vit")
    with pytest.raises(error, match=message):
        apply_plan(model, plan)
    if plan is not None:  # attach_masks(model, None) means "no plan"
        with pytest.raises(error, match=message):
            attach_masks(model, plan)
    assert type(model) is ViTForImageClassification


def test_applying_the_same_plan_twice_says_the_model_was_already_pruned(make_model):
    plan = PruningPlan(heads={0: [1, 3]}, neurons={2: [5, 30]})
    pruned = apply_plan(make_model("vit"), plan)
    widths = [(v.num_attention_heads, v.intermediate_size) for v in pruned.config.per_layer_config]
    with pytest.raises(ValueError, match=r"heads\[0\] keeps \[3\].*layer 0 has 2 heads") as info:
        apply_plan(pruned, plan)
    message = str(info.value)
    assert "already pruned" in message and "original model" in message
    assert [(v.num_attention_heads, v.intermediate_size) for v in pruned.config.per_layer_config] == widths
    with pytest.raises(ValueError, match="already pruned"):
        attach_masks(pruned, plan)
    # a dense model that is too small for a plan is not called pruned
    with pytest.raises(ValueError) as info:
        apply_plan(make_model("vit"), PruningPlan(heads={0: [4]}))
    assert "already pruned" not in str(info.value)
