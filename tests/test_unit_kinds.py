"""A unit kind registered from outside the package is planned, costed, budgeted and cut like heads.

The toy kind is the channel of a bottleneck adapter added beside every layer's MLP
(``out = mlp(x) + up(gelu(down(x)))``): a real unit with weights (a row of ``down`` with its
bias, a column of ``up``) and FLOPs, defined only here. No package module names it.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from hf_vitprune import PruningPlan, apply_plan, attach_masks, model_stats
from hf_vitprune.architectures import (
    UNIT_KINDS,
    UnitKind,
    find_encoder_layers,
    register_unit_kind,
    sliced_linear,
    unregister_unit_kind,
)
from hf_vitprune.budget import Budget, select_plan

KIND = "adapter_channels"
WIDTH = 6  # adapter channels per layer
HIDDEN = 32  # conftest's hidden_size
TOKENS = 17  # 16 patches + CLS
PARAMS_PER_CHANNEL = HIDDEN + 1 + HIDDEN  # a row of down, its bias, a column of up
FLOPS_PER_CHANNEL = 2 * TOKENS * 2 * HIDDEN  # one output of down and one input of up, per token


class Adapter(nn.Module):
    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.down = nn.Linear(hidden, width)
        self.up = nn.Linear(width, hidden)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.up(nn.functional.gelu(self.down(hidden_states)))


def _add_adapter(mlp: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output + mlp.adapter(args[0])  # reads the adapter through the hooked module: deepcopy-safe


def with_adapters(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` with a seeded adapter of WIDTH channels beside every layer's MLP."""
    torch.manual_seed(seed)
    for layer in find_encoder_layers(model):
        layer.mlp.adapter = Adapter(HIDDEN, WIDTH)
        layer.mlp.register_forward_hook(_add_adapter)
    return model.eval()


def _adapter(layer) -> Adapter | None:
    return getattr(layer.mlp, "adapter", None)


def _parameters(layer):
    adapter = _adapter(layer)
    if adapter is not None:
        yield adapter.down.weight, "rows"
        yield adapter.down.bias, "rows"
        yield adapter.up.weight, "columns"


def _count(layer) -> int:
    adapter = _adapter(layer)
    return 0 if adapter is None else adapter.down.out_features


def _params_per_channel(layer, shared_bias_rows: int) -> int:
    adapter = _adapter(layer)
    return 0 if adapter is None else adapter.down.in_features + 1 + adapter.up.out_features


def _flops_per_channel(layer, tokens: int) -> int:
    adapter = _adapter(layer)
    return 0 if adapter is None else 2 * tokens * (adapter.down.in_features + adapter.up.out_features)


def _compact(layer, kept) -> None:
    adapter = _adapter(layer)
    if adapter is not None:
        index = torch.as_tensor(list(kept), dtype=torch.long)
        adapter.down = sliced_linear(adapter.down, index, None)
        adapter.up = sliced_linear(adapter.up, None, index)


ADAPTER_CHANNELS = UnitKind(
    name=KIND,
    singular="adapter_channel",
    label="adapter channels",
    config_key="adapter_size",
    allow_empty="allow_empty_adapter",
    count=_count,
    parameters=_parameters,
    params_per_unit=_params_per_channel,
    flops_per_unit=_flops_per_channel,
    compact=_compact,
    gate=lambda layer: (_adapter(layer).up, 1),
)


@contextlib.contextmanager
def registered(kind: UnitKind):
    register_unit_kind(kind)
    try:
        yield kind
    finally:
        unregister_unit_kind(kind.name)


@pytest.fixture
def adapter_kind():
    with registered(ADAPTER_CHANNELS) as kind:
        yield kind
    assert KIND not in UNIT_KINDS


