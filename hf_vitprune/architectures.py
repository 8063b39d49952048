"""Where the prunable units of a vision transformer live, found by structure.

An encoder layer is any module that holds an attention block with ``q_proj``/``k_proj``/
``v_proj``/``o_proj`` and an MLP (``fc1``/``fc2``, or ``gate_proj``/``up_proj``/``down_proj``
for SwiGLU). Families are registered in :data:`FAMILIES`; adding one is one entry.

What can be pruned inside a layer is registered in :data:`UNIT_KINDS` (heads and MLP neurons):
each :class:`UnitKind` says which weight slices a unit owns, what it costs and how it is cut
out, so plans, statistics, budgets, surgery and the pruned config never name a kind themselves.

This module imports only torch and transformers: it is copied next to saved models so that
``from_pretrained(..., trust_remote_code=True)`` can rebuild them without hf_vitprune.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
# (input projections whose output rows are the units, output projection whose input columns are)
MLP_LAYOUTS = ((("fc1",), "fc2"), (("gate_proj", "up_proj"), "down_proj"))
TOKEN_PARAMETERS = ("cls_token", "distillation_token", "register_tokens")


@dataclass(frozen=True)
class Family:
    """A supported model family: its stock model type and the classes hf_vitprune can prune."""

    model_type: str
    model_classes: tuple[str, ...]

    @property
    def pruned_model_type(self) -> str:
        return f"pruned_{self.model_type}"


FAMILIES: dict[str, Family] = {
    family.model_type: family
    for family in (
        Family("vit", ("ViTModel", "ViTForImageClassification")),
        Family("deit", ("DeiTModel", "DeiTForImageClassification", "DeiTForImageClassificationWithTeacher")),
        Family("vit_msn", ("ViTMSNModel", "ViTMSNForImageClassification")),
        Family("beit", ("BeitModel", "BeitForImageClassification")),
        Family("dinov2", ("Dinov2Model", "Dinov2ForImageClassification")),
    )
}


def supported_models_text() -> str:
    return "; ".join(f"{f.model_type}: {', '.join(f.model_classes)}" for f in FAMILIES.values())


def model_class(model: nn.Module) -> type:
    """The model's own class: FSDP2's ``fully_shard`` swaps in a subclass named ``FSDP<Class>``."""
    from torch.distributed.fsdp import FSDPModule

    return next(cls for cls in type(model).__mro__ if not issubclass(cls, FSDPModule))


def family_of(model: nn.Module) -> Family:
    """The registered family of ``model`` (dense or already pruned), or a ValueError listing the supported ones."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    stock_type = model_type[len("pruned_") :] if model_type and model_type.startswith("pruned_") else model_type
    family = FAMILIES.get(stock_type)
    class_name = model_class(model).__name__
    stock_class = class_name[len("Pruned") :] if class_name.startswith("Pruned") else class_name
    if family is None or stock_class not in family.model_classes:
        raise ValueError(
            f"hf_vitprune cannot prune {class_name} (model_type={model_type!r}). Supported models are "
            f"{supported_models_text()}. To add a family, register it in hf_vitprune.architectures.FAMILIES."
        )
    return family


