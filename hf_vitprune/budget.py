"""Choosing which heads and MLP neurons to keep so that the compacted model hits a budget exactly.

:func:`select_plan` turns per-unit scores into a :class:`~hf_vitprune.plan.PruningPlan` whose
compacted model keeps at most ``(1 - target) * dense`` parameters (or FLOPs), as predicted by
:func:`~hf_vitprune.stats.model_stats`, and falls short of that by less than one unit's cost.

Algorithm (greedy by score density, then a fill step and an exchange step)
--------------------------------------------------------------------------
1. *Units and blocks.* In every layer the heads (and, separately, the neurons) are ordered by
   score, highest first, ties by index. The first ``m`` of them are *mandatory*, where ``m`` is
   the per-layer minimum rounded up to a multiple of the rounding (capped at the layer width).
   The rest are cut into *blocks* of ``round_*_to`` consecutive units (the last block of a layer
   may be the shorter remainder), so that every kept count is a multiple of the rounding or the
   whole layer. A block's cost is the sum of its units' costs (``stats.layer_cost``: parameters
   or FLOPs, so heterogeneous per-layer widths are costed correctly) and its *density* is its
   score sum divided by its cost. Within a layer densities never increase along the order, so
   keeping a prefix of a layer's blocks is what the greedy below does anyway; the code enforces
   it (a block is eligible only if its predecessor is kept).
2. *Greedy.* All blocks of all layers and both kinds are ranked globally by density (ties by
   layer, then heads before neurons, then unit index, so every process derives the same
   ranking) and taken in that order whenever they still fit in the budget.
3. *Fill and exchange.* The greedy leaves a slack smaller than the cost of every block it
   skipped. When heads are both expensive and low-density, the skipped blocks may all be heads
   and the slack up to one head's cost, although cheaper neurons could close it. The exchange
   step then adds the best skipped block ``d`` and drops the lowest-density kept blocks that are
   cheaper than ``d`` until the plan fits again; it is applied only if it strictly reduces the
   slack, followed by a fill (add any skipped block that fits, best first), and repeated while
   the slack is at least the cost of the cheapest prunable block. Both steps keep, among units of
   the same kind and cost, a highest-density set (the exchanged-in block is the best skipped one
   of its cost; the removed ones are the worst kept ones of theirs).

Guarantee: the kept total never exceeds the budget (at least the requested fraction is removed)
and falls short of it by less than the cost of the cheapest block that could still be kept,
normally one MLP neuron; with ``round_*_to > 1`` a block is several units, so the shortfall can
be up to one block. With only heads prunable it can be up to one head.

Why this is the Euclidean projection of ADMM's Z-step: for the group-sparse set S (whole heads
and neurons zero), the squared distance from W to its projection onto a support is the sum of
the squared norms of the groups dropped, so the projection keeps the support that maximises
the kept sum of squared group norms under the budget. When all units of a kind cost the same
and the budget is a count per kind, that is "keep the k largest", which the greedy returns
exactly (equal cost means density order is score order). With mixed costs the problem is a
knapsack; greedy by density is its standard solution, optimal for the fractional relaxation
and off by at most the one block that does not fit, which is below the budget's granularity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .architectures import find_encoder_layers, find_shared_position_bias, num_tokens
from .plan import PruningPlan
from .stats import layer_cost, model_stats

HEADS, NEURONS = 0, 1
_KIND_NAMES = ("heads", "neurons")


@dataclass
class _Block:
    chain: int  # one chain per (layer, kind): its blocks must be kept as a prefix
    position: int  # position in the chain (0 = best)
    layer: int
    kind: int
    units: list[int]
    cost: int
    density: float
    rank: int = -1  # position in the global ranking (0 = kept first)


def _check_scores(name: str, scores: Sequence[torch.Tensor] | None, sizes: list[int]) -> list[torch.Tensor]:
    if scores is None:
        raise ValueError(f"{name} is None; pass one score tensor per encoder layer ({len(sizes)} layers).")
    scores = list(scores)
    if len(scores) != len(sizes):
        raise ValueError(
            f"{name} has {len(scores)} tensors but the model has {len(sizes)} encoder layers; pass one per layer."
        )
    result = []
    for index, (score, size) in enumerate(zip(scores, sizes)):
        score = torch.as_tensor(score).detach()
        if tuple(score.shape) != (size,):
            raise ValueError(
                f"{name}[{index}] has shape {tuple(score.shape)}, but layer {index} has {size} units; "
                f"expected shape ({size},)."
            )
        score = score.to(device="cpu", dtype=torch.float64)
        if not torch.isfinite(score).all():
            bad = (~torch.isfinite(score)).nonzero().flatten().tolist()
            raise ValueError(
                f"{name}[{index}] has non-finite values (NaN or inf) at indices {bad}; scores must be finite."
            )
        result.append(score)
    return result


def _check_int(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return value


def _mandatory_count(width: int, minimum: int, multiple: int) -> int:
    return min(width, -(-minimum // multiple) * multiple)


def select_plan(
    model: nn.Module,
    head_scores: Sequence[torch.Tensor] | None,
    neuron_scores: Sequence[torch.Tensor] | None,
    *,
    target_sparsity: float | None = None,
    target_flops_reduction: float | None = None,
    min_heads_per_layer: int = 1,
    min_neurons_per_layer: int = 1,
    round_heads_to: int = 1,
    round_neurons_to: int = 1,
    prune_heads: bool = True,
    prune_neurons: bool = True,
) -> PruningPlan:
    """The plan that keeps the highest-scoring heads and neurons within a parameter or FLOPs budget.

    Args:
        model: the dense (or masked, never compacted-by-this-plan) model the plan indexes into.
        head_scores / neuron_scores: one 1-D tensor per encoder layer, of length ``num_heads`` /
            ``num_neurons``; higher means more worth keeping. Any device and float dtype (they are
            compared in float64 on CPU). May be ``None`` when that kind is not pruned.
        target_sparsity: fraction of the model's total parameters (``model_stats(model).params``)
            to remove, in [0, 1).
        target_flops_reduction: fraction of the forward FLOPs (``model_stats(model).flops``) to
            remove, in [0, 1). Give exactly one of the two targets.
        min_heads_per_layer / min_neurons_per_layer: every layer keeps at least this many (0 lets
            a whole branch go; the plan then sets ``allow_empty_*``).
        round_heads_to / round_neurons_to: every layer keeps a multiple of this many (or all).
        prune_heads / prune_neurons: when False that kind is kept whole and costs budget.

    Returns a plan listing every layer of each pruned kind, kept indices sorted. The predicted
    kept total (``model_stats(model, plan)``) is at most the budget and short of it by less than
    the cost of one prunable unit (one block of ``round_*_to`` units when rounding); see the
    module docstring for the algorithm. Deterministic: equal scores give equal plans everywhere.

    Raises ValueError for no or both targets, a target outside [0, 1), scores of the wrong number
    or shape, non-finite scores, bad minimums or roundings, or a budget that the units which cannot
    be pruned (non-prunable parameters, minimums, kinds not pruned) already exceed.
    """
    if (target_sparsity is None) == (target_flops_reduction is None):
        raise ValueError(
            "Give exactly one of target_sparsity (fraction of parameters to remove) and "
            f"target_flops_reduction (fraction of FLOPs to remove); got target_sparsity={target_sparsity!r}, "
            f"target_flops_reduction={target_flops_reduction!r}."
        )
    use_flops = target_flops_reduction is not None
    target_name = "target_flops_reduction" if use_flops else "target_sparsity"
    target = target_flops_reduction if use_flops else target_sparsity
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 <= float(target) < 1.0:
        raise ValueError(f"{target_name} must be a fraction in [0, 1), got {target!r}.")
    target = float(target)
    minimums = (_check_int("min_heads_per_layer", min_heads_per_layer, 0),
                _check_int("min_neurons_per_layer", min_neurons_per_layer, 0))
    roundings = (_check_int("round_heads_to", round_heads_to, 1), _check_int("round_neurons_to", round_neurons_to, 1))
    pruned = (bool(prune_heads), bool(prune_neurons))

    layers = find_encoder_layers(model)
    widths = ([layer.num_heads for layer in layers], [layer.num_neurons for layer in layers])
    scores = [
        _check_scores(name, given, sizes) if prune else None
        for name, given, sizes, prune in zip(
            ("head_scores", "neuron_scores"), (head_scores, neuron_scores), widths, pruned
        )
    ]

    # Costs, in the accounting model_stats uses for a plan (a shared BEiT bias becomes per layer).
    tokens = num_tokens(model)
    shared = find_shared_position_bias(model)
    shared_rows = getattr(*shared).relative_position_bias_table.shape[0] if shared is not None else 0
    costs = [layer_cost(layer, tokens, shared_rows) for layer in layers]
    unit_cost = [
        [c.flops_per_head if use_flops else c.params_per_head for c in costs],
        [c.flops_per_neuron if use_flops else c.params_per_neuron for c in costs],
    ]
    dense_stats = model_stats(model)
    dense = dense_stats.flops if use_flops else dense_stats.params
    full_stats = model_stats(model, PruningPlan())
    full = full_stats.flops if use_flops else full_stats.params
    fixed = full - sum(unit_cost[k][i] * widths[k][i] for k in (HEADS, NEURONS) for i in range(len(layers)))
    budget = (1.0 - target) * dense

    # Mandatory units and blocks.
    mandatory_cost = [0, 0]
    unpruned_cost = [0, 0]
    mandatory: list[list[list[int]]] = [[[] for _ in layers], [[] for _ in layers]]
    blocks: list[_Block] = []
    chains: list[list[_Block]] = []
    for kind in (HEADS, NEURONS):
        for i in range(len(layers)):
            width, cost = widths[kind][i], unit_cost[kind][i]
            if not pruned[kind]:
                unpruned_cost[kind] += width * cost
                continue
            score = scores[kind][i].tolist()
            order = sorted(range(width), key=lambda j: (-score[j], j))
            m = _mandatory_count(width, minimums[kind], roundings[kind])
            mandatory[kind][i] = order[:m]
            mandatory_cost[kind] += m * cost
            chain: list[_Block] = []
            density = math.inf
            for start in range(m, width, roundings[kind]):
                units = order[start : start + roundings[kind]]
                block_cost = len(units) * cost
                # densities are non-increasing along a chain mathematically; cummin guards float noise
                density = min(density, sum(score[j] for j in units) / block_cost)
                chain.append(_Block(len(chains), len(chain), i, kind, units, block_cost, density))
            chains.append(chain)
            blocks.extend(chain)

    base = fixed + sum(mandatory_cost) + sum(unpruned_cost)
    if base > budget:
        _raise_unreachable(
            target_name, target, dense, budget, base, fixed, mandatory_cost, unpruned_cost, minimums, roundings, pruned,
            "FLOPs" if use_flops else "parameters",
        )

    blocks.sort(key=lambda b: (-b.density, b.layer, b.kind, b.position))
    for rank, block in enumerate(blocks):
        block.rank = rank
    kept_count = [0] * len(chains)  # kept blocks per chain: a prefix
    total = base

    # Greedy by density.
    broken = [False] * len(chains)
    for block in blocks:
        if broken[block.chain]:
            continue
        if total + block.cost <= budget:
            kept_count[block.chain] += 1
            total += block.cost
        else:
            broken[block.chain] = True

    # Fill and exchange, while the slack is at least the cheapest prunable block.
    cheapest = min((b.cost for b in blocks), default=0)
    for _ in range(4 * len(blocks) + 4):
        if not blocks or budget - total < cheapest:
            break
        added = _fill(chains, kept_count, budget, total)
        if added:
            total += added
            continue
        exchanged = _exchange(blocks, chains, kept_count, budget, total, cheapest)
        if exchanged is None:
            break
        total += exchanged

    plan = _as_plan(layers, widths, pruned, mandatory, chains, kept_count, minimums)
    predicted = model_stats(model, plan)
    predicted_total = predicted.flops if use_flops else predicted.params
    if predicted_total != total:  # the cost model and model_stats disagree: a bug, not a user error
        raise RuntimeError(f"select_plan predicted {total} but model_stats gives {predicted_total}; please report.")
    return plan


def _fill(chains: list[list[_Block]], kept_count: list[int], budget: float, total: int) -> int:
    """Add the next block of every chain that still fits, best first; return the cost added."""
    added = 0
    while True:
        candidates = [chain[kept_count[c]] for c, chain in enumerate(chains) if kept_count[c] < len(chain)]
        fitting = [b for b in candidates if total + added + b.cost <= budget]
        if not fitting:
            return added
        best = min(fitting, key=lambda b: b.rank)
        kept_count[best.chain] += 1
        added += best.cost


def _exchange(
    blocks: list[_Block], chains: list[list[_Block]], kept_count: list[int], budget: float, total: int, cheapest: int
) -> int | None:
    """Add one skipped block and drop cheaper low-density kept blocks if that shrinks the slack.

    Returns the change in the kept total, or None when no exchange helps.
    """
    slack = budget - total
    candidates = sorted(
        (chain[kept_count[c]] for c, chain in enumerate(chains) if kept_count[c] < len(chain)), key=lambda b: b.rank
    )
    if not candidates:
        return None
    kept = [b for b in blocks if b.position < kept_count[b.chain]]
    kept.sort(key=lambda b: b.rank, reverse=True)  # worst first; within a chain, its tail first
    costs = torch.tensor([b.cost for b in kept], dtype=torch.int64)
    chain_ids = torch.tensor([b.chain for b in kept], dtype=torch.int64)
    best = None
    for d in candidates:
        need = d.cost - slack  # > 0, or _fill would have added d
        eligible = (costs < d.cost) & (chain_ids != d.chain)
        cumulative = torch.cumsum(torch.where(eligible, costs, 0), 0)
        position = int(torch.searchsorted(cumulative.double(), torch.tensor([need], dtype=torch.float64)).item())
        if position >= len(kept):
            continue
        new_slack = float(cumulative[position].item()) - need
        if new_slack >= slack:
            continue
        key = (new_slack >= cheapest, new_slack if new_slack >= cheapest else 0.0, d.rank)
        if best is None or key < best[0]:
            removed = [kept[j] for j in range(position + 1) if bool(eligible[j])]
            best = (key, d, removed)
    if best is None:
        return None
    _, d, removed = best
    kept_count[d.chain] += 1
    for block in removed:  # removed in worst-first order, so each is its chain's tail when removed
        if block.position != kept_count[block.chain] - 1:
            raise RuntimeError("select_plan exchanged a block that is not its layer's last kept one; please report.")
        kept_count[block.chain] -= 1
    return d.cost - sum(b.cost for b in removed)


def _as_plan(layers, widths, pruned, mandatory, chains, kept_count, minimums) -> PruningPlan:
    kept: list[list[list[int]]] = [[list(m) for m in mandatory[HEADS]], [list(m) for m in mandatory[NEURONS]]]
    for c, chain in enumerate(chains):
        for block in chain[: kept_count[c]]:
            kept[block.kind][block.layer].extend(block.units)
    heads = {i: sorted(kept[HEADS][i]) for i in range(len(layers))} if pruned[HEADS] else {}
    neurons = {i: sorted(kept[NEURONS][i]) for i in range(len(layers))} if pruned[NEURONS] else {}
    return PruningPlan(
        heads=heads,
        neurons=neurons,
        allow_empty_attention=any(not v for v in heads.values()),
        allow_empty_mlp=any(not v for v in neurons.values()),
    )


def _raise_unreachable(
    target_name, target, dense, budget, base, fixed, mandatory_cost, unpruned_cost, minimums, roundings, pruned, what
) -> None:
    parts = [f"{fixed} in parts that are never pruned (embeddings, norms, classifier, output biases)"]
    for kind in (HEADS, NEURONS):
        name = _KIND_NAMES[kind]
        if not pruned[kind]:
            parts.append(f"{unpruned_cost[kind]} for all {name}, since prune_{name}=False")
        elif mandatory_cost[kind]:
            rounding = f" rounded up to a multiple of {roundings[kind]}" if roundings[kind] > 1 else ""
            parts.append(f"{mandatory_cost[kind]} for the minimum {minimums[kind]} {name} per layer{rounding}")
    reachable = max(0.0, 1.0 - base / dense)
    fixes = [f"lower {target_name} to at most {math.floor(reachable * 1e4) / 1e4:.4f}"]
    if any(minimums[k] > 0 and pruned[k] for k in (HEADS, NEURONS)):
        fixes.append("lower min_heads_per_layer / min_neurons_per_layer or the round_*_to multiples")
    for kind in (HEADS, NEURONS):
        if not pruned[kind]:
            fixes.append(f"set prune_{_KIND_NAMES[kind]}=True")
    raise ValueError(
        f"{target_name}={target} is unreachable: it keeps at most {budget:.0f} of the model's {dense} {what}, but "
        f"{base} must stay ({'; '.join(parts)}). At most {reachable:.2%} of the {what} can be removed this way. "
        f"Fix: {', or '.join(fixes)}."
    )
