"""ADMM for structured (head / neuron) sparsity: the search GOHSP and the baselines share.

:class:`ADMMState` holds the Z and U tensors, the penalty, the projection and rho;
:class:`ADMMSearch` is the :class:`~hf_vitprune.methods.base.PruningMethod` built on it, which
subclasses complete with a ranking (:meth:`ADMMSearch.rank`) and the scores that decide each
projection (:meth:`ADMMSearch.projection_scores`).

The formulation is Zhang et al. 2018 ("A Systematic DNN Weight Pruning Framework using ADMM")
applied to groups: minimise ``f(W)`` subject to W having whole heads and MLP neurons zero and
fitting a budget. Training minimises the augmented loss ``f(W) + rho/2 * sum ||W - Z + U||^2``
(:meth:`ADMMState.penalty`, added to the loss in ``compute_loss``, never to ``.grad``); every k
steps :class:`ADMMSearch`

1. scores units from the importance and the group norms of W + U (the method's soft guideline),
2. picks the support with :func:`hf_vitprune.budget.select_plan` (identical on every process,
   since W, U and the importance are) -- or keeps the last support once it is frozen, for the
   last ``admm_freeze_fraction`` of the updates,
3. calls :meth:`ADMMState.update`: ``Z = Proj_plan(W + U)``, ``U = (U + W - Z) rho / rho_new``.

After the last W-step :meth:`ADMMState.hard_prune` zeroes W outside the *last Z's support* and
:func:`hf_vitprune.surgery.apply_plan` removes those groups. The primal residual
``||W - Z|| / ||W||`` at that moment says how far W was from Z: ADMM's guarantee assumes it is
small, so it is logged at every update and at the hard prune, and stated on the model card.

The prunable tensors of layer ``i`` are found structurally (:func:`find_encoder_layers`) and keyed
``"{i}.attention.q_proj.weight"``, ``"{i}.mlp.fc1.bias"`` and so on, so the same state works on a
model wrapped by DDP, ``torch.compile`` or accelerate. Per layer they are q/k/v weights and
biases (a head is ``head_dim`` rows), o_proj's weight (a head is ``head_dim`` columns), every MLP
input projection's weight and bias (a neuron is a row) and the output projection's weight (a
neuron is a column). Output biases and BEiT's relative position bias are not constrained
(``apply_plan`` slices the bias table itself).

Z and U are kept in at least float32, on the device of the weights they shadow; they follow the
model if it moves. Under FSDP (sharded parameters, :mod:`hf_vitprune.sharding`) each process keeps
the slices of Z and U that shadow its slices of W: the penalty is summed over local slices (each
process owns its slices' gradient), and the norms, projections and hard prune gather whole tensors,
one at a time, so every process derives the same plan.

U is the *scaled* dual variable (Y / rho), so it is rescaled by rho_old / rho_new whenever rho
grows (Boyd et al., "Distributed Optimization and Statistical Learning via ADMM", 3.4.1); Zhang
et al.'s code skips that, which lets the dual grow with rho.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.utils import logging

from ..architectures import EncoderLayer, find_encoder_layers
from ..budget import Budget, select_plan, unit_costs
from ..importance import UnitScores
from ..plan import PruningPlan
from ..sharding import full_tensor, has_sharded_parameters, local_tensor, shard_like, sum_over_shards
from ..stats import model_stats
from .admm_shrinking import SupportHistory, keep_scores, reindex, unit_widths
from .base import MethodOptions, PruningMethod, SearchContext
from .base import option_help as _help  # every option documents itself

PLAN_KEY = "plan_json"


@dataclass(frozen=True)
class _Group:
    """One prunable tensor: ``key``, whether its units are heads, the dimension they index and their size."""

    key: str
    heads: bool
    dim: int
    unit: int


def _tensors(layer: EncoderLayer) -> list[tuple[_Group, torch.Tensor]]:
    i, head_dim = layer.index, layer.head_dim
    result = []
    for name in ("q_proj", "k_proj", "v_proj"):
        proj = getattr(layer.attention, name)
        result.append((_Group(f"{i}.attention.{name}.weight", True, 0, head_dim), proj.weight))
        if proj.bias is not None:
            result.append((_Group(f"{i}.attention.{name}.bias", True, 0, head_dim), proj.bias))
    result.append((_Group(f"{i}.attention.o_proj.weight", True, 1, head_dim), layer.attention.o_proj.weight))
    for name, proj in zip(layer.mlp_in_names, layer.mlp_in):
        result.append((_Group(f"{i}.mlp.{name}.weight", False, 0, 1), proj.weight))
        if proj.bias is not None:
            result.append((_Group(f"{i}.mlp.{name}.bias", False, 0, 1), proj.bias))
    result.append((_Group(f"{i}.mlp.{layer.mlp_out_name}.weight", False, 1, 1), layer.mlp_out.weight))
    return result


def prunable_tensors(model: nn.Module) -> dict[str, tuple[_Group, torch.Tensor, EncoderLayer]]:
    """Every tensor ADMM constrains, by structural key, with its grouping and layer."""
    result = {}
    for layer in find_encoder_layers(model):
        if not all(hasattr(layer.attention, n) for n in ("q_proj", "k_proj", "v_proj")):
            raise ValueError(
                f"Layer {layer.index} has no q/k/v projections (its attention was removed); ADMM runs on the dense "
                f"model, before apply_plan."
            )
        for group, tensor in _tensors(layer):
            result[group.key] = (group, tensor, layer)
    return result


def _unit_norms(tensor: torch.Tensor, group: _Group) -> torch.Tensor:
    """Squared L2 norm of every unit (head or neuron) of ``tensor``."""
    squared = tensor.detach().float().pow(2)
    if tensor.dim() == 2:
        squared = squared.sum(dim=1 - group.dim)
    return squared.reshape(-1, group.unit).sum(dim=1)


def _unit_mask(group: _Group, layer: EncoderLayer, plan: PruningPlan, like: torch.Tensor) -> torch.Tensor:
    """1 on the units ``plan`` keeps, 0 elsewhere, shaped to broadcast against ``like``."""
    count = layer.num_heads if group.heads else layer.num_neurons
    kept = plan.kept_heads(layer.index, count) if group.heads else plan.kept_neurons(layer.index, count)
    mask = torch.zeros(count, dtype=like.dtype, device=like.device)
    mask[torch.as_tensor(kept, dtype=torch.long, device=like.device)] = 1
    mask = mask.repeat_interleave(group.unit)
    if like.dim() == 2 and group.dim == 0:
        mask = mask.unsqueeze(1)
    return mask


def combine_scores(
    importance: Sequence[torch.Tensor] | None,
    norms: Sequence[torch.Tensor],
    alpha: float = 1.0,
    *,
    per_layer: bool = True,
) -> list[torch.Tensor]:
    """GOHSP's soft guideline: ``importance**alpha * norms / norms.max()``, layer by layer.

    ``norms`` are :meth:`ADMMState.group_norms` (squared, one tensor per layer). With
    ``per_layer`` (the default) each layer's norms are divided by that layer's largest, so the
    norm only ranks units within a layer and the (globally comparable) graph importance sets
    how much each layer keeps; ``per_layer=False`` divides by the largest norm of all layers,
    letting the norms compete across layers too. ``importance=None`` means 1 everywhere (use it
    for neurons, which have no graph importance). ``alpha=0`` ignores the importance. A layer
    whose norms are all zero scores 0. Results are float64 on CPU.
    """
    norms = [torch.as_tensor(n).detach().to("cpu", torch.float64) for n in norms]
    if importance is not None:
        importance = [torch.as_tensor(s).detach().to("cpu", torch.float64) for s in importance]
        if len(importance) != len(norms):
            raise ValueError(f"importance has {len(importance)} layers but norms has {len(norms)}; pass one per layer.")
        for i, (s, n) in enumerate(zip(importance, norms)):
            if s.shape != n.shape:
                raise ValueError(f"importance[{i}] has shape {tuple(s.shape)} but norms[{i}] has {tuple(n.shape)}.")
            if (s < 0).any():
                raise ValueError(f"importance[{i}] has negative values; importance**alpha needs scores >= 0.")
    global_max = max((float(n.max()) for n in norms if n.numel()), default=0.0)
    result = []
    for i, n in enumerate(norms):
        largest = (float(n.max()) if n.numel() else 0.0) if per_layer else global_max
        normalised = n / largest if largest > 0 else torch.zeros_like(n)
        result.append(normalised if importance is None else importance[i].pow(alpha) * normalised)
    return result


class ADMMState:
    """Z and U for every prunable tensor of the encoder, the penalty weight rho and the last plan.

    Build it with :meth:`initialize`; resume it from :meth:`state_dict` with :meth:`from_state_dict`
    (or :meth:`load_state_dict` on an existing state). ``Z`` and ``U`` map structural keys (see the
    module docstring) to tensors.
    """

    def __init__(self, Z: dict[str, torch.Tensor], U: dict[str, torch.Tensor], rho: float, rho_growth: float,
                 plan: PruningPlan | None = None, step: int = 0):
        if set(Z) != set(U):
            raise ValueError("Z and U must hold the same keys.")
        self.Z, self.U = dict(Z), dict(U)
        self.rho, self.rho_growth = float(rho), float(rho_growth)
        self.plan = plan
        self.step = int(step)  # Z/U updates done so far

    @classmethod
    def initialize(cls, model: nn.Module, rho: float, *, rho_growth: float = 1.3,
                   plan: PruningPlan | None = None) -> ADMMState:
        """Start ADMM on ``model``: U = 0 and Z = W (or W projected onto ``plan``'s support)."""
        if not rho > 0:
            raise ValueError(f"rho must be > 0, got {rho!r}.")
        if not rho_growth >= 1:
            raise ValueError(f"rho_growth must be >= 1 (rho grows geometrically), got {rho_growth!r}.")
        if plan is not None:
            plan.validate(model)
        Z, U = {}, {}
        for key, (group, tensor, layer) in prunable_tensors(model).items():
            w = tensor.detach().to(torch.promote_types(tensor.dtype, torch.float32))
            Z[key] = w.clone() if plan is None else w * _unit_mask(group, layer, plan, w)
            U[key] = torch.zeros_like(w)
        return cls(Z, U, rho, rho_growth, plan)

    # ------------------------------------------------------------------ training-time terms

    def _pairs(self, model: nn.Module):
        """(key, group, W, layer) for every tensor, with Z and U laid out like W: on its device, and sliced
        as W is when FSDP shards it (whole again when it is not)."""
        found = prunable_tensors(model)
        if set(found) != set(self.Z):
            missing, extra = sorted(set(self.Z) - set(found)), sorted(set(found) - set(self.Z))
            raise ValueError(
                f"The model's prunable tensors do not match this ADMM state (missing {missing[:4]}, unexpected "
                f"{extra[:4]}); was the state built for another model, or has the model been compacted?"
            )
        for key, (group, tensor, layer) in found.items():
            if tuple(tensor.shape) != tuple(self.Z[key].shape):
                raise ValueError(
                    f"{key} has shape {tuple(tensor.shape)} but the ADMM state holds {tuple(self.Z[key].shape)}; "
                    f"was the model compacted?"
                )
            if self.Z[key].device != tensor.device or type(self.Z[key]) is not type(tensor.data):
                self.Z[key] = shard_like(self.Z[key], tensor)
                self.U[key] = shard_like(self.U[key], tensor)
            yield key, group, tensor, layer

    def penalty(self, model: nn.Module) -> torch.Tensor:
        """``rho/2 * sum ||W - Z + U||^2`` as a differentiable scalar (gradient ``rho * (W - Z + U)``).

        Summed over this process's slices when FSDP shards W (its value is the whole model's).
        """
        total = like = None
        for key, _, tensor, _ in self._pairs(model):
            z = local_tensor(self.Z[key])
            term = (local_tensor(tensor).to(z.dtype) - z + local_tensor(self.U[key])).pow(2).sum()
            total, like = (term if total is None else total + term), tensor
        return 0.5 * self.rho * sum_over_shards(total, like)

    def group_norms(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-layer SQUARED L2 norms of W + U per head and per neuron, summed over all their tensors.

        Squared norms are what the Euclidean projection compares (the distance to a support is the
        sum of the dropped groups' squared norms), so they are the right scores for select_plan.
        Returned as float32 tensors on the weights' device, one per layer in order.
        """
        layers = find_encoder_layers(model)
        heads = [None] * len(layers)
        neurons = [None] * len(layers)
        for key, group, tensor, layer in self._pairs(model):
            u = full_tensor(self.U[key])
            norms = _unit_norms(full_tensor(tensor.detach()).to(u.dtype) + u, group)
            target = heads if group.heads else neurons
            target[layer.index] = norms if target[layer.index] is None else target[layer.index] + norms
        return heads, neurons

    @torch.no_grad()
    def update(self, model: nn.Module, plan: PruningPlan) -> None:
        """Z-step and U-step on ``plan``'s support, then ``rho *= rho_growth``.

        ``Z = Proj_plan(W + U)`` (W + U with the dropped heads and neurons zeroed), ``U = U + W - Z``,
        then U is multiplied by ``rho_old / rho_new``: U is the scaled dual ``Y / rho``, and without
        the rescale a growing rho would inflate the dual variable it stands for. The caller picks
        ``plan`` (select_plan on the method's scores of W + U).
        """
        plan.validate(model)
        rho = self.rho * self.rho_growth
        rescale = self.rho / rho  # scaled form: U = Y / rho, so a new rho rescales U (Boyd et al. 3.4.1)
        for key, group, tensor, layer in self._pairs(model):
            u = full_tensor(self.U[key])
            w = full_tensor(tensor.detach()).to(u.dtype)
            v = w + u
            z = v * _unit_mask(group, layer, plan, v)
            self.Z[key] = shard_like(z, tensor)
            self.U[key] = shard_like((u + w - z) * rescale, tensor)
        self.rho = rho
        self.plan = plan
        self.step += 1

    @torch.no_grad()
    def residual(self, model: nn.Module) -> float:
        """Primal residual ``||W - Z|| / ||W||`` over all constrained tensors (0 when W lies on Z).

        Sums over elements: under FSDP each process sums its own slices, and one all-reduce adds them up.
        """
        sums, like = [], None
        for key, _, tensor, _ in self._pairs(model):
            z = local_tensor(self.Z[key])
            w = local_tensor(tensor.detach()).to(z.dtype)
            sums.append(torch.stack([(w - z).pow(2).sum(), w.pow(2).sum()]).double())
            like = tensor
        per_tensor = sum_over_shards(torch.stack(sums), like).tolist()
        diff, weight = sum(d for d, _ in per_tensor), sum(w for _, w in per_tensor)
        if weight == 0.0:
            return 0.0 if diff == 0.0 else float("inf")
        return (diff / weight) ** 0.5

    @staticmethod
    @torch.no_grad()
    def hard_prune(model: nn.Module, plan: PruningPlan) -> None:
        """Zero, in place, the weights of every head and neuron ``plan`` drops (then call apply_plan)."""
        plan.validate(model)
        for _, (group, tensor, layer) in prunable_tensors(model).items():
            whole = full_tensor(tensor)
            local_tensor(tensor).copy_(local_tensor(shard_like(whole * _unit_mask(group, layer, plan, whole), tensor)))

    # ------------------------------------------------------------------ mid-search removal

    @staticmethod
    def kept_positions(model: nn.Module, removal: PruningPlan) -> dict[str, tuple[int, torch.Tensor]]:
        """For every constrained tensor, ``(dim, indices)`` of the elements ``removal`` keeps along the unit axis."""
        removal.validate(model)
        positions = {}
        for key, (group, tensor, layer) in prunable_tensors(model).items():
            count = layer.num_heads if group.heads else layer.num_neurons
            kept = torch.as_tensor(removal.kept("heads" if group.heads else "neurons", layer.index, count),
                                   dtype=torch.long)
            index = (kept.unsqueeze(1) * group.unit + torch.arange(group.unit)).flatten()
            positions[key] = (group.dim if tensor.dim() == 2 else 0, index)
        return positions

    @torch.no_grad()
    def removed_share(self, model: nn.Module, positions: dict[str, tuple[int, torch.Tensor]]) -> float:
        """``||W of the units about to be removed|| / ||W||``: the residual that cutting them leaves behind (they
        lie outside Z's support, so their part of ``W - Z`` is W itself)."""
        removed = total = 0.0
        for key, _, tensor, _ in self._pairs(model):
            w = full_tensor(tensor.detach()).double()
            dim, index = positions[key]
            whole = float(w.pow(2).sum())
            total += whole
            removed += whole - float(w.index_select(dim, index.to(w.device)).pow(2).sum())
        return (removed / total) ** 0.5 if total > 0 else 0.0

    def keep(self, positions: dict[str, tuple[int, torch.Tensor]]) -> None:
        """Slice Z and U as the trainer sliced W (``positions`` from :meth:`kept_positions` before the cut)."""
        for key, (dim, index) in positions.items():
            self.Z[key] = self.Z[key].index_select(dim, index.to(self.Z[key].device))
            self.U[key] = self.U[key].index_select(dim, index.to(self.U[key].device))

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, torch.Tensor]:
        """A flat dict of tensors for ``safetensors.torch.save_file`` (after ``.cpu()`` if needed).

        Keys: ``Z.<key>``, ``U.<key>``, ``rho`` and ``rho_growth`` (float64 scalars, exact), ``step``
        (int64) and, when a plan has been set, ``plan_json`` (the plan's JSON as uint8 bytes), so a
        single safetensors file resumes the state exactly.
        """
        state = {f"Z.{k}": full_tensor(v) for k, v in self.Z.items()}  # under FSDP: collective
        state.update({f"U.{k}": full_tensor(v) for k, v in self.U.items()})
        state["rho"] = torch.tensor(self.rho, dtype=torch.float64)
        state["rho_growth"] = torch.tensor(self.rho_growth, dtype=torch.float64)
        state["step"] = torch.tensor(self.step, dtype=torch.int64)
        if self.plan is not None:
            data = self.plan.to_json_string().encode()
            state[PLAN_KEY] = torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore from :meth:`state_dict`; tensors move to the model's device on first use."""
        for name in ("rho", "rho_growth", "step"):
            if name not in state:
                raise ValueError(f"The ADMM state dict has no {name!r}; it was not written by ADMMState.state_dict().")
        Z = {k[2:]: v for k, v in state.items() if k.startswith("Z.")}
        U = {k[2:]: v for k, v in state.items() if k.startswith("U.")}
        if set(Z) != set(U) or not Z:
            raise ValueError("The ADMM state dict must hold matching, non-empty Z.* and U.* tensors.")
        plan = None
        if PLAN_KEY in state:
            plan = PruningPlan.from_json_string(bytes(state[PLAN_KEY].cpu().tolist()).decode())
        self.__init__(Z, U, float(state["rho"]), float(state["rho_growth"]), plan, int(state["step"]))

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], model: nn.Module | None = None) -> ADMMState:
        """An ADMMState restored from :meth:`state_dict`; with ``model``, checked against it and moved to its device."""
        self = cls.__new__(cls)
        self.load_state_dict(state)
        if model is not None:
            for _ in self._pairs(model):
                pass
        return self


def balance_kinds(model, head_scores, neuron_scores, budget: Budget):
    """Put head and neuron scores on one scale before the budgeted selection compares them.

    Criteria score heads and neurons in unrelated units (a stationary probability against a
    squared norm), so each kind is rescaled to total score = total cost of that kind (costed as
    the budget costs them, :func:`~hf_vitprune.budget.unit_costs`): a unit of average importance
    then has score-per-cost 1 whichever kind it is, and the selection trades heads against
    neurons by relative importance only.
    """
    costs = unit_costs(model, budget)

    def rescale(scores, kind):
        if scores is None:
            return None
        total_cost = sum(cost * s.numel() for cost, s in zip(costs[kind], scores))
        total_score = float(sum(s.double().sum() for s in scores))
        return [s * (total_cost / total_score) if total_score > 0 else s for s in scores]

    return rescale(head_scores, "heads"), rescale(neuron_scores, "neurons")


def scores_to_tensors(scores: UnitScores, prefix: str) -> dict[str, torch.Tensor]:
    tensors = {f"{prefix}heads.{i}": t for i, t in enumerate(scores.heads)}
    tensors.update({f"{prefix}neurons.{i}": t for i, t in enumerate(scores.neurons)})
    return tensors


def scores_from_tensors(tensors: dict[str, torch.Tensor], prefix: str) -> UnitScores | None:
    def layer_list(kind: str) -> list[torch.Tensor]:
        found = {int(k.rsplit(".", 1)[1]): v for k, v in tensors.items() if k.startswith(f"{prefix}{kind}.")}
        return [found[i] for i in range(len(found))]

    heads = layer_list("heads")
    return UnitScores(heads, layer_list("neurons")) if heads else None


# --------------------------------------------------------------------------- the method




@dataclass
class ADMMOptions(MethodOptions):
    """The ADMM schedule every ADMM-based method shares."""

    admm_rho: float = field(
        default=0.1,
        **_help("Initial ADMM penalty weight rho. With AdamW the step size does not grow with the gradient, so rho "
                "must make the penalty dominate the loss on the dropped units: values tuned for SGD (1e-3) are far "
                "too small."),
    )
    admm_rho_growth: float = field(
        default=1.3, **_help("rho is multiplied by this at every Z/U update (only when admm_rho_final is None).")
    )
    admm_rho_final: float | None = field(
        default=10.0,
        **_help("rho grows geometrically from admm_rho to this value at the ADMM phase's last Z/U update, whatever "
                "the phase's length; None grows it by admm_rho_growth per update instead."),
    )
    admm_update_steps: int = field(default=20, **_help("Optimizer steps between ADMM Z/U updates."))
    admm_fraction: float = field(
        default=0.0,
        **_help("Share of the steps spent in ADMM (0: one shot, to the first projection); the rest fine-tunes."),
    )
    admm_freeze_fraction: float = field(
        default=0.25,
        **_help("Share of the Z/U updates, at the end of ADMM, that keep the last support instead of choosing "
                "it again: W then settles on the units that will survive the hard prune. 0 never freezes."),
    )
    admm_remove_after: int | None = field(
        default=3,
        **_help("Cut a unit out mid-search once Z has left it out for this many Z/U updates in a row; None never."),
    )
    admm_distillation: bool = field(
        default=True,
        **_help("Distil from the dense model during ADMM too (distillation_weight)."),
    )
    admm_constant_lr: bool = field(
        default=True,
        **_help("Keep the learning rate constant (after warm-up) during ADMM, so that it does not anneal to zero "
                "just as rho peaks; False uses the TrainingArguments schedule in both phases."),
    )

    def __post_init__(self):
        super().__post_init__()
        self._check_int("admm_update_steps", 1)
        if self.admm_remove_after is not None:
            self._check_int("admm_remove_after", 1)
        self._check_number("admm_fraction", low=0, high=1, low_open=False)
        self._check_number("admm_freeze_fraction", low=0, high=1, low_open=False)
        for name in ("admm_constant_lr", "admm_distillation"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{type(self).__name__}.{name}={getattr(self, name)!r} must be True or False.")
        self._check_number("admm_rho", low=0)
        self._check_number("admm_rho_growth", low=1, low_open=False)
        if self.admm_rho_final is not None:
            self._check_number("admm_rho_final", low=0)
            if not self.admm_rho_final >= self.admm_rho:
                raise ValueError(
                    f"{type(self).__name__}.admm_rho_final={self.admm_rho_final} must be >= admm_rho={self.admm_rho} "
                    f"(rho never shrinks); leave it unset to grow by admm_rho_growth."
                )

    def rho_growth(self, steps: int) -> float:
        """admm_rho_growth, or the growth that takes rho to admm_rho_final at the phase's last Z/U update."""
        if self.admm_rho_final is None:
            return self.admm_rho_growth
        updates = steps // self.admm_update_steps
        if updates == 0:
            return 1.0
        return (self.admm_rho_final / self.admm_rho) ** (1.0 / updates)


ADMM_CITATION = {
    "what": "ADMM pruning (Zhang et al., ECCV 2018, arXiv:1804.03294)",
    "bibtex": """@inproceedings{zhang2018systematic,
  title = {A Systematic {DNN} Weight Pruning Framework using Alternating Direction Method of Multipliers},
  author = {Zhang, Tianyun and Ye, Shaokai and Zhang, Kaiqi and Tang, Jian and Wen, Wujie and Fardad, Makan and Wang, Yanzhi},
  booktitle = {Proceedings of the European Conference on Computer Vision (ECCV)},
  year = {2018},
  eprint = {1804.03294},
  archivePrefix = {arXiv}
}""",
}

IMPORTANCE_PREFIX = "importance."
ADMM_PREFIX = "admm."
FREEZE_KEY = "admm_schedule.freeze_after"
DENSE_KEY = "admm_schedule.dense_budget_measure"
SEARCH_STEPS_KEY = "admm_schedule.search_steps"
HISTORY_PREFIX = "admm_history."
NEVER = 2**62

logger = logging.get_logger(__name__)


class ADMMSearch(PruningMethod):
    """Rank the units once, then ADMM on a fixed-shape model, then a hard prune to the last projection.

    The shared pipeline of GOHSP and the baselines: the subclasses differ only in
    :meth:`rank` (the importance computed once on the dense model) and
    :meth:`projection_scores` (how importance and the group norms of W + U decide each Z-step).
    """

    options_class = ADMMOptions
    phase_name = "admm"
    supports_sharded_parameters = True  # ADMMState gathers whole tensors where it needs them
    rescale_kinds = True  # rescale head and neuron scores to one scale (for scores in unrelated units)

    def __init__(self, config):
        super().__init__(config)
        self.importance: UnitScores | None = None
        self.admm: ADMMState | None = None
        self.finished = False
        self.freeze_after = 0  # Z/U updates after which the support stays as it is
        self.final_residual: float | None = None
        self.dense_measure: int | None = None  # the dense model's parameters or FLOPs: what the budget is of
        self.search_total = 0  # optimizer steps of the whole search
        self.history: SupportHistory | None = None  # updates each unit spent outside the support
        self._removal = None  # (plan, kept positions, widths) of a mid-search removal the trainer is to make
        self._logs: dict[str, float] = {}

    # ------------------------------------------------------------------ what subclasses decide

    def rank(self, context: SearchContext) -> UnitScores:
        """The importance of every head and neuron of the dense model (same on every process)."""
        raise NotImplementedError

    def projection_scores(self, head_norms, neuron_norms):
        """(head scores, neuron scores) that decide which units Z keeps at a projection."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the hooks

    def search_steps(self, total_steps: int) -> int:
        return min(max(1, round(total_steps * self.options.admm_fraction)), total_steps - 1)

    def setup(self, context: SearchContext) -> None:
        """Rank, then the standard ADMM start: U = 0 and Z = the projection of the dense W onto the budget."""
        started = time.perf_counter()
        self.importance = self.rank(context)
        self._logs["ranking_seconds"] = time.perf_counter() - started
        model, options = context.model, self.options
        self.dense_measure = context.budget.measure(model_stats(model))
        self.search_total = context.search_steps
        if options.admm_remove_after is not None:
            self.history = SupportHistory.start(model)
        growth = options.rho_growth(context.search_steps)
        updates = context.search_steps // options.admm_update_steps
        self.freeze_after = math.ceil(updates * (1 - options.admm_freeze_fraction))
        self.admm = ADMMState.initialize(model, options.admm_rho, rho_growth=growth)
        plan = self.project(model)
        self.admm = ADMMState.initialize(model, options.admm_rho, rho_growth=growth, plan=plan)
        self._log_plan(model, plan)

    def loss_terms(self, model, inputs, outputs) -> dict[str, torch.Tensor]:
        if self.options.admm_fraction == 0:  # one shot: the single search step is a plain one, no pull towards Z
            return {}
        return {"admm_penalty": self.admm.penalty(model)}

    def on_step_end(self, model, step: int) -> None:
        if step % self.options.admm_update_steps == 0:
            # a removal pays only while W-steps are left to run on the smaller model before the hard prune
            self.update(model, may_remove=step + self.options.admm_update_steps <= self.search_total)

    def search_lr_scheduler(self) -> str | None:
        return "constant_with_warmup" if self.options.admm_constant_lr else None

    def distils_during_search(self) -> bool:
        return self.options.admm_distillation

    def finalize(self, model) -> PruningPlan:
        """The last Z's support: W is hard-pruned to it (the residual to Z is recorded first)."""
        plan = self.admm.plan if self.admm.plan is not None else self.project(model)
        if self.admm.step > 0:  # in one shot no Z/U update ran: ||W - Z|| is only the share the projection cuts
            self.final_residual = float(self.admm.residual(model))
            self._logs["admm_residual_at_hard_prune"] = self.final_residual
            logger.info("ADMM ended: ||W - Z|| / ||W|| = %.4f at the hard prune, after %d Z/U updates (rho %.4g).",
                        self.final_residual, self.admm.step, self.admm.rho)
        self.admm.hard_prune(model, plan)
        self.finished = True
        return plan

    def state_dict(self) -> dict[str, torch.Tensor]:
        tensors = {}
        if self.importance is not None:
            tensors.update(scores_to_tensors(self.importance, IMPORTANCE_PREFIX))
        if self.admm is not None and not self.finished:
            tensors.update({f"{ADMM_PREFIX}{k}": v for k, v in self.admm.state_dict().items()})
            tensors[FREEZE_KEY] = torch.tensor(self.freeze_after, dtype=torch.int64)
            tensors[DENSE_KEY] = torch.tensor(self.dense_measure, dtype=torch.int64)
            tensors[SEARCH_STEPS_KEY] = torch.tensor(self.search_total, dtype=torch.int64)
            if self.history is not None:
                tensors.update(self.history.state_dict(HISTORY_PREFIX))
        return tensors

    def load_state_dict(self, state: dict[str, torch.Tensor], model) -> None:
        self.importance = scores_from_tensors(state, IMPORTANCE_PREFIX)
        admm = {k[len(ADMM_PREFIX):]: v for k, v in state.items() if k.startswith(ADMM_PREFIX)}
        if admm:
            self.admm = ADMMState.from_state_dict(admm, model=model)
        # checkpoints written before the support could be frozen never freeze it
        self.freeze_after = int(state[FREEZE_KEY]) if FREEZE_KEY in state else NEVER
        # ...and those written before mid-search removal never removed anything: the model is the dense one
        self.dense_measure = int(state[DENSE_KEY]) if DENSE_KEY in state else self.config.budget.measure(model_stats(model))
        self.history = SupportHistory.from_state_dict(state, HISTORY_PREFIX)
        self.search_total = int(state[SEARCH_STEPS_KEY]) if SEARCH_STEPS_KEY in state else 0

    def log_values(self) -> dict[str, float]:
        return dict(self._logs)

    # ------------------------------------------------------------------ ADMM steps

    def project(self, model) -> PruningPlan:
        """Z's support: the budgeted plan that keeps the best units by :meth:`projection_scores`.

        The budget is of the dense model: after a mid-search removal the model is smaller, so the
        fraction still to remove is taken against what it is now (everything fits: keep everything).
        """
        head_norms, neuron_norms = self.admm.group_norms(model)
        heads, neurons = self.projection_scores(head_norms, neuron_norms)
        if self.rescale_kinds:
            heads, neurons = balance_kinds(model, heads, neurons, self.config.budget)
        arguments = self.config.selection_arguments()
        budget = self.config.budget
        current = budget.measure(model_stats(model))
        if current != self.dense_measure:
            limit = (1.0 - budget.fraction) * self.dense_measure
            if current <= limit:
                return PruningPlan()
            arguments.update(target_sparsity=None, target_flops_reduction=None,
                             budget=Budget(budget.metric, 1.0 - limit / current))
        return select_plan(model, heads, neurons, **arguments)

    def update(self, model, may_remove: bool = False) -> None:
        """Z = projection of W + U onto the budget (or the frozen support), U += W - Z, rho grows; logs them.

        With ``admm_remove_after``, units outside the support for that many updates in a row are then
        handed to the trainer to cut out (:meth:`pending_compaction`).
        """
        frozen = self.admm.step >= self.freeze_after and self.admm.plan is not None
        plan = self.admm.plan if frozen else self.project(model)
        self.admm.update(model, plan)
        self._log_plan(model, plan)
        if self.history is not None:
            self.history.record(model, plan)
            removal = self.history.removal(self.options.admm_remove_after) if may_remove else None
            if removal is not None and has_sharded_parameters(model):
                logger.warning("ADMM keeps the full width under FSDP: sharded parameters cannot be cut mid-search "
                               "(admm_remove_after is ignored).")
                self.history = None
            elif removal is not None:
                positions = ADMMState.kept_positions(model, removal)
                share = self.admm.removed_share(model, positions)
                self._logs["admm_residual_at_removal"] = max(share, self._logs.get("admm_residual_at_removal", 0.0))
                self._removal = (removal, positions, unit_widths(model))

    def pending_compaction(self) -> PruningPlan | None:
        return None if self._removal is None else self._removal[0]

    def after_compaction(self, model, plan, replace_parameters) -> None:
        """Slice Z, U, the importance and the history as the trainer sliced W; the support follows the new indices."""
        removal, positions, widths = self._removal
        self._removal = None
        self.admm.keep(positions)
        self.admm.plan = reindex(self.admm.plan, removal, widths)
        self.importance = keep_scores(self.importance, removal)
        self.history.keep(removal)
        self._logs["admm_removed_units"] = self._logs.get("admm_removed_units", 0.0) + sum(
            widths[kind][layer] - len(removal.kept(kind, layer, widths[kind][layer]))
            for kind in widths for layer in range(len(widths[kind])))

    def _log_plan(self, model, plan: PruningPlan) -> None:
        stats = model_stats(model, plan)
        self._logs.update(
            kept_heads=stats.heads,
            kept_neurons=stats.neurons,
            params=stats.params,
            flops=stats.flops,
        )
        if self.admm.step > 0:  # the ADMM figures exist once a Z/U update has run (never in one shot)
            self._logs.update(admm_residual=float(self.admm.residual(model)), admm_rho=float(self.admm.rho))

    # ------------------------------------------------------------------ the card

    def card_recipe(self) -> list[str]:
        options = self.options
        if options.admm_rho_final is not None:
            growth = f"growing geometrically to {options.admm_rho_final} at the last update"
        else:
            growth = f"growing ×{options.admm_rho_growth} per update"
        if options.admm_fraction == 0:
            return [self.ranking_sentence() + ".",
                    "Schedule: one shot: the plan is the first projection of the ranking onto the budget, made on the "
                    "dense model (no ADMM update), then a hard prune, physical compaction, and fine-tuning of the "
                    "compacted model with a fresh optimizer for every remaining step."]
        lines = [
            self.ranking_sentence() + ".",
            f"Schedule: ADMM for the first {options.admm_fraction:.0%} of the optimizer steps (Z/U update every "
            f"{options.admm_update_steps} steps, rho from {options.admm_rho} {growth}"
            + (f", support frozen for the last {options.admm_freeze_fraction:.0%} of the updates"
               if options.admm_freeze_fraction > 0 else "")
            + (", constant learning rate after warm-up" if options.admm_constant_lr else "")
            + (", distilling from the dense model" if options.admm_distillation and self.config.distillation_weight > 0
               else "")
            + (f", units left out of Z for {options.admm_remove_after} updates in a row cut out at once"
               if options.admm_remove_after is not None else "")
            + "), then a hard prune to the ADMM solution, physical compaction, and fine-tuning of the compacted model "
            "with a fresh optimizer for the remaining steps.",
        ]
        removed = self._logs.get("admm_removed_units")
        if removed:
            lines.append(f"{removed:.0f} units that Z had left out for {options.admm_remove_after} updates in a row were "
                         f"cut out during the search (largest share of ||W|| cut at once: "
                         f"{self._logs['admm_residual_at_removal']:.4f}).")
        if self.final_residual is not None:
            lines.append(f"ADMM residual ||W - Z|| / ||W|| at the hard prune: {self.final_residual:.4f}.")
        return lines

    def ranking_sentence(self) -> str:
        return f"Ranking: {self.config.calibration_samples} calibration images"

    def citations(self) -> list[dict[str, str]]:
        return [ADMM_CITATION]