@dataclass
class EncoderLayer:
    """Handles on the prunable parts of one encoder layer.

    A head is ``head_dim`` output rows of q/k/v and the same input columns of o_proj (plus a
    column of the relative position bias table where there is one); an MLP neuron is an
    output row of each input projection and an input column of the output projection.
    """

    index: int
    module: nn.Module
    attention: nn.Module
    mlp: nn.Module
    mlp_in_names: tuple[str, ...]
    mlp_out_name: str

    @property
    def head_dim(self) -> int:
        return int(self.attention.head_dim)

    @property
    def is_convolution(self) -> bool:
        """Whether the attention was turned into a convolution (``hf_vitprune.convolution.ConvMixer``): no heads."""
        return bool(getattr(self.attention, "is_convolution", False))

    @property
    def num_heads(self) -> int:
        if self.is_convolution:
            return 0
        return self.attention.o_proj.in_features // self.head_dim

    @property
    def num_neurons(self) -> int:
        return self.mlp_out.in_features

    @property
    def mlp_in(self) -> list[nn.Linear]:
        return [getattr(self.mlp, name) for name in self.mlp_in_names]

    @property
    def mlp_out(self) -> nn.Linear:
        return getattr(self.mlp, self.mlp_out_name)

    @property
    def attention_scale(self) -> torch.Tensor | None:
        """The per-channel layer scale on the attention branch's output (DINOv2 ``layer_scale1``, BEiT ``lambda_1``)."""
        return _layer_scale(self.module, "layer_scale1", "lambda_1")

    @property
    def mlp_scale(self) -> torch.Tensor | None:
        """The per-channel layer scale on the MLP branch's output (DINOv2 ``layer_scale2``, BEiT ``lambda_2``)."""
        return _layer_scale(self.module, "layer_scale2", "lambda_2")

    @property
    def position_bias(self) -> nn.Module | None:
        """The layer's own relative position bias (BEiT), a table of shape (distances, heads)."""
        return getattr(self.module, "relative_position_bias", None)


def _layer_scale(layer: nn.Module, module_name: str, parameter_name: str) -> torch.Tensor | None:
    scale = getattr(getattr(layer, module_name, None), "lambda1", None)
    if scale is None:
        scale = getattr(layer, parameter_name, None)
    return scale if isinstance(scale, torch.Tensor) else None


def mlp_layout(mlp: nn.Module) -> tuple[tuple[str, ...], str] | None:
    for in_names, out_name in MLP_LAYOUTS:
        if all(isinstance(getattr(mlp, n, None), nn.Linear) for n in (*in_names, out_name)):
            return in_names, out_name
    return None


def _as_encoder_layer(index: int, layer: nn.Module) -> EncoderLayer | None:
    attention = getattr(layer, "attention", None)
    mlp = getattr(layer, "mlp", None)
    if attention is None or mlp is None:
        return None
    if not all(isinstance(getattr(attention, n, None), nn.Linear) for n in ("o_proj",)):
        return None
    layout = mlp_layout(mlp)
    if layout is None or not hasattr(attention, "head_dim"):
        return None
    return EncoderLayer(index, layer, attention, mlp, *layout)