def numel(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def counted_flops(model: nn.Module) -> int:
    model.set_attn_implementation("eager")  # torch's counter has no formula for fused CPU SDPA
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(pixel_values=torch.randn(1, 3, 16, 16))
    return counter.get_total_flops()


HEADS_AND_NEURONS = dict(heads={0: [1, 2], 2: [3]}, neurons={1: list(range(10)), 2: [0, 5, 36]})
KEPT_CHANNELS = {0: [1, 4], 1: [0, 2, 3, 5], 2: []}


def joint_plan() -> PruningPlan:
    """Heads, neurons and adapter channels at once (layer 2 keeps no channel). Needs the kind registered."""
    return PruningPlan(**HEADS_AND_NEURONS, other_units={KIND: KEPT_CHANNELS}, other_allow_empty={KIND})


# --------------------------------------------------------------------------- statistics


def test_model_stats_cost_the_toy_kind_exactly(adapter_kind, make_model):
    plain = make_model("vit")
    model = with_adapters(copy.deepcopy(plain))
    plain_stats, dense = model_stats(plain), model_stats(model)
    adapter_params = 3 * (WIDTH * PARAMS_PER_CHANNEL + HIDDEN)  # up's bias belongs to no channel
    assert dense.params == plain_stats.params + adapter_params == numel(model)
    assert dense.flops == plain_stats.flops + 3 * WIDTH * FLOPS_PER_CHANNEL
    # the FLOPs are the adapter's real matrix products: torch counts exactly that many more
    assert counted_flops(copy.deepcopy(model)) - counted_flops(copy.deepcopy(plain)) == 3 * WIDTH * FLOPS_PER_CHANNEL
    assert [s.units(KIND) for s in dense.layers] == [WIDTH] * 3

    predicted = model_stats(model, joint_plan())
    without = model_stats(plain, PruningPlan(**HEADS_AND_NEURONS))
    kept = [len(KEPT_CHANNELS[i]) for i in range(3)]
    assert predicted.params == without.params + sum(k * PARAMS_PER_CHANNEL + HIDDEN for k in kept)
    assert predicted.flops == without.flops + sum(kept) * FLOPS_PER_CHANNEL
    for layer, plain_layer, k in zip(predicted.layers, without.layers, kept):
        assert layer.params == plain_layer.params + k * PARAMS_PER_CHANNEL + HIDDEN
        assert (layer.heads, layer.neurons, layer.units(KIND)) == (plain_layer.heads, plain_layer.neurons, k)
    assert predicted.layers[2].other_units == {}  # a layer that kept none records none


def test_stats_of_other_models_are_unchanged_while_registered(make_model):
    model = make_model("beit_shared_bias")
    plan = PruningPlan(heads={1: [0]}, neurons={2: [3, 4]})
    before = (model_stats(model).to_dict(), model_stats(model, plan).to_dict())
    with registered(ADAPTER_CHANNELS):
        assert (model_stats(model).to_dict(), model_stats(model, plan).to_dict()) == before
        assert "other_units" not in model_stats(model).to_dict()["layers"][0]


def test_stats_with_the_toy_kind_round_trip_through_dicts(adapter_kind, make_model):
    from hf_vitprune.stats import ModelStats

    stats = model_stats(with_adapters(make_model("vit")), joint_plan())
    data = stats.to_dict()
    assert data["layers"][0]["other_units"] == {KIND: 2}
    assert ModelStats.from_dict(data) == stats


# --------------------------------------------------------------------------- surgery


def _zeroed_reference(model, plan, helpers):
    reference = helpers.zeroed_reference(model, plan)
    with torch.no_grad():
        for index, layer in enumerate(helpers.encoder_layers(reference)):
            dropped = sorted(set(range(WIDTH)) - set(plan.kept(KIND, index, WIDTH)))
            layer.mlp.adapter.up.weight[:, dropped] = 0
    return reference


def test_apply_plan_cuts_the_toy_kind_as_predicted(adapter_kind, make_model, pixel_values, helpers):
    model = with_adapters(make_model("vit"))
    predicted = model_stats(model, joint_plan())
    plan = joint_plan()
    reference = helpers.outputs(_zeroed_reference(model, plan, helpers), pixel_values)
    assert helpers.max_abs_diff(helpers.outputs(model, pixel_values), reference) > 1e-3  # the plan matters

    with attach_masks(model, plan) as masks:
        assert [len(g) for g in masks.gates[KIND]] == [WIDTH] * 3
        masked = helpers.outputs(model, pixel_values)
    pruned = apply_plan(copy.deepcopy(model), plan)
    assert helpers.max_abs_diff(helpers.outputs(pruned, pixel_values), reference) <= 1e-5
    assert helpers.max_abs_diff(masked, reference) <= 1e-5

    assert numel(pruned) == predicted.params
    assert model_stats(pruned) == predicted
    assert [layer.mlp.adapter.down.out_features for layer in helpers.encoder_layers(pruned)] == [2, 4, 0]
    assert [view.adapter_size for view in pruned.config.per_layer_config] == [2, 4, 0]


# --------------------------------------------------------------------------- plans


def test_plan_json_keeps_heads_and_neurons_as_before_and_adds_the_kind(adapter_kind):
    plan = joint_plan()
    text = plan.to_json_string()
    again = PruningPlan.from_json_string(text)
    assert again == plan and again.to_json_string() == text
    data = plan.to_dict()
    assert data[KIND] == {"0": [1, 4], "1": [0, 2, 3, 5], "2": []} and data["allow_empty_adapter"] is True
    plain = PruningPlan(**HEADS_AND_NEURONS)
    assert set(plain.to_dict()) == {"heads", "neurons", "allow_empty_attention", "allow_empty_mlp"}
    assert plan.kept(KIND, 1, WIDTH) == [0, 2, 3, 5] and plan.kept(KIND, 5, WIDTH) == list(range(WIDTH))


def test_plan_round_trips_flags_and_empty_mappings(adapter_kind):
    assert PruningPlan(other_units={KIND: {}}) == PruningPlan()  # naming no layer keeps everything, as absent
    for plan in (
        PruningPlan(other_allow_empty={KIND}),
        PruningPlan(heads={0: [1]}, other_units={KIND: {1: [0]}}),
        PruningPlan.of({"neurons": {2: []}, KIND: {0: [5]}}, allow_empty={"neurons"}),
    ):
        assert PruningPlan.from_json_string(plan.to_json_string()) == plan
    assert PruningPlan.of({"neurons": {2: []}}, allow_empty={"neurons"}).allow_empty_mlp


def test_plan_checks_the_toy_kind(adapter_kind, make_model):
    with pytest.raises(ValueError, match=rf"{KIND} leaves layers \[2\] with nothing kept.*other_allow_empty"):
        PruningPlan(other_units={KIND: {2: []}})
    with pytest.raises(ValueError, match=rf"{KIND}\[0\] keeps \[6\], but layer 0 has 6 {KIND}"):
        PruningPlan(other_units={KIND: {0: [6]}}).validate(with_adapters(make_model("vit")))
    with pytest.raises(ValueError, match=r"unknown unit kind 'qk_dims'"):
        PruningPlan(other_units={"qk_dims": {0: [1]}})
    with pytest.raises(ValueError, match=r"Unknown PruningPlan fields \['qk_dims'\]"):
        PruningPlan.from_dict({"qk_dims": {"0": [1]}})


def test_registry_refuses_clashes_and_builtins(adapter_kind):
    with pytest.raises(ValueError, match=f"reuses '{KIND}'"):
        register_unit_kind(ADAPTER_CHANNELS)
    with pytest.raises(ValueError, match="reuses 'intermediate_size'"):
        register_unit_kind(UnitKind(**{**ADAPTER_CHANNELS.__dict__, "name": "other", "config_key": "intermediate_size",
                                       "allow_empty": "allow_empty_other"}))
    with pytest.raises(ValueError, match="built in"):
        unregister_unit_kind("heads")
    assert list(UNIT_KINDS) == ["heads", "neurons", "head_dims", KIND]  # registry order: the budget's tie-break order


# --------------------------------------------------------------------------- budgets


def _adapter_scores(seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(WIDTH, generator=generator, dtype=torch.float64) for _ in range(3)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_select_plan_hits_a_budget_with_only_the_toy_kind(adapter_kind, make_model, seed):
    model = with_adapters(make_model("vit"))
    dense = model_stats(model).params
    fraction = 0.45 * 3 * WIDTH * PARAMS_PER_CHANNEL / dense  # about half the channels must go
    scores = _adapter_scores(seed)
    plan = select_plan(model, budget=Budget("params", fraction), prune_heads=False, prune_neurons=False,
                       scores={KIND: scores}, minimums={KIND: 0})
    limit, kept = (1 - fraction) * dense, model_stats(model, plan).params
    assert 0 <= limit - kept < PARAMS_PER_CHANNEL  # within one channel
    assert plan.heads == {} and plan.neurons == {} and set(plan.other_units[KIND]) == {0, 1, 2}
    # every channel costs the same, so the kept ones are exactly the highest-scoring ones
    kept_scores = [float(scores[i][j]) for i, js in plan.other_units[KIND].items() for j in js]
    dropped = [float(scores[i][j]) for i in range(3) for j in set(range(WIDTH)) - set(plan.other_units[KIND][i])]
    assert dropped and min(kept_scores) > max(dropped)
    assert numel(apply_plan(copy.deepcopy(model), plan)) == kept


def test_select_plan_hits_a_flops_budget_with_all_kinds(adapter_kind, make_model, helpers):
    model = with_adapters(make_model("vit"))
    generator = torch.Generator().manual_seed(3)
    heads = [torch.rand(4, generator=generator) for _ in range(3)]
    neurons = [torch.rand(37, generator=generator) for _ in range(3)]
    plan = select_plan(model, heads, neurons, target_flops_reduction=0.3, scores={KIND: _adapter_scores(3)},
                       roundings={KIND: 2})
    dense, kept = model_stats(model).flops, model_stats(model, plan).flops
    assert 0 <= 0.7 * dense - kept < 2 * TOKENS * 2 * HIDDEN  # within one neuron (= one adapter channel here)
    assert all(len(kept_) % 2 == 0 or len(kept_) == WIDTH for kept_ in plan.other_units[KIND].values())
    assert all(kept_ for kept_ in plan.other_units[KIND].values())  # the default minimum is 1 (rounded to 2)
    pruned = apply_plan(copy.deepcopy(model), plan)
    assert model_stats(pruned).flops == kept and numel(pruned) == model_stats(model, plan).params


def test_unreachable_budget_names_the_toy_kind(adapter_kind, make_model):
    model = with_adapters(make_model("vit"))
    with pytest.raises(ValueError, match="unreachable") as info:
        select_plan(model, None, None, target_sparsity=0.2, prune_heads=False, prune_neurons=False,
                    scores={KIND: _adapter_scores(0)}, minimums={KIND: 3})
    message = str(info.value)
    assert f"for the minimum 3 {KIND} per layer" in message and f"minimums['{KIND}']" in message
    with pytest.raises(ValueError, match="unreachable") as info:
        select_plan(model, None, [torch.ones(37)] * 3, target_sparsity=0.6, prune_heads=False)
    message = str(info.value)
    assert f"for all {KIND}, since no scores['{KIND}'] were given" in message
    assert f"pass scores['{KIND}']" in message and "set prune_heads=True" in message
