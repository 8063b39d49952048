"""Choosing which units (heads, MLP neurons, other kinds) to keep so that the model hits a budget exactly.

:func:`select_plan` turns per-unit scores into a :class:`~hf_vitprune.plan.PruningPlan` whose
compacted model keeps at most ``(1 - target) * dense`` parameters (or FLOPs), as predicted by
:func:`~hf_vitprune.stats.model_stats`, and falls short of that by less than one unit's cost.

Algorithm (greedy by score density, then a fill step and an exchange step)
--------------------------------------------------------------------------
1. *Units and blocks.* In every layer the units of each kind (``architectures.UNIT_KINDS``:
   heads, neurons, ...) are ordered by score, highest first, ties by index. The first ``m`` of
   them are *mandatory*, where ``m`` is the per-layer minimum rounded up to a multiple of the
   rounding (capped at the layer width). The rest are cut into *blocks* of ``round_*_to``
   consecutive units (the last block of a layer may be the shorter remainder), so that every
   kept count is a multiple of the rounding or the whole layer. A block's cost is the sum of
   its units' costs (``stats.layer_cost``: parameters or FLOPs, so heterogeneous per-layer
   widths are costed correctly) and its *density* is its score sum divided by its cost. Within
   a layer densities never increase along the order, so keeping a prefix of a layer's blocks is
   what the greedy below does anyway; the code enforces it (a block is eligible only if its
   predecessor is kept).
2. *Greedy.* All blocks of all layers and kinds are ranked globally by density (ties by
   layer, then kind in registry order, so heads before neurons, then position, so every
   process derives the same ranking) and taken in that order whenever they still fit.
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

Idempotence, as far as it holds: scores that are positive exactly on a plan's support select
that plan again whenever its slack is below the cheapest prunable block. Above that (possible
with rounding: kept short tail blocks could close the gap, but the exchange step, which drops
kept blocks worst first, did not find a tighter set), the order of the new scores may let the
exchange step find one: re-selection returns the plan or a strictly tighter one, never a
looser one.

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

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .architectures import (
    BUILTIN_UNIT_KINDS,
    UNIT_KINDS,
    UnitKind,
    find_encoder_layers,
    find_shared_position_bias,
    layer_tokens,
)
from .plan import PruningPlan
from .stats import layer_cost, model_stats


@dataclass(frozen=True)
class Budget:
    """What a pruning run must remove: a fraction of the parameters, of the forward FLOPs, or of the
    latency measured on this machine (``latency``: only methods that measure, token pruning).

    The one place the range is checked: ``fraction`` lies strictly between 0 and 1. Build it
    from a config with ``PruningConfig.budget`` or from the two keyword targets with
    :meth:`from_targets`.
    """

    metric: str  # "params", "flops" or "latency"
    fraction: float

    METRICS = {"params": "target_sparsity", "flops": "target_flops_reduction", "latency": "target_latency_reduction"}

    def __post_init__(self):
        if self.metric not in self.METRICS:
            raise ValueError(f"Budget.metric={self.metric!r} is unknown; use 'params', 'flops' or 'latency'.")
        value = self.fraction
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(
                f"{self.target_name}={value!r} must be a number (the fraction of the {self.unit_name} to remove), "
                f"e.g. 0.4, not a {type(value).__name__}."
            )
        if not math.isfinite(value) or not 0 < value < 1:
            raise ValueError(
                f"{self.target_name}={value!r} must lie strictly between 0 and 1 (the fraction of the "
                f"{self.unit_name} to remove), e.g. 0.4."
            )
        object.__setattr__(self, "fraction", float(value))

    @property
    def target_name(self) -> str:
        """The keyword a user sets for this budget: ``target_sparsity`` or ``target_flops_reduction``."""
        return self.METRICS[self.metric]

    @property
    def unit_name(self) -> str:
        return {"params": "parameters", "flops": "FLOPs", "latency": "latency"}[self.metric]

    @property
    def uses_flops(self) -> bool:
        return self.metric == "flops"

    def measure(self, stats) -> int:
        """The quantity this budget counts in a :class:`~hf_vitprune.stats.ModelStats`."""
        if self.metric == "latency":
            raise ValueError("A latency budget is measured on the machine, not counted in model statistics.")
        return stats.flops if self.uses_flops else stats.params

    @classmethod
    def from_targets(cls, target_sparsity: float | None = None, target_flops_reduction: float | None = None,
                     target_latency_reduction: float | None = None) -> Budget:
        """The budget of exactly one of the targets; a ValueError names the fix otherwise."""
        given = {metric: value for metric, value in (("params", target_sparsity), ("flops", target_flops_reduction),
                                                     ("latency", target_latency_reduction)) if value is not None}
        if len(given) != 1:
            raise ValueError(
                "Give exactly one of target_sparsity (fraction of parameters to remove), target_flops_reduction "
                "(fraction of FLOPs to remove) and target_latency_reduction (fraction of the measured latency to "
                f"remove, token pruning only); got target_sparsity={target_sparsity!r}, "
                f"target_flops_reduction={target_flops_reduction!r}, "
                f"target_latency_reduction={target_latency_reduction!r}."
            )
        ((metric, value),) = given.items()
        return cls(metric, value)


@dataclass(frozen=True)
class _Choice:
    """How one unit kind takes part in a selection, and what error messages call its settings."""

    kind: UnitKind
    keyword: bool  # set through select_plan's head_/neuron_ keywords rather than the dicts
    pruned: bool
    minimum: int | tuple[int, ...]  # as given; select_plan makes it one per layer
    rounding: int
    scores: Sequence[torch.Tensor] | None

    def _name(self, keyword: str, dictionary: str) -> str:
        return keyword if self.keyword else f"{dictionary}[{self.kind.name!r}]"

    @property
    def scores_name(self) -> str:
        return self._name(f"{self.kind.singular}_scores", "scores")

    @property
    def min_name(self) -> str:
        return self._name(f"min_{self.kind.name}_per_layer", "minimums")

    @property
    def round_name(self) -> str:
        return self._name(f"round_{self.kind.name}_to", "roundings")

    @property
    def not_pruned_because(self) -> str:
        return f"prune_{self.kind.name}=False" if self.keyword else f"no scores[{self.kind.name!r}] were given"

    @property
    def enable(self) -> str:
        return f"set prune_{self.kind.name}=True" if self.keyword else f"pass scores[{self.kind.name!r}]"


@dataclass
class _Block:
    chain: int  # one chain per (layer, kind): its blocks must be kept as a prefix
    position: int  # position in the chain (0 = best)
    layer: int
    kind: int  # position of the kind in the registry
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


def _check_minimum(name: str, value) -> int | tuple[int, ...]:
    """A minimum for every layer (an int) or one per layer (a sequence of ints), checked."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        return tuple(_check_int(f"{name}[{i}]", v, 0) for i, v in enumerate(value))
    return _check_int(name, value, 0)