def find_encoder_layers(model: nn.Module) -> list[EncoderLayer]:
    """The encoder layers of ``model``, in order, found by structure rather than class names."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            layers = [_as_encoder_layer(i, layer) for i, layer in enumerate(module)]
            if all(layer is not None for layer in layers):
                return layers
    raise ValueError(
        f"No encoder layers with attention (q_proj/k_proj/v_proj/o_proj) and an MLP (fc1/fc2 or "
        f"gate_proj/up_proj/down_proj) were found in {type(model).__name__}."
    )


def find_shared_position_bias(model: nn.Module) -> tuple[nn.Module, str] | None:
    """(parent, attribute) of a relative position bias shared by all layers (BEiT), if any."""
    for module in model.modules():
        if getattr(module, "shared_position_bias", None) is not None:
            return module, "shared_position_bias"
    return None


# The resolution a model is run at, when it differs from config.image_size (set_input_size).
INPUT_SIZE_ATTRIBUTE = "hf_vitprune_input_size"


def set_input_size(model: nn.Module, height: int, width: int) -> None:
    """Cost ``model`` at ``height`` x ``width`` images instead of its config's ``image_size``.

    DINOv2 checkpoints record ``image_size=518`` (their pre-training resolution) but are run at
    224 and interpolate their position embeddings, so the configured resolution would count 1370
    tokens where the model sees 257. ``PruningTrainer`` calls this with its training images' size.
    """
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"set_input_size: {name}={value!r} must be a positive integer (pixels).")
    setattr(model, INPUT_SIZE_ATTRIBUTE, (height, width))


def num_patches(model: nn.Module) -> int:
    """Patches per image, at the configured resolution or the one given to :func:`set_input_size`."""
    patch_embeddings = embeddings_module(model).patch_embeddings
    size = getattr(model, INPUT_SIZE_ATTRIBUTE, None)
    if size is None:
        return int(patch_embeddings.num_patches)
    patch = patch_embeddings.patch_size
    patch_h, patch_w = (patch, patch) if isinstance(patch, int) else patch
    return (size[0] // patch_h) * (size[1] // patch_w)


def num_tokens(model: nn.Module) -> int:
    """Tokens per image: :func:`num_patches` plus the class/distillation/register tokens."""
    module = embeddings_module(model)
    extra = sum(
        getattr(module, name).shape[1] for name in TOKEN_PARAMETERS if isinstance(getattr(module, name, None), torch.Tensor)
    )
    return num_patches(model) + int(extra)


def embeddings_module(model: nn.Module) -> nn.Module:
    """The module holding ``patch_embeddings`` (and the tokens and position embeddings)."""
    for module in model.modules():
        if hasattr(getattr(module, "patch_embeddings", None), "projection"):
            return module
    raise ValueError(f"{type(model).__name__} has no patch embeddings with a projection; its width cannot be pruned.")


def embedding_width(model: nn.Module) -> int:
    """The residual stream's width: the patch embedding's output channels."""
    return int(embeddings_module(model).patch_embeddings.projection.out_channels)


def layer_tokens(model: nn.Module) -> list[int]:
    """Tokens each encoder layer sees, in layer order: all :func:`num_tokens`, or fewer after the stages of a
    token path (``hf_vitprune.tokens.TokenPruning``, found by its ``tokens_per_layer``)."""
    layers = len(find_encoder_layers(model))
    for module in model.modules():
        if callable(getattr(module, "tokens_per_layer", None)):
            return module.tokens_per_layer(num_tokens(model), layers)
    return [num_tokens(model)] * layers


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every tensor on the meta device: its shapes, without copying a weight."""
    return copy_with_tensors(model, lambda t: nn.Parameter(torch.empty_like(t, device="meta"),
                                                           requires_grad=t.requires_grad))


def copy_with_tensors(model: nn.Module, parameter: Callable[[nn.Parameter], nn.Parameter]) -> nn.Module:
    """A copy of ``model`` whose parameters are ``parameter(p)`` of its own, its buffers on the meta device,
    and no hooks (a hook may hold a search's live state, which is not ours to copy)."""
    memo = {id(t): parameter(t) for t in model.parameters()}
    memo.update({id(t): torch.empty_like(t, device="meta") for t in model.buffers()})
    for module in model.modules():
        for name, value in vars(module).items():
            if name.endswith("hooks") and isinstance(value, dict):
                memo[id(value)] = type(value)()
    return copy.deepcopy(model, memo)


# --------------------------------------------------------------------------- compaction


def sliced_linear(linear: nn.Linear, rows: torch.Tensor | None, cols: torch.Tensor | None) -> nn.Linear:
    """A new Linear holding the ``rows`` (outputs, with their bias) and ``cols`` (inputs) of ``linear``."""
    weight = linear.weight.detach()
    if rows is not None:
        weight = weight.index_select(0, rows.to(weight.device))
    if cols is not None:
        weight = weight.index_select(1, cols.to(weight.device))
    bias = linear.bias
    if bias is not None and rows is not None:
        bias = bias.detach().index_select(0, rows.to(bias.device))
    with warnings.catch_warnings():  # a fully pruned branch has zero-size weights; nothing to initialise
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    new.weight = nn.Parameter(weight.clone(), requires_grad=linear.weight.requires_grad)
    if bias is not None:
        new.bias = nn.Parameter(bias.detach().clone(), requires_grad=linear.bias.requires_grad)
    return new


def _index(units: Sequence[int]) -> torch.Tensor:
    return torch.as_tensor(list(units), dtype=torch.long)


