"""SPViT attention-to-convolution pruning (He et al., TPAMI 2024) as a method: a single-path search.

Every attention layer gets a *single path* that holds three choices: a 1x1 convolution, a 3x3
convolution and the attention itself. The convolutions share the attention's value and output
projections (:mod:`hf_vitprune.convolution`: a learned ``heads x 9`` mixing, a softmax over the heads
at temperature ``mixing_temperature``, builds each kernel tap from the heads), each with its own
BatchNorm and a ReLU; the class/distillation/register tokens bypass them. Two gates per layer choose,
chained as in the paper: ``g3`` (the 3x3 over the 1x1) and ``ga`` (attention over the 3x3, counted
only where ``g3`` is on), so the layer's output is
``ga * attention + g3 (1 - ga) * conv3x3 + (1 - g3)(1 - ga) * conv1x1``. Every MLP neuron has a gate
too (a mask on the output projection's input). A gate is a learned threshold ``theta``: in training a
Bernoulli sample of ``sigmoid(theta)`` with a straight-through gradient (logistic noise, hard
forward), in evaluation ``theta > 0``; thresholds start at ``initial_gate`` > 0, so everything starts
as the attention with all its neurons.

The loss adds ``flops_loss_weight x ((cost - target) / dense)^2``, the cost (FLOPs or parameters,
counted exactly by ``model_stats`` for each layer type) taken in expectation under the gates'
probabilities ``sigmoid(theta)`` (``cost_estimate``; the paper takes it at the thresholded gates with a
straight-through gradient, which makes every gate fall together). Gates and mixings train in their own
optimizer group (``arch_learning_rate``), the BatchNorms with the weights.

After the search each layer takes the type its gates chose and becomes a real ``nn.Conv2d`` layer
(:func:`hf_vitprune.convert_attention`, the search's mixing and BatchNorm state carried over, so the
converted model computes what the search model computed with those gates), and the MLP neurons are
chosen by their thresholds with the project's exact budget selection (``select_plan``): a final exact
adjustment that makes the result meet the budget to within one neuron. The model then fine-tunes
with the usual distillation.

Departures (docs/methods.md): the paper's fourth choice, skipping the attention altogether, is not
offered (the layer types are attention, conv3x3, conv1x1); the cost term sees the expected cost, relative
to the dense model's rather than in GFLOPs, so one weight serves every model size; the gate samples are drawn
from a generator seeded by the run's seed, the same on every process, so all processes train the same
path at each step; and the neurons are chosen to meet the budget exactly after the search.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field

import torch
from torch import nn

from ..architectures import find_encoder_layers, meta_copy, num_patches
from ..budget import Budget, select_plan, unit_costs
from ..convolution import (
    ATTENTION,
    KERNEL_SIZES,
    LAYER_TYPES,
    check_layer_type,
    conv_mix,
    patch_grid,
    shared_conv_weights,
)
from ..plan import PruningPlan
from ..stats import model_stats
from ..surgery import convert_attention
from .base import MethodOptions, PruningMethod, SearchContext, average_over_processes, register_method
from .base import option_help as _help  # every option documents itself

SPVIT_CONV_CITATION = {
    "what": "SPViT attention-to-convolution pruning (He et al., TPAMI 2024, arXiv:2111.11802)",
    "bibtex": """@article{he2024pruning,
  title = {Pruning Self-Attentions Into Convolutional Layers in Single Path},
  author = {He, Haoyu and Cai, Jianfei and Liu, Jing and Pan, Zizheng and Zhang, Jing and Tao, Dacheng and Zhuang, Bohan},
  journal = {IEEE Transactions on Pattern Analysis and Machine Intelligence},
  year = {2024},
  eprint = {2111.11802},
  archivePrefix = {arXiv}
}""",
}
PREFIX = "spvit_conv."
TYPE_CODES = {name: code for code, name in enumerate(LAYER_TYPES)}
COST_ESTIMATES = ("expected", "thresholded")




@dataclass
class ConvSearchOptions(MethodOptions):
    """How the single-path search runs and what it may choose."""

    search_fraction: float = field(
        default=0.3, **_help("Share of the optimizer steps spent searching (gates sampled, cost term on); the rest "
                             "fine-tunes the converted model.")
    )
    flops_loss_weight: float = field(
        default=20.0, **_help("Weight of the cost term (relative gap to the target, squared; the paper's lambda, "
                              "there in GFLOPs).")
    )
    arch_learning_rate: float = field(
        default=1e-2, **_help("Learning rate of the gates' thresholds and the head-to-tap mixings (paper: 5e-4 to "
                              "1e-3 over 10 ImageNet epochs).")
    )
    cost_estimate: str = field(
        default="expected", **_help("The cost the cost term sees: 'expected' (under the gates' probabilities "
                                    "sigmoid(theta): it moves smoothly as the thresholds move) or 'thresholded' (the "
                                    "paper's: at theta > 0 with a straight-through gradient, so it changes only when "
                                    "gates cross zero, and every gate is pushed until then).")
    )
    initial_gate: float = field(
        default=0.5, **_help("Initial threshold of every gate (> 0: everything starts as attention with all its "
                             "neurons, and the other paths are sampled with probability 1 - sigmoid(0.5) = 0.38).")
    )
    mixing_temperature: float = field(
        default=0.01, **_help("Temperature of the softmax over the heads that mixes them into each kernel tap "
                              "(paper: 0.01).")
    )
    gate_neurons: bool = field(default=True, **_help("Gate (and prune) the MLP neurons too, as the paper does."))
    gate_heads: bool = field(
        default=False, **_help("Gate (and prune) the heads of the layers that stay attention (not in the paper: its "
                               "budget falls on layer types and MLP neurons only).")
    )
    min_heads_per_layer: int = field(default=1, **_help("Heads every layer that stays attention keeps at least "
                                                        "(with gate_heads)."))
    min_attention_layers: int = field(
        default=1, **_help("Layers that stay attention at least (those the search leaves closest to attention): the "
                           "class token reads the image only through attention layers, as it bypasses convolutions.")
    )
    min_neurons_per_layer: int = field(default=1, **_help("Neurons every layer keeps at least."))
    layer_types: dict[int, str] | str | None = field(
        default=None, **_help("Layers whose type is fixed instead of searched, e.g. {0: 'conv3x3', 5: 'attention'}; "
                              "JSON on the command line: '{\"0\": \"conv3x3\"}' (types: attention, conv3x3, conv1x1).")
    )

    def __post_init__(self):
        super().__post_init__()
        self._check_number("search_fraction", low=0, high=1)
        self._check_number("flops_loss_weight", low=0, low_open=False)
        self._check_number("arch_learning_rate", low=0)
        self._check_number("initial_gate", low=0)
        self._check_number("mixing_temperature", low=0)
        self._check_int("min_neurons_per_layer", 0)
        self._check_int("min_heads_per_layer", 1)
        self._check_int("min_attention_layers", 0)
        if self.cost_estimate not in COST_ESTIMATES:
            raise ValueError(f"ConvSearchOptions.cost_estimate={self.cost_estimate!r}; choose one of "
                             f"{list(COST_ESTIMATES)}.")
        if isinstance(self.layer_types, str):  # from the command line: JSON
            try:
                self.layer_types = json.loads(self.layer_types)
            except json.JSONDecodeError as error:
                raise ValueError(f"ConvSearchOptions.layer_types={self.layer_types!r} is not JSON ({error}); write it "
                                 f"as '{{\"0\": \"conv3x3\"}}'.") from None
        if self.layer_types is not None:
            if not isinstance(self.layer_types, dict):
                raise ValueError(f"ConvSearchOptions.layer_types={self.layer_types!r} must map layer indices to layer "
                                 f"types, e.g. {{0: 'conv3x3'}}.")
            fixed = {}
            for index, layer_type in self.layer_types.items():
                key = int(index) if isinstance(index, str) and index.isdigit() else index  # JSON keys are strings
                if isinstance(key, bool) or not isinstance(key, int) or key < 0:
                    raise ValueError(f"ConvSearchOptions.layer_types has key {index!r}; keys are layer indices >= 0.")
                fixed[key] = check_layer_type(layer_type, f"ConvSearchOptions.layer_types[{index!r}]")
            self.layer_types = fixed


class LayerSearch(nn.Module):
    """One layer's search state: two chained kernel gates, a head-to-tap mixing, two BatchNorms, neuron gates and
    head gates (used with ``gate_heads``)."""

    def __init__(self, heads: int, channels: int, neurons: int, initial_gate: float):
        super().__init__()
        self.kernel_gates = nn.Parameter(torch.full((2,), float(initial_gate)))  # [3x3 over 1x1, attention over 3x3]
        self.mixing = nn.Parameter(torch.ones(heads, 9))
        self.norms = nn.ModuleDict({"conv1x1": nn.BatchNorm2d(channels), "conv3x3": nn.BatchNorm2d(channels)})
        self.neuron_gates = nn.Parameter(torch.full((neurons,), float(initial_gate)))
        self.head_gates = nn.Parameter(torch.full((heads,), float(initial_gate)))


def _thresholded(theta: torch.Tensor) -> torch.Tensor:
    """``theta > 0`` forward, the gradient of ``sigmoid(theta)`` backward."""
    soft = torch.sigmoid(theta)
    return (theta > 0).to(theta.dtype) + soft - soft.detach()


def _sampled(theta: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A Bernoulli sample of ``sigmoid(theta)`` (logistic noise, hard forward) with a straight-through gradient."""
    uniform = torch.rand(theta.shape, generator=generator, dtype=torch.float64).clamp(1e-6, 1 - 1e-6)
    noise = (uniform.log() - (-uniform).log1p()).to(theta.device, theta.dtype)
    soft = torch.sigmoid(theta + noise)
    return (theta + noise > 0).to(theta.dtype) + soft - soft.detach()


