"""select_plan: exact budgets, idempotence, highest-density selection, minimums, rounding, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from transformers import (
    BeitConfig,
    BeitForImageClassification,
    Dinov2Config,
    Dinov2ForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)

from hf_vitprune import PruningPlan, apply_plan, model_stats
from hf_vitprune.architectures import find_encoder_layers, find_shared_position_bias, num_tokens
from hf_vitprune.budget import Budget, select_plan
from hf_vitprune.stats import layer_cost

TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37, image_size=16,
            patch_size=4, num_labels=3)
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _perturbed(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


def _build(name: str):
    torch.manual_seed(0)
    if name == "vit":
        return _perturbed(ViTForImageClassification(ViTConfig(**TINY)))
    if name == "dinov2":
        return _perturbed(Dinov2ForImageClassification(Dinov2Config(**TINY)))
    if name == "beit":
        return _perturbed(BeitForImageClassification(BeitConfig(**TINY, use_relative_position_bias=True)))
    if name == "beit_shared":
        return _perturbed(BeitForImageClassification(BeitConfig(**TINY, use_shared_relative_position_bias=True)))
    if name == "vit_hetero":  # heterogeneous widths: an already pruned model
        model = _perturbed(ViTForImageClassification(ViTConfig(**TINY)))
        plan = PruningPlan(heads={0: [0, 1, 2], 2: [1, 3]}, neurons={0: list(range(20)), 1: list(range(0, 37, 2))})
        return apply_plan(model, plan)
    raise KeyError(name)


MODELS = {name: _build(name) for name in ("vit", "dinov2", "beit", "beit_shared", "vit_hetero")}


def _sizes(model):
    layers = find_encoder_layers(model)
    return [layer.num_heads for layer in layers], [layer.num_neurons for layer in layers]


def _unit_costs(model, flops: bool):
    tokens = num_tokens(model)
    shared = find_shared_position_bias(model)
    rows = getattr(*shared).relative_position_bias_table.shape[0] if shared is not None else 0
    costs = [layer_cost(layer, tokens, rows) for layer in find_encoder_layers(model)]
    if flops:
        return [c.flops_per_head for c in costs], [c.flops_per_neuron for c in costs]
    return [c.params_per_head for c in costs], [c.params_per_neuron for c in costs]


def _scores(model, seed: int, mode: str):
    generator = torch.Generator().manual_seed(seed)
    heads, neurons = _sizes(model)

    def draw(n, scale=1.0):
        if mode == "ties":
            return torch.randint(0, 3, (n,), generator=generator).double()
        return scale * torch.rand(n, generator=generator, dtype=torch.float64)

    head_scale = 1e-3 if mode == "cheap_heads" else 1.0  # heads far less dense than neurons
    return [draw(h, head_scale) for h in heads], [draw(n) for n in neurons]


def _totals(model, plan, flops: bool):
    dense, kept = model_stats(model), model_stats(model, plan)
    return (dense.flops, kept.flops) if flops else (dense.params, kept.params)


def _select(model, hs, ns, target, flops, **kwargs):
    key = "target_flops_reduction" if flops else "target_sparsity"
    return select_plan(model, hs, ns, **{key: target}, **kwargs)


# --------------------------------------------------------------------------- exact budget


@SETTINGS
@given(
    name=st.sampled_from(["vit", "dinov2", "beit", "vit_hetero"]),
    target=st.sampled_from([0.3, 0.4, 0.6]),
    flops=st.booleans(),
    seed=st.integers(0, 2**16),
    mode=st.sampled_from(["uniform", "ties", "cheap_heads"]),
)
def test_budget_is_hit_exactly(name, target, flops, seed, mode):
    model = MODELS[name]
    hs, ns = _scores(model, seed, mode)
    plan = _select(model, hs, ns, target, flops)
    dense, kept = _totals(model, plan, flops)
    budget = (1 - target) * dense
    head_costs, neuron_costs = _unit_costs(model, flops)
    assert kept <= budget
    assert budget - kept <= 0.005 * dense
    assert budget - kept < min(head_costs + neuron_costs)  # within one unit of the finest granularity
    for mapping in (plan.heads, plan.neurons):
        assert all(kept_ == sorted(kept_) for kept_ in mapping.values())


def test_budget_with_a_shared_position_bias():
    """A shared BEiT table is copied into every layer by apply_plan; the budget counts those copies."""
    model = MODELS["beit_shared"]
    hs, ns = _scores(model, 3, "uniform")
    plan = select_plan(model, hs, ns, target_sparsity=0.4)
    dense, kept = _totals(model, plan, False)
    assert 0 <= 0.6 * dense - kept < min(_unit_costs(model, False)[1])
    compacted = apply_plan(copy.deepcopy(model), plan)
    assert sum(p.numel() for p in compacted.parameters()) == kept


def test_prediction_matches_the_compacted_model():
    model = MODELS["dinov2"]
    hs, ns = _scores(model, 7, "uniform")
    plan = select_plan(model, hs, ns, target_sparsity=0.4)
    compacted = apply_plan(copy.deepcopy(model), plan)
    assert sum(p.numel() for p in compacted.parameters()) == model_stats(model, plan).params


def test_zero_target_is_refused_by_the_one_range_check():
    """Budget is the one place targets are checked: 0 (remove nothing) is not a pruning budget."""
    model = MODELS["vit"]
    hs, ns = _scores(model, 0, "uniform")
    with pytest.raises(ValueError, match=r"target_sparsity=0\.0 must lie strictly between 0 and 1"):
        select_plan(model, hs, ns, target_sparsity=0.0)


@pytest.mark.parametrize("metric, key", [("params", "target_sparsity"), ("flops", "target_flops_reduction")])
def test_a_budget_selects_what_its_target_does(metric, key):
    model = MODELS["vit_hetero"]
    hs, ns = _scores(model, 4, "uniform")
    by_budget = select_plan(model, hs, ns, budget=Budget(metric, 0.35), round_neurons_to=4)
    by_target = select_plan(model, hs, ns, **{key: 0.35}, round_neurons_to=4)
    assert by_budget.to_json_string() == by_target.to_json_string()


# --------------------------------------------------------------------------- which units


def _cheapest_block(model, flops: bool, minimums: tuple[int, int], roundings: tuple[int, int]) -> int:
    """The cost of the cheapest block select_plan may add or drop (a block is up to ``round_*_to`` units)."""
    cheapest = []
    for sizes, costs, minimum, multiple in zip(_sizes(model), _unit_costs(model, flops), minimums, roundings):
        for width, cost in zip(sizes, costs):
            prunable = width - min(width, -(-minimum // multiple) * multiple)
            if prunable:
                cheapest.append(cost * (prunable % multiple or multiple))
    return min(cheapest)


@SETTINGS
@given(
    name=st.sampled_from(["vit", "beit", "vit_hetero"]),
    target=st.floats(0.05, 0.6),
    flops=st.booleans(),
    seed=st.integers(0, 2**16),
    mode=st.sampled_from(["uniform", "ties", "cheap_heads"]),
    round_heads=st.sampled_from([1, 2]),
    round_neurons=st.sampled_from([1, 4]),
    min_heads=st.integers(0, 2),
)
# The greedy keeps all neurons and drops one head, 3082 FLOPs short of the budget; the only
# blocks that would close that gap are kept 1-neuron tails. Rescored, the exchange step finds
# neurons whose removal (with the head back) leaves 362: a different, tighter plan.
@example(name="vit", target=0.05, flops=True, seed=1, mode="ties", round_heads=1, round_neurons=4, min_heads=0)
def test_selecting_again_on_the_plan_support_gives_the_same_plan(
    name, target, flops, seed, mode, round_heads, round_neurons, min_heads
):
    """Idempotence, as far as it holds: the support of a plan is the greedy's answer for scores that
    are positive exactly on it. If that plan is within one block of the budget, nothing else fits and
    the answer is the plan. Otherwise the exchange step, whose result depends on the order of the
    kept blocks, may still find a strictly tighter plan, never a looser one."""
    model = MODELS[name]
    hs, ns = _scores(model, seed, mode)
    kwargs = dict(round_heads_to=round_heads, round_neurons_to=round_neurons, min_heads_per_layer=min_heads)
    try:
        plan = _select(model, hs, ns, target, flops, **kwargs)
    except ValueError as error:  # minimums above the budget on the small pruned model
        assert "unreachable" in str(error)
        assume(False)
    generator = torch.Generator().manual_seed(seed + 1)
    heads, neurons = _sizes(model)

    def on_support(mapping, sizes):
        result = []
        for layer, size in enumerate(sizes):
            score = torch.zeros(size, dtype=torch.float64)
            kept = mapping[layer]
            score[kept] = 0.5 + torch.rand(len(kept), generator=generator, dtype=torch.float64)
            result.append(score)
        return result

    again = _select(model, on_support(plan.heads, heads), on_support(plan.neurons, neurons), target, flops, **kwargs)
    dense, kept = _totals(model, plan, flops)
    slack, slack_again = (1 - target) * dense - kept, (1 - target) * dense - _totals(model, again, flops)[1]
    assert slack >= 0 and slack_again >= 0
    if slack < _cheapest_block(model, flops, (min_heads, 1), (round_heads, round_neurons)):
        assert again == plan
    else:
        assert again == plan or slack_again < slack


@SETTINGS
@given(
    name=st.sampled_from(["vit", "dinov2", "vit_hetero"]),
    target=st.floats(0.05, 0.65),
    flops=st.booleans(),
    seed=st.integers(0, 2**16),
    mode=st.sampled_from(["uniform", "ties", "cheap_heads"]),
    min_heads=st.integers(0, 2),
    min_neurons=st.integers(0, 3),
)
def test_keeps_the_highest_density_units(name, target, flops, seed, mode, min_heads, min_neurons):
    """Within a kind and unit cost, every kept unit's density >= every dropped one's (minimums aside)."""
    model = MODELS[name]
    hs, ns = _scores(model, seed, mode)
    try:
        plan = _select(model, hs, ns, target, flops, min_heads_per_layer=min_heads, min_neurons_per_layer=min_neurons)
    except ValueError as error:
        assert "unreachable" in str(error)
        assume(False)
    costs = _unit_costs(model, flops)
    for scores, mapping, unit_costs, minimum in ((hs, plan.heads, costs[0], min_heads),
                                                   (ns, plan.neurons, costs[1], min_neurons)):
        kept_density, dropped_density = {}, {}
        for layer, score in enumerate(scores):
            order = sorted(range(len(score)), key=lambda j: (-float(score[j]), j))
            mandatory = set(order[:minimum])
            cost = unit_costs[layer]
            for j in range(len(score)):
                if j in mandatory:
                    continue
                target_dict = kept_density if j in mapping[layer] else dropped_density
                target_dict.setdefault(cost, []).append(float(score[j]) / cost)
        for cost in set(kept_density) & set(dropped_density):
            assert min(kept_density[cost]) >= max(dropped_density[cost])


def test_equal_scores_break_ties_by_layer_then_index():
    model = MODELS["vit"]
    heads, neurons = _sizes(model)
    hs = [torch.ones(h) for h in heads]
    ns = [torch.ones(n) for n in neurons]
    plan = select_plan(model, hs, ns, target_sparsity=0.3, prune_heads=False)
    assert plan == select_plan(model, hs, ns, target_sparsity=0.3, prune_heads=False)
    counts = [len(plan.neurons[i]) for i in range(3)]
    assert counts == sorted(counts, reverse=True)  # later layers lose units first
    for i, kept in plan.neurons.items():
        assert kept == list(range(len(kept)))  # lower indices first


@SETTINGS
@given(
    seed=st.integers(0, 2**16),
    target=st.floats(0.05, 0.5),
    min_heads=st.integers(0, 3),
    min_neurons=st.integers(0, 10),
    round_heads=st.sampled_from([1, 2, 3]),
    round_neurons=st.sampled_from([1, 4, 8]),
    mode=st.sampled_from(["uniform", "cheap_heads"]),
)
def test_respects_minimums_and_rounding(seed, target, min_heads, min_neurons, round_heads, round_neurons, mode):
    model = MODELS["vit"]
    hs, ns = _scores(model, seed, mode)
    kwargs = dict(min_heads_per_layer=min_heads, min_neurons_per_layer=min_neurons,
                  round_heads_to=round_heads, round_neurons_to=round_neurons)
    try:
        plan = select_plan(model, hs, ns, target_sparsity=target, **kwargs)
    except ValueError as error:  # only when the rounded minimums really exceed the budget
        assert "unreachable" in str(error)
        mandatory = PruningPlan(
            heads={i: list(range(min(4, -(-min_heads // round_heads) * round_heads))) for i in range(3)},
            neurons={i: list(range(min(37, -(-min_neurons // round_neurons) * round_neurons))) for i in range(3)},
            allow_empty_attention=True, allow_empty_mlp=True,
        )
        assert model_stats(model, mandatory).params > (1 - target) * model_stats(model).params
        return
    heads, neurons = _sizes(model)
    for mapping, sizes, minimum, multiple in ((plan.heads, heads, min_heads, round_heads),
                                              (plan.neurons, neurons, min_neurons, round_neurons)):
        for layer, size in enumerate(sizes):
            count = len(mapping[layer])
            assert count >= min(minimum, size)
            assert count % multiple == 0 or count == size
    dense, kept = _totals(model, plan, False)
    head_costs, neuron_costs = _unit_costs(model, False)
    assert kept <= (1 - target) * dense
    assert (1 - target) * dense - kept < max(round_heads * head_costs[0], round_neurons * neuron_costs[0])


@pytest.mark.parametrize("target", [0.2, 0.4])
def test_per_layer_minimums(target):
    """A sequence of minimums holds layer by layer (OFB keeps its search grid's narrowest MLP this way), the budget
    still exact; where it binds, the units go elsewhere."""
    model = MODELS["vit"]
    heads, neurons = _sizes(model)
    hs = [torch.ones(h) for h in heads]
    ns = [torch.full((n,), 1e-3) if i == 0 else torch.ones(n) for i, n in enumerate(neurons)]  # layer 0 goes first
    minimums = [30, 2, 2]
    plan = select_plan(model, hs, ns, target_sparsity=target, min_neurons_per_layer=minimums)
    assert all(len(plan.neurons[i]) >= m for i, m in enumerate(minimums))
    assert len(plan.neurons[0]) <= 31  # the lowest scores, cut to the minimum (one more may close the slack)
    dense, kept = _totals(model, plan, False)
    assert 0 <= (1 - target) * dense - kept < _unit_costs(model, False)[1][0]
    with pytest.raises(ValueError, match="min_neurons_per_layer gives 2 minimums, but the model has 3 layers"):
        select_plan(model, hs, ns, target_sparsity=target, min_neurons_per_layer=[1, 1])
    with pytest.raises(ValueError, match=r"min_heads_per_layer\[1\] must be an integer >= 0"):
        select_plan(model, hs, ns, target_sparsity=target, min_heads_per_layer=[1, -1, 1])
    with pytest.raises(ValueError, match="the minimum 4/4/1 heads per layer"):
        select_plan(model, hs, ns, target_sparsity=0.7, min_heads_per_layer=[4, 4, 1])


def test_min_zero_may_remove_a_whole_branch():
    model = MODELS["vit"]
    heads, neurons = _sizes(model)
    hs = [torch.full((h,), 1e-6) if i == 1 else torch.ones(h) for i, h in enumerate(heads)]
    ns = [torch.ones(n) for n in neurons]
    plan = select_plan(model, hs, ns, target_sparsity=0.2, min_heads_per_layer=0)
    assert plan.heads[1] == [] and plan.allow_empty_attention
    compacted = apply_plan(copy.deepcopy(model), plan)
    assert compacted(pixel_values=torch.randn(1, 3, 16, 16)).logits.shape == (1, 3)


def test_only_neurons_or_only_heads():
    model = MODELS["vit"]
    hs, ns = _scores(model, 1, "uniform")
    plan = select_plan(model, None, ns, target_sparsity=0.2, prune_heads=False)
    assert plan.heads == {} and model_stats(model, plan).params <= 0.8 * model_stats(model).params
    plan = select_plan(model, hs, None, target_sparsity=0.2, prune_neurons=False)
    assert plan.neurons == {}
    dense, kept = _totals(model, plan, False)
    assert 0 <= 0.8 * dense - kept < _unit_costs(model, False)[0][0]  # granularity: one head


def test_scores_on_any_dtype_and_device_type():
    model = MODELS["vit"]
    hs, ns = _scores(model, 5, "uniform")
    plan = select_plan(model, hs, ns, target_sparsity=0.4)
    assert plan == select_plan(model, [h.float() for h in hs], [n.float() for n in ns], target_sparsity=0.4)


# --------------------------------------------------------------------------- errors


@pytest.fixture
def vit_scores():
    return _scores(MODELS["vit"], 0, "uniform")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "exactly one of target_sparsity"),
        ({"target_sparsity": 0.3, "target_flops_reduction": 0.3}, "exactly one of target_sparsity"),
        ({"target_sparsity": 1.0}, r"target_sparsity=1\.0 must lie strictly between 0 and 1"),
        ({"target_flops_reduction": -0.1}, r"target_flops_reduction=-0\.1 must lie strictly between 0 and 1"),
        ({"target_sparsity": 0.3, "min_heads_per_layer": -1}, "min_heads_per_layer must be an integer >= 0"),
        ({"target_sparsity": 0.3, "round_neurons_to": 0}, "round_neurons_to must be an integer >= 1"),
    ],
)
def test_bad_arguments(vit_scores, kwargs, match):
    with pytest.raises(ValueError, match=match):
        select_plan(MODELS["vit"], *vit_scores, **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"budget": Budget("params", 0.3), "target_sparsity": 0.3}, "Give either budget or target_sparsity"),
        ({"budget": 0.3}, "budget must be a hf_vitprune.budget.Budget, got float"),
        ({"target_sparsity": 0.3, "scores": {"heads": []}}, r"scores names 'heads'; pass that with head_scores"),
        ({"target_sparsity": 0.3, "minimums": {"neurons": 2}}, r"minimums names 'neurons'; .* min_neurons_per_layer"),
        ({"target_sparsity": 0.3, "roundings": {"rows": 2}}, r"roundings names unknown unit kind 'rows'; registered"),
        ({"target_sparsity": 0.3, "scores": [1.0]}, "scores must map unit kind names to values, got list"),
    ],
)
def test_bad_budget_or_kind_arguments(vit_scores, kwargs, match):
    with pytest.raises(ValueError, match=match):
        select_plan(MODELS["vit"], *vit_scores, **kwargs)


def test_bad_scores(vit_scores):
    model = MODELS["vit"]
    hs, ns = vit_scores
    with pytest.raises(ValueError, match="head_scores has 2 tensors but the model has 3 encoder layers"):
        select_plan(model, hs[:2], ns, target_sparsity=0.3)
    with pytest.raises(ValueError, match=r"neuron_scores\[1\] has shape \(36,\), but layer 1 has 37 units"):
        select_plan(model, hs, [ns[0], ns[1][:36], ns[2]], target_sparsity=0.3)
    with pytest.raises(ValueError, match=r"head_scores\[0\] has shape \(4, 1\)"):
        select_plan(model, [hs[0][:, None], *hs[1:]], ns, target_sparsity=0.3)
    for bad in (float("nan"), float("inf")):
        broken = [h.clone() for h in hs]
        broken[2][1] = bad
        with pytest.raises(ValueError, match=r"head_scores\[2\] has non-finite values .* at indices \[1\]"):
            select_plan(model, broken, ns, target_sparsity=0.3)
    with pytest.raises(ValueError, match="neuron_scores is None"):
        select_plan(model, hs, None, target_sparsity=0.3)


def test_unreachable_because_of_minimums(vit_scores):
    with pytest.raises(ValueError, match="target_sparsity=0.6 is unreachable") as info:
        select_plan(MODELS["vit"], *vit_scores, target_sparsity=0.6, min_heads_per_layer=4)
    message = str(info.value)
    assert "minimum 4 heads per layer" in message and "lower target_sparsity to at most" in message
    assert "min_heads_per_layer" in message


def test_unreachable_because_a_kind_is_not_pruned(vit_scores):
    with pytest.raises(ValueError, match="target_flops_reduction=0.6 is unreachable") as info:
        select_plan(MODELS["vit"], *vit_scores, target_flops_reduction=0.6, prune_neurons=False)
    message = str(info.value)
    assert "prune_neurons=False" in message and "set prune_neurons=True" in message and "FLOPs" in message
    # the reported maximum is reachable
    reachable = float(message.split("lower target_flops_reduction to at most ")[1].split(",")[0].rstrip("."))
    plan = select_plan(MODELS["vit"], *vit_scores, target_flops_reduction=reachable, prune_neurons=False)
    assert model_stats(MODELS["vit"], plan).flops <= (1 - reachable) * model_stats(MODELS["vit"]).flops