def _head_rows(heads: Sequence[int], head_dim: int) -> torch.Tensor:
    index = _index(heads).reshape(-1, 1) * head_dim
    return (index + torch.arange(head_dim)).reshape(-1)


class AttentionRemoved(nn.Module):
    """Stands in for an attention block whose every head was pruned: only o_proj's bias remains.

    Keeps the (out_features, 0) ``o_proj`` so that state-dict keys and the bias survive.
    """

    def __init__(self, o_proj: nn.Linear, head_dim: int):
        super().__init__()
        self.o_proj = o_proj
        self.head_dim = head_dim

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, None]:
        return self.o_proj(hidden_states[..., :0]), None


# --------------------------------------------------------------------------- unit kinds

Slices = Iterator[tuple[torch.Tensor, str]]


@dataclass(frozen=True)
class UnitKind:
    """One kind of prunable unit of an encoder layer, and everything the package needs to know about it.

    ``parameters`` yields the tensors holding the layer's units with their layout: ``'rows'``
    (units are consecutive equal row blocks), ``'columns'`` (consecutive equal column blocks)
    or ``'table'`` (one column per unit); importance criteria reduce over exactly these, and the
    layer's other parameters are its fixed cost. ``params_per_unit(layer, shared_bias_rows)``
    must equal what one unit owns there (plus a column of a shared bias table copied into the
    layer at compaction, for heads). ``flops_per_unit(layer, tokens)`` counts the matrix products
    a unit takes part in for ``tokens`` tokens. ``compact(layer, kept)`` slices the layer in
    place to the ``kept`` units. ``gate(layer)``, if given, names the module whose input holds
    the units' channels (consecutive, ``channels`` each) so that training-time masks can gate them.

    Kinds own disjoint slices: a layer's cost is its fixed part plus, per kind, count times unit
    cost, which is what lets budgets be exact. A kind cutting across another's slices (head dims
    across heads) sets ``linear_cost=False``: it owns no slice and reports zero unit cost, its
    effect shows in the other kind's unit costs (which read the current shapes), budgets cannot
    select it, and ``model_stats`` costs a plan that changes it from the compacted shapes.
    ``output_gates(layer)``, if given, returns ``(modules, copies)``: modules whose *output*
    channels hold the units, the unit pattern tiled ``copies`` times (a head-dim channel in
    every head of q, k and v).
    ``default(config)``, if given, is the count every layer has unless pruned; a kind whose
    layers all have it is not recorded in ``per_layer_config`` nor listed in statistics.
    """

    name: str  # plural; the PruningPlan field / JSON key and the score key, e.g. "heads"
    singular: str  # "head"
    label: str  # how error messages name the units, e.g. "MLP neurons"
    config_key: str  # the per_layer_config attribute recording each layer's count
    allow_empty: str  # the PruningPlan flag that lets a layer keep none of them
    count: Callable[[EncoderLayer], int]
    parameters: Callable[[EncoderLayer], Slices]
    params_per_unit: Callable[[EncoderLayer, int], int]
    flops_per_unit: Callable[[EncoderLayer, int], int]
    compact: Callable[[EncoderLayer, Sequence[int]], None]
    gate: Callable[[EncoderLayer], tuple[nn.Module, int]] | None = None
    output_gates: Callable[[EncoderLayer], tuple[tuple[nn.Module, ...], int]] | None = None
    linear_cost: bool = True
    default: Callable[[object], int] | None = None


UNIT_KINDS: dict[str, UnitKind] = {}
BUILTIN_UNIT_KINDS = ("heads", "neurons")  # PruningPlan fields of their own