def _reads_the_image(model: nn.Module) -> bool:
    """Whether two different images give ``model`` different outputs (a check of its wiring, not of training)."""
    config = model.config
    size = config.image_size if isinstance(config.image_size, (tuple, list)) else (config.image_size,) * 2
    generator = torch.Generator().manual_seed(0)
    parameter = next(model.parameters())
    images = torch.randn(2, config.num_channels, *size, generator=generator).to(parameter)
    with torch.no_grad():
        outputs = model(pixel_values=images)
    first = outputs.logits if getattr(outputs, "logits", None) is not None else outputs.last_hidden_state
    return not torch.allclose(first[0], first[1], rtol=1e-5, atol=1e-6)


@register_method
class SPViTConv(PruningMethod):
    name = "spvit_conv"
    options_class = ConvSearchOptions
    phase_name = "conv_search"
    budgets = ("params", "flops")
    description = ("SPViT attention-to-convolution pruning: a single-path search turns some attention layers into "
                   "convolutions built from their own value/output projections and gates the MLP neurons.")

    def __init__(self, config):
        super().__init__(config)
        self.search: nn.ModuleList | None = None
        self.searching = True
        self.types: list[str] | None = None  # after the search: each layer's type
        self.searched: list[bool] = []  # per layer: its type is searched (not fixed by layer_types)
        self.generator = torch.Generator()
        self.fixed: dict[int, str] = {}
        self.costs: dict | None = None
        self.budget: Budget | None = None
        self._grid: tuple[int, int] = (0, 0)
        self._patches = 0
        self._hooks = []
        self._logs: dict[str, float] = {}

    def search_steps(self, total_steps: int) -> int:
        return min(max(1, round(total_steps * self.options.search_fraction)), total_steps - 1)

    # ------------------------------------------------------------------ setup

    def setup(self, context: SearchContext) -> None:
        self.budget = context.budget
        self._build(context.model)
        self.generator.manual_seed(context.seed)

    def _build(self, model: nn.Module) -> None:
        """The search state and hooks on the model as it is before the search."""
        o = self.options
        self._grid, self._patches = patch_grid(model), num_patches(model)  # a ValueError when not a grid
        layers = find_encoder_layers(model)
        fixed = dict(o.layer_types or {})
        outside = sorted(i for i in fixed if i >= len(layers))
        if outside:
            raise ValueError(f"ConvSearchOptions.layer_types names layers {outside}, but the model has layers 0 to "
                             f"{len(layers) - 1}.")
        self.searched = []
        for layer in layers:
            convertible = layer.num_heads > 0 and not layer.is_convolution
            if layer.index in fixed and fixed[layer.index] != ATTENTION and not convertible:
                raise ValueError(f"ConvSearchOptions.layer_types[{layer.index}]={fixed[layer.index]!r}, but layer "
                                 f"{layer.index} has no heads left (or is a convolution already) to build one from.")
            self.searched.append(convertible and layer.index not in fixed)
        self.fixed = fixed
        self.search = nn.ModuleList(
            LayerSearch(max(1, layer.num_heads), layer.head_dim, layer.num_neurons, o.initial_gate) for layer in layers
        ).to(next(model.parameters()).device)
        self.costs = self._layer_costs(model)
        self._check_reachable()
        self._check_not_collapsing(model)
        self._attach(model)

    def _layer_costs(self, model: nn.Module) -> dict:
        """Exact costs in the budget's measure: the model's, and per layer the change each layer type makes and
        one neuron's cost (counted by ``model_stats`` on meta copies with the layer converted)."""
        measure = self.budget.measure
        dense = measure(model_stats(model))
        deltas = []
        for layer in find_encoder_layers(model):
            change = {ATTENTION: 0.0}
            if layer.num_heads > 0 and not layer.is_convolution:
                for layer_type in KERNEL_SIZES:
                    shaped = convert_attention(meta_copy(model), {layer.index: layer_type})
                    change[layer_type] = float(measure(model_stats(shaped)) - dense)
            deltas.append(change)
        units = unit_costs(model, self.budget)
        layers = find_encoder_layers(model)
        return {"dense": float(dense), "deltas": deltas, "neuron": [float(c) for c in units["neurons"]],
                "neurons": [layer.num_neurons for layer in layers], "head": [float(c) for c in units["heads"]],
                "heads": [layer.num_heads if not layer.is_convolution else 0 for layer in layers]}

    def _check_reachable(self) -> None:
        """The cheapest model the search space holds must meet the budget."""
        c, o = self.costs, self.options
        cheapest = [self.fixed.get(i, min(change, key=change.get)) for i, change in enumerate(c["deltas"])]
        searched = [i for i in range(len(cheapest)) if self.searched[i]]
        fixed_attention = sum(1 for t in self.fixed.values() if t == ATTENTION)
        staying = max(0, o.min_attention_layers - fixed_attention)  # searched layers that must stay attention
        if staying > len(searched):
            raise ValueError(
                f"ConvSearchOptions.min_attention_layers={o.min_attention_layers} asks for more attention layers than "
                f"the model can keep ({fixed_attention} fixed as attention by layer_types, {len(searched)} searched); "
                f"lower it or fix fewer layers as convolutions."
            )
        for i in sorted(searched, key=lambda i: (c["deltas"][i][cheapest[i]], i), reverse=True)[:staying]:
            cheapest[i] = ATTENTION  # the layers that save least stay attention
        cost = self._cost(cheapest, fewest_neurons=True)
        target = (1 - self.budget.fraction) * c["dense"]
        if cost > target:
            neurons = f"{o.min_neurons_per_layer} MLP neuron(s) per layer" if o.gate_neurons else "every MLP neuron"
            if o.gate_heads:
                neurons += f", {o.min_heads_per_layer} head(s) per attention layer"
            raise ValueError(
                f"{self.budget.target_name}={self.budget.fraction:g} asks for at most {target:,.0f} "
                f"{self.budget.unit_name} (of {c['dense']:,.0f}), but the cheapest model spvit_conv can reach (1x1 "
                f"convolutions wherever layer_types and min_attention_layers={o.min_attention_layers} allow, "
                f"{neurons}) keeps {cost:,.0f}. Ask for at most {1 - cost / c['dense']:.3f}, or prune the "
                f"model's heads and neurons first."
            )

    def _check_not_collapsing(self, model: nn.Module) -> None:
        """Refuse a search space whose most converted model classifies every image alike.

        A class token bypasses the convolutions (the paper's design), so a classifier that reads it sees the
        image only through attention layers. When the options allow every layer to become a convolution, that
        worst case is built on a copy and given two different images: equal logits mean the search could hand
        back a model that ignores its input (mean-pooling heads, e.g. BEiT's, do not and pass).
        """
        o = self.options
        layers = find_encoder_layers(model)
        fixed_attention = [i for i, t in self.fixed.items() if t == ATTENTION and layers[i].num_heads > 0]
        worst = {i: t for i, t in self.fixed.items() if t != ATTENTION}
        worst.update({i: "conv1x1" for i, searched in enumerate(self.searched) if searched})
        if fixed_attention or o.min_attention_layers > 0 or not worst:
            return  # an attention layer stays, or the search converts nothing
        if _reads_the_image(convert_attention(copy.deepcopy(model), worst).eval()):
            return
        raise ValueError(
            f"ConvSearchOptions.min_attention_layers={o.min_attention_layers} lets the search turn every attention "
            f"layer into a convolution, and then this model's classifier returns the same logits for every image: "
            f"it reads the class token, which bypasses convolutions. Keep at least one attention layer "
            f"(min_attention_layers=1, the default, or layer_types={{i: 'attention'}})."
        )

    def _cost(self, types: list[str], fewest_neurons: bool) -> float:
        """The model's cost (the budget's measure) with these layer types, and every MLP neuron and head or, where
        they are gated, only ``min_neurons_per_layer`` / ``min_heads_per_layer`` of them."""
        c, o = self.costs, self.options
        total = c["dense"] + sum(change[t] for change, t in zip(c["deltas"], types))
        if fewest_neurons and o.gate_neurons:
            total -= sum((n - min(o.min_neurons_per_layer, n)) * cost for n, cost in zip(c["neurons"], c["neuron"]))
        if fewest_neurons and o.gate_heads:
            total -= sum((h - min(o.min_heads_per_layer, h)) * cost
                         for h, cost, t in zip(c["heads"], c["head"], types) if t == ATTENTION)
        return total

    def _closeness(self, index: int) -> float:
        """How close layer ``index``'s gates are to attention (the smaller threshold of the two)."""
        return float(self.search[index].kernel_gates.detach().min())

    def _attach(self, model: nn.Module) -> None:
        for layer, state in zip(find_encoder_layers(model), self.search):
            self._hooks.append(layer.attention.register_forward_hook(self._single_path(layer, state)))
            if self.options.gate_neurons:
                self._hooks.append(layer.mlp_out.register_forward_pre_hook(self._unit_gate(state.neuron_gates)))
            if self.options.gate_heads and self.costs["heads"][layer.index] > 0:
                self._hooks.append(layer.attention.o_proj.register_forward_pre_hook(
                    self._unit_gate(state.head_gates, repeat=layer.head_dim)))

    # ------------------------------------------------------------------ the single path

    def _gates(self, index: int, state: LayerSearch, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(g3, ga): the 3x3 gate and the chained attention gate of layer ``index``."""
        fixed = self.fixed.get(index, ATTENTION if not self.searched[index] else None)
        if fixed is not None:
            one, zero = state.kernel_gates.new_ones(()), state.kernel_gates.new_zeros(())
            return {"conv1x1": (zero, zero), "conv3x3": (one, zero), ATTENTION: (one, one)}[fixed]
        gates = _sampled(state.kernel_gates, self.generator) if training else _thresholded(state.kernel_gates)
        g3 = gates[0]
        ga = g3 * gates[1]
        if training and bool(g3 > 0) and bool(ga > 0):  # the paper slows the smaller choice's gate down
            g3 = g3.detach()
        return g3, ga

    def _single_path(self, layer, state: LayerSearch):
        index = layer.index

        def hook(module, args, output):
            hidden = args[0]
            attention_output = output[0]
            g3, ga = self._gates(index, state, module.training)
            if not self.searched[index] and bool(ga > 0):  # fixed to attention
                return output
            mixing = self.mixing_of(state)  # once for both paths
            if not self.searched[index]:  # a fixed convolution: only its path
                mixed = self._conv_path(module, state, mixing, hidden, "conv3x3" if bool(g3 > 0) else "conv1x1")
                return (mixed, *output[1:])
            conv3 = self._conv_path(module, state, mixing, hidden, "conv3x3")
            conv1 = self._conv_path(module, state, mixing, hidden, "conv1x1")
            mixed = ga * attention_output + g3 * (1 - ga) * conv3 + (1 - g3) * (1 - ga) * conv1
            return (mixed, *output[1:])

        return hook

    def _conv_path(self, attention: nn.Module, state: LayerSearch, mixing: torch.Tensor, hidden: torch.Tensor,
                   layer_type: str) -> torch.Tensor:
        """The layer's output as a ``layer_type`` convolution sharing the attention's weights (special tokens
        bypass it)."""
        kernel_size = KERNEL_SIZES[layer_type]
        norm = state.norms[layer_type]
        norm.train(attention.training)  # the search state is not part of the model: follow its mode
        kernel, bias, projection, out_bias = shared_conv_weights(attention, mixing, kernel_size)
        return conv_mix(hidden, hidden.shape[1] - self._patches, self._grid, kernel, bias, norm, projection, out_bias)

    def mixing_of(self, state: LayerSearch) -> torch.Tensor:
        """The head-to-tap mixing: a softmax over the heads of each tap, at the mixing temperature."""
        return torch.softmax(state.mixing / self.options.mixing_temperature, dim=0)

    def _unit_gate(self, thresholds: nn.Parameter, repeat: int = 1):
        """A pre-hook gating a linear layer's input units (MLP neurons, or heads of ``repeat`` channels each)."""
        def hook(module, args):
            gates = _sampled(thresholds, self.generator) if module.training else _thresholded(thresholds)
            return (args[0] * gates.repeat_interleave(repeat), *args[1:])

        return hook

    # ------------------------------------------------------------------ the search

    def loss_terms(self, model, inputs, outputs) -> dict[str, torch.Tensor]:
        cost = self._cost_estimate()
        c = self.costs
        target = (1 - self.budget.fraction) * c["dense"]
        self._logs["spvit_cost_ratio"] = float(cost.detach()) / c["dense"]
        return {"spvit_cost": self.options.flops_loss_weight * ((cost - target) / c["dense"]).square()}

    def _cost_estimate(self) -> torch.Tensor:
        """The model's cost as the cost term sees it, differentiable in the thresholds.

        ``thresholded`` (the paper's): at ``theta > 0``, with the straight-through gradient of ``sigmoid(theta)``.
        It changes only when a gate crosses zero, so until then every gate is pushed the same way, and Adam
        moves each by about its learning rate: the gates fall together and the cost overshoots (a gate race).
        ``expected`` (the default): each gate on with probability ``sigmoid(theta)``, the 3x3 and attention gates
        chained (``P(attention) = sigmoid(theta_3) sigmoid(theta_a)``), so the cost falls as the thresholds move
        and the push fades as it nears the target, where the task gradient decides which gates go.
        """
        c, expected = self.costs, self.options.cost_estimate == "expected"

        def off(gates: torch.Tensor) -> torch.Tensor:
            """How many of these units the estimate counts as removed."""
            gates = gates.double()
            return (1 - (torch.sigmoid(gates) if expected else _thresholded(gates))).sum()

        total = torch.zeros((), dtype=torch.float64, device=self.search[0].kernel_gates.device)
        for i, state in enumerate(self.search):
            if expected and self.searched[i]:
                p = torch.sigmoid(state.kernel_gates.double())
                g3, ga = p[0], p[0] * p[1]
            else:
                g3, ga = (x.double() for x in self._gates(i, state, training=False))
            change = c["deltas"][i]
            if len(change) > 1:
                total = total + g3 * (1 - ga) * change["conv3x3"] + (1 - g3) * (1 - ga) * change["conv1x1"]
            if self.options.gate_neurons:
                total = total - off(state.neuron_gates) * c["neuron"][i]
            if self.options.gate_heads and c["heads"][i] > 0:  # a head saves only while the layer stays attention
                total = total - ga * off(state.head_gates) * c["head"][i]
        return total + c["dense"]

    def parameter_groups(self) -> list[dict]:
        arch = [p for state in self.search
                for p in (state.kernel_gates, state.mixing, state.neuron_gates, state.head_gates)]
        norms = [p for state in self.search for p in state.norms.parameters()]
        return [{"params": arch, "lr": self.options.arch_learning_rate, "weight_decay": 0.0},
                {"params": norms, "weight_decay": 0.0}]

    def before_optimizer_step(self, model: nn.Module) -> None:
        average_over_processes(self.search.parameters(), self.search.buffers())

    def current_types(self) -> list[str]:
        """Each layer's type under the thresholded gates (the fixed ones as fixed), with at least
        ``min_attention_layers`` attention layers: those whose gates are closest to attention stay it."""
        types = []
        for i, state in enumerate(self.search):
            g3, ga = self._gates(i, state, training=False)
            types.append(ATTENTION if bool(ga > 0) else "conv3x3" if bool(g3 > 0) else "conv1x1")
        missing = self.options.min_attention_layers - types.count(ATTENTION)
        if missing > 0:
            candidates = [i for i, t in enumerate(types) if t != ATTENTION and self.searched[i]]
            candidates.sort(key=lambda i: (-self._closeness(i), i))
            for i in candidates[:missing]:
                types[i] = ATTENTION
        return types

    def log_values(self) -> dict[str, float]:
        if self.search is None:
            return {}
        types = self.current_types()
        logs = dict(self._logs, spvit_conv_layers=float(sum(t != ATTENTION for t in types)))
        if self.options.gate_neurons:
            logs["spvit_open_neurons"] = float(sum(int((s.neuron_gates > 0).sum()) for s in self.search))
        if self.options.gate_heads:
            logs["spvit_open_heads"] = float(sum(int((s.head_gates > 0).sum()) for s, t, h in
                                                 zip(self.search, types, self.costs["heads"]) if t == ATTENTION and h))
        return logs

    # ------------------------------------------------------------------ the end of the search

    def finalize(self, model) -> PruningPlan:
        """Convert the chosen layers into convolutions, then choose the neurons that meet the budget exactly."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self.types = self._fitted(self.current_types())
        self.searching = False
        converted = {i: t for i, t in enumerate(self.types) if t != ATTENTION}
        with torch.no_grad():
            mixing = {i: self.mixing_of(self.search[i]) for i in converted}
            norms = {i: self.search[i].norms[t] for i, t in converted.items()}
            convert_attention(model, converted, mixing=mixing, norms=norms)
        dense = self.costs["dense"]
        now = self.budget.measure(model_stats(model))
        remaining = 1 - (1 - self.budget.fraction) * dense / now
        o = self.options
        if not (o.gate_neurons or o.gate_heads):
            return PruningPlan()
        layers = find_encoder_layers(model)  # converted layers have no heads
        neurons = [state.neuron_gates.detach().cpu().double() for state in self.search] if o.gate_neurons else None
        heads = [state.head_gates.detach().cpu().double()[:layer.num_heads] for state, layer in zip(self.search, layers)
                 ] if o.gate_heads else None
        if remaining <= 0:  # the layer types alone meet the budget: drop the units whose gates closed
            def open_units(scores: list[torch.Tensor], floor: int) -> dict[int, list[int]]:
                return {i: sorted(int(n) for n in torch.argsort(-score, stable=True)[:max(int((score > 0).sum()),
                                                                                          min(floor, len(score)))])
                        for i, score in enumerate(scores) if len(score)}
            return PruningPlan(neurons=open_units(neurons, o.min_neurons_per_layer) if neurons else {},
                               heads=open_units(heads, o.min_heads_per_layer) if heads else {})
        return select_plan(model, head_scores=heads, neuron_scores=neurons,
                           budget=Budget(self.budget.metric, remaining), prune_heads=o.gate_heads,
                           prune_neurons=o.gate_neurons,
                           min_heads_per_layer=o.min_heads_per_layer, min_neurons_per_layer=o.min_neurons_per_layer)

    def _fitted(self, types: list[str]) -> list[str]:
        """``types`` adjusted so that the neuron selection can meet the budget exactly.

        Searched layers move one step at a time (attention -> 3x3 -> 1x1 or back), in the order of their gates:
        toward convolutions, the layers furthest from attention first, while even the fewest neurons would leave
        the model above the budget (keeping ``min_attention_layers``); toward attention, the closest first,
        while every neuron would leave it below.
        """
        target = (1 - self.budget.fraction) * self.costs["dense"]
        types = list(types)
        searched = [i for i in range(len(types)) if self.searched[i]]
        smaller = {ATTENTION: "conv3x3", "conv3x3": "conv1x1"}
        for i in sorted(searched, key=lambda i: (self._closeness(i), i)):
            while self._cost(types, fewest_neurons=True) > target and types[i] in smaller:
                if types[i] == ATTENTION and types.count(ATTENTION) <= self.options.min_attention_layers:
                    break
                types[i] = smaller[types[i]]
        for i in sorted(searched, key=lambda i: (-self._closeness(i), i)):
            while types[i] != ATTENTION and self._cost(types, fewest_neurons=False) < target:
                larger = types[:i] + ["conv3x3" if types[i] == "conv1x1" else ATTENTION] + types[i + 1:]
                if self._cost(larger, fewest_neurons=True) > target:  # then no neuron selection could meet the budget
                    break
                types = larger
        return types

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, torch.Tensor]:
        if not self.searching:
            return {f"{PREFIX}types": torch.tensor([TYPE_CODES[t] for t in self.types], dtype=torch.int64)}
        if self.search is None:
            return {}
        tensors = {f"{PREFIX}search.{k}": v.detach().clone() for k, v in self.search.state_dict().items()}
        tensors[f"{PREFIX}generator"] = self.generator.get_state()
        return tensors

    def load_state_dict(self, state: dict[str, torch.Tensor], model) -> None:
        own = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
        if not own:
            return
        if "types" in own:  # fine-tuning: give the dense model the converted layers (their weights load next)
            self.types = [LAYER_TYPES[code] for code in own["types"].tolist()]
            self.searching = False
            convert_attention(model, {i: t for i, t in enumerate(self.types) if t != ATTENTION})
            return
        self.budget = self.config.budget
        self._build(model)
        self.search.load_state_dict({k[len("search."):]: v for k, v in own.items() if k.startswith("search.")})
        self.generator.set_state(own["generator"])

    # ------------------------------------------------------------------ the card

    def card_recipe(self) -> list[str]:
        o = self.options
        lines = [
            f"Schedule: a single-path search over attention, 3x3 and 1x1 convolutions sharing the attention's "
            f"value/output projections{' and over the MLP neurons' if o.gate_neurons else ''} for the first "
            f"{o.search_fraction:.0%} of the optimizer steps (loss: classification + {o.flops_loss_weight:g} x the "
            f"squared relative gap to the target cost; gates at learning rate {o.arch_learning_rate:g}), then the "
            f"chosen layers became convolutions, the neurons were chosen to meet the budget exactly, and the model "
            f"was fine-tuned.",
        ]
        if self.types is not None:
            layer_map = ", ".join(f"{i}: {t}" for i, t in enumerate(self.types))
            lines.append(f"Layer map: {layer_map}.")
        return lines

    def card_info(self) -> dict:
        info = super().card_info()
        if self.types is not None:
            info["details"] = {"layer_map": list(self.types)}
        o = self.options
        layers = "attention layers turned into convolutions, heads and all (at least "
        layers += f"{o.min_attention_layers} stay{'s' if o.min_attention_layers == 1 else ''} attention)"
        heads = f"the heads of the other layers (at least {o.min_heads_per_layer} per layer)" if o.gate_heads else None
        neurons = f"MLP neurons (at least {o.min_neurons_per_layer} per layer)" if o.gate_neurons else None
        parts = [part for part in (layers, heads, neurons) if part]
        info["units"] = " and ".join([", ".join(parts[:-1]), parts[-1]] if len(parts) > 1 else parts)
        return info

    def citations(self) -> list[dict[str, str]]:
        return [SPVIT_CONV_CITATION]