def _per_layer(name: str, minimum: int | tuple[int, ...], layers: int) -> tuple[int, ...]:
    """``minimum`` (checked by :func:`_check_minimum`) as one value per layer."""
    if not isinstance(minimum, tuple):
        return (minimum,) * layers
    if len(minimum) != layers:
        raise ValueError(f"{name} gives {len(minimum)} minimums, but the model has {layers} layers; give one per "
                         f"layer, or one int for all.")
    return minimum


def _mandatory_count(width: int, minimum: int, multiple: int) -> int:
    return min(width, -(-minimum // multiple) * multiple)


def _resolve_budget(
    budget: Budget | None, target_sparsity: float | None, target_flops_reduction: float | None
) -> Budget:
    if budget is None:
        return Budget.from_targets(target_sparsity, target_flops_reduction)
    if not isinstance(budget, Budget):
        raise ValueError(f"budget must be a hf_vitprune.budget.Budget, got {type(budget).__name__}.")
    if target_sparsity is not None or target_flops_reduction is not None:
        raise ValueError(
            f"Give either budget or target_sparsity / target_flops_reduction, not both; got budget={budget!r}, "
            f"target_sparsity={target_sparsity!r}, target_flops_reduction={target_flops_reduction!r}."
        )
    return budget


def _per_other_kind(name: str, value: Mapping | None, keyword: str) -> dict:
    """``value`` (kind name -> setting) checked to name only registered kinds other than heads and neurons,
    which have keywords (``keyword`` formatted with the kind's ``name`` and ``singular``)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{name} must map unit kind names to values, got {type(value).__name__}.")
    for kind in value:
        if kind in BUILTIN_UNIT_KINDS:
            spelled = keyword.format(name=kind, singular=UNIT_KINDS[kind].singular)
            raise ValueError(f"{name} names {kind!r}; pass that with {spelled} instead.")
        if kind not in UNIT_KINDS:
            raise ValueError(f"{name} names unknown unit kind {kind!r}; registered kinds are {list(UNIT_KINDS)}.")
    return dict(value)


def _choices(keywords: dict[str, tuple], scores, minimums, roundings) -> list[_Choice]:
    """One choice per registered kind, in registry order; ``keywords[kind]`` is (scores, minimum, rounding, pruned)."""
    scores = _per_other_kind("scores", scores, "{singular}_scores")
    minimums = _per_other_kind("minimums", minimums, "min_{name}_per_layer")
    roundings = _per_other_kind("roundings", roundings, "round_{name}_to")
    choices = []
    for kind in UNIT_KINDS.values():
        if kind.name in keywords:
            given, minimum, rounding, pruned = keywords[kind.name]
            choices.append(_Choice(kind, True, bool(pruned), minimum, rounding, given))
        else:
            choices.append(_Choice(kind, False, kind.name in scores, minimums.get(kind.name, 1),
                                   roundings.get(kind.name, 1), scores.get(kind.name)))
    for choice in choices:
        if choice.pruned and not choice.kind.linear_cost:
            raise ValueError(
                f"Unit kind {choice.kind.name!r} cannot be selected by a budget: its units cut across another kind's "
                f"(linear_cost=False), so their cost is not additive. Compact it first (apply_plan), then select."
            )
    choices = [dataclasses.replace(c, minimum=_check_minimum(c.min_name, c.minimum)) for c in choices]
    for choice in choices:
        _check_int(choice.round_name, choice.rounding, 1)
    return choices


def unit_costs(model: nn.Module, budget: Budget) -> dict[str, list[int]]:
    """What one unit of every kind costs in every layer, in the budget's measure (parameters or FLOPs).

    The accounting is the one ``model_stats`` uses for a plan (a shared BEiT bias table becomes
    per layer), so whoever trades units against each other (the selection below, a method that
    puts scores of different kinds on one scale) prices them as the budget will.
    """
    layers = find_encoder_layers(model)
    shared = find_shared_position_bias(model)
    shared_rows = getattr(*shared).relative_position_bias_table.shape[0] if shared is not None else 0
    costs = [layer_cost(layer, tokens, shared_rows) for layer, tokens in zip(layers, layer_tokens(model))]
    return {name: [(c.unit_flops if budget.uses_flops else c.unit_params)[name] for c in costs] for name in UNIT_KINDS}


def select_plan(
    model: nn.Module,
    head_scores: Sequence[torch.Tensor] | None = None,
    neuron_scores: Sequence[torch.Tensor] | None = None,
    *,
    target_sparsity: float | None = None,
    target_flops_reduction: float | None = None,
    budget: Budget | None = None,
    min_heads_per_layer: int | Sequence[int] = 1,
    min_neurons_per_layer: int | Sequence[int] = 1,
    round_heads_to: int = 1,
    round_neurons_to: int = 1,
    prune_heads: bool = True,
    prune_neurons: bool = True,
    scores: Mapping[str, Sequence[torch.Tensor]] | None = None,
    minimums: Mapping[str, int] | None = None,
    roundings: Mapping[str, int] | None = None,
) -> PruningPlan:
    """The plan that keeps the highest-scoring units within a parameter or FLOPs budget.

    Args:
        model: the dense (or masked, never compacted-by-this-plan) model the plan indexes into.
        head_scores / neuron_scores: one 1-D tensor per encoder layer, of length ``num_heads`` /
            ``num_neurons``; higher means more worth keeping. Any device and float dtype (they are
            compared in float64 on CPU). May be ``None`` when that kind is not pruned.
        target_sparsity: fraction of the model's total parameters (``model_stats(model).params``)
            to remove, strictly between 0 and 1.
        target_flops_reduction: fraction of the forward FLOPs (``model_stats(model).flops``) to
            remove, strictly between 0 and 1. Give exactly one of the two targets, or ``budget``.
        budget: the same as a :class:`Budget` (e.g. ``PruningConfig.budget``), instead of a target.
        min_heads_per_layer / min_neurons_per_layer: every layer keeps at least this many (0 lets
            a whole branch go; the plan then sets ``allow_empty_*``); a sequence gives one per layer.
        round_heads_to / round_neurons_to: every layer keeps a multiple of this many (or all).
        prune_heads / prune_neurons: when False that kind is kept whole and costs budget.
        scores / minimums / roundings: the same, by kind name, for other registered unit kinds
            (``architectures.register_unit_kind``); a kind is pruned when it has scores, else kept
            whole. Minimums and roundings default to 1.

    Returns a plan listing every layer of each pruned kind, kept indices sorted. The predicted
    kept total (``model_stats(model, plan)``) is at most the budget and short of it by less than
    the cost of one prunable unit (one block of ``round_*_to`` units when rounding); see the
    module docstring for the algorithm. Deterministic: equal scores give equal plans everywhere.

    Raises ValueError for no or both targets, a target not strictly between 0 and 1, scores of the
    wrong number or shape, non-finite scores, bad minimums or roundings, unknown unit kinds, or a
    budget that the units which cannot be pruned (non-prunable parameters, minimums, kinds not
    pruned) already exceed.
    """
    budget = _resolve_budget(budget, target_sparsity, target_flops_reduction)
    keywords = {
        "heads": (head_scores, min_heads_per_layer, round_heads_to, prune_heads),
        "neurons": (neuron_scores, min_neurons_per_layer, round_neurons_to, prune_neurons),
    }
    choices = _choices(keywords, scores, minimums, roundings)
    kinds = range(len(choices))

    layers = find_encoder_layers(model)
    choices = [dataclasses.replace(c, minimum=_per_layer(c.min_name, c.minimum, len(layers))) for c in choices]
    widths = [[choice.kind.count(layer) for layer in layers] for choice in choices]
    checked = [
        _check_scores(choice.scores_name, choice.scores, sizes) if choice.pruned else None
        for choice, sizes in zip(choices, widths)
    ]

    per_kind = unit_costs(model, budget)
    unit_cost = [per_kind[choice.kind.name] for choice in choices]
    dense = budget.measure(model_stats(model))
    full = budget.measure(model_stats(model, PruningPlan()))
    fixed = full - sum(unit_cost[k][i] * widths[k][i] for k in kinds for i in range(len(layers)))
    limit = (1.0 - budget.fraction) * dense

    # Mandatory units and blocks.
    mandatory_cost = [0 for _ in kinds]
    unpruned_cost = [0 for _ in kinds]
    mandatory: list[list[list[int]]] = [[[] for _ in layers] for _ in kinds]
    blocks: list[_Block] = []
    chains: list[list[_Block]] = []
    for kind, choice in enumerate(choices):
        for i in range(len(layers)):
            width, cost = widths[kind][i], unit_cost[kind][i]
            if not choice.pruned:
                unpruned_cost[kind] += width * cost
                continue
            score = checked[kind][i].tolist()
            order = sorted(range(width), key=lambda j: (-score[j], j))
            m = _mandatory_count(width, choice.minimum[i], choice.rounding)
            mandatory[kind][i] = order[:m]
            mandatory_cost[kind] += m * cost
            chain: list[_Block] = []
            density = math.inf
            for start in range(m, width, choice.rounding):
                units = order[start : start + choice.rounding]
                block_cost = len(units) * cost
                # densities are non-increasing along a chain mathematically; cummin guards float noise
                density = min(density, sum(score[j] for j in units) / block_cost)
                chain.append(_Block(len(chains), len(chain), i, kind, units, block_cost, density))
            chains.append(chain)
            blocks.extend(chain)

    base = fixed + sum(mandatory_cost) + sum(unpruned_cost)
    if base > limit:
        _raise_unreachable(budget, dense, limit, base, fixed, mandatory_cost, unpruned_cost, choices)

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
        if total + block.cost <= limit:
            kept_count[block.chain] += 1
            total += block.cost
        else:
            broken[block.chain] = True

    # Fill and exchange, while the slack is at least the cheapest prunable block.
    cheapest = min((b.cost for b in blocks), default=0)
    for _ in range(4 * len(blocks) + 4):
        if not blocks or limit - total < cheapest:
            break
        added = _fill(chains, kept_count, limit, total)
        if added:
            total += added
            continue
        exchanged = _exchange(blocks, chains, kept_count, limit, total, cheapest)
        if exchanged is None:
            break
        total += exchanged

    plan = _as_plan(len(layers), choices, mandatory, chains, kept_count)
    predicted_total = budget.measure(model_stats(model, plan))
    if predicted_total != total:  # the cost model and model_stats disagree: a bug, not a user error
        raise RuntimeError(f"select_plan predicted {total} but model_stats gives {predicted_total}; please report.")
    return plan


def _fill(chains: list[list[_Block]], kept_count: list[int], limit: float, total: int) -> int:
    """Add the next block of every chain that still fits, best first; return the cost added."""
    added = 0
    while True:
        candidates = [chain[kept_count[c]] for c, chain in enumerate(chains) if kept_count[c] < len(chain)]
        fitting = [b for b in candidates if total + added + b.cost <= limit]
        if not fitting:
            return added
        best = min(fitting, key=lambda b: b.rank)
        kept_count[best.chain] += 1
        added += best.cost


def _exchange(
    blocks: list[_Block], chains: list[list[_Block]], kept_count: list[int], limit: float, total: int, cheapest: int
) -> int | None:
    """Add one skipped block and drop cheaper low-density kept blocks if that shrinks the slack.

    Returns the change in the kept total, or None when no exchange helps.
    """
    slack = limit - total
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


def _as_plan(num_layers: int, choices: list[_Choice], mandatory, chains, kept_count) -> PruningPlan:
    kept = [[list(m) for m in per_kind] for per_kind in mandatory]
    for c, chain in enumerate(chains):
        for block in chain[: kept_count[c]]:
            kept[block.kind][block.layer].extend(block.units)
    units = {
        choice.kind.name: {i: sorted(kept[k][i]) for i in range(num_layers)}
        for k, choice in enumerate(choices)
        if choice.pruned
    }
    emptied = [name for name, per_layer in units.items() if any(not v for v in per_layer.values())]
    return PruningPlan.of(units, allow_empty=emptied)


def _raise_unreachable(budget, dense, limit, base, fixed, mandatory_cost, unpruned_cost, choices) -> None:
    """Say what must stay and how to make the budget reachable; kinds absent from the model go unmentioned."""
    named = [k for k, c in enumerate(choices) if c.keyword or c.pruned or unpruned_cost[k]]
    parts = [f"{fixed} in parts that are never pruned (embeddings, norms, classifier, output biases)"]
    for k in named:
        choice, name = choices[k], choices[k].kind.name
        if not choice.pruned:
            parts.append(f"{unpruned_cost[k]} for all {name}, since {choice.not_pruned_because}")
        elif mandatory_cost[k]:
            rounding = f" rounded up to a multiple of {choice.rounding}" if choice.rounding > 1 else ""
            minimum = choice.minimum[0] if len(set(choice.minimum)) == 1 else "/".join(map(str, choice.minimum))
            parts.append(f"{mandatory_cost[k]} for the minimum {minimum} {name} per layer{rounding}")
    reachable = max(0.0, 1.0 - base / dense)
    fixes = [f"lower {budget.target_name} to at most {math.floor(reachable * 1e4) / 1e4:.4f}"]
    if any(max(c.minimum, default=0) > 0 and c.pruned for c in choices):
        others = [c for c in choices if not c.keyword and c.pruned and max(c.minimum, default=0) > 0]
        minimum_names = [c.min_name for c in choices if c.keyword] + [c.min_name for c in others]
        rounding_names = ["round_*_to"] + [c.round_name for c in others]
        fixes.append(f"lower {' / '.join(minimum_names)} or the {' / '.join(rounding_names)} multiples")
    fixes += [choices[k].enable for k in named if not choices[k].pruned]
    what = budget.unit_name
    raise ValueError(
        f"{budget.target_name}={budget.fraction} is unreachable: it keeps at most {limit:.0f} of the model's {dense} "
        f"{what}, but {base} must stay ({'; '.join(parts)}). At most {reachable:.2%} of the {what} can be removed "
        f"this way. Fix: {', or '.join(fixes)}."
    )