def register_unit_kind(kind: UnitKind) -> UnitKind:
    """Add ``kind`` after the registered ones (registry order is the budget's tie-break order)."""
    if not isinstance(kind, UnitKind):
        raise ValueError(f"register_unit_kind expects a UnitKind, got {type(kind).__name__}.")
    taken = {}
    for other in UNIT_KINDS.values():
        taken.update({other.name: other.name, other.config_key: other.name, other.allow_empty: other.name})
    for value in (kind.name, kind.config_key, kind.allow_empty):
        if value in taken:
            raise ValueError(
                f"Unit kind {kind.name!r} reuses {value!r}, already used by unit kind {taken[value]!r}; names, "
                f"config keys and allow-empty flags must all be distinct."
            )
    if len({kind.name, kind.config_key, kind.allow_empty}) != 3:
        raise ValueError(f"Unit kind {kind.name!r} must have a name, config key and allow-empty flag that differ.")
    UNIT_KINDS[kind.name] = kind
    return kind


def unregister_unit_kind(name: str) -> None:
    """Remove a kind added with :func:`register_unit_kind` (heads and neurons are built in)."""
    if name in (*BUILTIN_UNIT_KINDS, "head_dims"):
        raise ValueError(f"Unit kind {name!r} is built in and cannot be unregistered.")
    if name not in UNIT_KINDS:
        raise ValueError(f"No unit kind {name!r} is registered; registered kinds are {list(UNIT_KINDS)}.")
    del UNIT_KINDS[name]


def unit_kind(name: str) -> UnitKind:
    """The registered kind called ``name``, or a ValueError listing the registered ones."""
    if name not in UNIT_KINDS:
        raise ValueError(f"Unknown unit kind {name!r}; registered kinds are {list(UNIT_KINDS)}.")
    return UNIT_KINDS[name]


def compact_units(layer: EncoderLayer, kept: Mapping[str, Sequence[int]]) -> None:
    """Keep only ``kept[kind]`` (indices into the current layer) of each named kind, in registry order."""
    unknown = sorted(set(kept) - set(UNIT_KINDS))
    if unknown:
        raise ValueError(f"Unknown unit kinds {unknown}; registered kinds are {list(UNIT_KINDS)}.")
    for kind in UNIT_KINDS.values():
        if kind.name in kept:
            kind.compact(layer, kept[kind.name])


def compact_layer(layer: EncoderLayer, heads: Sequence[int], neurons: Sequence[int]) -> None:
    """Keep only ``heads`` and ``neurons`` (indices into the current layer) by slicing weights in place."""
    compact_units(layer, {"heads": heads, "neurons": neurons})


# heads: head_dim rows of q/k/v, the same input columns of o_proj, a column of the layer's own
# relative position bias table (BEiT). o_proj's bias belongs to no head.


def _head_parameters(layer: EncoderLayer) -> Slices:
    if layer.is_convolution:  # no heads: the convolution is the layer's fixed part
        return
    attention = layer.attention
    for name in ATTENTION_PROJECTIONS[:3]:
        linear = getattr(attention, name, None)  # an AttentionRemoved block has only o_proj
        if linear is None:
            continue
        yield linear.weight, "rows"
        if linear.bias is not None:
            yield linear.bias, "rows"
    yield attention.o_proj.weight, "columns"
    bias = layer.position_bias
    table = getattr(bias, "relative_position_bias_table", None) if bias is not None else None
    if isinstance(table, torch.Tensor):
        yield table, "table"


def _head_params(layer: EncoderLayer, shared_bias_rows: int) -> int:
    attention, head_dim = layer.attention, layer.head_dim
    width = attention.o_proj.out_features
    per_head = width * head_dim
    for name in ATTENTION_PROJECTIONS[:3]:
        proj = getattr(attention, name, None)
        in_features = proj.in_features if proj is not None else width
        per_head += head_dim * in_features + (head_dim if proj is not None and proj.bias is not None else 0)
    bias = layer.position_bias
    return per_head + (bias.relative_position_bias_table.shape[0] if bias is not None else shared_bias_rows)


def _head_flops(layer: EncoderLayer, tokens: int) -> int:
    """q, k, v and o projections of the head's channels, plus its QK^T and AV products."""
    width, head_dim = layer.attention.o_proj.out_features, layer.head_dim
    return 2 * tokens * 4 * width * head_dim + 2 * 2 * tokens * tokens * head_dim


def _keep_attention_channels(attention: nn.Module, rows: torch.Tensor) -> None:
    """Keep ``rows`` of q/k/v (outputs) and the same input columns of o_proj."""
    for name in ATTENTION_PROJECTIONS[:3]:
        if hasattr(attention, name):  # an AttentionRemoved block has only o_proj
            setattr(attention, name, sliced_linear(getattr(attention, name), rows, None))
    attention.o_proj = sliced_linear(attention.o_proj, None, rows)


def _compact_heads(layer: EncoderLayer, heads: Sequence[int]) -> None:
    if layer.is_convolution:  # it has no heads to keep or drop
        return
    attention, head_dim = layer.attention, layer.head_dim
    _keep_attention_channels(attention, _head_rows(heads, head_dim))
    if hasattr(attention, "num_attention_heads"):
        attention.num_attention_heads = len(heads)
    bias = layer.position_bias
    if bias is not None:
        if heads:
            table = bias.relative_position_bias_table.detach()
            bias.relative_position_bias_table = nn.Parameter(
                table.index_select(1, _index(heads).to(table.device)).clone()
            )
        else:
            layer.module.relative_position_bias = None
    if not heads and not isinstance(attention, AttentionRemoved):
        layer.module.attention = AttentionRemoved(attention.o_proj, head_dim)
        layer.attention = layer.module.attention


# neurons: a row of every MLP input projection (with its bias) and a column of the output
# projection, whose bias belongs to no neuron.


def _neuron_parameters(layer: EncoderLayer) -> Slices:
    for linear in layer.mlp_in:
        yield linear.weight, "rows"
        if linear.bias is not None:
            yield linear.bias, "rows"
    yield layer.mlp_out.weight, "columns"


def _neuron_params(layer: EncoderLayer, shared_bias_rows: int) -> int:
    return sum(p.in_features + (1 if p.bias is not None else 0) for p in layer.mlp_in) + layer.mlp_out.out_features


def _neuron_flops(layer: EncoderLayer, tokens: int) -> int:
    """One output of each input projection and one input of the output projection, per token."""
    return 2 * tokens * (len(layer.mlp_in) + 1) * layer.attention.o_proj.out_features


def _compact_neurons(layer: EncoderLayer, neurons: Sequence[int]) -> None:
    units = _index(neurons)
    for name in layer.mlp_in_names:
        setattr(layer.mlp, name, sliced_linear(getattr(layer.mlp, name), units, None))
    setattr(layer.mlp, layer.mlp_out_name, sliced_linear(layer.mlp_out, None, units))


register_unit_kind(
    UnitKind(
        name="heads",
        singular="head",
        label="heads",
        config_key="num_attention_heads",
        allow_empty="allow_empty_attention",
        count=lambda layer: layer.num_heads,
        parameters=_head_parameters,
        params_per_unit=_head_params,
        flops_per_unit=_head_flops,
        compact=_compact_heads,
        gate=lambda layer: (layer.attention.o_proj, layer.head_dim),
    )
)
register_unit_kind(
    UnitKind(
        name="neurons",
        singular="neuron",
        label="MLP neurons",
        config_key="intermediate_size",
        allow_empty="allow_empty_mlp",
        count=lambda layer: layer.num_neurons,
        parameters=_neuron_parameters,
        params_per_unit=_neuron_params,
        flops_per_unit=_neuron_flops,
        compact=_compact_neurons,
        gate=lambda layer: (layer.mlp_out, 1),
    )
)


# head dims: channel c of every head of a layer, cut from q, k and v alike (so q/k width = v
# width) and from o_proj's matching input columns. The attention keeps its scaling (that of the
# dense head_dim): the logits then equal the dense model's with those channels zeroed.


def dense_head_dim(config) -> int:
    """The head_dim a config's layers are built with (an explicit ``head_dim``, else hidden / heads)."""
    head_dim = getattr(config, "head_dim", None)
    return int(head_dim) if head_dim else config.hidden_size // config.num_attention_heads


def _head_dim_rows(layer: EncoderLayer, channels: Sequence[int]) -> torch.Tensor:
    """The q/k/v rows (and o_proj columns) of ``channels`` in every head of ``layer``."""
    starts = torch.arange(layer.num_heads).reshape(-1, 1) * layer.head_dim
    return (starts + _index(channels)).reshape(-1)


def _compact_head_dims(layer: EncoderLayer, channels: Sequence[int]) -> None:
    attention = layer.attention
    if layer.is_convolution:  # a convolution's head dims are its channels
        _compact_conv_channels(attention, _index(channels))
        return
    _keep_attention_channels(attention, _head_dim_rows(layer, channels))
    attention.head_dim = len(channels)  # attention.scaling stays that of the dense head_dim


def _compact_conv_channels(mixer: nn.Module, channels: torch.Tensor) -> None:
    """Keep ``channels`` of a convolution layer: its kernels and bias, BatchNorm, and the projection's inputs."""
    conv, norm = mixer.conv, mixer.norm
    channels = channels.to(conv.weight.device)
    new = nn.Conv2d(conv.in_channels, len(channels), conv.kernel_size, padding=conv.padding, bias=True, device="meta")
    new.weight = nn.Parameter(conv.weight.detach().index_select(0, channels).clone())
    new.bias = nn.Parameter(conv.bias.detach().index_select(0, channels).clone())
    mixer.conv = new
    kept = nn.BatchNorm2d(len(channels), eps=norm.eps, momentum=norm.momentum, device="meta")
    kept.weight = nn.Parameter(norm.weight.detach().index_select(0, channels).clone())
    kept.bias = nn.Parameter(norm.bias.detach().index_select(0, channels).clone())
    for name in ("running_mean", "running_var"):
        setattr(kept, name, getattr(norm, name).index_select(0, channels).clone())
    kept.num_batches_tracked = norm.num_batches_tracked.clone()
    kept.train(norm.training)
    mixer.norm = kept
    mixer.o_proj = sliced_linear(mixer.o_proj, None, channels)


def _head_dim_gates(layer: EncoderLayer) -> tuple[tuple[nn.Module, ...], int]:
    attention = layer.attention
    projections = tuple(getattr(attention, n) for n in ATTENTION_PROJECTIONS[:3] if hasattr(attention, n))
    return projections, layer.num_heads


register_unit_kind(
    UnitKind(
        name="head_dims",
        singular="head_dim",
        label="head dims",
        config_key="head_dim",
        allow_empty="allow_empty_head_dims",
        count=lambda layer: layer.head_dim,
        parameters=lambda layer: iter(()),  # owns no slice of its own: heads own q/k/v/o
        params_per_unit=lambda layer, shared_bias_rows: 0,
        flops_per_unit=lambda layer, tokens: 0,
        compact=_compact_head_dims,
        output_gates=_head_dim_gates,
        linear_cost=False,
        default=dense_head_dim,
    )
)


def unshare_position_bias(model: nn.Module) -> bool:
    """Give every layer its own copy of a shared relative position bias (BEiT); True if one was shared.

    Heads are pruned per layer, so a table shared across layers cannot follow them. The bias is
    gathered linearly from the table, so adding the shared table to a layer's own gives the same
    logits as adding the two biases.
    """
    found = find_shared_position_bias(model)
    if found is None:
        return False
    parent, name = found
    shared = getattr(parent, name)
    for layer in find_encoder_layers(model):
        own = copy.deepcopy(shared)
        if layer.position_bias is not None:
            own.relative_position_bias_table = nn.Parameter(
                own.relative_position_bias_table.detach() + layer.position_bias.relative_position_bias_table.detach()
            )
        layer.module.relative_position_bias = own
    setattr(parent, name, None)
    return True
